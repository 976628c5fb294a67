"""NeuronCache: bookkeeping invariants, delete-by-swap data movement, LRU pressure, window statistics."""
import mmap

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flashlm.runtime.neuron_cache import Admission, NeuronCache


def _read(cache: NeuronCache, adm: Admission) -> None:
    """The caller's flash read: neuron i's bundle row is filled with the value i."""
    for i, r in zip(adm.missing, adm.dest_rows):
        cache.rows[r] = i


def _resident(cache: NeuronCache) -> set[int]:
    return set(cache.neuron_of_row[:cache.n].tolist())


def _check_structure(cache: NeuronCache) -> None:
    n = cache.n
    assert 0 <= n <= cache.capacity
    live = cache.neuron_of_row[:n]
    assert len(np.unique(live)) == n
    assert (cache.neuron_of_row[n:] == -1).all()
    expect = np.full(cache.n_neurons, -1, np.int32)
    expect[live] = np.arange(n, dtype=np.int32)
    np.testing.assert_array_equal(cache.row_of_neuron, expect)
    # every live row holds its own neuron's payload: delete-by-swap moved data along with the index
    np.testing.assert_array_equal(cache.rows[:n], np.broadcast_to(live[:, None], (n, cache.row_elems)).astype(cache.rows.dtype))


@st.composite
def scenarios(draw):
    n_neurons = draw(st.integers(50, 300))
    capacity = draw(st.one_of(st.integers(10, 40), st.integers(10, n_neurons)))   # often under pressure
    window = draw(st.integers(1, 5))
    pinned = draw(st.lists(st.integers(0, n_neurons - 1), max_size=min(capacity, 12), unique=True))
    span = draw(st.integers(5, n_neurons))                 # a small span gives locality, so hits
    step = st.lists(st.integers(0, span - 1), max_size=min(span, 60))
    steps = draw(st.lists(st.one_of(step, step, step, step, st.none()), min_size=4, max_size=25))  # None = reset
    row_elems = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.uint16, np.float32]))
    return n_neurons, capacity, window, pinned, steps, row_elems, dtype


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_cache_invariants_against_reference(sc):
    n_neurons, capacity, window, pinned, steps, row_elems, dtype = sc
    pinned_set = set(pinned)
    cache = NeuronCache(n_neurons, capacity, row_elems, dtype, window=window,
                        pinned=np.array(pinned, np.int32) if pinned else None)

    def load_pinned():
        assert cache.needs_pinned_load == bool(pinned)
        if pinned:
            with pytest.raises(RuntimeError):
                cache.step(np.zeros(0, np.int32))
        adm = cache.load_pinned()
        assert sorted(adm.missing.tolist()) == sorted(pinned)
        np.testing.assert_array_equal(adm.dest_rows, np.arange(len(pinned)))   # at the start
        assert adm.overflow.size == 0
        _read(cache, adm)

    load_pinned()
    history: list[set[int]] = []      # wanted sets since the last reset
    last: dict[int, int] = {}         # neuron -> last step it was wanted (reference model)
    pressure_free = True              # no step so far needed more than the capacity
    for wanted in steps:
        if wanted is None:
            cache.reset()
            history, last, pressure_free = [], {}, True
            assert cache.n == 0 and cache.step_count == 0
            load_pinned()
            continue
        before = _resident(cache)
        w = set(wanted)
        adm = cache.step(np.array(wanted, np.int32))
        t = cache.step_count
        history.append(w)
        for i in w:
            last[i] = t
        _read(cache, adm)
        _check_structure(cache)

        now = _resident(cache)
        missing, overflow = set(adm.missing.tolist()), set(adm.overflow.tolist())
        assert len(missing) == len(adm.missing) and len(overflow) == len(adm.overflow)
        np.testing.assert_array_equal(adm.dest_rows, cache.row_of_neuron[adm.missing])
        # wanted: resident unless overflowed; hits were resident before; nothing wanted is evicted
        assert w - overflow <= now and not (overflow & now) and overflow <= w
        assert missing == (w - before) - overflow
        hits, misses, over, evs = adm.hits, len(adm.missing), len(adm.overflow), adm.evictions
        assert (hits, misses, over) == (len(w & before), len(missing), len(overflow))
        assert evs == len(before - now)
        assert pinned_set <= now
        window_union = set().union(*history[-window:])
        if capacity >= len(w | pinned_set):
            assert not overflow
        if overflow:                  # only when every evictable row was already given up
            assert cache.n == cache.capacity and now <= w | pinned_set
        # every resident unpinned neuron was wanted within the last `window` steps
        assert now - pinned_set <= window_union
        for i in now - pinned_set:
            assert t - last[i] < window and cache.last_used[i] == last[i]
        # LRU evictions (not explained by the window) took the least recently used, only under pressure
        lru_evicted = {i for i in before - now if i in pinned_set or t - last[i] < window}
        assert not (lru_evicted & (pinned_set | w))
        if lru_evicted:
            assert cache.n == cache.capacity
            kept = [last[i] for i in now - pinned_set - w]
            assert max(last[i] for i in lru_evicted) <= min(kept, default=t)
        # with enough capacity at every step so far, the cache is exactly pinned ∪ window union
        pressure_free &= capacity >= len(pinned_set | window_union)
        if pressure_free:
            assert now == pinned_set | window_union
            assert not lru_evicted
        for name, hit in (("overflow", overflow), ("lru eviction", lru_evicted), ("exact model", pressure_free),
                          ("cache hits", hits), ("window eviction", evs > len(lru_evicted))):
            if hit:
                event(name)


