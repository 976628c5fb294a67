"""Per-layer DRAM neuron cache with a sliding window ("LLM in a flash", section 3.3).

The FFN of a layer is stored on flash as bundle rows (row i = everything neuron i needs). The cache
keeps in DRAM every neuron wanted in the last `window` tokens, in one preallocated matrix `rows`
whose first `n` rows are live; `kernels.ffn_bundles(h, cache.rows, cache.n, cache.neuron_of_row, ...)`
computes over them in any order. Per token, `step(wanted)`:

1. advances the step counter and stamps `last_used[wanted] = step`;
2. evicts every resident, unpinned neuron not wanted in the last `window` steps (this one included)
   by delete-by-swap-with-last: the last live row's data and index move into the hole, n -= 1
   (no reallocation, no compaction pass);
3. appends the wanted neurons that are not resident at rows n, n+1, ... and returns them as an
   `Admission` so the caller reads them from flash into `rows[dest_rows]`.

If the capacity cannot hold every missing neuron, resident unpinned neurons not wanted now are
evicted least recently used first; whatever still does not fit is returned as `overflow` (the caller
streams those through a scratch buffer). A neuron wanted at the current step is never evicted;
overflow priority follows the order of `wanted` (earlier entries get a cache row first).

Lookahead (runtime/ffn.py's pipeline): `prefetch(guess)` admits an early guess of the next step's
neurons before the step, so their reads start early. It first evicts what the next step would evict
anyway (out of the window by then, not guessed) if the free rows are too few, then appends the guessed
neurons not resident into the free rows, flagged as prefetched: they do not touch `last_used`. The next `step()` confirms those
it wants (a prefetch hit, counted apart from the window's hits) and evicts the others before its own
window eviction, so over-fetched rows never distort the window accounting; it returns only what the
guess missed for reading. The caller must finish reading a prefetch before the next step() moves rows.

Pinned neurons (hot neurons from calibration statistics) are never evicted and count against the
capacity. They are admitted by `load_pinned()` / `pin()`, which return an `Admission` like `step()`.
`reset()` clears everything, pinned rows included (their data is treated as invalid), and sets
`needs_pinned_load`; `step()` refuses to run until the caller has called `load_pinned()` and read
the rows it names.

The bookkeeping loops are numba kernels over plain arrays; `NeuronCache` is a thin wrapper.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .aligned import aligned_empty
from .kernels import kth_smallest

JIT = dict(cache=True, fastmath=True, nogil=True)

NEVER = np.int32(np.iinfo(np.int32).min // 2)   # last_used of a neuron never wanted (no overflow on t - window)
_NO_STEP = -1                                   # a step value no last_used ever holds: protects nothing


# ----------------------------------------------------------------------------------------- kernels
@njit(**JIT)
def _mark(wanted, t, row_of_neuron, last_used, prefetched, missing):
    """last_used[wanted] = t; wanted neurons not resident go to missing[:m] (duplicates dropped).

    Returns (hits, prefetch_hits, m): resident wanted neurons that were not / were admitted by a prefetch."""
    hits = 0
    pref = 0
    m = 0
    for k in range(wanted.shape[0]):
        i = wanted[k]
        if last_used[i] == t:           # already seen at this step
            continue
        last_used[i] = t
        if row_of_neuron[i] >= 0:
            if prefetched[i]:
                pref += 1
            else:
                hits += 1
        else:
            missing[m] = i
            m += 1
    return hits, pref, m


@njit(**JIT)
def _remove_row(r, n, rows, neuron_of_row, row_of_neuron):
    """Delete-by-swap: drop live row r; row n-1's data and index move into the hole. Returns n - 1."""
    last = n - 1
    row_of_neuron[neuron_of_row[r]] = -1
    if r != last:
        moved = neuron_of_row[last]
        for j in range(rows.shape[1]):
            rows[r, j] = rows[last, j]
        neuron_of_row[r] = moved
        row_of_neuron[moved] = r
    neuron_of_row[last] = -1
    return last


@njit(**JIT)
def _evict_window(t, window, n, rows, neuron_of_row, row_of_neuron, last_used, pinned):
    """Evict every live, unpinned neuron with last_used <= t - window. Returns (n, evicted).

    Walks the live rows backwards: rows above r are already known to stay, so the row that
    delete-by-swap moves into a hole never needs a second look."""
    oldest = t - window
    evicted = 0
    for r in range(n - 1, -1, -1):
        i = neuron_of_row[r]
        if not pinned[i] and last_used[i] <= oldest:
            n = _remove_row(r, n, rows, neuron_of_row, row_of_neuron)
            evicted += 1
    return n, evicted


