"""FlashReader returns exactly the file's bytes for any row set, in both modes, and counts its I/O honestly.

The fake bundle file is random bytes with layers at 4096-aligned offsets and random filler between them,
so reading a wrong row, a neighbour layer or alignment padding shows up as a byte mismatch. The last
layer ends the file at a size that is not a multiple of 4096, which exercises the short read at EOF.
"""
from __future__ import annotations

import errno
import mmap
import os
import pathlib
import shutil
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashlm.runtime.aligned import BLOCK, aligned_empty
from flashlm.runtime.flash_reader import DirectIOUnsupported, FlashReader

STRIDES = (512, 4096, 12288)
N_ROWS = 203                  # odd: 203 * 512 is not a multiple of 4096, so the file ends mid-block
N_LAYERS = 3
REPO = pathlib.Path(__file__).resolve().parent.parent


def _supports_direct(directory) -> bool:
    path = os.path.join(directory, ".odirect-probe")
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * BLOCK)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [mmap.mmap(-1, BLOCK)], 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A directory on a filesystem that accepts O_DIRECT if there is one (/tmp may be tmpfs)."""
    candidates = [str(tmp_path_factory.mktemp("flash")), "/var/tmp", str(REPO / ".pytest_tmp")]
    for base in candidates:
        try:
            os.makedirs(base, exist_ok=True)
            d = tempfile.mkdtemp(prefix="flashlm-reader-", dir=base)
        except OSError:
            continue
        if _supports_direct(d):
            yield d, True
            shutil.rmtree(d, ignore_errors=True)
            if base.endswith(".pytest_tmp"):
                shutil.rmtree(base, ignore_errors=True)
            return
        shutil.rmtree(d, ignore_errors=True)
    yield str(tmp_path_factory.mktemp("flash-buffered")), False


def _make_file(directory, stride: int, seed: int):
    rng = np.random.default_rng(seed)
    offsets, pos = [], 3 * BLOCK                           # a fake header area before the first layer
    for _ in range(N_LAYERS):
        offsets.append(pos)
        pos += N_ROWS * stride
        pos = -(-pos // BLOCK) * BLOCK + BLOCK * int(rng.integers(0, 3))   # filler between layers
    size = offsets[-1] + N_ROWS * stride                   # the file ends right after the last row
    data = rng.integers(0, 256, size, dtype=np.uint8)
    path = os.path.join(directory, f"bundles-{stride}.bin")
    data.tofile(path)
    return path, offsets, data


@pytest.fixture(scope="module")
def files(data_dir):
    directory, _ = data_dir
    return {s: _make_file(directory, s, seed=s) for s in STRIDES}


def _modes(data_dir):
    return ["direct", "buffered"] if data_dir[1] else ["buffered"]


def _expected(data, offsets, stride, layer, neurons):
    base = offsets[layer]
    return np.stack([data[base + n * stride: base + (n + 1) * stride] for n in neurons])


def _check(reader, data, offsets, stride, layer, neurons, dtype, rng, extra_rows=3):
    """read_rows into a permuted subset of a larger `out`; untouched rows must stay untouched."""
    neurons = np.asarray(neurons, dtype=np.int64)
    n_out = len(neurons) + extra_rows
    out = np.zeros((n_out, stride // np.dtype(dtype).itemsize), dtype=dtype)
    out.view(np.uint8)[:] = 0xA5
    out_rows = rng.permutation(n_out)[: len(neurons)]
    reader.reset_stats()
    reader.read_rows(layer, neurons, out, out_rows)
    got = out.view(np.uint8)
    if len(neurons):
        np.testing.assert_array_equal(got[out_rows], _expected(data, offsets, stride, layer, neurons))
    untouched = np.setdiff1d(np.arange(n_out), out_rows)
    assert (got[untouched] == 0xA5).all()
    st_ = reader.stats
    assert st_.useful_bytes == len(np.unique(neurons)) * stride
    assert st_.bytes_read >= st_.useful_bytes
    return got[out_rows]


# -- random row sets (hypothesis) ----------------------------------------------------------------------

def _row_sets():
    scattered = st.lists(st.integers(0, N_ROWS - 1), unique=True, max_size=60)
    run = st.tuples(st.integers(0, N_ROWS - 1), st.integers(1, 40)).map(
        lambda t: list(range(t[0], min(t[0] + t[1], N_ROWS))))
    runs = st.lists(run, min_size=1, max_size=5).map(lambda rs: sorted({n for r in rs for n in r}))
    edges = st.lists(st.sampled_from([0, 1, N_ROWS - 2, N_ROWS - 1]), unique=True, min_size=1)
    return st.one_of(scattered, runs, edges, st.just(list(range(N_ROWS))))


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("max_gap", [0, 64 * 1024])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32], ids=["f16-as-u16", "f32"])
def test_read_rows_random_sets(files, data_dir, stride, max_gap, dtype):
    path, offsets, data = files[stride]
    readers = [FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=m, threads=3,
                           max_gap_bytes=max_gap, staging_bytes=32 * 1024) for m in _modes(data_dir)]

    @settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=_row_sets(), layer=st.integers(0, N_LAYERS - 1), shuffle=st.booleans(), seed=st.integers(0, 99))
    def check(rows, layer, shuffle, seed):
        rng = np.random.default_rng(seed)
        rows = np.array(rows, dtype=np.int64)
        if shuffle:
            rows = rng.permutation(rows)
        results = [_check(r, data, offsets, stride, layer, rows, dtype, np.random.default_rng(seed))
                   for r in readers]
        for other in results[1:]:                      # direct and buffered: identical bytes
            np.testing.assert_array_equal(results[0], other)

    try:
        check()
    finally:
        for r in readers:
            r.close()


# -- named cases ---------------------------------------------------------------------------------------

CASES = {
    "first": [0],
    "last": [N_ROWS - 1],
    "first-and-last": [N_ROWS - 1, 0],
    "adjacent-run": list(range(10, 30)),
    "two-runs-big-gap": list(range(3, 9)) + list(range(150, 160)),
    "unsorted-scattered": [170, 4, 99, 5, 63, 202, 1, 120],
    "every-other": list(range(0, N_ROWS, 2)),
    "all": list(range(N_ROWS)),
    "empty": [],
    "duplicates": [5, 5, 6, 100, 5, N_ROWS - 1, N_ROWS - 1],   # allowed, each copy gets the row
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("max_gap", [0, 64 * 1024])
def test_read_rows_named_cases(files, data_dir, case, stride, max_gap):
    path, offsets, data = files[stride]
    rng = np.random.default_rng(0)
    for mode in _modes(data_dir):
        with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=mode, threads=4,
                         max_gap_bytes=max_gap, staging_bytes=64 * 1024) as r:
            for layer in range(N_LAYERS):
                _check(r, data, offsets, stride, layer, CASES[case], np.float32, rng)


@pytest.mark.parametrize("stride", STRIDES)
def test_read_rows_straight_into_aligned_out(files, data_dir, stride):
    """Consecutive neurons to consecutive rows of a page-aligned `out` take the no-copy path."""
    path, offsets, data = files[stride]
    for mode in _modes(data_dir):
        with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=mode,
                         threads=2) as r:
            out = aligned_empty((N_ROWS, stride // 2), np.uint16)
            rows = np.arange(8, 8 + 64)                 # 64 rows from row 8: block-aligned for every stride
            r.read_rows(1, rows, out, rows - 8)
            np.testing.assert_array_equal(out.view(np.uint8)[:64], _expected(data, offsets, stride, 1, rows))
            out2 = aligned_empty((N_ROWS, stride // 2), np.uint16)
            rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 100, 101, 102, N_ROWS - 1])
            r.read_rows(2, rows, out2, np.arange(len(rows)))
            np.testing.assert_array_equal(out2.view(np.uint8)[:len(rows)],
                                          _expected(data, offsets, stride, 2, rows))


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("aligned", [True, False])
def test_read_layer_equals_file_slice(files, data_dir, stride, aligned):
    path, offsets, data = files[stride]
    results = []
    for mode in _modes(data_dir):
        with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=mode, threads=3,
                         staging_bytes=64 * 1024) as r:
            for layer in range(N_LAYERS):
                if aligned:
                    out = aligned_empty((N_ROWS + 1, stride // 4), np.float32)
                else:                                   # deliberately 64 bytes off a page boundary
                    raw = aligned_empty(((N_ROWS + 1) * stride + 64,), np.uint8)
                    out = raw[64:].view(np.float32).reshape(N_ROWS + 1, stride // 4)
                r.read_layer(layer, out)
                want = data[offsets[layer]: offsets[layer] + N_ROWS * stride].reshape(N_ROWS, stride)
                np.testing.assert_array_equal(out.view(np.uint8)[:N_ROWS], want)
                results.append(out.view(np.uint8)[:N_ROWS].copy())
            assert r.stats.useful_bytes == N_LAYERS * N_ROWS * stride
            assert r.stats.bytes_read >= r.stats.useful_bytes
    for a, b in zip(results[:N_LAYERS], results[N_LAYERS:]):    # direct vs buffered, layer by layer
        np.testing.assert_array_equal(a, b)


# -- I/O accounting -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stride, max_gap, rows, reads, nbytes", [
    (4096, 0, [7, 8], 1, 8192),                 # two adjacent rows: one read of 8 KiB
    (4096, 0, [8, 7], 1, 8192),                 # order does not matter
    (4096, 0, [7, 9], 2, 8192),                 # a one-row hole: two reads
    (4096, 4096, [7, 9], 1, 12288),             # ... unless the gap may be read through
    (4096, 64 * 1024, [7, 20], 1, 14 * 4096),   # 12 blocks of hole < 64 KiB: read through
    (4096, 64 * 1024, [7, 40], 2, 8192),        # 32 blocks > 64 KiB: two reads
    (512, 0, [0, 1], 1, 4096),                  # same block: one 4 KiB read
    (512, 0, [0, 7], 1, 4096),
    (512, 0, [0, 8], 1, 8192),                  # adjacent blocks merge
    (512, 0, [0, 16], 2, 8192),                 # a block apart: two reads
    (12288, 0, [3, 4], 1, 24576),
    (12288, 0, [3, 5], 2, 24576),
])
def test_stats_match_run_plan(files, data_dir, stride, max_gap, rows, reads, nbytes):
    path, offsets, data = files[stride]
    for mode in _modes(data_dir):
        with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=mode, threads=4,
                         max_gap_bytes=max_gap) as r:
            _check(r, data, offsets, stride, 0, rows, np.uint16, np.random.default_rng(1))
            assert (r.stats.reads, r.stats.bytes_read) == (reads, nbytes)
            assert r.stats.useful_bytes == len(rows) * stride
            assert r.stats.calls == 1 and r.stats.seconds > 0
            # the workers' CPU time on the call's tasks: some, and no more than 4 threads for its wall time
            assert 0 < r.stats.cpu_s <= 4 * r.stats.seconds


def test_runs_are_capped_at_staging_size(files, data_dir):
    stride = 4096
    path, offsets, data = files[stride]
    with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=_modes(data_dir)[0],
                     threads=1, staging_bytes=16 * 1024) as r:
        _check(r, data, offsets, stride, 0, list(range(40)), np.float32, np.random.default_rng(2))
        assert r.stats.reads == 10 and r.stats.bytes_read == 40 * 4096


def test_row_bytes_counts_useful_bytes(files, data_dir):
    path, offsets, data = files[4096]
    with FlashReader(path, layer_offsets=offsets, stride_bytes=4096, n_rows=N_ROWS, mode=_modes(data_dir)[0],
                     row_bytes=3000) as r:
        out = np.zeros((2, 1024), np.float32)
        r.read_rows(0, [5, 6], out, [0, 1])
        assert r.stats.useful_bytes == 6000 and r.stats.bytes_read == 8192


# -- modes, lifecycle, errors -------------------------------------------------------------------------

def test_direct_and_buffered_identical(files, data_dir):
    if not data_dir[1]:
        pytest.skip(f"no O_DIRECT-capable filesystem among tmp dirs tried (last: {data_dir[0]})")
    path, offsets, data = files[12288]
    rows = np.random.default_rng(3).choice(N_ROWS, 77, replace=False)
    outs = []
    for mode in ("direct", "buffered"):
        with FlashReader(path, layer_offsets=offsets, stride_bytes=12288, n_rows=N_ROWS, mode=mode) as r:
            if mode == "buffered":
                r.drop_cache()
            out = np.empty((77, 6144), np.uint16)
            r.read_rows(2, rows, out, np.arange(77))
            outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("stride, width", [(512, 320), (4096, 2880), (12288, 10240)])
def test_read_rows_into_packed_rows(files, data_dir, stride, width):
    """Rows of `out` narrower than the stride (a neuron cache's packed rows) get each row's first `width`
    bytes, for both loops, including consecutive rows into a page-aligned out (no straight-in read there:
    the file's rows carry padding)."""
    path, offsets, data = files[stride]
    rng = np.random.default_rng(9)
    rows = np.concatenate([np.arange(8, 8 + 40), rng.choice(N_ROWS, 30, replace=False), [N_ROWS - 1]])
    for mode in _modes(data_dir):
        for loop in ("numba", "python"):
            with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=mode, threads=3,
                             loop=loop) as r:
                out = aligned_empty((len(rows) + 2, width), np.uint8)
                out[:] = 0xA5
                r.read_rows(1, rows, out, np.arange(len(rows)))
                want = _expected(data, offsets, stride, 1, rows)[:, :width]
                np.testing.assert_array_equal(out[:len(rows)], want)
                assert (out[len(rows):] == 0xA5).all()
                dest = rng.permutation(len(rows))
                r.read_rows(2, rows, out, dest)
                np.testing.assert_array_equal(out[dest], _expected(data, offsets, stride, 2, rows)[:, :width])


@pytest.mark.parametrize("stride", [512, 4096, 12288])
def test_numba_and_python_loops_identical(files, data_dir, stride):
    """The numba batch loop (default) and the Python os.preadv loop read the same bytes into the same
    rows with the same counts: duplicates, adjacent runs, the file's last row, a permuted out."""
    path, offsets, data = files[stride]
    rng = np.random.default_rng(5)
    rows = np.concatenate([rng.choice(N_ROWS, 60, replace=False), [0, 1, 2, N_ROWS - 1, N_ROWS - 1, 7]])
    dest = rng.permutation(len(rows))
    layer = len(offsets) - 1
    results = []
    for loop in ("numba", "python"):
        with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS,
                         mode=_modes(data_dir)[0], threads=3, max_gap_bytes=8192, loop=loop) as r:
            out = np.zeros((len(rows), stride), np.uint8)
            r.read_rows(layer, rows, out, dest)
            results.append((out, r.stats.bytes_read, r.stats.reads, r.stats.useful_bytes))
    (a, *ca), (b, *cb) = results
    np.testing.assert_array_equal(a, b)
    assert ca == cb
    np.testing.assert_array_equal(a[dest], _expected(data, offsets, stride, layer, rows))