def test_delete_by_swap_explicit():
    c = NeuronCache(10, 5, 2, np.float32, window=2)
    counts = []                                         # (hits, misses, overflow, evictions, lru) per step
    step = c.step

    def counted(w):
        a = step(w)
        counts.append((a.hits, len(a.missing), len(a.overflow), a.evictions, a.lru_evictions))
        return a
    c.step = counted
    a = c.step(np.array([3, 7, 1, 5], np.int32))
    np.testing.assert_array_equal(a.missing, [3, 7, 1, 5])
    np.testing.assert_array_equal(a.dest_rows, [0, 1, 2, 3])
    _read(c, a)
    a = c.step(np.array([7, 5, 2], np.int32))           # window 2: 3 and 1 (step 1) still in
    np.testing.assert_array_equal(a.missing, [2])
    np.testing.assert_array_equal(a.dest_rows, [4])
    _read(c, a)
    np.testing.assert_array_equal(c.neuron_of_row, [3, 7, 1, 5, 2])
    # step 3: 3 and 1 fall out of the window. Backwards walk: row 2 (neuron 1) <- row 4 (neuron 2),
    # then row 0 (neuron 3) <- row 3 (neuron 5); then 9 is appended at row 3.
    a = c.step(np.array([7, 9], np.int32))
    np.testing.assert_array_equal(a.missing, [9])
    np.testing.assert_array_equal(a.dest_rows, [3])
    assert a.overflow.size == 0
    assert c.n == 4
    np.testing.assert_array_equal(c.neuron_of_row, [5, 7, 2, 9, -1])
    np.testing.assert_array_equal(c.row_of_neuron, [-1, -1, 2, -1, -1, 0, -1, 1, -1, 3])
    np.testing.assert_array_equal(c.rows[:3], [[5, 5], [7, 7], [2, 2]])    # data moved with the index
    np.testing.assert_array_equal(c.last_used[[5, 7, 2, 9]], [2, 3, 2, 3])
    assert c.step_count == 3 and tuple(map(sum, zip(*counts))) == (3, 6, 0, 2, 0)


def test_lru_pressure_overflow_and_pinned():
    c = NeuronCache(12, 4, 1, np.uint16, window=8, pinned=np.array([0], np.int32))
    with pytest.raises(RuntimeError):
        c.step(np.array([1], np.int32))
    a = c.load_pinned()
    np.testing.assert_array_equal(a.missing, [0])
    np.testing.assert_array_equal(a.dest_rows, [0])
    _read(c, a)
    for w in ([1, 2], [3], [2]):                         # last_used: 1 -> 1, 3 -> 2, 2 -> 3
        _read(c, c.step(np.array(w, np.int32)))
    assert _resident(c) == {0, 1, 2, 3}
    a = c.step(np.array([4, 5], np.int32))               # full: evict LRU 1 then 3
    _read(c, a)
    assert _resident(c) == {0, 2, 4, 5} and a.overflow.size == 0
    assert a.lru_evictions == 2
    a = c.step(np.array([6, 7, 8, 9, 0], np.int32))      # room for 3 only (0 pinned, hit): 9 overflows
    _read(c, a)
    np.testing.assert_array_equal(a.missing, [6, 7, 8])
    np.testing.assert_array_equal(a.overflow, [9])
    assert _resident(c) == {0, 6, 7, 8}
    _check_structure(c)
    assert (a.hits, len(a.overflow), a.lru_evictions) == (1, 1, 3)
    a = c.step(np.array([9, 6], np.int32))               # 7, 8 not wanted now: LRU makes room for 9
    _read(c, a)
    np.testing.assert_array_equal(a.missing, [9])
    assert 9 in _resident(c) and 6 in _resident(c)
    _check_structure(c)