@njit(**JIT)
def _evict_lru(count, t, n, rows, neuron_of_row, row_of_neuron, last_used, pinned, cand, age):
    """Evict up to `count` live, unpinned neurons not wanted at step t, least recently used first
    (ties: the lower row first). cand and age are scratch of the capacity. Returns (n, evicted)."""
    c = 0
    for r in range(n):
        i = neuron_of_row[r]
        if not pinned[i] and last_used[i] != t:
            cand[c] = i
            age[c] = last_used[i]
            c += 1
    k = min(count, c)
    if k <= 0:
        return n, 0
    # The k-th smallest age by selection (no sort, nothing allocated); then every candidate older
    # than it, and as many of its ties as are still needed, in row order.
    kth = kth_smallest(age[:c], k)
    older = 0
    for q in range(c):
        if last_used[cand[q]] < kth:
            older += 1
    ties = k - older
    for q in range(c):
        i = cand[q]
        a = last_used[i]
        if a < kth or (a == kth and ties > 0):
            if a == kth:
                ties -= 1
            n = _remove_row(row_of_neuron[i], n, rows, neuron_of_row, row_of_neuron)
    return n, k


@njit(**JIT)
def _count_missing(wanted, row_of_neuron):
    m = 0
    for k in range(wanted.shape[0]):
        if row_of_neuron[wanted[k]] < 0:
            m += 1
    return m


@njit(**JIT)
def _append(missing, m, n, neuron_of_row, row_of_neuron, dest):
    """missing[:m] take rows n, n+1, ...; dest[:m] gets those rows. Returns the new n."""
    for k in range(m):
        i = missing[k]
        neuron_of_row[n] = i
        row_of_neuron[i] = n
        dest[k] = n
        n += 1
    return n


@njit(**JIT)
def _admit(missing, m, t, n, rows, neuron_of_row, row_of_neuron, last_used, pinned, dest, cand, age):
    """Give rows to missing[:m], evicting LRU unpinned neurons not wanted at step t if short of room.

    The first `fit` of missing get dest[:fit]; missing[fit:m] overflow. Returns (n, fit, lru_evicted)."""
    capacity = rows.shape[0]
    lru = 0
    short = m - (capacity - n)
    if short > 0:
        n, lru = _evict_lru(short, t, n, rows, neuron_of_row, row_of_neuron, last_used, pinned, cand, age)
    fit = min(m, capacity - n)
    n = _append(missing, fit, n, neuron_of_row, row_of_neuron, dest)
    return n, fit, lru


@njit(**JIT)
def _drop_prefetched(ids, k, t, n, rows, neuron_of_row, row_of_neuron, last_used, prefetched):
    """Clear the prefetch flag of ids[:k]; evict those not wanted at step t (over-fetched). Returns (n, dropped)."""
    dropped = 0
    for q in range(k):
        i = ids[q]
        if not prefetched[i]:
            continue
        prefetched[i] = False
        if row_of_neuron[i] >= 0 and last_used[i] != t:
            n = _remove_row(row_of_neuron[i], n, rows, neuron_of_row, row_of_neuron)
            dropped += 1
    return n, dropped


@njit(**JIT)
def _step(wanted, t, window, n, rows, neuron_of_row, row_of_neuron, last_used, pinned, prefetched,
          pref_ids, n_pref, missing, dest, cand, age):
    """One token: mark, drop over-fetched prefetch rows, evict out-of-window, append.

    Returns (n, hits, prefetch_hits, fit, m, window_evicted, lru_evicted, dropped)."""
    hits, pref, m = _mark(wanted, t, row_of_neuron, last_used, prefetched, missing)
    n, dropped = _drop_prefetched(pref_ids, n_pref, t, n, rows, neuron_of_row, row_of_neuron, last_used, prefetched)
    n, evicted = _evict_window(t, window, n, rows, neuron_of_row, row_of_neuron, last_used, pinned)
    n, fit, lru = _admit(missing, m, t, n, rows, neuron_of_row, row_of_neuron, last_used, pinned, dest, cand, age)
    return n, hits, pref, fit, m, evicted, lru, dropped


