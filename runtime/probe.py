"""Measure this machine and write a device profile: memory (cgroup-aware), cores, flash reads (direct
and buffered, by read size x concurrency), DRAM read bandwidth and decode-matvec throughput per thread
count for each storage type and engine.

Flash: every thread loops over its own list of random size-aligned offsets with `os.preadv` into its
own page-aligned buffer for a fixed time, the equivalent of `fio --rw=randread --ioengine=psync
--numjobs=T --bs=B` (Python threads release the GIL inside the syscall, so this matches fio, see
DESIGN.md; one thread-pool task per read would not). Buffered points first evict the file from the page
cache (POSIX_FADV_DONTNEED) so they measure cold reads through the kernel's read-ahead, not DRAM.
The same workload through `FlashReader` shows its efficiency against the raw disk.

The test file (random bytes, so no layer of the stack can shortcut zeros) lives on the disk being
measured and is deleted afterwards if this run created it. MB means 10^6 bytes, GB 10^9. Expect ~15%
run-to-run noise; compare ratios within one run. Library code: progress goes to an `on_point`
callback, never to stdout.
"""
from __future__ import annotations

import datetime
import mmap
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .aligned import BLOCK, aligned_empty
from .flash_reader import AIO_DEPTH, FlashReader
from .layer_stream import CHUNK_BYTES

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class ProbeSettings:
    """What to measure; `quick()` is the short default, `full()` the thorough grid."""
    read_bytes: tuple[int, ...]
    threads: tuple[int, ...]
    sequential_threads: tuple[int, ...]
    file_bytes: int
    seconds: float
    compute_threads: tuple[int, ...]
    buffered: bool = True
    reader_checks: bool = True
    matvec_shape: tuple[int, int] = (2048, 4096)     # rows x cols of the synthetic decode matvec
    dram_bytes: int = 256 * MiB                      # array summed for DRAM bandwidth (>> last-level cache)

    @classmethod
    def quick(cls, cores: int) -> "ProbeSettings":
        return cls((4096, 16384, 65536, 262144, MiB), (1, 4, 16), (1, 4), 512 * MiB, 0.4,
                   _thread_counts(cores), buffered=True, reader_checks=False)

    @classmethod
    def full(cls, cores: int) -> "ProbeSettings":
        return cls((4096, 16384, 65536, 262144, MiB), (1, 4, 16, 32), (1, 4), 2 * GiB, 1.5,
                   _thread_counts(cores), buffered=True, reader_checks=True)


def _thread_counts(cores: int) -> tuple[int, ...]:
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return tuple(out + [cores])


