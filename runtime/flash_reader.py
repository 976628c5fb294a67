"""Read FFN bundle rows from flash: sorted, coalesced, 4 KiB-aligned reads spread over persistent threads.

Why it is built this way (measured on a 2-core VM with a virtio disk, see ../shared/DESIGN.md):
- The disk needs depth: random 16 KiB reads give ~220 MB/s at depth 1 but 0.75-0.8 GB/s at depth 32,
  and >= 64 KiB reads 1.1-1.2 GB/s. So rows are sorted, adjacent rows become one read, small gaps may be
  read through (`max_gap_bytes`), and the reads are split over several threads.
- Python threads that each LOOP over their own batch of `os.preadv` calls (the GIL is released in the
  syscall) match fio, while one thread-pool task per read stalls at ~20k tasks/s. So each call sends
  exactly one task per worker, and each worker owns a page-aligned staging buffer.
- O_DIRECT bypasses the page cache (the model does not fit in RAM; the neuron cache is ours), but needs
  buffer address, file offset and length aligned: every read is widened outward to 4096-byte blocks.
  Layer offsets are multiples of 4096 and rows never straddle a block (stride is a multiple or a
  power-of-two divisor of 4096), which makes the row grid and the block grid line up.
- Measured with the probe (`flashlm probe`, devices/this-machine-2core.toml): random 16 KiB rows reach 0.9-1.0x
  the raw probe at the same thread count with 512 rows per call. Small calls (64 rows) or many threads
  (16-32) lose 10-30% to the per-call wake-up and join. read_layer matches sequential 1 MiB reads.
"""
from __future__ import annotations

import errno
import itertools
import mmap
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from .errors import FlashlmError

BLOCK = 4096                   # alignment unit for O_DIRECT (512 often works; 4096 always does)
MIN_SPLIT_BYTES = 64 * 1024    # don't cut a run below this just to keep every worker busy


class DirectIOUnsupported(OSError, FlashlmError):
    """The filesystem refused O_DIRECT (e.g. older tmpfs, some FUSE/overlay setups)."""


@dataclass
class ReadStats:
    bytes_read: int = 0        # bytes fetched from the file, including alignment and gap overhead
    useful_bytes: int = 0      # distinct requested rows x row_bytes
    reads: int = 0             # preadv calls
    seconds: float = 0.0       # wall time inside read_rows / read_layer (concurrent calls each count)
    calls: int = 0             # read_rows / read_layer calls
    busy_s: float = 0.0        # wall time with at least one call in flight (concurrent calls count once)