def test_direct_refused_raises_clear_error(tmp_path, monkeypatch):
    """Refusal at open (old tmpfs) and at the first read (some FUSE filesystems) both name the fix."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 8192)
    real_open, real_preadv = os.open, os.preadv

    def refuse_open(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(p, flags, *a)

    def refuse_read(fd, bufs, off):
        raise OSError(22, "Invalid argument")

    for name, fake in (("open", refuse_open), ("preadv", refuse_read)):
        with monkeypatch.context() as m:
            m.setattr(os, name, fake)
            with pytest.raises(DirectIOUnsupported, match="mode='buffered'") as info:
                FlashReader(path, layer_offsets=[0], stride_bytes=4096, n_rows=2, mode="direct")
            assert isinstance(info.value, OSError) and info.value.filename == str(path)
    with FlashReader(path, layer_offsets=[0], stride_bytes=4096, n_rows=2, mode="buffered") as r:
        out = np.zeros((1, 4096), np.uint8)
        r.read_rows(0, [1], out, [0])
        assert (out == ord("x")).all()


def test_threads_exit_on_close_and_on_gc(files, data_dir):
    path, offsets, _ = files[4096]
    before = {t for t in threading.enumerate() if t.name.startswith("flashlm-reader")}
    r = FlashReader(path, layer_offsets=offsets, stride_bytes=4096, n_rows=N_ROWS, mode=_modes(data_dir)[0],
                    threads=5)
    assert len({t for t in threading.enumerate() if t.name.startswith("flashlm-reader")} - before) == 5
    r.close()
    r.close()                                          # idempotent
    # (<= before: an earlier test's reader, collected meanwhile, may have stopped too)
    assert {t for t in threading.enumerate() if t.name.startswith("flashlm-reader")} <= before
    with pytest.raises(ValueError, match="closed"):
        r.read_rows(0, [0], np.zeros((1, 4096), np.uint8), [0])

    import gc
    r = FlashReader(path, layer_offsets=offsets, stride_bytes=4096, n_rows=N_ROWS, mode=_modes(data_dir)[0],
                    threads=3)
    r.read_rows(0, [1, 2], np.zeros((2, 4096), np.uint8), [0, 1])
    del r
    gc.collect()
    for t in threading.enumerate():
        if t.name.startswith("flashlm-reader") and t not in before:
            t.join(timeout=5)
    assert {t for t in threading.enumerate() if t.name.startswith("flashlm-reader")} <= before


def test_concurrent_calls(files, data_dir):
    stride = 4096
    path, offsets, data = files[stride]
    errors = []
    with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=_modes(data_dir)[0],
                     threads=3, max_gap_bytes=8192) as r:
        def work(seed):
            rng = np.random.default_rng(seed)
            try:
                for _ in range(20):
                    layer = int(rng.integers(N_LAYERS))
                    rows = rng.choice(N_ROWS, int(rng.integers(1, 50)), replace=False)
                    out = np.empty((len(rows), stride), np.uint8)
                    r.read_rows(layer, rows, out, np.arange(len(rows)))
                    np.testing.assert_array_equal(out, _expected(data, offsets, stride, layer, rows))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert r.stats.calls == 80
    assert not errors, errors[0]


@pytest.mark.parametrize("inline", [False, True], ids=["workers", "inline"])
def test_busy_time_counts_concurrent_calls_once(files, data_dir, monkeypatch, inline):
    """busy_s is the wall time with any call in flight: two overlapping calls count their overlap once,
    calls one after the other count their own time. Each batch of reads is slowed to 50 ms so the overlap
    is known. Through the workers the two calls queue on the first worker; inline (native AIO) each
    calling thread reads its own call, so they overlap entirely."""
    import time
    from flashlm.runtime import flash_reader
    stride = 4096
    path, offsets, _ = files[stride]
    def slowed(real):
        def slow(*args):
            time.sleep(0.05)
            return real(*args)
        return slow
    with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, mode=_modes(data_dir)[0],
                     threads=2, inline=inline) as r:
        for kernel in ("_read_runs", "_aio_read_runs"):       # whichever the reader submits with
            monkeypatch.setattr(flash_reader, kernel, slowed(getattr(flash_reader, kernel)))
        go = threading.Barrier(2)

        def one(row):
            out = np.empty((1, stride), np.uint8)
            go.wait()
            r.read_rows(0, [row], out, [0])
        ts = [threading.Thread(target=one, args=(i,)) for i in (3, 90)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if inline and r.submission == "aio":   # 50 + 50 ms of call time, 50 ms of busy time
            assert r.stats.calls == 2 and r.stats.seconds >= 0.095
            assert 0.045 <= r.stats.busy_s <= 0.8 * r.stats.seconds
        else:
            # One run each: both calls queue on the first worker, so one waits for the other: 50 + 100 ms
            # of call time, 100 ms of busy time.
            assert r.stats.calls == 2 and r.stats.seconds >= 0.14
            assert 0.095 <= r.stats.busy_s <= 0.8 * r.stats.seconds
        r.reset_stats()
        out = np.empty((1, stride), np.uint8)
        for row in (7, 8):
            r.read_rows(1, [row], out, [0])
        assert 0.095 <= r.stats.busy_s <= r.stats.seconds
        assert r.stats.busy_s >= 0.9 * r.stats.seconds


def test_bad_arguments(files, data_dir):
    path, offsets, _ = files[4096]
    mode = _modes(data_dir)[0]
    kw = dict(layer_offsets=offsets, stride_bytes=4096, n_rows=N_ROWS, mode=mode)
    with pytest.raises(ValueError):
        FlashReader(path, **{**kw, "stride_bytes": 3000})
    with pytest.raises(ValueError):
        FlashReader(path, **{**kw, "layer_offsets": [100]})
    with pytest.raises(ValueError):
        FlashReader(path, **{**kw, "mode": "mmap"})
    with FlashReader(path, **kw) as r:
        with pytest.raises(IndexError):
            r.read_rows(0, [N_ROWS], np.zeros((1, 4096), np.uint8), [0])
        with pytest.raises(IndexError):
            r.read_rows(0, [0], np.zeros((1, 4096), np.uint8), [1])
        with pytest.raises(ValueError):
            r.read_rows(0, [0], np.zeros((1, 8192), np.uint8), [0])       # rows wider than the stride
        with pytest.raises(ValueError):
            r.read_rows(0, [0], np.zeros((2, 4096), np.uint8)[:, :1024].copy().T, [0])
        with pytest.raises(ValueError):
            r.read_layer(0, np.zeros((N_ROWS - 1, 4096), np.uint8))


def test_truncated_file_raises(data_dir):
    path = os.path.join(data_dir[0], "short.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * BLOCK + 100))           # row 3 is cut short, rows 4+ are missing
    try:
        for mode in _modes(data_dir):
            with FlashReader(path, layer_offsets=[0], stride_bytes=4096, n_rows=8, mode=mode) as r:
                for rows in ([5], [3], [2, 3]):
                    with pytest.raises(OSError, match="short read"):
                        r.read_rows(0, rows, aligned_empty((len(rows), 4096), np.uint8), np.arange(len(rows)))
                out = aligned_empty((3, 4096), np.uint8)
                r.read_rows(0, [0, 1, 2], out, [0, 1, 2])     # the intact rows still read fine
    finally:
        os.unlink(path)


# -- batched submission (native AIO) and its pread fallback ----------------------------------------------

def _aio_or_skip(data_dir, files):
    if not data_dir[1]:
        pytest.skip(f"no O_DIRECT-capable filesystem among tmp dirs tried (last: {data_dir[0]})")
    path, offsets, _ = files[4096]
    with FlashReader(path, layer_offsets=offsets, stride_bytes=4096, n_rows=N_ROWS) as r:
        if r.submission != "aio":
            pytest.skip(f"native AIO not used here: {r.submission_note}")


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("depth, staging", [(64, 1 << 20), (3, 16 * 1024)])
def test_aio_and_pread_read_the_same_bytes(files, data_dir, stride, depth, staging):
    """Native AIO submission (from the calling thread, and through the workers) and pread give the file's
    bytes (numpy's view of it) for random row sets,
    edge rows and the file's last partial block, into full and packed (staged) rows, with the same run
    counts; AIO needs fewer syscalls. Depth 3 with a 16 KiB ring makes staged runs wrap the ring and wait
    for it to drain."""
    _aio_or_skip(data_dir, files)
    path, offsets, data = files[stride]
    rng = np.random.default_rng(stride + depth)
    sets = [rng.choice(N_ROWS, 90, replace=False), np.arange(N_ROWS), [0, 1, N_ROWS - 2, N_ROWS - 1],
            np.concatenate([np.arange(20, 60), [N_ROWS - 1, N_ROWS - 1, 5]]), [N_ROWS - 1]]
    width = max(stride * 5 // 8, 1)
    got = {}
    for submit, inline in (("aio", True), ("aio-workers", False), ("pread", True)):
        with FlashReader(path, layer_offsets=offsets, stride_bytes=stride, n_rows=N_ROWS, threads=2,
                         max_gap_bytes=8192, staging_bytes=staging, submit=submit.split("-")[0], aio_depth=depth,
                         inline=inline) as r:
            assert r.submission == submit.split("-")[0]
            outs = []
            for k, rows in enumerate(sets):
                rows = np.asarray(rows, np.int64)
                layer = k % N_LAYERS if k != len(sets) - 1 else N_LAYERS - 1
                full = aligned_empty((len(rows), stride), np.uint8)
                dest = rng.permutation(len(rows))
                r.read_rows(layer, rows, full, dest)
                np.testing.assert_array_equal(full[dest], _expected(data, offsets, stride, layer, rows))
                packed = np.zeros((len(rows), width), np.uint8)
                r.read_rows(layer, rows, packed, dest)
                np.testing.assert_array_equal(packed[dest], _expected(data, offsets, stride, layer, rows)[:, :width])
                outs.append((full[dest], packed[dest]))
            layer_out = aligned_empty((N_ROWS, stride), np.uint8)
            r.read_layer(N_LAYERS - 1, layer_out)
            last = offsets[-1]
            np.testing.assert_array_equal(layer_out, data[last:last + N_ROWS * stride].reshape(N_ROWS, stride))
            got[submit] = (r.stats.reads, r.stats.bytes_read, r.stats.syscalls)
    assert got["aio"][:2] == got["pread"][:2] == got["aio-workers"][:2]
    assert got["pread"][2] == got["pread"][0]            # one syscall per pread
    if stride >= 4096 and depth >= 16:                   # (512-byte rows: a few block runs per call)
        assert got["aio"][2] < got["pread"][2]


def test_aio_unavailable_falls_back_to_pread_and_says_why(files, data_dir, monkeypatch):
    from flashlm.runtime import flash_reader
    path, offsets, data = files[12288]
    monkeypatch.setattr(flash_reader.native_aio, "unavailable", lambda fd: "native AIO unavailable: test")
    mode = _modes(data_dir)[0]
    with FlashReader(path, layer_offsets=offsets, stride_bytes=12288, n_rows=N_ROWS, mode=mode) as r:
        assert r.submission == "pread"
        assert r.submission_note == ("native AIO unavailable: test" if mode == "direct" else
                                     "buffered reads: pread (native AIO runs page-cache reads synchronously)")
        _check(r, data, offsets, 12288, 1, [0, 7, 8, N_ROWS - 1], np.uint8, np.random.default_rng(0))
        assert r.stats.syscalls == r.stats.reads
    if mode == "direct":
        with pytest.raises(OSError, match="submit='aio' but native AIO unavailable: test"):
            FlashReader(path, layer_offsets=offsets, stride_bytes=12288, n_rows=N_ROWS, submit="aio")
    with FlashReader(path, layer_offsets=offsets, stride_bytes=12288, n_rows=N_ROWS, mode="buffered") as r:
        assert r.submission == "pread" and "buffered" in r.submission_note
    monkeypatch.undo()
    # asked for explicitly, AIO reads a buffered file too (synchronously: the probe times its hand-off so)
    with FlashReader(path, layer_offsets=offsets, stride_bytes=12288, n_rows=N_ROWS, mode="buffered",
                     submit="aio") as r:
        assert r.submission == "aio"
        _check(r, data, offsets, 12288, 2, [1, 2, 50, N_ROWS - 1], np.uint8, np.random.default_rng(1))


def test_refused_aio_submit_switches_to_pread(files, data_dir, monkeypatch):
    """A context the kernel refuses at io_submit (here: a context id that io_setup never returned, EINVAL)
    switches the reader to pread mid-call: the call still returns the right rows, and the note says what
    was refused."""
    _aio_or_skip(data_dir, files)
    from flashlm.runtime import flash_reader
    real = flash_reader.native_aio.AioContext

    class Refused(real):
        def __init__(self, depth):
            super().__init__(depth)
            self.real_ctx, self.ctx = self.ctx, 0x7fff0000

        def close(self):
            self.ctx = self.real_ctx
            super().close()
    monkeypatch.setattr(flash_reader.native_aio, "AioContext", Refused)
    monkeypatch.setattr(flash_reader.native_aio, "unavailable", lambda fd: None)   # (it would see the refusal)
    path, offsets, data = files[4096]
    with FlashReader(path, layer_offsets=offsets, stride_bytes=4096, n_rows=N_ROWS, threads=2) as r:
        assert r.submission == "aio"
        rng = np.random.default_rng(4)
        _check(r, data, offsets, 4096, 2, rng.choice(N_ROWS, 70, replace=False), np.uint8, rng)
        assert r.submission == "pread"
        assert "native AIO refused reads of" in r.submission_note and path in r.submission_note
        _check(r, data, offsets, 4096, 0, rng.choice(N_ROWS, 70, replace=False), np.uint8, rng)


def test_io_error_names_file_and_offset(files, data_dir, monkeypatch):
    """A read the kernel fails (here: EIO on the Python redo of a failed run) raises an OSError naming the
    file and the offset."""
    from flashlm.runtime import flash_reader
    path, offsets, _ = files[4096]

    def eio(fd, bufs, off):
        raise OSError(errno.EIO, "Input/output error")
    with FlashReader(path, layer_offsets=offsets, stride_bytes=4096, n_rows=N_ROWS, mode=_modes(data_dir)[0],
                     loop="python") as r:
        monkeypatch.setattr(flash_reader.os, "preadv", eio)
        with pytest.raises(OSError, match=f"{path}: reading 4096 bytes at offset {offsets[1] + 5 * 4096}") as info:
            r.read_rows(1, [5], np.zeros((1, 4096), np.uint8), [0])
        assert info.value.errno == errno.EIO
