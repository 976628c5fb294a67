"""Read FFN bundle rows from flash: sorted, coalesced, 4 KiB-aligned reads spread over persistent threads.

Why it is built this way (measured on a 2-core VM with a virtio disk, see ../shared/DESIGN.md):
- The disk needs depth: random 16 KiB reads give ~220 MB/s at depth 1 but 0.75-0.8 GB/s at depth 32,
  and >= 64 KiB reads 1.1-1.2 GB/s. So rows are sorted, adjacent rows become one read, small gaps may be
  read through (`max_gap_bytes`), and the reads are split over several threads.
- Threads that each LOOP over their own batch of reads match fio, while one thread-pool task per read
  stalls at ~20k tasks/s. So each call sends exactly one task per worker, and each worker owns a
  page-aligned staging buffer. The loop itself (claim a run, pread, scatter its rows) is one numba call
  per task that releases the GIL for the whole batch (libc `pread` called from nopython code), not a
  Python loop around `os.preadv`: on 2 cores that per-read Python work ran beside the compute kernels
  and took CPU and the GIL from them (see docs/BENCHMARKS.md, "Reader loop in numba").
- Reads reach the kernel in batches through Linux native AIO (runtime/native_aio.py): every claimable run
  in one io_submit, up to AIO_DEPTH in flight, completions reaped in groups. With AIO one thread keeps the
  disk as deep as four did, so by default the calling thread submits its own call's reads (`inline`, one
  context per concurrent caller) and no worker wakes: that cut the CPU per read another 1.1-1.6x in
  128- and 32-row calls. In this
  VM a pread cost 30-65 us of CPU (a syscall, a virtual-disk notification, an interrupt, a thread wake per
  read); batched, 6-8 us, and 1.5-3x the reads/s from host-cached rows (tools/bench_read_submit.py,
  docs/BENCHMARKS.md "Batched read submission"). pread stays the path where AIO is not there or refused
  (buffered mode, a kernel without it, a filesystem failing it, aio-max-nr reached): `submission_note`
  says why in one line.
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
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import native_aio
from .aligned import BLOCK
from .errors import FlashlmError

MIN_SPLIT_BYTES = 64 * 1024    # don't cut a run below this just to keep every worker busy
AIO_DEPTH = 64                 # reads each worker keeps in flight through native AIO (see _aio_read_runs)
AIO_REAP = 32                  # ... and how many completions it waits for per io_getevents


class DirectIOUnsupported(OSError, FlashlmError):
    """The filesystem refused O_DIRECT (e.g. older tmpfs, some FUSE/overlay setups)."""


@dataclass
class ReadStats:
    bytes_read: int = 0        # bytes fetched from the file, including alignment and gap overhead
    useful_bytes: int = 0      # distinct requested rows x row_bytes
    reads: int = 0             # read requests: preads, or reads submitted through native AIO
    syscalls: int = 0          # read syscalls: one per pread; io_submit + io_getevents calls under AIO
    seconds: float = 0.0       # wall time inside read_rows / read_layer (concurrent calls each count)
    calls: int = 0             # read_rows / read_layer calls
    busy_s: float = 0.0        # wall time with at least one call in flight (concurrent calls count once)
    cpu_s: float = 0.0         # CPU time of the worker threads on their tasks (syscalls, copies): what the
    #                            reads take from compute on a small machine


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


# libc's pread(fd, buf, count, offset), called from nopython code by symbol name (so the kernels stay
# cacheable). The buffer is passed as an integer address: same register and width as a pointer on the
# 64-bit ABIs this runs on (x86-64, aarch64).
_pread = types.ExternalFunction("pread", types.intp(types.intc, types.intp, types.uintp, types.intp))


@intrinsic
def _claim(typingctx, counter):
    """Atomically counter[0] += 1 and return the old value: the readers' shared run counter (the same
    role as itertools.count under the GIL in the Python loop, without the GIL)."""
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [zero])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "seq_cst")
    return sig, codegen


@njit(cache=True, nogil=True)
def _read_runs(fd, counter, n_runs, run_off, run_len, run_direct, run_lo, run_hi, ns, dst, layer_off, stride,
               stage, stage_addr, out2d, out_addr, result):
    """One worker's share of a call: claim runs until none is left; each is read with pread (looping over
    short reads) straight into `out` (direct runs) or into the staging buffer, whose rows are then copied
    to their out rows. result[:] = (bytes, preads, failed run or -1): a pread error or an early EOF stops
    the loop and names the run, which the caller redoes with os.preadv to raise the right OSError (or to
    retry an interrupted call)."""
    nbytes = 0
    ncalls = 0
    result[2] = -1
    while True:
        k = _claim(counter)
        if k >= n_runs:
            break
        off = run_off[k]
        length = run_len[k]
        direct = run_direct[k]
        lo = run_lo[k]
        hi = run_hi[k]
        if direct >= 0:
            addr = out_addr + direct
            need = length
        else:
            addr = stage_addr
            need = layer_off + ns[hi - 1] * stride + stride - off   # EOF may cut the alignment padding
        got = 0
        while got < need:
            r = _pread(fd, addr + got, length - got, off + got)
            ncalls += 1
            if r <= 0:
                break
            got += r
        if got < need:
            result[0] = nbytes
            result[1] = ncalls
            result[2] = k
            return
        nbytes += got
        if direct < 0:
            width = out2d.shape[1]           # the stride, or a cache's packed row (its parts, no padding)
            for j in range(lo, hi):
                src = layer_off + ns[j] * stride - off
                out2d[dst[j], :] = stage[src:src + width]
    result[0] = nbytes
    result[1] = ncalls


@njit(cache=True, nogil=True)
def _aio_read_runs(nr_submit, nr_getevents, ctx, iocbs, iocb_addr, submit_ptrs, events, ws, reap,
                   fd, counter, n_runs, run_off, run_len, run_direct, run_lo, run_hi, ns, dst, layer_off, stride,
                   stage, stage_addr, out2d, out_addr, failed, result):
    """_read_runs through native AIO: claim runs and keep up to depth = len(submit_ptrs) of them in flight,
    submitting every claimable run in one io_submit and reaping at least `reap` completions per
    io_getevents, scattering staged rows as their reads complete.

    Staged runs take space in the staging arena `stage` in claim order, as a ring (byte counters head and
    tail; a run that would wrap starts at the arena's beginning instead), released in the same order once
    read, so a run's bytes stay put while its read is in flight. The arena holds any one run (the plan caps
    runs at the staging size), so a run always fits once the ring has drained. ws (depth x 6, int64)
    holds per slot: run, ring end, done, ring start (-1: read straight into out), the free-slot stack,
    and the release FIFO of staged slots.

    result[:] = (bytes, requests, syscalls, failed runs, fatal). A read that failed or came back short
    (res < what the run needs) is listed in failed[] for the caller to redo with os.preadv (which raises
    the right error, or finishes a read the kernel cut short); claiming stops at the first one and the
    loop drains what is in flight. fatal > 0: io_submit refused with that errno (AIO unusable here): the
    runs claimed but not submitted are listed too, and it returns once nothing is in flight; the caller
    goes on with pread. fatal < 0: io_getevents failed (-errno; not expected with valid arguments)."""
    depth = len(submit_ptrs)
    arena = len(stage)
    for s in range(depth):
        ws[s, 4] = s
    nfree = depth
    fifo_h = 0
    fifo_n = 0
    head = 0
    tail = 0
    pending = -1
    exhausted = False
    stop = False
    inflight = 0
    nprep = 0                     # iocb pointers prepared in submit_ptrs[:nprep], not yet submitted
    nbytes = 0
    nreq = 0
    nsys = 0
    nfail = 0
    fatal = 0
    width = out2d.shape[1]
    while True:
        while not stop and nfree > 0:
            if pending < 0:
                if exhausted:
                    break
                k = _claim(counter)
                if k >= n_runs:
                    exhausted = True
                    break
                pending = k
            k = pending
            length = run_len[k]
            if run_direct[k] >= 0:
                addr = out_addr + run_direct[k]
                start = -1
            else:
                if fifo_n == 0:
                    head = 0
                    tail = 0
                pos = head % arena
                pad = arena - pos if pos + length > arena else 0
                if head + pad + length - tail > arena:
                    break                               # wait for the ring to drain
                start = head + pad
                head = start + length
                addr = stage_addr + start % arena
            nfree -= 1
            s = ws[nfree, 4]
            ws[s, 0] = k
            ws[s, 1] = head
            ws[s, 2] = 0
            ws[s, 3] = start
            if start >= 0:
                ws[(fifo_h + fifo_n) % depth, 5] = s
                fifo_n += 1
            native_aio.fill_iocb(iocbs, s, fd, addr, length, run_off[k])
            submit_ptrs[nprep] = iocb_addr[s]
            nprep += 1
            pending = -1
        if nprep > 0:
            r = native_aio.submit_from(nr_submit, ctx, submit_ptrs, 0, nprep)
            nsys += 1
            if r > 0:
                for j in range(r, nprep):               # keep the rest for the next round
                    submit_ptrs[j - r] = submit_ptrs[j]
                nprep -= r
                inflight += r
                nreq += r
            elif (r == 0 or r == -11) and inflight > 0:  # EAGAIN: the context is full; reap, then retry
                pass
            else:
                fatal = -r if r < 0 else 11
                stop = True
                for j in range(nprep):                  # hand the unsubmitted runs back to the caller
                    s = (submit_ptrs[j] - iocb_addr[0]) // (native_aio.IOCB_WORDS * 8)
                    failed[nfail] = ws[s, 0]
                    nfail += 1
                    ws[s, 2] = 1
                    if ws[s, 3] < 0:
                        ws[nfree, 4] = s
                        nfree += 1
                nprep = 0
        if inflight == 0:
            if nprep == 0 and pending < 0 and (exhausted or stop):
                break
            if stop and nprep == 0:
                break
            continue
        want = 1 if (nprep > 0 or pending >= 0) else min(reap, inflight)
        r = native_aio.get_events(nr_getevents, ctx, events, want, depth)
        nsys += 1
        if r < 0:                                       # cannot happen with valid arguments; nothing safe is left
            fatal = r
            break
        for j in range(r):
            s = events[j, 0]
            res = events[j, 2]
            k = ws[s, 0]
            start = ws[s, 3]
            off = run_off[k]
            if start < 0:
                need = run_len[k]
            else:
                need = layer_off + ns[run_hi[k] - 1] * stride + stride - off   # EOF may cut the padding
            if res < need:
                failed[nfail] = k
                nfail += 1
                stop = True
            else:
                nbytes += res
                if start >= 0:
                    base = start % arena - off
                    for i in range(run_lo[k], run_hi[k]):
                        src = base + layer_off + ns[i] * stride
                        out2d[dst[i], :] = stage[src:src + width]
            ws[s, 2] = 1
            if start < 0:
                ws[nfree, 4] = s
                nfree += 1
        inflight -= r
        while fifo_n > 0 and ws[ws[fifo_h, 5], 2] == 1:   # release staged slots in claim order
            s = ws[fifo_h, 5]
            tail = ws[s, 1]
            ws[nfree, 4] = s
            nfree += 1
            fifo_h = (fifo_h + 1) % depth
            fifo_n -= 1
    if pending >= 0:                                    # claimed, never submitted: the caller reads it
        failed[nfail] = pending
        nfail += 1
    result[0] = nbytes
    result[1] = nreq
    result[2] = nsys
    result[3] = nfail
    result[4] = fatal


@njit(cache=True, nogil=True)
def _plan_runs(neurons, out_rows, n_rows, layer_off, stride, gap_blocks, cap_blocks, threads, out_addr,
               counts, ns, dst, run_off, run_len, run_lo, run_hi, run_consecutive, run_direct):
    """Turn one call's (neuron, out row) pairs into runs: aligned byte ranges in file order, each with the
    sorted rows lo:hi it carries. Writes into the preallocated arrays; returns (runs, unique rows).

    - Rows are sorted by neuron with a stable counting sort (ids are < n_rows, a few thousand).
    - Segments: the blocks rows touch, merged when the hole between them is <= gap_blocks (reading
      through a small hole costs less than a second request on this kind of disk).
    - Runs: segments cut at the staging size and, for big reads (a whole layer, long runs), into about one
      piece per worker so all of them read in parallel (not below MIN_SPLIT_BYTES). Cuts fall on whole
      rows: the rows of a segment sit on a grid of row_blocks from the segment's first row.
    - run_direct[k] >= 0 is a byte offset into `out` when run k is exactly its rows, consecutive in `out`
      at an aligned address, so it is read straight into `out` without the staging copy."""
    n = len(neurons)
    counts[:n_rows + 1] = 0
    for i in range(n):
        counts[neurons[i] + 1] += 1
    for r in range(n_rows):
        counts[r + 1] += counts[r]
    for i in range(n):                       # stable: equal neurons keep their call order
        r = neurons[i]
        j = counts[r]
        counts[r] = j + 1
        ns[j] = r
        dst[j] = out_rows[i]
    unique = 1
    for i in range(1, n):
        if ns[i] != ns[i - 1]:
            unique += 1

    row_blocks = max(stride // BLOCK, 1)
    # First pass: total blocks over segments, for the per-worker split.
    total_blocks = 0
    seg_bs = (layer_off + ns[0] * stride) // BLOCK
    prev_be = (layer_off + ns[0] * stride + stride + BLOCK - 1) // BLOCK
    for i in range(1, n):
        bs = (layer_off + ns[i] * stride) // BLOCK
        if bs > prev_be + gap_blocks:
            total_blocks += prev_be - seg_bs
            seg_bs = bs
        prev_be = (layer_off + ns[i] * stride + stride + BLOCK - 1) // BLOCK   # sorted: monotonic
    total_blocks += prev_be - seg_bs
    want = -(-total_blocks // threads)
    cap = min(cap_blocks, max(want, MIN_SPLIT_BYTES // BLOCK))
    cap = max(cap // row_blocks, 1) * row_blocks

    # Second pass: runs.
    k = -1
    seg_bs = 0
    piece = 0
    prev_be = 0
    for i in range(n):
        start = layer_off + ns[i] * stride
        bs = start // BLOCK
        be = (start + stride + BLOCK - 1) // BLOCK
        new_seg = i == 0 or bs > prev_be + gap_blocks
        if new_seg:
            seg_bs = bs
        p = (bs - seg_bs) // cap
        if new_seg or p != piece:
            if k >= 0:
                run_hi[k] = i
            k += 1
            run_lo[k] = i
            run_off[k] = bs * BLOCK
            run_consecutive[k] = True
        elif ns[i] - ns[i - 1] != 1 or dst[i] - dst[i - 1] != 1:
            run_consecutive[k] = False
        piece = p
        prev_be = be
        run_len[k] = be * BLOCK - run_off[k]              # trimmed to the run's last wanted row
    run_hi[k] = n
    n_runs = k + 1
    for k in range(n_runs):
        lo, hi = run_lo[k], run_hi[k]
        run_direct[k] = -1
        if (out_addr >= 0 and run_consecutive[k] and layer_off + ns[lo] * stride == run_off[k]
                and (hi - lo) * stride == run_len[k] and (out_addr + dst[lo] * stride) % BLOCK == 0):
            run_direct[k] = dst[lo] * stride
    return n_runs, unique


class _Plan:
    """Preallocated arrays for one call's runs (see _plan_runs), reused call after call: a decode token
    allocates no arrays here. A reader keeps one per call in flight (concurrent callers each take one)."""

    def __init__(self, capacity: int, n_rows: int):
        self.capacity = capacity
        self.counts = np.zeros(n_rows + 1, np.int64)
        self.ns, self.dst = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
        self.off, self.length = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
        self.lo, self.hi = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
        self.consecutive = np.zeros(capacity, np.bool_)
        self.direct = np.zeros(capacity, np.int64)
        self.n_runs = self.unique = 0

    def fill(self, neurons, out_rows, n_rows, layer_off, stride, gap_blocks, cap_blocks, threads, out_addr):
        self.n_runs, self.unique = _plan_runs(
            neurons, out_rows, n_rows, layer_off, stride, gap_blocks, cap_blocks, threads, out_addr,
            self.counts, self.ns, self.dst, self.off, self.length, self.lo, self.hi, self.consecutive,
            self.direct)


def _read_full(fd: int, buf: memoryview, offset: int, need: int, path: str) -> tuple[int, int]:
    """preadv until at least `need` bytes arrived; returns (bytes, calls). Short reads only happen at EOF.
    Errors name the file and the offset."""
    got, calls = 0, 0
    while got < need:
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as e:
            if got and e.errno == errno.EINVAL and got % BLOCK:   # O_DIRECT refuses to go on after an
                n = 0                                              # unaligned short read (EOF)
            else:
                raise OSError(e.errno, f"{path}: reading {len(buf) - got} bytes at offset {offset + got}: "
                                       f"{e.strerror}") from e
        calls += 1
        if n <= 0:
            raise OSError(errno.EIO, f"{path}: short read at offset {offset + got}: the file ends before the "
                                     f"bundle rows (got {got} of {need} bytes)")
        got += n
    return got, calls


@dataclass
class Submission:
    """How a reader's workers hand reads to the kernel, shared by the reader and its workers: "aio" (native
    AIO, AIO_DEPTH reads in flight per worker) or "pread" (one blocking read per syscall), and why pread
    where AIO was not used (one line; empty under AIO). A worker whose io_submit is refused switches the
    whole reader to pread and says so here."""
    engine: str
    note: str = ""


class _Worker:
    """One reader thread's buffers and loops. Module-level state only (no reference to the reader), so an
    abandoned reader is garbage collected and its finalizer stops the thread."""

    def __init__(self, fd: int, stage: mmap.mmap, path: str, submission: Submission, aio):
        self.fd, self.path, self.submission, self.aio = fd, path, submission, aio
        self.stage_mv = memoryview(stage)
        self.stage_np = np.frombuffer(stage, dtype=np.uint8)
        self.stage_addr = _address(self.stage_np)
        self.result = np.zeros(5, np.int64)
        if aio is not None:
            self.ws = np.zeros((aio.depth, 6), np.int64)
            self.failed = np.zeros(aio.depth + 1, np.int64)

    def redo(self, job, i) -> tuple[int, int]:
        """Run i of a call in Python with os.preadv: the numba loops' error path (raises the OSError the
        syscall gave, EINTR retried by Python, EOF named; a read the kernel cut short is finished), and
        every run under loop="python"."""
        plan, out2d, out_mv, layer_off, stride = job
        ns, dst = plan.ns, plan.dst
        off, length, direct = int(plan.off[i]), int(plan.length[i]), int(plan.direct[i])
        if direct >= 0:
            return _read_full(self.fd, out_mv[direct:direct + length], off, length, self.path)
        lo, hi = int(plan.lo[i]), int(plan.hi[i])
        need = layer_off + int(ns[hi - 1]) * stride + stride - off
        b, c = _read_full(self.fd, self.stage_mv[:length], off, need, self.path)
        width = out2d.shape[1]
        for j in range(lo, hi):
            src = layer_off + int(ns[j]) * stride - off
            out2d[int(dst[j]), :] = self.stage_np[src:src + width]
        return b, c

    def task(self, claim, job) -> tuple[int, int, int]:
        """Read runs of one call until none is left to claim: (bytes, read requests, syscalls)."""
        plan, out2d, out_mv, layer_off, stride = job
        nbytes = nreq = nsys = 0
        if not isinstance(claim, np.ndarray):        # loop="python": claim is an itertools.count
            while (i := next(claim)) < plan.n_runs:
                b, c = self.redo(job, i)
                nbytes, nreq, nsys = nbytes + b, nreq + c, nsys + c
            return nbytes, nreq, nsys
        out_addr = _address(out2d)
        res = self.result
        a = self.aio
        if a is not None and self.submission.engine == "aio":
            while True:
                _aio_read_runs(a.nr_submit, a.nr_getevents, a.ctx, a.iocbs, a.iocb_addr, a.submit, a.events,
                               self.ws, AIO_REAP, self.fd, claim, plan.n_runs, plan.off, plan.length, plan.direct,
                               plan.lo, plan.hi, plan.ns, plan.dst, layer_off, stride, self.stage_np,
                               self.stage_addr, out2d, out_addr, self.failed, res)
                nbytes, nreq, nsys = nbytes + int(res[0]), nreq + int(res[1]), nsys + int(res[2])
                nfail, fatal = int(res[3]), int(res[4])
                if fatal < 0:          # io_getevents failed: reads may still be in flight; nothing is safe
                    raise OSError(-fatal, f"{self.path}: native AIO io_getevents failed: {os.strerror(-fatal)}")
                if fatal > 0:
                    self.submission.engine = "pread"
                    self.submission.note = (f"native AIO refused reads of {self.path} "
                                            f"({os.strerror(fatal)}): reading with pread")
                for i in self.failed[:nfail].tolist():
                    b, c = self.redo(job, i)
                    nbytes, nreq, nsys = nbytes + b, nreq + c, nsys + c
                if fatal:
                    break                              # the rest of this call with pread
                if nfail == 0:
                    return nbytes, nreq, nsys
        while True:
            _read_runs(self.fd, claim, plan.n_runs, plan.off, plan.length, plan.direct, plan.lo, plan.hi, plan.ns,
                       plan.dst, layer_off, stride, self.stage_np, self.stage_addr, out2d, out_addr, res)
            nbytes, nreq, nsys = nbytes + int(res[0]), nreq + int(res[1]), nsys + int(res[1])
            failed = int(res[2])
            if failed < 0:
                return nbytes, nreq, nsys
            b, c = self.redo(job, failed)
            nbytes, nreq, nsys = nbytes + b, nreq + c, nsys + c

    def release(self) -> None:
        del self.stage_np
        self.stage_mv.release()


def _worker(tasks: queue.SimpleQueue, w: _Worker) -> None:
    while True:
        item = tasks.get()
        if item is None:
            break
        claim, job, done = item
        c0 = time.thread_time()
        try:
            b, c, n = w.task(claim, job)
            done.put((b, c, n, time.thread_time() - c0, None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
            done.put((0, 0, 0, time.thread_time() - c0, e))
        del item, claim, job, done   # drop references to the caller's `out` before blocking again
    w.release()


def _shutdown(queues, threads, fd, stages, aios, callers):
    for q in queues:
        q.put(None)
    for t in threads:
        if t is not threading.current_thread():
            t.join(timeout=10)
    for a in aios:                   # io_destroy waits for reads still in flight
        a.close()
    for w, stage in callers:
        w.aio.close()
        w.release()
        stages = [*stages, stage]
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
                 staging_bytes: int = 1 << 20, row_bytes: int | None = None, loop: str = "numba",
                 submit: str = "auto", aio_depth: int = AIO_DEPTH, inline: bool = True):
        if mode not in ("direct", "buffered"):
            raise ValueError(f"mode must be 'direct' or 'buffered', not {mode!r}")
        if loop not in ("numba", "python"):
            raise ValueError(f"loop must be 'numba' or 'python', not {loop!r}")
        if submit not in ("auto", "aio", "pread"):
            raise ValueError(f"submit must be 'auto', 'aio' or 'pread', not {submit!r}")
        if aio_depth < 1:
            raise ValueError("aio_depth must be >= 1")
        # submit: "aio" hands each worker's reads to the kernel in batches (native AIO, aio_depth in flight
        # per worker), "pread" issues one blocking read per syscall; "auto" takes AIO where it works (direct
        # mode, a kernel and filesystem that accept it) and says why not in submission_note otherwise.
        # inline (AIO only): the calling thread submits and reaps its call's reads itself (one context per
        # concurrent caller) instead of handing them to the workers: no thread wake-up, hand-off or join.
        # "numba": each worker's batch is one nogil call (_read_runs); "python": one os.preadv per run
        # from a Python loop (the reader before; kept to measure against, tools/bench_reader_loop.py)
        self.loop = loop
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
        self._plans: list[_Plan] = []  # run arrays for calls, reused (see _Plan)
        self._all_rows = np.arange(self.n_rows, dtype=np.int64)

        self._fd = self._open()
        self.inline = bool(inline)
        self._submission, aios = self._open_aio(submit, int(aio_depth))
        # Under AIO a worker's staging buffer is the ring its in-flight staged runs share: room for a full
        # window of single-row runs as well as for the largest run.
        stage_bytes = self.staging_bytes
        if aios:
            stage_bytes = max(stage_bytes, int(aio_depth) * (-(-self.stride_bytes // BLOCK) * BLOCK))
        stages = [mmap.mmap(-1, stage_bytes) for _ in range(self.threads)]
        self._queues = [queue.SimpleQueue() for _ in range(self.threads)]
        workers = [_Worker(self._fd, s, self.path, self._submission, aios[i] if aios else None)
                   for i, s in enumerate(stages)]
        self._workers = [threading.Thread(target=_worker, args=(q, w), daemon=True, name=f"flashlm-reader-{i}")
                         for i, (q, w) in enumerate(zip(self._queues, workers))]
        del workers
        for t in self._workers:
            t.start()
        self._stage_bytes = max(self.staging_bytes, int(aio_depth) * (-(-self.stride_bytes // BLOCK) * BLOCK))
        self._aio_depth = int(aio_depth)
        self._callers: list[_Worker] = []    # idle calling-thread contexts (inline AIO), reused call after call
        callers_all: list = []               # every one made, for the finalizer (it closes their contexts)
        self._callers_all = callers_all
        self._finalizer = weakref.finalize(self, _shutdown, self._queues, self._workers, self._fd, stages, aios,
                                           callers_all)

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

    def _open_aio(self, submit: str, depth: int) -> tuple[Submission, list]:
        """The submission engine and, under AIO through the workers (not inline), one io_setup context per
        worker (inline callers make theirs on their first call)."""
        if submit == "pread":
            return Submission("pread", "pread asked for (submit='pread')"), []
        if self.loop == "python":
            return Submission("pread", "the Python loop reads with os.preadv"), []
        if self.mode != "direct" and submit == "auto":
            reason = "buffered reads: pread (native AIO runs page-cache reads synchronously)"
        else:                   # (buffered with submit="aio": synchronous, the probe's hand-off timing)
            reason = native_aio.unavailable(self._fd)
        aios = []
        if reason is None and not self.inline:
            try:
                for _ in range(self.threads):
                    aios.append(native_aio.AioContext(depth))
            except OSError as e:        # e.g. /proc/sys/fs/aio-max-nr reached by other readers
                for a in aios:
                    a.close()
                aios, reason = [], f"native AIO unavailable: {e.strerror or e}"
        if reason is None:
            return Submission("aio"), aios
        if submit == "aio":
            os.close(self._fd)
            raise OSError(errno.ENOTSUP, f"{self.path}: submit='aio' but {reason}")
        return Submission("pread", reason), []

    # -- public API --------------------------------------------------------------------------------

    @property
    def submission(self) -> str:
        """"aio" or "pread": how reads reach the kernel now (a refused AIO submit switches to pread)."""
        return self._submission.engine

    @property
    def submission_note(self) -> str:
        """Why reads go through pread, in one line ("" under AIO)."""
        return self._submission.note

    def read_rows(self, layer: int, neurons, out: np.ndarray, out_rows) -> None:
        """Copy bundle row neurons[j] of `layer` into out[out_rows[j]] for every j. Rows of `out` are the
        stride or narrower (a neuron cache's packed rows): then each gets the first bytes of its row."""
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
        self._run(layer, self._all_rows, out_u8, self._all_rows, t0)

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
        if not 0 < out.shape[1] * out.itemsize <= self.stride_bytes:
            raise ValueError(f"out rows are {out.shape[1] * out.itemsize} bytes, the stride is {self.stride_bytes}: "
                             "rows of at most the stride fit")
        return out.view(np.uint8)

    def _take_plan(self, n: int) -> _Plan:
        with self._lock:
            for i, p in enumerate(self._plans):
                if p.capacity >= n:
                    return self._plans.pop(i)
        return _Plan(max(n, self.n_rows), self.n_rows)   # first call, a new concurrent caller, or duplicates

    def _run(self, layer: int, neurons: np.ndarray, out_u8: np.ndarray, out_rows: np.ndarray, t0: float) -> None:
        plan = self._take_plan(len(neurons))
        layer_off = self.layer_offsets[layer]
        try:
            # runs go straight into `out` only where its rows are the file's (packed rows: via staging)
            direct_to = _address(out_u8) if out_u8.shape[1] == self.stride_bytes else -1
            plan.fill(neurons, out_rows, self.n_rows, layer_off, self.stride_bytes, self.max_gap_bytes // BLOCK,
                      self.staging_bytes // BLOCK, self.threads, direct_to)
            nbytes, ncalls = self._read_plan(plan, out_u8, layer_off)
        finally:
            with self._lock:
                self._plans.append(plan)
        self._account(plan.unique * self.row_bytes, nbytes, ncalls, t0)

    def _read_plan(self, plan: _Plan, out_u8: np.ndarray, layer_off: int) -> tuple[int, int]:
        job = (plan, out_u8, memoryview(out_u8.reshape(-1)), layer_off, self.stride_bytes)
        with self._lock:
            if self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += 1
        claim = np.zeros(1, np.int64) if self.loop == "numba" else itertools.count()   # the shared run counter
        nbytes = ncalls = nsys = 0
        cpu = 0.0
        error = None
        caller = self._take_caller() if self.inline and self._submission.engine == "aio" else None
        if caller is not None:
            c0 = time.thread_time()
            try:
                nbytes, ncalls, nsys = caller.task(claim, job)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the accounting
                error = e
            cpu = time.thread_time() - c0
            with self._lock:
                self._callers.append(caller)
        else:
            done: queue.SimpleQueue = queue.SimpleQueue()
            busy = self._queues[:plan.n_runs]             # one task per worker that has something to do
            for q in busy:
                q.put((claim, job, done))
            for _ in busy:
                b, c, n, t, e = done.get()
                nbytes, ncalls, nsys, cpu = nbytes + b, ncalls + c, nsys + n, cpu + t
                error = error or e
        with self._lock:
            self.stats.cpu_s += cpu
            self.stats.syscalls += nsys
            self._active -= 1
            if self._active == 0:
                self.stats.busy_s += time.perf_counter() - self._busy_since
        if error is not None:
            raise error
        return nbytes, ncalls

    def _take_caller(self) -> _Worker | None:
        """An idle calling-thread AIO context, or a new one; None when io_setup refuses one more (e.g.
        aio-max-nr reached): the call then goes to the workers."""
        with self._lock:
            if self._callers:
                return self._callers.pop()
        try:
            aio = native_aio.AioContext(self._aio_depth)
        except OSError as e:
            self._submission.note = (f"native AIO: io_setup refused a context for one more caller "
                                     f"({e.strerror or e}): such calls read with pread")
            return None
        stage = mmap.mmap(-1, self._stage_bytes)
        w = _Worker(self._fd, stage, self.path, self._submission, aio)
        with self._lock:
            self._callers_all.append((w, stage))
        return w

    def _account(self, useful: int, nbytes: int, ncalls: int, t0: float) -> None:
        with self._lock:
            self.stats.useful_bytes += useful
            self.stats.bytes_read += nbytes
            self.stats.reads += ncalls
            self.stats.seconds += time.perf_counter() - t0
            self.stats.calls += 1