# --- memory and cores ------------------------------------------------------------------------------
def cgroup_memory_limit() -> int | None:
    """The tightest memory limit of this process's cgroup (v2 memory.max or v1 limit_in_bytes), or None."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":                                   # cgroup v2: walk up to the root
            p = Path("/sys/fs/cgroup") / rel
            while True:
                f = p / "memory.max"
                if f.exists():
                    v = f.read_text().strip()
                    if v != "max":
                        limits.append(int(v))
                if p == Path("/sys/fs/cgroup") or p.parent == p:
                    break
                p = p.parent
        elif "memory" in controllers.split(","):
            for base in (Path("/sys/fs/cgroup/memory") / rel, Path("/sys/fs/cgroup/memory")):
                f = base / "memory.limit_in_bytes"
                if f.exists():
                    v = int(f.read_text().strip())
                    if v < 1 << 60:                             # "unlimited" is a huge page-rounded number
                        limits.append(v)
                    break
    return min(limits) if limits else None


def cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup CPU quota (cpu.max or cfs_quota/period), or None."""
    try:
        q = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if q[0] != "max":
            return int(q[0]) / int(q[1])
    except (OSError, IndexError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def machine_facts() -> dict:
    import psutil
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = psutil.cpu_count(logical=False) or logical
    cpu_quota = cgroup_cpu_limit()
    cores = min(physical, logical)
    if cpu_quota is not None:
        cores = max(1, min(cores, int(cpu_quota)))
    return {"cores": cores, "logical_cpus": logical, "ram_bytes": psutil.virtual_memory().total,
            "memory_limit_bytes": cgroup_memory_limit(), "page_size": mmap.PAGESIZE,
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine()}


def disk_info(path: str) -> dict:
    """Best effort: the block device holding `path` and its queue properties (Linux sysfs)."""
    try:
        st = os.stat(path)
        dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
        if (dev / "partition").exists():
            dev = dev.parent
        q = dev / "queue"
        return {"disk": dev.name,
                "rotational": (q / "rotational").read_text().strip() == "1",
                "logical_block_bytes": int((q / "logical_block_size").read_text()),
                "disk_model": (dev / "device" / "model").read_text().strip()
                if (dev / "device" / "model").exists() else ""}
    except (OSError, ValueError):
        return {}


# --- flash -----------------------------------------------------------------------------------------
def ensure_file(path: str, size: int) -> bool:
    """Create `path` with `size` random bytes unless it already holds that many; True if created."""
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return False
    rng = np.random.default_rng(0)
    chunk = 8 * MiB
    with open(path, "wb") as f:
        for _ in range(0, size, chunk):
            f.write(rng.bytes(chunk))
        f.flush()
        os.fsync(f.fileno())
    return True


def _run_threads(fd: int, nthreads: int, seconds: float, make_offsets) -> tuple[float, int, int]:
    """Each thread loops preadv over its own offsets until the deadline. Returns (elapsed, bytes, reads)."""
    barrier = threading.Barrier(nthreads + 1)
    results = [None] * nthreads

    def loop(i: int, bs: int, offsets: list[int]):
        buf = mmap.mmap(-1, bs)
        n, k, got = len(offsets), 0, 0
        barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        t1 = t0
        while t1 < deadline:
            got += os.preadv(fd, [buf], offsets[k % n])
            k += 1
            t1 = time.perf_counter()
        results[i] = (t0, t1, got, k)
        buf.close()

    threads = [threading.Thread(target=loop, args=(i, *make_offsets(i))) for i in range(nthreads)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return end - start, sum(r[2] for r in results), sum(r[3] for r in results)


def random_point(fd, file_size, bs, nthreads, seconds, seed=0):
    def offsets(i):
        rng = np.random.default_rng((seed, bs, nthreads, i))
        return bs, (rng.integers(0, file_size // bs, 1 << 16) * bs).tolist()
    return _run_threads(fd, nthreads, seconds, offsets)


def sequential_point(fd, file_size, nthreads, seconds, bs=MiB):
    region = file_size // nthreads // bs * bs      # each thread streams through its own region

    def offsets(i):
        return bs, [i * region + j * bs for j in range(region // bs)]
    return _run_threads(fd, nthreads, seconds, offsets)


def _evict(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def reader_rows_point(path, file_size, seconds, rows_per_call, stride=16384, threads=4):
    """FlashReader.read_rows with random 16 KiB rows: (useful MB/s, fetched MB/s, reads/s)."""
    n_rows = file_size // stride
    rng = np.random.default_rng(1)
    out = np.empty((rows_per_call, stride), np.uint8)
    dst = np.arange(rows_per_call)
    with FlashReader(path, layer_offsets=[0], stride_bytes=stride, n_rows=n_rows, mode="direct",
                     threads=threads) as r:
        r.read_rows(0, rng.choice(n_rows, rows_per_call, replace=False), out, dst)   # warm-up
        r.reset_stats()
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            r.read_rows(0, rng.choice(n_rows, rows_per_call, replace=False), out, dst)
        s = r.stats
    return s.useful_bytes / s.seconds / 1e6, s.bytes_read / s.seconds / 1e6, s.reads / s.seconds


class _Matvecs:
    """The compute thread of a decode step, reduced to what contends with the readers: short numba
    matvecs (kernels.matmul releases the GIL; at 2+ threads its parallel halves each need a core) with
    the Python between them that needs the GIL back, as a sparse layer's predictor, cache step and
    kernels do. `run` returns (calls, seconds) of a loop; against the same loop without reads in
    flight it gives the compute time the readers cost. Means, not medians: a GIL hand-off that
    stalls one call in ten is what a decode step pays."""

    def __init__(self, rows: int = 256, cols: int = 2048, copies: int = 64):
        from .kernels import matmul
        self.w = [np.full((rows, cols), 0x3C00, np.uint16) for _ in range(copies)]      # f16 ones, > cache
        self.x = np.ones((1, cols), np.float32)
        self.out = np.empty((1, rows), np.float32)
        self.matmul = matmul
        self.k = 0
        self.call()                                 # compiled before any clock runs

    def call(self) -> None:
        self.matmul(self.x, self.w[self.k % len(self.w)], self.out)
        self.k += 1

    def run(self, seconds: float, until=None) -> tuple[int, float]:
        n = 0
        t0 = time.perf_counter()
        t_end = t0 + seconds
        while n < 3 or (time.perf_counter() < t_end if until is None else not until()):
            self.call()
            n += 1
        return n, time.perf_counter() - t0


class _LayerKernel:
    """The streamed layers' kernel in the probe: a matvec over each layer's rows as f16 weights (a
    decode step's compute per streamed byte), timed, so the compute slowdown under streaming is measured
    on the calls the ring streamer itself makes."""

    def __init__(self, cols: int):
        from .kernels import matmul
        self.d = 8
        self.matmul = matmul
        self.x = np.ones((1, cols), np.float32)
        self.y = None
        self.times: list[float] = []

    def __call__(self, h, rows, n, ids, bias, out) -> None:
        if self.y is None or self.y.shape[1] != n:
            self.y = np.empty((1, n), np.float32)
        t0 = time.perf_counter()
        self.matmul(self.x, rows[:n], self.y)
        self.times.append(time.perf_counter() - t0)


RING_FRACTIONS = (1, 4, 16)     # rings the probe streams through: two whole layers, and 1/4, 1/16 of that
RATE_ROUNDS = 3                 # rounds over the reader thread counts whose median a ring or row rate is
MIN_RING_LAYERS = 16            # layers a ring point streams at least (this disk swings 0.6-1.4 GB/s within seconds)


def ring_stream_point(path, file_size, seconds, threads, compute_threads, layer_bytes=16 * MiB, stride=4096,
                      ring_fraction: int = 1, min_layers: int = MIN_RING_LAYERS) -> dict:
    """Whole layers through the runtime's own ring streamer (runtime/layer_stream.py: ~1.5 MiB chunks
    claimed in order by `threads` reader threads, read ahead across layers) with a ring of 1/ring_fraction
    of two whole layers (the sizes the planner gives streamed layers: memory.stream_ring_rows), while the
    compute thread runs a matvec over each layer as it arrives, as a decode step's streamed layers do.
    Streams consecutive layers of the file, as a token streams a plan's layers, for at least `min_layers`
    layers and `seconds`: a plan streams hundreds of MiB per token, and a short point catches this disk's
    swings rather than its rate. Returns the readers' rate (bytes / their busy time: the runtime's
    io_busy) and the compute slowdown (the per-layer matvec while streaming / the same matvec on
    resident rows)."""
    from .ffn import FFNStats
    from .kernels import set_threads
    from .layer_stream import RingStreamer, RowSource
    layer_bytes = max(stride, min(layer_bytes, file_size // 4 // stride * stride))
    n_rows, n_layers = layer_bytes // stride, file_size // layer_bytes
    ring_rows = -(-n_rows // max(1, int(ring_fraction)))
    src = RowSource(str(path), tuple(i * layer_bytes for i in range(n_layers)), stride, n_rows, 1,
                    np.dtype(np.uint16), direct=True)
    kernel = _LayerKernel(stride // 2)
    set_threads(compute_threads)
    stats = FFNStats()
    streamer = RingStreamer(src, kernel, [None] * n_layers, list(range(n_layers)), 2 * ring_rows * stride, stats,
                            threads=threads)
    try:
        h, out = np.ones((1, kernel.d), np.float32), np.zeros((1, kernel.d), np.float32)
        for layer in range(2):                 # warm-up: the ring filled, the kernel compiled
            streamer.compute(layer, h, out)
        streamer.settle()
        streamer.reset_stats()
        kernel.times.clear()
        t_end = time.perf_counter() + seconds
        layer = 2
        while time.perf_counter() < t_end or layer < 2 + min_layers:
            streamer.compute(layer % n_layers, h, out)
            layer += 1
        streamer.settle()
        nbytes, _ = streamer.io_counts()
        busy = streamer.ring.busy_s
    finally:
        streamer.close()
    loaded = float(np.mean(kernel.times))
    resident = [np.full((n_rows, stride // 2), 0x3C00, np.uint16) for _ in range(2)]
    kernel.times.clear()
    t_end = time.perf_counter() + max(0.2, seconds / 4)
    while len(kernel.times) < 4 or time.perf_counter() < t_end:
        kernel(h, resident[len(kernel.times) % 2], n_rows, None, None, out)
    alone = float(np.mean(kernel.times))
    set_threads(None)
    return {"stream_mb_s": nbytes / max(busy, 1e-9) / 1e6, "stream_slowdown": max(1.0, loaded / alone)}


ROW_CALL_ROWS = 128         # rows per read_rows call the probe times: what a sparse layer misses per token (~50-500)


def reader_call_point(path, seconds, threads, stride=4096, layer_bytes=16 * MiB, submit="pread") -> float:
    """Seconds one FlashReader.read_rows call costs beyond its reads (handing each worker its batch,
    waking it, joining them; under native AIO the calling thread's own submit and reap): median of calls
    of one row per reader thread from a layer in the page cache (buffered reads of cached blocks take
    microseconds), so the disk's noise stays out of it. `submit` is how the reader's direct reads go
    (reader_submission): AIO on a buffered file runs each read inside io_submit, the same calls and
    syscalls as a direct call without the disk's wait."""
    layer_bytes = min(layer_bytes, os.path.getsize(path) // stride * stride)
    n_rows = layer_bytes // stride
    with open(path, "rb") as f:                  # the layer into the page cache
        while f.tell() < layer_bytes and f.read(8 * MiB):
            pass
    rng = np.random.default_rng(4)
    out = aligned_empty((threads, stride), np.uint8)
    dst = np.arange(threads, dtype=np.int64)
    with FlashReader(path, layer_offsets=[0], stride_bytes=stride, n_rows=n_rows, mode="buffered",
                     threads=threads, submit=submit) as r:
        return _timed(lambda: r.read_rows(0, np.sort(rng.choice(n_rows, threads, replace=False)), out, dst),
                      max(0.1, seconds / 4), min_reps=20)


def reader_row_point(path, file_size, seconds, threads, call_s, stride=4096, layer_bytes=16 * MiB,
                     rows=ROW_CALL_ROWS) -> float:
    """Seconds per read in FlashReader.read_rows calls of `rows` random 4 KiB rows of a 16 MiB layer (direct),
    as the sparse path makes them: (median call time - the call's hand-off `call_s`) / reads per call
    (a few adjacent rows merge). The median of calls over `seconds`, not a fit over call sizes: a fit's
    intercept took 0.9-2.8 ms per call on this disk and its slope the rest, and the model sums both."""
    layer_bytes = max(stride, min(layer_bytes, file_size // 2 // stride * stride))
    n_rows, n_layers = layer_bytes // stride, file_size // layer_bytes
    k = min(rows, n_rows)
    rng = np.random.default_rng(2)
    out = aligned_empty((k, stride), np.uint8)
    dst = np.arange(k, dtype=np.int64)
    with FlashReader(path, layer_offsets=[i * layer_bytes for i in range(n_layers)], stride_bytes=stride,
                     n_rows=n_rows, mode="direct", threads=threads) as r:
        def call():
            r.read_rows(int(rng.integers(n_layers)), rng.choice(n_rows, k, replace=False), out, dst)
        call()
        r.reset_stats()
        t = _timed(call, seconds, min_reps=5)
        reads = r.stats.reads / max(1, r.stats.calls)
    return max(1e-7, (t - call_s) / max(1.0, reads))


def reader_call_compute_point(path, file_size, seconds, threads, compute_threads, stride=4096,
                              layer_bytes=16 * MiB, rows=64, repeats=3) -> float:
    """Compute-thread seconds lost per FlashReader.read_rows call of `rows` random 4 KiB rows made from an
    I/O thread while the compute thread runs short matvecs (`_Matvecs`): the reader's workers wake and
    take the GIL and the cores. Per repeat, the matvec loop's time with calls in flight less its time
    alone (measured just before) for as many matvecs, over the calls; the median of `repeats` repeats
    (one repeat swung 0.3-5.6 ms per call on this machine, under other processes' disk load)."""
    from .kernels import set_threads
    layer_bytes = max(stride, min(layer_bytes, file_size // 2 // stride * stride))
    n_rows, n_layers = layer_bytes // stride, file_size // layer_bytes
    rng = np.random.default_rng(2)
    out = aligned_empty((rows, stride), np.uint8)
    dst = np.arange(min(rows, n_rows), dtype=np.int64)
    set_threads(compute_threads)
    mv = _Matvecs()
    losses = []
    with FlashReader(path, layer_offsets=[i * layer_bytes for i in range(n_layers)], stride_bytes=stride,
                     n_rows=n_rows, mode="direct", threads=threads) as r:
        def call():
            r.read_rows(int(rng.integers(n_layers)), rng.choice(n_rows, len(dst), replace=False), out, dst)
        call()
        for _ in range(repeats):
            n0, t0 = mv.run(max(0.1, seconds / 8))
            calls = [0]
            done = threading.Event()

            def io_loop():
                t_end = time.perf_counter() + max(0.3, seconds / 4)
                while calls[0] < 3 or time.perf_counter() < t_end:
                    call()
                    calls[0] += 1
                done.set()
            io = threading.Thread(target=io_loop, daemon=True)
            io.start()
            n1, t1 = mv.run(0.0, until=done.is_set)
            io.join()
            losses.append(max(0.0, t1 - n1 * t0 / n0) / calls[0])
    set_threads(None)
    return float(np.median(losses))


def reader_runtime_points(path, file_size, seconds, threads, compute_threads, submit="pread") -> dict:
    """The reads of a decode step at `threads` reader threads with the runtime's own readers, while a
    compute thread at `compute_threads` numba threads runs: whole layers through the ring streamer
    (`ring_stream_point`, the full ring), the fixed cost of a row call (`reader_call_point`), its reads
    (`reader_row_point`) and the compute time a row call takes from the compute thread
    (`reader_call_compute_point`)."""
    call_s = reader_call_point(path, seconds, threads, submit=submit)
    return {**ring_stream_point(path, file_size, seconds / 2, threads, compute_threads), "call_s": call_s,
            "row_s": reader_row_point(path, file_size, seconds / 2, threads, call_s),
            "call_compute_s": reader_call_compute_point(path, file_size, seconds, threads, compute_threads)}


def reader_layer_point(path, file_size, seconds, layer_bytes=256 * MiB, stride=16384, threads=4):
    """FlashReader.read_layer of a whole layer into a reused page-aligned array: fetched MB/s."""
    layer_bytes = min(layer_bytes, file_size // stride * stride)
    n_rows = layer_bytes // stride
    n_layers = file_size // layer_bytes
    out = aligned_empty((n_rows, stride), np.uint8)
    out[:] = 0                                   # fault the pages in once: a prefill buffer is reused
    with FlashReader(path, layer_offsets=[i * layer_bytes for i in range(n_layers)], stride_bytes=stride,
                     n_rows=n_rows, mode="direct", threads=threads) as r:
        t_end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < t_end or i == 0:
            r.read_layer(i % n_layers, out)
            i += 1
        s = r.stats
    return s.bytes_read / s.seconds / 1e6


def reader_submission(path: str) -> tuple[str, str]:
    """How FlashReader submits direct reads of this file, as the probe's reader points measure them: the
    engine ("aio" or "pread") and a line for the profile ("native AIO, ..." or "pread (why)")."""
    with FlashReader(path, layer_offsets=[0], stride_bytes=BLOCK, n_rows=1, mode="direct", threads=1) as r:
        if r.submission == "aio":
            return "aio", f"native AIO from the calling thread, {AIO_DEPTH} reads in flight per call"
        return "pread", f"pread ({r.submission_note})"


def probe_flash(path: str, s: ProbeSettings, on_point: Callable[[str, dict], None]) -> dict:
    """Direct (and buffered) random reads by size x threads, sequential 1 MiB reads, FlashReader checks."""
    submit, res_submit = reader_submission(path)
    res = {"random": {}, "sequential": {}, "buffered_random": {}, "buffered_sequential": {}, "reader": {},
           "reader_submit": res_submit}
    on_point("reader", {"what": "submission", "submit": res_submit})
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for bs in s.read_bytes:
            for nt in s.threads:
                el, nbytes, nreads = random_point(fd, s.file_bytes, bs, nt, s.seconds)
                res["random"][bs, nt] = (nbytes / el / 1e6, nreads / el)
                on_point("flash", {"io": "direct", "read_bytes": bs, "threads": nt, "mb_s": nbytes / el / 1e6,
                                   "iops": nreads / el})
        for nt in s.sequential_threads:
            el, nbytes, _ = sequential_point(fd, s.file_bytes, nt, s.seconds)
            res["sequential"][nt] = nbytes / el / 1e6
            on_point("flash", {"io": "direct", "read_bytes": MiB, "threads": nt, "sequential": True,
                               "mb_s": nbytes / el / 1e6})
    finally:
        os.close(fd)
    if s.buffered:
        fd = os.open(path, os.O_RDONLY)
        try:
            for bs in s.read_bytes:
                for nt in s.threads:
                    _evict(fd)
                    el, nbytes, nreads = random_point(fd, s.file_bytes, bs, nt, s.seconds, seed=1)
                    res["buffered_random"][bs, nt] = nbytes / el / 1e6
                    on_point("flash", {"io": "buffered", "read_bytes": bs, "threads": nt, "mb_s": nbytes / el / 1e6})
            for nt in s.sequential_threads:
                _evict(fd)
                el, nbytes, _ = sequential_point(fd, s.file_bytes, nt, s.seconds)
                res["buffered_sequential"][nt] = nbytes / el / 1e6
                on_point("flash", {"io": "buffered", "read_bytes": MiB, "threads": nt, "sequential": True,
                                   "mb_s": nbytes / el / 1e6})
            _evict(fd)
        finally:
            os.close(fd)
    # The reader as decode steps use it (while computing): whole layers streamed, and calls of random rows.
    # Rates at the default compute threads (all cores); the compute slowdown at each compute thread count;
    # the streamed rate also through the smaller rings the planner may give streamed layers. The rates
    # (rings, reads per call) are the median of RATE_ROUNDS rounds over every reader thread count in turn:
    # this disk swings 2x within seconds, and one point taken in a swing would misprice that thread count.
    res["runtime"], res["slowdown"], res["ring"] = {}, {}, {}
    ct_max = max(s.compute_threads)
    ring, rows = {}, {}
    for nt in s.threads:
        for ct in sorted(s.compute_threads, reverse=True):
            pt = reader_runtime_points(path, s.file_bytes, s.seconds, nt, ct, submit)
            res["slowdown"][nt, ct] = (pt["stream_slowdown"], 1e6 * pt["call_compute_s"])
            if ct == ct_max:
                res["runtime"][nt] = pt
                ring[1, nt], rows[nt] = [pt["stream_mb_s"]], [pt["row_s"]]
            on_point("reader", {"what": "in a decode step", "threads": nt, "compute_threads": ct,
                                "stream_mb_s": pt["stream_mb_s"], "call_us": 1e6 * pt["call_s"],
                                "row_us": 1e6 * pt["row_s"], "stream_slowdown": pt["stream_slowdown"],
                                "call_compute_us": 1e6 * pt["call_compute_s"]})
    for r in range(RATE_ROUNDS):
        for nt in s.threads:
            for k in RING_FRACTIONS if r else RING_FRACTIONS[1:]:
                ring.setdefault((k, nt), []).append(
                    ring_stream_point(path, s.file_bytes, s.seconds / 2, nt, ct_max, ring_fraction=k)["stream_mb_s"])
            if r:
                rows[nt].append(reader_row_point(path, s.file_bytes, s.seconds / 2, nt, res["runtime"][nt]["call_s"]))
    for (k, nt), rates in ring.items():
        res["ring"][k, nt] = float(np.median(rates))
        on_point("reader", {"what": "ring", "threads": nt, "ring_fraction": k, "mb_s": res["ring"][k, nt],
                            "rounds": rates})
    for nt in s.threads:             # the rates written: the rounds' medians
        res["runtime"][nt] = {**res["runtime"][nt], "stream_mb_s": res["ring"][1, nt], "row_s": float(np.median(rows[nt]))}
        on_point("reader", {"what": "row reads", "threads": nt, "row_us": 1e6 * res["runtime"][nt]["row_s"],
                            "rounds": [1e6 * x for x in rows[nt]]})
    if s.reader_checks:
        rows = {}
        for nt, k in ((4, 64), (4, 512), (16, 512)):
            useful, _, _ = reader_rows_point(path, s.file_bytes, s.seconds, k, threads=nt)
            rows[nt, k] = useful
            on_point("reader", {"what": "read_rows", "threads": nt, "rows_per_call": k, "useful_mb_s": useful})
        layer = reader_layer_point(path, s.file_bytes, s.seconds)
        on_point("reader", {"what": "read_layer", "threads": 4, "mb_s": layer})
        res["reader"] = {"rows": rows, "layer": layer}
    return res


# --- DRAM and compute ------------------------------------------------------------------------------
def _timed(fn, seconds: float, min_reps: int = 3) -> float:
    """Median seconds per call of fn over about `seconds` (after one warm-up call). The median, not the
    best: the cost model predicts what decode steps take, and those are measured by their median too
    (on an idle machine the two agree; under load the best run would promise speeds no step sees)."""
    fn()
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def probe_dram(threads: tuple[int, ...], seconds: float, nbytes: int = 256 * MiB) -> dict[int, float]:
    """DRAM read bandwidth (GB/s) as the decode kernels see it: kernels.matmul streaming one f32
    matrix much larger than any cache (a plain float sum does not vectorize as well in numba)."""
    from .kernels import matmul, set_threads
    d = 4096
    w = np.ones((max(64, nbytes // (4 * d)), d), np.float32)
    x = np.ones((1, d), np.float32)
    out = np.empty((1, w.shape[0]), np.float32)
    res = {}
    for t in threads:
        set_threads(t)
        res[t] = w.nbytes / _timed(lambda: matmul(x, w, out), seconds) / 1e9
    set_threads(None)
    return res


def probe_matvec_numba(threads: tuple[int, ...], seconds: float, shape: tuple[int, int]) -> dict[str, dict[int, float]]:
    """G weights/s of kernels.matmul (the dense decode path) for f32 and f16 weights, T = 1."""
    from .kernels import matmul, set_threads
    rng = np.random.default_rng(0)
    n, d = shape
    x = rng.standard_normal((1, d)).astype(np.float32)
    out = np.empty((1, n), np.float32)
    # Several matrices whose total exceeds the last-level cache, cycled, as a decode step does.
    copies = min(64, max(2, (64 * MiB) // (n * d * 2)))
    weights = {"f32": [rng.standard_normal((n, d)).astype(np.float32) for _ in range(max(1, copies // 2))],
               "f16": [rng.standard_normal((n, d)).astype(np.float16).view(np.uint16) for _ in range(copies)]}
    res = {}
    for storage, ws in weights.items():
        res[f"numba-{storage}"] = {}
        for t in threads:
            set_threads(t)
            k = [0]

            def step():
                matmul(x, ws[k[0] % len(ws)], out)
                k[0] += 1
            res[f"numba-{storage}"][t] = n * d / _timed(step, seconds) / 1e9
    set_threads(None)
    return res


def probe_bundle_kernel(threads: tuple[int, ...], seconds: float, d: int = 1024,
                        n_rows: int = 4096) -> dict[str, dict[int, float]]:
    """G weights/s of the FFN row kernel (kernels.ffn_bundles, what resident, streamed and sparse layers
    run) over f16 rows of an up|down bundle (d_model d), T = 1: "numba-bundle-f16". Its loop (a dot
    product, an activation, an axpy per row) is not the dense matmul's, so it has its own figure."""
    from .kernels import ACT_RELU, ffn_bundles, set_threads
    rng = np.random.default_rng(0)
    copies = min(64, max(2, (64 * MiB) // (n_rows * 2 * d * 2)))
    mats = [rng.standard_normal((n_rows, 2 * d)).astype(np.float16).view(np.uint16) for _ in range(copies)]
    h = rng.standard_normal((1, d)).astype(np.float32)
    ids = np.arange(n_rows, dtype=np.int32)
    bias = np.zeros(n_rows, np.float32)
    out = np.empty((1, d), np.float32)
    every_row = np.zeros(0, np.int32)          # the kernel's `keep`: no subset
    res = {}
    for t in threads:
        set_threads(t)
        partial = np.zeros((t, 8, d), np.float32)
        k = [0]

        def step():
            ffn_bundles(h, mats[k[0] % copies], n_rows, ids, bias, ACT_RELU, np.float32(0), 0, 0, d, partial, out,
                        every_row)
            k[0] += 1
        res[t] = n_rows * 2 * d / _timed(step, seconds) / 1e9
    set_threads(None)
    return {"numba-bundle-f16": res}


def probe_cache_step(seconds: float, n_neurons: int = 4096) -> dict[str, float]:
    """A sparse layer's memory management on the compute thread: NeuronCache.count_missing + step (the
    window's evictions, admissions) per token, fitted as a fixed cost plus a cost per wanted neuron
    from 64 and 512 wanted of n_neurons, window 2. Rows of 16 bytes: the delete-by-swap row copies are
    priced separately, at DRAM bandwidth."""
    from .neuron_cache import NeuronCache
    rng = np.random.default_rng(3)
    per = {}
    for k in (64, 512):
        cache = NeuronCache(n_neurons, 4 * k, 8, np.uint16, window=2)
        sets = [np.sort(rng.choice(n_neurons, k, replace=False)).astype(np.int32) for _ in range(64)]
        i = [0]

        def step():
            w = sets[i[0] % len(sets)]
            i[0] += 1
            cache.count_missing(w)
            cache.step(w)
        per[k] = _timed(step, seconds / 2)
    row = max(0.0, (per[512] - per[64]) / (512 - 64))
    return {"cache_step_us": 1e6 * max(0.0, per[64] - 64 * row), "cache_step_row_us": 1e6 * row}


def probe_matvec_onnxruntime(threads: tuple[int, ...], seconds: float, shape: tuple[int, int]) -> dict[str, dict[int, float]]:
    """G weights/s of onnxruntime's com.microsoft.MatMulNBits (4 and 8 bits, block 32) on synthetic
    constant weights, T = 1; when onnxruntime cannot be used here (runtime/engines.py), only why."""
    from .engines import onnxruntime_status
    status = onnxruntime_status()
    if not status.usable:
        return {"_errors": {"ort": status.detail}}
    import onnxruntime as ort
    from onnx import TensorProto, helper
    n, d = shape
    block = 32
    res = {}
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        blob = block * bits // 8
        nodes, inits = [], []
        # A chain of square-ish matvecs ([d] -> [n] -> [d] ...) whose weights exceed the cache.
        n_mats = min(64, max(2, (64 * MiB) // (n * d * bits // 8)))
        prev = "x"
        dims = [(d, n) if i % 2 == 0 else (n, d) for i in range(n_mats)]
        for i, (K, N) in enumerate(dims):
            kb = K // block
            w = rng.integers(0, 256, (N, kb, blob), dtype=np.uint8)
            sc = (rng.random(N * kb, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
            inits += [helper.make_tensor(f"w{i}", TensorProto.UINT8, w.shape, w.tobytes(), raw=True),
                      helper.make_tensor(f"s{i}", TensorProto.FLOAT, sc.shape, sc.tobytes(), raw=True)]
            nodes.append(helper.make_node("MatMulNBits", [prev, f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                          K=K, N=N, bits=bits, block_size=block, accuracy_level=4))
            prev = f"y{i}"
        graph = helper.make_graph(nodes, "matvec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                                  [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model_bytes = model.SerializeToString()
        x = rng.standard_normal((1, d)).astype(np.float32)
        weights = sum(K * N for K, N in dims)
        key = f"ort-int{bits}"
        res[key] = {}
        for t in threads:
            so = ort.SessionOptions()
            so.intra_op_num_threads = t
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
            except Exception as e:      # an onnxruntime build without this contrib op / bit width
                res.pop(key, None)
                res.setdefault("_errors", {})[key] = str(e).splitlines()[0][:200]
                break
            feed = {"x": x}
            res[key][t] = weights / _timed(lambda: sess.run(None, feed), seconds) / 1e9
    return res


# --- the whole probe -------------------------------------------------------------------------------
def probe(directory: str | Path, settings: ProbeSettings | None = None, *, quick: bool = True,
          on_point: Callable[[str, dict], None] = lambda kind, point: None, keep_file: bool = False) -> dict:
    """Measure this machine; returns the profile as a dict ready for `profile_toml` (and parse_profile)."""
    facts = machine_facts()
    s = settings or (ProbeSettings.quick if quick else ProbeSettings.full)(facts["cores"])
    directory = Path(directory)
    test_file = directory / "flashlm-probe.bin"
    created = ensure_file(str(test_file), s.file_bytes)
    try:
        flash = probe_flash(str(test_file), s, on_point)
    finally:
        if created and not keep_file:
            test_file.unlink()
    dram = probe_dram(s.compute_threads, s.seconds, s.dram_bytes)
    on_point("dram", {"gb_s": dram})
    compute = probe_matvec_numba(s.compute_threads, s.seconds, s.matvec_shape)
    compute.update(probe_bundle_kernel(s.compute_threads, s.seconds, d=s.matvec_shape[1] // 2, n_rows=s.matvec_shape[0]))
    compute.update(probe_matvec_onnxruntime(s.compute_threads, s.seconds, s.matvec_shape))
    errors = compute.pop("_errors", {})
    on_point("compute", {"gweights_s": compute, "errors": errors})
    step = probe_cache_step(s.seconds)
    on_point("cache", step)
    return _as_profile(facts, disk_info(str(directory)), s, flash, dram, compute, errors, step)


def round_figure(v) -> float:
    """A measured figure as written: 0.1 above 10, else 4 significant digits (never 0 for a positive
    figure: an emulated aarch64 root measured the row kernel at 0.0004 G weights/s, which 3 decimals
    wrote as 0.0 and the profile's own parser then refused)."""
    v = float(v)
    return round(v, 1) if v >= 10 else float(f"{v:.4g}")


def _as_profile(facts, disk, s: ProbeSettings, flash, dram, compute, errors, check=None) -> dict:
    rnd = round_figure
    fl = {"read_bytes": list(s.read_bytes), "threads": list(s.threads),
          "sequential_threads": list(s.sequential_threads),
          "sequential_1m_mb_s": [rnd(flash["sequential"][t]) for t in s.sequential_threads],
          "random_mb_s": {str(b): [rnd(flash["random"][b, t][0]) for t in s.threads] for b in s.read_bytes},
          "random_iops": {str(b): [float(round(flash["random"][b, t][1])) for t in s.threads] for b in s.read_bytes}}
    if flash.get("runtime"):
        rt = flash["runtime"]
        fl["reader_stream_mb_s"] = [rnd(rt[t]["stream_mb_s"]) for t in s.threads]
        fl["reader_call_us"] = [round(1e6 * rt[t]["call_s"], 1) for t in s.threads]
        fl["reader_row_us"] = [round(1e6 * rt[t]["row_s"], 2) for t in s.threads]
    if flash.get("ring"):
        fl["ring_stream_mb_s"] = {str(k): [rnd(flash["ring"][k, t]) for t in s.threads]
                                  for k in sorted({k for k, _ in flash["ring"]})}
    if flash["buffered_random"]:
        fl["buffered_sequential_1m_mb_s"] = [rnd(flash["buffered_sequential"][t]) for t in s.sequential_threads]
        fl["buffered_random_mb_s"] = {str(b): [rnd(flash["buffered_random"][b, t]) for t in s.threads]
                                      for b in s.read_bytes}
    if flash["reader"]:
        rows = flash["reader"]["rows"]
        fl["flashreader"] = {"read_rows_threads": [t for t, _ in rows], "read_rows_rows_per_call": [k for _, k in rows],
                             "read_rows_useful_mb_s": [rnd(v) for v in rows.values()],
                             "read_layer_mb_s": rnd(flash["reader"]["layer"])}
    device = {"name": "", "description": "measured by flashlm probe", "measured": True, **facts, **disk}
    if device["memory_limit_bytes"] is None:
        del device["memory_limit_bytes"]
    threads = list(s.compute_threads)
    return {
        "version": 1,
        "device": device,
        "probe": {"date": datetime.date.today().isoformat(), "file_bytes": s.file_bytes, "seconds_per_point": s.seconds,
                  "method": "python threads, each looping os.preadv over its own offsets (fio psync numjobs); "
                            "buffered points after POSIX_FADV_DONTNEED",
                  **({"reader_submit": flash["reader_submit"]} if flash.get("reader_submit") else {}),
                  "matvec_shape": list(s.matvec_shape), **({"engine_errors": errors} if errors else {})},
        "flash": fl,
        "memory": {"threads": threads, "read_gb_s": [rnd(dram[t]) for t in threads]},
        "compute": {"threads": threads, **({k: rnd(v) for k, v in check.items()} if check else {}),
                    "gweights_s": {k: [rnd(v[t]) for t in threads] for k, v in compute.items() if v},
                    **_slowdown_tables(flash.get("slowdown"), s.threads, threads)},
    }


def _slowdown_tables(slowdown: dict | None, reader_threads, compute_threads) -> dict:
    """[compute.stream_slowdown] (compute time while the ring streams / alone) and
    [compute.reader_call_compute_us] (compute-thread time lost per read_rows call): per reader thread
    count (the key), at each compute thread count."""
    if not slowdown:
        return {}
    return {name: {str(nt): [round(float(slowdown[nt, ct][i]), 2) for ct in compute_threads] for nt in reader_threads}
            for i, name in enumerate(("stream_slowdown", "reader_call_compute_us"))}


# --- TOML writing (tomllib reads, nothing in the standard library writes) ----------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(data: dict, header: list[str] = ()) -> str:
    """A nested dict of scalars, lists and tables as TOML (tables after the scalars of each level)."""
    lines = [f"# {h}" for h in header]

    def emit(table: dict, prefix: str):
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.extend(["", f"[{prefix}]"])
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in tables.items():
            emit(v, f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k))
    emit(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"