@njit(**JIT)
def _prefetch(guess, t_next, window, n, rows, neuron_of_row, row_of_neuron, last_used, pinned, prefetched,
              in_guess, missing, dest):
    """Admit guess (the next step's likely neurons) ahead of step t_next: if the free rows are too few,
    evict (as many as lacking) unpinned rows that step would evict unless wanted (last_used <= t_next -
    window) and that are not guessed, then append the guessed neurons not resident into the free rows,
    flagged prefetched. missing[:fit] go to dest[:fit]. Evicting no more than needed keeps rows that the
    step may still want (each one evicted early and wanted costs a read). Returns (n, m, fit, evicted):
    m guessed neurons were not resident, fit of them got a row."""
    m = 0
    for k in range(guess.shape[0]):
        i = guess[k]
        if in_guess[i]:
            continue
        in_guess[i] = True
        if row_of_neuron[i] < 0:
            missing[m] = i
            m += 1
    oldest = t_next - window
    evicted = 0
    short = m - (rows.shape[0] - n)
    for r in range(n - 1, -1, -1):
        if evicted >= short:
            break
        i = neuron_of_row[r]
        if not pinned[i] and not in_guess[i] and last_used[i] <= oldest:
            n = _remove_row(r, n, rows, neuron_of_row, row_of_neuron)
            evicted += 1
    for k in range(guess.shape[0]):
        in_guess[guess[k]] = False
    fit = min(m, rows.shape[0] - n)
    n = _append(missing, fit, n, neuron_of_row, row_of_neuron, dest)
    for k in range(fit):
        prefetched[missing[k]] = True
    return n, m, fit, evicted


# ------------------------------------------------------------------------------------- python side
@dataclass(frozen=True, slots=True)
class Admission:
    """What the caller must read from flash after `step()` / `pin()` / `load_pinned()`, and what the
    step did (the caller keeps the figures: the FFN backend's FFNStats is the one hit counter).

    missing[k] goes into rows[dest_rows[k]] (dest_rows are consecutive); overflow are wanted neurons
    that got no cache row this step (stream them through a scratch buffer). The arrays are views of
    the cache's scratch, valid until its next step()."""
    missing: np.ndarray     # int32 neuron ids
    dest_rows: np.ndarray   # int32 row indices into NeuronCache.rows
    overflow: np.ndarray    # int32 neuron ids
    hits: int = 0           # distinct wanted neurons already resident (not counting a prefetch's rows)
    prefetch_hits: int = 0  # distinct wanted neurons resident because the last prefetch() admitted them
    dropped: int = 0        # rows the last prefetch() admitted that this step did not want (over-fetched)
    evictions: int = 0      # window evictions + LRU (capacity-pressure) evictions
    lru_evictions: int = 0


_EMPTY = np.zeros(0, np.int32)


