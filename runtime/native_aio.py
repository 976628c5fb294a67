"""Linux native AIO (io_setup / io_submit / io_getevents) called from numba: many O_DIRECT reads per syscall.

Why: in a VM every read request the guest hands to the virtual disk costs a notification (a VM exit)
and an interrupt, and a pread also costs a syscall and a sleep/wake of its thread. Measured on this
project's 2-core Firecracker guest (tools/bench_read_submit.py, docs/BENCHMARKS.md "Batched read
submission"): pread from worker threads costs tens of microseconds of CPU per read; handing the disk
a batch of reads per io_submit lets the block layer plug them into one notification and reap them
in groups. Native AIO is used rather than io_uring because it needs no shared-ring memory ordering
(plain syscalls, no library), is truly asynchronous for O_DIRECT on ext4/xfs/btrfs, and exists on
every kernel this runs on.

The kernel and the structs:
- syscall numbers differ per architecture: x86-64 has its own table; aarch64 and riscv64 use the
  generic table (include/uapi/asm-generic/unistd.h). They are passed to the kernels as arguments, so the
  numba cache is the same code everywhere.
- struct iocb is 64 bytes (8 little-endian u64 words here): data, key|rw_flags, opcode|reqprio|fildes,
  buf, nbytes, offset, reserved2, flags|resfd. struct io_event is 32 bytes: data, obj, res, res2.
- libc's variadic syscall() is called with a fixed six-integer prototype: on the x86-64 and aarch64
  Linux ABIs integer arguments go in the same registers either way.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# (io_setup, io_destroy, io_getevents, io_submit)
_NUMBERS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2), "riscv64": (0, 1, 4, 2)}
IOCB_WORDS = 8
EVENT_WORDS = 4
IOCB_CMD_PREAD = 0

_syscall = types.ExternalFunction("syscall", types.intp(types.intp, types.intp, types.intp, types.intp,
                                                        types.intp, types.intp))
_errno_location = types.ExternalFunction("__errno_location", types.intp())


@intrinsic
def _load_i32(typingctx, addr):
    """The int32 at an integer address (errno through __errno_location)."""
    sig = types.int32(types.intp)

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()))
    return sig, codegen


@njit(cache=True, nogil=True)
def last_errno() -> int:
    return _load_i32(_errno_location())


def syscall_numbers() -> tuple[int, int, int, int] | None:
    """(io_setup, io_destroy, io_getevents, io_submit) for this machine, or None where unknown."""
    if not sys.platform.startswith("linux") or sys.byteorder != "little":
        return None
    return _NUMBERS.get(platform.machine())


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class AioContext:
    """One io_setup context of `depth` events plus the iocb/event arrays its kernel fills.
    Raises OSError (with the syscall's errno) when the kernel refuses; `unavailable()` says why first."""

    def __init__(self, depth: int):
        nums = syscall_numbers()
        if nums is None:
            raise OSError(errno.ENOSYS, f"native AIO: no syscall numbers for {platform.machine()} / {sys.platform}")
        self.nr_setup, self.nr_destroy, self.nr_getevents, self.nr_submit = nums
        self.depth = int(depth)
        self._libc = _libc()
        self._libc.syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if self._libc.syscall(ctypes.c_long(self.nr_setup), ctypes.c_long(self.depth), ctypes.byref(ctx)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup({self.depth}): {os.strerror(e)}")
        self.ctx = int(ctx.value)
        self.iocbs = np.zeros((self.depth, IOCB_WORDS), np.int64)
        self.events = np.zeros((self.depth, EVENT_WORDS), np.int64)
        self.submit = np.zeros(self.depth, np.int64)      # the iocb pointers of one io_submit
        base = self.iocbs.__array_interface__["data"][0]
        self.iocb_addr = base + np.arange(self.depth, dtype=np.int64) * (IOCB_WORDS * 8)

    def close(self) -> None:
        if self.ctx:
            self._libc.syscall(ctypes.c_long(self.nr_destroy), ctypes.c_ulong(self.ctx))
            self.ctx = 0


def unavailable(fd: int, depth: int = 4) -> str | None:
    """Why native AIO cannot read this (O_DIRECT) file, or None when a one-block read through it works:
    no syscall numbers for this machine, io_setup refused (no AIO in the kernel, aio-max-nr reached),
    or the filesystem failing the read."""
    from .aligned import BLOCK, aligned_empty
    try:
        ctx = AioContext(depth)
    except OSError as e:
        return f"native AIO unavailable: {e.strerror or e}"
    try:
        buf = aligned_empty((BLOCK,), np.uint8)
        res = np.zeros(2, np.int64)
        read_one(ctx.nr_submit, ctx.nr_getevents, ctx.ctx, fd, buf.__array_interface__["data"][0], BLOCK, 0,
                 ctx.iocbs, ctx.iocb_addr, ctx.submit, ctx.events, res)
        if res[0] < 0:
            return f"native AIO read failed: {os.strerror(int(-res[0]))}"
        if res[1] < 0:
            return f"native AIO read failed: {os.strerror(int(-res[1]))}"
        return None
    finally:
        ctx.close()


@njit(cache=True, nogil=True)
def fill_iocb(iocbs, s, fd, addr, length, offset):
    iocbs[s, 0] = s                           # aio_data: the slot, returned in the event
    iocbs[s, 1] = 0                           # aio_key, aio_rw_flags
    iocbs[s, 2] = IOCB_CMD_PREAD | (fd << 32)  # aio_lio_opcode, aio_reqprio 0, aio_fildes
    iocbs[s, 3] = addr
    iocbs[s, 4] = length
    iocbs[s, 5] = offset
    iocbs[s, 6] = 0
    iocbs[s, 7] = 0                           # aio_flags, aio_resfd


@njit(cache=True, nogil=True)
def submit_from(nr_submit, ctx, submit_ptrs, start, n) -> int:
    """io_submit the n iocb pointers submit_ptrs[start:start + n]; returns how many the kernel took or -errno."""
    r = _syscall(nr_submit, ctx, n, submit_ptrs.ctypes.data + 8 * start, 0, 0)
    if r < 0:
        return -last_errno()
    return r


@njit(cache=True, nogil=True)
def get_events(nr_getevents, ctx, events, min_nr, nr) -> int:
    """io_getevents(min_nr..nr) into events (no timeout); EINTR retried; returns events or -errno."""
    while True:
        r = _syscall(nr_getevents, ctx, min_nr, nr, events.ctypes.data, 0)
        if r >= 0:
            return r
        e = last_errno()
        if e != 4:                            # EINTR: a signal reached this thread; wait again
            return -e


@njit(cache=True, nogil=True)
def read_one(nr_submit, nr_getevents, ctx, fd, addr, length, offset, iocbs, iocb_addr, submit_ptrs, events, res):
    """One read through the context (the availability check): res[:] = (submit result, read result)."""
    fill_iocb(iocbs, 0, fd, addr, length, offset)
    submit_ptrs[0] = iocb_addr[0]
    res[0] = submit_from(nr_submit, ctx, submit_ptrs, 0, 1)
    res[1] = 0
    if res[0] == 1:
        n = get_events(nr_getevents, ctx, events, 1, 1)
        res[1] = events[0, 2] if n == 1 else n