def aligned_empty(shape, dtype) -> np.ndarray:
    """A C-contiguous array on page-aligned memory (anonymous mmap), so O_DIRECT can read straight into it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(nbytes, 1))
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class _Plan:
    """Runs (aligned byte ranges) for one call, in file order, and the rows each run carries.

    Rows are sorted by neuron, so run k carries sorted rows lo[k]:hi[k]. `direct[k]` >= 0 is a byte
    offset into `out` when the run is exactly those rows, consecutive in `out` at an aligned address,
    so it can be read straight into `out` without the staging copy."""

    def __init__(self, neurons, out_rows, layer_off, stride, gap_blocks, cap_blocks, threads, out_addr):
        order = np.argsort(neurons, kind="stable")
        self.ns = ns = neurons[order].astype(np.int64)
        self.dst = dst = out_rows[order].astype(np.int64)
        n = len(ns)
        self.unique = int(np.count_nonzero(np.diff(ns))) + 1     # duplicates are fetched once
        start = layer_off + ns * stride
        bs = start // BLOCK                                   # first block of each row
        be = (start + stride + BLOCK - 1) // BLOCK            # one past its last block (sorted: monotonic)
        row_blocks = max(stride // BLOCK, 1)

        # Segments: blocks touched, merged when the hole between them is <= gap_blocks (reading through a
        # small hole costs less than a second request on this kind of disk).
        seg_brk = np.ones(n, dtype=bool)
        seg_brk[1:] = bs[1:] > be[:-1] + gap_blocks
        seg_id = np.cumsum(seg_brk) - 1
        seg_first = np.flatnonzero(seg_brk)
        seg_last = np.append(seg_first[1:], n) - 1
        total_blocks = int((be[seg_last] - bs[seg_first]).sum())

        # Cap runs at the staging size, and cut big reads (a whole layer, long runs) into about one piece
        # per worker so all of them read in parallel (not below 64 KiB: smaller reads are less efficient).
        # Caps are whole rows, so no row straddles two pieces: the rows of a segment sit on a grid of
        # row_blocks starting at the segment's first row.
        want = -(-total_blocks // threads)
        cap = min(cap_blocks, max(want, MIN_SPLIT_BYTES // BLOCK))
        cap = max(cap // row_blocks, 1) * row_blocks
        piece = (bs - bs[seg_first][seg_id]) // cap
        run_brk = seg_brk.copy()
        run_brk[1:] |= piece[1:] != piece[:-1]
        lo = np.flatnonzero(run_brk)
        hi = np.append(lo[1:], n)
        off = bs[lo] * BLOCK
        length = be[hi - 1] * BLOCK - off                     # trimmed to the first/last wanted row

        # Straight-into-out runs: no holes, no duplicates, consecutive destination rows, aligned address.
        breaks = np.zeros(n, dtype=np.int64)
        breaks[1:] = np.cumsum((np.diff(ns) != 1) | (np.diff(dst) != 1))
        consecutive = breaks[hi - 1] == breaks[lo]
        direct = np.full(len(lo), -1, dtype=np.int64)
        if out_addr is not None:
            ok = (consecutive & (start[lo] == off) & ((hi - lo) * stride == length)
                  & ((out_addr + dst[lo] * stride) % BLOCK == 0))
            direct[ok] = dst[lo][ok] * stride

        cols = [off.tolist(), length.tolist(), lo.tolist(), hi.tolist(), consecutive.tolist(), direct.tolist()]
        self.runs = list(zip(*cols))


def _read_full(fd: int, buf: memoryview, offset: int, need: int) -> tuple[int, int]:
    """preadv until at least `need` bytes arrived; returns (bytes, calls). Short reads only happen at EOF."""
    got = os.preadv(fd, [buf], offset)
    calls = 1
    while got < need:
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as e:            # O_DIRECT refuses to continue after an unaligned short read (EOF)
            if e.errno != errno.EINVAL or got % BLOCK == 0:
                raise
            n = 0
        calls += 1
        if n <= 0:
            raise OSError(errno.EIO, f"short read at offset {offset + got}: file ends before the bundle rows "
                                     f"(got {got} of {need} bytes)")
        got += n
    return got, calls


def _do_task(fd, stage_mv, stage_np, runs, claim, job):
    ns_arr, dst_arr, ns, dst, out2d, out_mv, layer_off, stride = job
    nbytes = ncalls = 0
    n = len(runs)
    while True:
        # Workers claim runs one at a time from a shared counter (next() on itertools.count is atomic
        # under the GIL), so a worker that drew fast reads takes more: the call ends about one read after
        # the disk finishes, instead of waiting for the unluckiest fixed share.
        i = next(claim)
        if i >= n:
            break
        off, length, lo, hi, consecutive, direct = runs[i]
        if direct >= 0:
            b, c = _read_full(fd, out_mv[direct:direct + length], off, length)
        else:
            first = layer_off + ns[lo] * stride - off
            need = layer_off + ns[hi - 1] * stride + stride - off   # EOF may cut the alignment padding
            b, c = _read_full(fd, stage_mv[:length], off, need)
            if hi - lo == 1:                                     # the common random case: one row
                d = dst[lo] * stride
                out_mv[d:d + stride] = stage_mv[first:first + stride]
            else:
                rows = stage_np[:length].reshape(-1, stride)    # run start is on the row grid
                base = (off - layer_off) // stride
                if consecutive:
                    d0, r0 = dst[lo], ns[lo] - base
                    out2d[d0:d0 + hi - lo] = rows[r0:r0 + hi - lo]
                else:
                    out2d[dst_arr[lo:hi]] = rows[ns_arr[lo:hi] - base]
        nbytes += b
        ncalls += c
    return nbytes, ncalls


def _worker(tasks: queue.SimpleQueue, fd: int, stage: mmap.mmap) -> None:
    # Module-level (not a method) so the thread holds no reference to the reader: an abandoned reader is
    # garbage collected, and its finalizer stops this thread.
    stage_mv = memoryview(stage)
    stage_np = np.frombuffer(stage, dtype=np.uint8)
    while True:
        item = tasks.get()
        if item is None:
            break
        runs, claim, job, done = item
        try:
            done.put((*_do_task(fd, stage_mv, stage_np, runs, claim, job), None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
            done.put((0, 0, e))
        del item, runs, claim, job, done   # drop references to the caller's `out` before blocking again
    del stage_np
    stage_mv.release()


def _shutdown(queues, threads, fd, stages):
    for q in queues:
        q.put(None)
    for t in threads:
        if t is not threading.current_thread():
            t.join(timeout=10)
    try:
        os.close(fd)
    except OSError:
        pass
    for s in stages:
        try:
            s.close()
        except BufferError:  # a worker that did not exit still has a view; GC will release it
            pass


class FlashReader:
    """Reads bundle rows of one FFN file. Thread-safe: concurrent calls interleave at run granularity."""

    def __init__(self, path, *, layer_offsets: list[int], stride_bytes: int, n_rows: int,
                 mode: str = "direct", threads: int = 4, max_gap_bytes: int = 0,
                 staging_bytes: int = 1 << 20, row_bytes: int | None = None):
        if mode not in ("direct", "buffered"):
            raise ValueError(f"mode must be 'direct' or 'buffered', not {mode!r}")
        if stride_bytes <= 0 or not (stride_bytes % BLOCK == 0 or BLOCK % stride_bytes == 0):
            raise ValueError(f"stride_bytes={stride_bytes} must be a multiple or a divisor of {BLOCK}")
        bad = [o for o in layer_offsets if o % BLOCK]
        if bad:
            raise ValueError(f"layer offsets must be multiples of {BLOCK}: {bad[:4]}")
        if threads < 1 or n_rows < 1 or max_gap_bytes < 0:
            raise ValueError("threads and n_rows must be >= 1 and max_gap_bytes >= 0")
        self.path = os.fspath(path)
        self.layer_offsets = [int(o) for o in layer_offsets]
        self.stride_bytes = int(stride_bytes)
        self.row_bytes = int(row_bytes if row_bytes is not None else stride_bytes)
        self.n_rows = int(n_rows)
        self.mode = mode
        self.threads = int(threads)
        self.max_gap_bytes = int(max_gap_bytes)
        # Staging holds at least one whole (aligned) row; the run cap is whole blocks.
        self.staging_bytes = max(-(-int(staging_bytes) // BLOCK) * BLOCK, -(-self.stride_bytes // BLOCK) * BLOCK)
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._active = 0               # calls in flight, and since when the reader has been busy
        self._busy_since = 0.0

        self._fd = self._open()
        stages = [mmap.mmap(-1, self.staging_bytes) for _ in range(self.threads)]
        self._queues = [queue.SimpleQueue() for _ in range(self.threads)]
        self._workers = [threading.Thread(target=_worker, args=(q, self._fd, s), daemon=True,
                                          name=f"flashlm-reader-{i}")
                         for i, (q, s) in enumerate(zip(self._queues, stages))]
        for t in self._workers:
            t.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._queues, self._workers, self._fd, stages)

    def _open(self) -> int:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if self.mode == "direct":
            if not hasattr(os, "O_DIRECT"):
                raise DirectIOUnsupported(errno.EINVAL, "this OS has no O_DIRECT; use mode='buffered'", self.path)
            flags |= os.O_DIRECT
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            if self.mode == "direct" and e.errno == errno.EINVAL:
                raise DirectIOUnsupported(errno.EINVAL, "the filesystem refuses O_DIRECT; "
                                          "use mode='buffered'", self.path) from e
            raise
        if self.mode == "direct":
            # Some filesystems accept the flag at open and fail each read: probe one aligned block now.
            probe = mmap.mmap(-1, BLOCK)
            try:
                os.preadv(fd, [probe], 0)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.EINVAL:
                    raise DirectIOUnsupported(errno.EINVAL, "the filesystem refuses O_DIRECT reads; "
                                              "use mode='buffered'", self.path) from e
                raise
            finally:
                probe.close()
        return fd

    # -- public API --------------------------------------------------------------------------------

    def read_rows(self, layer: int, neurons, out: np.ndarray, out_rows) -> None:
        """Copy bundle row neurons[j] of `layer` into out[out_rows[j]] for every j."""
        t0 = time.perf_counter()
        neurons = np.asarray(neurons).reshape(-1)
        out_rows = np.asarray(out_rows).reshape(-1)
        if len(neurons) != len(out_rows):
            raise ValueError(f"{len(neurons)} neurons but {len(out_rows)} out_rows")
        out_u8 = self._check_out(out)
        if len(neurons):
            if neurons.min() < 0 or neurons.max() >= self.n_rows:
                raise IndexError(f"neuron ids must be in [0, {self.n_rows}), got {neurons.min()}..{neurons.max()}")
            if out_rows.min() < 0 or out_rows.max() >= out_u8.shape[0]:
                raise IndexError(f"out_rows must be in [0, {out_u8.shape[0]}), got {out_rows.min()}..{out_rows.max()}")
            self._run(layer, neurons, out_u8, out_rows, t0)
        else:
            self._account(0, 0, 0, t0)

    def read_layer(self, layer: int, out: np.ndarray) -> None:
        """Read rows 0..n_rows-1 of `layer` into out[:n_rows] in large sequential pieces (<= staging size)."""
        t0 = time.perf_counter()
        out_u8 = self._check_out(out)
        if out_u8.shape[0] < self.n_rows:
            raise ValueError(f"out has {out_u8.shape[0]} rows, the layer has {self.n_rows}")
        rows = np.arange(self.n_rows, dtype=np.int64)
        self._run(layer, rows, out_u8, rows, t0)

    def drop_cache(self) -> None:
        """Evict this file's pages from the OS page cache (for cold-read baselines in buffered mode)."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = ReadStats()
            self._busy_since = time.perf_counter()   # a call in flight counts from now on

    def close(self) -> None:
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _check_out(self, out: np.ndarray) -> np.ndarray:
        if not self._finalizer.alive:
            raise ValueError("FlashReader is closed")
        if out.ndim != 2 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writable 2-D C-contiguous array")
        if out.shape[1] * out.itemsize != self.stride_bytes:
            raise ValueError(f"out rows are {out.shape[1] * out.itemsize} bytes, stride is {self.stride_bytes}")
        return out.view(np.uint8)

    def _run(self, layer: int, neurons: np.ndarray, out_u8: np.ndarray, out_rows: np.ndarray, t0: float) -> None:
        layer_off = self.layer_offsets[layer]
        plan = _Plan(neurons, out_rows, layer_off, self.stride_bytes, self.max_gap_bytes // BLOCK,
                     self.staging_bytes // BLOCK, self.threads, _address(out_u8))
        out_mv = memoryview(out_u8.reshape(-1))
        # Lists too: workers mostly index single elements, and Python ints are much cheaper there.
        job = (plan.ns, plan.dst, plan.ns.tolist(), plan.dst.tolist(), out_u8, out_mv, layer_off, self.stride_bytes)
        with self._lock:
            if self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += 1
        done: queue.SimpleQueue = queue.SimpleQueue()
        claim = itertools.count()
        busy = self._queues[:len(plan.runs)]              # one task per worker that has something to do
        for q in busy:
            q.put((plan.runs, claim, job, done))
        nbytes = ncalls = 0
        error = None
        for _ in busy:
            b, c, e = done.get()
            nbytes, ncalls = nbytes + b, ncalls + c
            error = error or e
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.stats.busy_s += time.perf_counter() - self._busy_since
        self._account(plan.unique * self.row_bytes, nbytes, ncalls, t0)
        if error is not None:
            raise error

    def _account(self, useful: int, nbytes: int, ncalls: int, t0: float) -> None:
        with self._lock:
            self.stats.useful_bytes += useful
            self.stats.bytes_read += nbytes
            self.stats.reads += ncalls
            self.stats.seconds += time.perf_counter() - t0
            self.stats.calls += 1