class NeuronCache:
    """Sliding-window DRAM cache of one layer's FFN bundle rows (see module docstring)."""

    def __init__(self, n_neurons: int, capacity: int, row_elems: int, dtype, *, window: int,
                 pinned: np.ndarray | None = None):
        if n_neurons < 1 or capacity < 1 or row_elems < 1:
            raise ValueError("n_neurons, capacity and row_elems must be >= 1")
        if window < 1:
            raise ValueError("window must be >= 1")
        self.n_neurons = int(n_neurons)
        self.capacity = int(min(capacity, n_neurons))
        self.row_elems = int(row_elems)
        self.window = int(window)
        self.rows = aligned_empty((self.capacity, self.row_elems), dtype)   # direct I/O reads land here
        self.neuron_of_row = np.full(self.capacity, -1, np.int32)
        self.row_of_neuron = np.full(self.n_neurons, -1, np.int32)
        self.last_used = np.full(self.n_neurons, NEVER, np.int32)
        self.is_pinned = np.zeros(self.n_neurons, np.bool_)
        self._missing = np.empty(self.n_neurons, np.int32)   # scratch: a step's missing neurons
        self._dest = np.empty(self.n_neurons, np.int32)
        self._cand = np.empty(self.capacity, np.int32)       # scratch: LRU eviction candidates
        self._age = np.empty(self.capacity, np.int32)
        self.is_prefetched = np.zeros(self.n_neurons, np.bool_)  # admitted by prefetch(), not yet confirmed
        self._pref = np.empty(self.n_neurons, np.int32)        # ... those neurons, in _pref[:_n_pref]
        self._pdest = np.empty(self.n_neurons, np.int32)
        self._n_pref = 0
        self._in_guess = np.zeros(self.n_neurons, np.bool_)
        self._n = 0
        self._t = 0
        self.needs_pinned_load = False
        if pinned is not None and len(pinned):
            self.is_pinned[self._checked(pinned)] = True
            self._check_pinned_fits()
            self.needs_pinned_load = True

    # ---- views
    @property
    def n(self) -> int:
        """Live rows: rows[:n] hold neurons neuron_of_row[:n]."""
        return self._n

    @property
    def step_count(self) -> int:
        return self._t

    @property
    def pinned(self) -> np.ndarray:
        return np.flatnonzero(self.is_pinned).astype(np.int32)

    # ---- operations
    def step(self, wanted: np.ndarray) -> Admission:
        """Admit one token's wanted neurons; the caller then reads `missing` into rows[dest_rows]."""
        if self.needs_pinned_load:
            raise RuntimeError("pinned neurons are not loaded: call load_pinned() and read its rows first")
        wanted = self._checked(wanted)
        self._t += 1
        n, hits, pref, fit, m, evicted, lru, dropped = _step(
            wanted, self._t, self.window, self._n, self.rows, self.neuron_of_row, self.row_of_neuron,
            self.last_used, self.is_pinned, self.is_prefetched, self._pref, self._n_pref, self._missing, self._dest,
            self._cand, self._age)
        self._n, self._n_pref = n, 0
        return Admission(self._missing[:fit], self._dest[:fit], self._missing[fit:m], hits=hits,
                         evictions=evicted + lru, lru_evictions=lru, prefetch_hits=pref, dropped=dropped)

    def prefetch(self, guess: np.ndarray) -> Admission:
        """Admit an early guess of the next step's neurons (see module docstring); the caller reads
        `missing` into rows[dest_rows] and must finish before the next step(). `overflow` lists guessed
        neurons that found no free row (not read early). A prefetch not yet confirmed by a step is
        dropped first."""
        if self.needs_pinned_load:
            raise RuntimeError("pinned neurons are not loaded: call load_pinned() and read its rows first")
        guess = self._checked(guess)
        self.cancel_prefetch()
        n, m, fit, evicted = _prefetch(guess, self._t + 1, self.window, self._n, self.rows, self.neuron_of_row,
                                       self.row_of_neuron, self.last_used, self.is_pinned, self.is_prefetched,
                                       self._in_guess, self._pref, self._pdest)
        self._n, self._n_pref = n, fit
        return Admission(self._pref[:fit], self._pdest[:fit], self._pref[fit:m], evictions=evicted)

    def cancel_prefetch(self) -> int:
        """Evict the rows of a prefetch no step confirmed (e.g. the layer was streamed instead); returns
        how many. Their reads must be finished."""
        n, dropped = _drop_prefetched(self._pref, self._n_pref, _NO_STEP, self._n, self.rows, self.neuron_of_row,
                                      self.row_of_neuron, self.last_used, self.is_prefetched)
        self._n, self._n_pref = n, 0
        return dropped

    def pin(self, neurons: np.ndarray) -> Admission:
        """Add `neurons` to the pinned set and admit every pinned neuron not resident.

        On an empty cache (fresh or after reset()) the pinned neurons land at rows 0..p-1. Clears
        `needs_pinned_load`: the caller must read the returned rows. Unpinned residents are evicted
        (LRU first) if room is needed."""
        neurons = self._checked(neurons)
        was = self.is_pinned[neurons].copy()
        self.is_pinned[neurons] = True
        try:
            self._check_pinned_fits()
        except ValueError:
            self.is_pinned[neurons] = was
            raise
        todo = self.pinned
        todo = todo[self.row_of_neuron[todo] < 0]
        m = len(todo)
        self._missing[:m] = todo
        n, fit, _ = _admit(self._missing, m, _NO_STEP, self._n, self.rows, self.neuron_of_row,
                           self.row_of_neuron, self.last_used, self.is_pinned, self._dest, self._cand, self._age)
        assert fit == m, "pinned neurons must always fit"
        self._n = n
        self.needs_pinned_load = False
        return Admission(todo.astype(np.int32), self._dest[:m].copy(), _EMPTY.copy())

    def load_pinned(self) -> Admission:
        """Admit the pinned set (after construction or reset()); read the returned rows from flash."""
        return self.pin(_EMPTY)

    def reset(self) -> None:
        """Empty the cache, pinned rows included (their data is treated as invalid), and restart the
        step counter; if anything is pinned, `needs_pinned_load` is set: call load_pinned() again."""
        self.neuron_of_row.fill(-1)
        self.row_of_neuron.fill(-1)
        self.last_used.fill(NEVER)
        self.is_prefetched.fill(False)
        self._n = 0
        self._n_pref = 0
        self._t = 0
        self.needs_pinned_load = bool(self.is_pinned.any())

    def count_missing(self, wanted: np.ndarray) -> int:
        """How many of `wanted` are not resident, without changing anything."""
        return int(_count_missing(self._checked(wanted), self.row_of_neuron))

    # ---- helpers
    def _checked(self, neurons) -> np.ndarray:
        a = np.ascontiguousarray(neurons, dtype=np.int32).reshape(-1)
        if a.size and (int(a.min()) < 0 or int(a.max()) >= self.n_neurons):
            raise ValueError(f"neuron ids must be in [0, {self.n_neurons})")
        return a

    def _check_pinned_fits(self) -> None:
        p = int(self.is_pinned.sum())
        if p > self.capacity:
            raise ValueError(f"{p} pinned neurons exceed the capacity {self.capacity}")