def test_reset_pin_and_validation():
    c = NeuronCache(20, 6, 3, np.float32, window=3, pinned=np.array([4, 2], np.int32))
    assert c.rows.ctypes.data % mmap.PAGESIZE == 0 and c.rows.flags.writeable
    a = c.load_pinned()
    np.testing.assert_array_equal(np.sort(a.missing), [2, 4])
    _read(c, a)
    a = c.step(np.array([1, 5, 5, 1], np.int32))           # duplicates count once
    _read(c, a)
    assert c.n == 4 and len(a.missing) == 2
    a = c.pin(np.array([5, 9], np.int32))                   # 5 already resident: only 9 is read
    np.testing.assert_array_equal(a.missing, [9])
    _read(c, a)
    np.testing.assert_array_equal(c.pinned, [2, 4, 5, 9])
    with pytest.raises(ValueError):
        c.pin(np.array([10, 11, 12], np.int32))             # 7 pinned > capacity 6
    np.testing.assert_array_equal(c.pinned, [2, 4, 5, 9])
    with pytest.raises(ValueError):
        c.step(np.array([20], np.int32))
    for _ in range(5):
        _read(c, c.step(np.zeros(0, np.int32)))
    assert _resident(c) == {2, 4, 5, 9}                      # 1 aged out, pinned 5 stays
    c.reset()
    assert c.n == 0 and c.needs_pinned_load and c.step_count == 0
    assert (c.row_of_neuron == -1).all()
    a = c.load_pinned()
    np.testing.assert_array_equal(a.missing, [2, 4, 5, 9])
    np.testing.assert_array_equal(a.dest_rows, [0, 1, 2, 3])
    _read(c, a)
    _check_structure(c)
    assert not NeuronCache(20, 6, 3, np.float32, window=3).needs_pinned_load


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_prefetch_reads_early_and_leaves_the_window_accounting_alone(sc, data):
    """A cache that admits an early guess before each step (the lookahead pipeline) against one that
    does not: the same window stamps, the same resident set whenever capacity suffices, every wanted
    neuron resident or overflowed, and nothing read twice for one step; over-fetched rows are evicted."""
    n_neurons, capacity, window, pinned, steps, row_elems, dtype = sc
    make = lambda: NeuronCache(n_neurons, capacity, row_elems, dtype, window=window,
                               pinned=np.array(pinned, np.int32) if pinned else None)
    plain, ahead = make(), make()
    for c in (plain, ahead):
        _read(c, c.load_pinned())
    pressure_free = True
    history: list[set[int]] = []
    for wanted in steps:
        if wanted is None:
            for c in (plain, ahead):
                c.reset()
                _read(c, c.load_pinned())
            history, pressure_free = [], True
            continue
        w = set(wanted)
        # the guess: most of the wanted neurons plus some others
        guess = [i for i in wanted if data.draw(st.booleans())] + data.draw(
            st.lists(st.integers(0, n_neurons - 1), max_size=20))
        before = _resident(ahead)
        pre = ahead.prefetch(np.array(guess, np.int32))
        assert set(pre.missing.tolist()) <= set(guess) - before and ahead.n <= capacity
        _read(ahead, pre)
        _check_structure(ahead)
        guessed = set(pre.missing.tolist())
        a, b = plain.step(np.array(wanted, np.int32)), ahead.step(np.array(wanted, np.int32))
        _read(plain, a)
        _read(ahead, b)
        _check_structure(ahead)
        history.append(w)
        np.testing.assert_array_equal(plain.last_used, ahead.last_used)   # over-fetched rows stamp nothing
        got = set(b.missing.tolist())
        assert not got & guessed, "a row the guess read was read again"
        assert b.prefetch_hits == len(w & guessed) and b.dropped == len(guessed - w)
        assert b.hits + b.prefetch_hits + len(b.missing) + len(b.overflow) == len(w)
        now = _resident(ahead)
        assert w - set(b.overflow.tolist()) <= now and not (guessed - w) & now
        assert not ahead.is_prefetched.any()
        pressure_free &= capacity >= len(set(pinned) | set().union(*history[-window:]) | set(guess))
        if pressure_free:             # (under LRU pressure the two caches' contents may part ways)
            assert now == _resident(plain)
            assert b.hits <= a.hits and b.hits + b.prefetch_hits >= a.hits - len(w - set(guess))
    # a prefetch that no step confirms is undone
    pre = ahead.prefetch(np.arange(min(5, n_neurons), dtype=np.int32))
    _read(ahead, pre)
    assert ahead.cancel_prefetch() == len(pre.missing)
    _check_structure(ahead)
