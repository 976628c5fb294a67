"""CPU per read and reads/s of random O_DIRECT reads: pread from N threads vs batched native AIO.

    python tools/bench_read_submit.py FILE [--sizes 4096,12288] [--reads 4000] [--rounds 2]
        [--configs pread:1,pread:4,aio:1:64:32,...] [--warm]

FILE is any large file on the disk under test (a bundle file, e.g. .../ffn.safetensors).
A config is `pread:T` (T threads, each a numba nogil loop of libc pread over its share of the reads,
as FlashReader's workers did before native AIO), `aio:T:D:B` (T threads, each with its own io_setup
context keeping up to D reads in flight, submitting and reaping in groups of B per syscall), or
`reader:T:SUBMIT` (FlashReader itself, T worker threads, SUBMIT pread, aio (through the workers) or
aio-inline (the calling thread submits), read_rows calls of `--rows-per-call` rows as the sparse path
makes them; CPU includes the calling thread's hand-off). Every
configuration reads rows never read before in this run (a fresh slice of one random permutation of
the file's size-aligned rows: the host caches the virtual disk, so a repeated row is not a disk read);
the configurations are alternated (reversed every other round). `--warm` re-reads the same rows right
after each cold pass (host-cached reads: the per-request cost without the disk).

Per point: reads/s, MB/s, process CPU per read (getrusage, every thread and the kernel time
they cause, interrupts landing on them included), the machine's total busy CPU per read from
/proc/stat (other processes included: read it only at idle), and the disk's interrupts per read
(/proc/interrupts, its virtio request queue). Medians over rounds.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from numba import njit, types

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlm.runtime import native_aio  # noqa: E402
from flashlm.runtime.aligned import aligned_empty  # noqa: E402

_pread = types.ExternalFunction("pread", types.intp(types.intc, types.intp, types.uintp, types.intp))


@njit(cache=True, nogil=True)
def _pread_loop(fd, offsets, length, addr):
    got = 0
    for i in range(len(offsets)):
        r = _pread(fd, addr, length, offsets[i])
        if r != length:
            return -1 - i
        got += r
    return got


@njit(cache=True, nogil=True)
def _aio_loop(nr_submit, nr_getevents, ctx, fd, offsets, length, arena, depth, batch, iocbs, iocb_addr,
              submit_ptrs, events, free, result):
    """Keep up to `depth` reads of `offsets` in flight, slot s reading into arena + s*length; submit the
    freed slots in groups of up to `batch`, reap at least min(batch, in flight) per io_getevents.
    result[:] = (bytes, syscalls, error)."""
    n = len(offsets)
    nfree = depth
    for s in range(depth):
        free[s] = s
    nxt = 0
    inflight = 0
    got = 0
    calls = 0
    result[2] = 0
    while nxt < n or inflight > 0:
        # refill: groups of up to `batch` (all the free slots when starting)
        while nxt < n and nfree > 0 and (nfree >= batch or inflight == 0 or n - nxt <= nfree):
            m = 0
            while m < batch and nfree > 0 and nxt < n:
                nfree -= 1
                s = free[nfree]
                native_aio.fill_iocb(iocbs, s, fd, arena + s * length, length, offsets[nxt])
                submit_ptrs[m] = iocb_addr[s]
                m += 1
                nxt += 1
            done = 0
            while done < m:
                r = native_aio.submit_from(nr_submit, ctx, submit_ptrs, done, m - done)
                calls += 1
                if r <= 0:
                    result[2] = r if r < 0 else -11
                    result[0] = got
                    result[1] = calls
                    return
                done += r
            inflight += m
        want = min(batch, inflight)
        r = native_aio.get_events(nr_getevents, ctx, events, want, depth)
        calls += 1
        if r < 0:
            result[2] = r
            break
        for j in range(r):
            s = events[j, 0]
            if events[j, 2] != length:
                result[2] = -5 if events[j, 2] >= 0 else events[j, 2]
            else:
                got += length
            free[nfree] = s
            nfree += 1
        inflight -= r
    result[0] = got
    result[1] = calls


def _proc_stat() -> tuple[int, int]:
    """(busy, irq+softirq) jiffies over all CPUs."""
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, v[5] + v[6]


def _disk_irq_names(path: str) -> list[str]:
    """The /proc/interrupts names of the virtio request queues of the disk holding `path`."""
    dev = os.stat(path).st_dev
    try:
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
        if (block / "partition").exists():
            block = block.parent
        virtio = (block / "device").resolve().name       # e.g. virtio1
    except OSError:
        return []
    return [f"{virtio}-req", f"{virtio}-request"]


def _irqs(names: list[str]) -> int:
    if not names:
        return 0
    total = 0
    for line in open("/proc/interrupts"):
        parts = line.split()
        if parts and any(p.startswith(n) for p in parts[-1:] for n in names):
            total += sum(int(x) for x in parts[1:] if x.isdigit())
    return total


class Runner:
    def __init__(self, path: str, size: int, max_threads: int, max_depth: int, rows_per_call: int):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.path, self.file_size, self.rows_per_call = path, os.path.getsize(path), rows_per_call
        self.readers: dict = {}
        self.size = size
        self.bufs = [aligned_empty((max(max_depth, 1) * size,), np.uint8) for _ in range(max_threads)]
        self.ctxs: dict[tuple[int, int], native_aio.AioContext] = {}

    def ctx(self, i: int, depth: int) -> native_aio.AioContext:
        if (i, depth) not in self.ctxs:
            self.ctxs[(i, depth)] = native_aio.AioContext(depth)
        return self.ctxs[(i, depth)]

    def reader(self, cfg: tuple):
        from flashlm.runtime.flash_reader import FlashReader
        if cfg not in self.readers:
            self.readers[cfg] = FlashReader(self.path, layer_offsets=[0], stride_bytes=self.size,
                                            n_rows=self.file_size // self.size, threads=cfg[1],
                                            submit=cfg[2].split("-")[0], inline=cfg[2].endswith("-inline"))
        return self.readers[cfg]

    def run(self, cfg: tuple, offsets: np.ndarray) -> tuple[int, int]:
        """Read all offsets with config cfg; returns (bytes, syscalls)."""
        kind, t = cfg[0], cfg[1]
        if kind == "reader":
            r = self.reader(cfg)
            r.reset_stats()
            k = self.rows_per_call
            out = aligned_empty((k, self.size), np.uint8)
            dst = np.arange(k)
            for i in range(0, len(offsets), k):
                rows = offsets[i:i + k] // self.size
                r.read_rows(0, rows, out, dst[:len(rows)])
            return r.stats.bytes_read, r.stats.syscalls
        shares = np.array_split(offsets, t)
        out = [None] * t

        def work(i):
            addr = self.bufs[i].__array_interface__["data"][0]
            if kind == "pread":
                got = _pread_loop(self.fd, shares[i], self.size, addr)
                out[i] = (got, len(shares[i]))
            else:
                d, b = cfg[2], cfg[3]
                c = self.ctx(i, d)
                res = np.zeros(3, np.int64)
                free = np.zeros(d, np.int64)
                _aio_loop(c.nr_submit, c.nr_getevents, c.ctx, self.fd, shares[i], self.size, addr, d, b, c.iocbs,
                          c.iocb_addr, c.submit, c.events, free, res)
                if res[2]:
                    raise OSError(int(-res[2]), f"aio read failed: {os.strerror(int(-res[2]))}")
                out[i] = (int(res[0]), int(res[1]))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(t)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if any(o is None for o in out):
            raise SystemExit(f"config {cfg} failed in a thread")
        if any(o[0] < 0 for o in out):
            raise SystemExit(f"config {cfg}: a short pread")
        return sum(o[0] for o in out), sum(o[1] for o in out)


def parse_config(s: str) -> tuple:
    p = s.split(":")
    if p[0] == "pread" and len(p) == 2:
        return ("pread", int(p[1]))
    if p[0] == "aio" and len(p) == 4:
        return ("aio", int(p[1]), int(p[2]), int(p[3]))
    if p[0] == "reader" and len(p) == 3 and p[2] in ("aio", "aio-inline", "pread"):
        return ("reader", int(p[1]), p[2])
    raise SystemExit(f"bad config {s!r}: pread:T, aio:T:DEPTH:BATCH or reader:T:aio|aio-inline|pread")


def label(cfg: tuple) -> str:
    if cfg[0] == "reader":
        return f"FlashReader x{cfg[1]} {cfg[2]}"
    return f"pread x{cfg[1]}" if cfg[0] == "pread" else f"aio x{cfg[1]} depth {cfg[2]} batch {cfg[3]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--sizes", default="4096,12288")
    ap.add_argument("--reads", type=int, default=4000, help="reads per point")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default="pread:1,pread:4,pread:16,aio:1:16:8,aio:1:64:32,aio:1:256:128,"
                                         "aio:1:64:64,aio:2:64:32,aio:4:32:16")
    ap.add_argument("--warm", action="store_true", help="also re-read each point's rows (host-cached)")
    ap.add_argument("--seed", type=int, default=None,
                    help="row permutation seed (default: from the clock, so a rerun reads rows the host has not cached)")
    ap.add_argument("--rows-per-call", type=int, default=128, help="reader:* configs: rows per read_rows call")
    args = ap.parse_args()
    if native_aio.syscall_numbers() is None:
        raise SystemExit(f"native AIO: no syscall numbers for this machine ({os.uname().machine})")
    configs = [parse_config(c) for c in args.configs.split(",")]
    if args.seed is None:
        args.seed = time.time_ns() % (1 << 31)
    sizes = [int(s) for s in args.sizes.split(",")]
    file_size = os.path.getsize(args.file)
    irq_names = _disk_irq_names(args.file)
    rows = {}
    print(f"# {args.file} ({file_size / 2**30:.2f} GiB), {args.reads} reads per point, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.2f}, seed {args.seed}", file=sys.stderr)
    results: dict = {}
    for size in sizes:
        rng = np.random.default_rng((args.seed, size))
        rows[size] = rng.permutation(file_size // size).astype(np.int64) * size
        need = args.reads * len(configs) * args.rounds
        if need > len(rows[size]):
            raise SystemExit(f"{file_size} bytes hold {len(rows[size])} rows of {size}: fewer than the {need} asked")
    for size in sizes:
        runner = Runner(args.file, size, max(c[1] for c in configs),
                        max([c[2] for c in configs if c[0] == "aio"] + [1]), args.rows_per_call)
        # warm-up: compile/load the kernels, open the contexts (not timed)
        for cfg in configs:
            runner.run(cfg, rows[size][-8 * cfg[1]:])
        used = 0
        for rnd in range(args.rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]
            for cfg in order:
                offs = rows[size][used:used + args.reads]
                used += args.reads
                for phase in (("cold", "warm") if args.warm else ("cold",)):
                    r0, s0, q0, t0 = resource.getrusage(resource.RUSAGE_SELF), _proc_stat(), _irqs(irq_names), \
                        time.perf_counter()
                    nbytes, calls = runner.run(cfg, offs)
                    t1, r1, s1, q1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), _proc_stat(), \
                        _irqs(irq_names)
                    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                    sys_cpu = (r1.ru_stime - r0.ru_stime)
                    jiffy = os.sysconf("SC_CLK_TCK")
                    n = len(offs)
                    x = dict(wall=t1 - t0, reads_s=n / (t1 - t0), mb_s=nbytes / (t1 - t0) / 1e6,
                             cpu_us=cpu / n * 1e6, sys_us=sys_cpu / n * 1e6,
                             machine_us=(s1[0] - s0[0]) / jiffy / n * 1e6,
                             irq_us=(s1[1] - s0[1]) / jiffy / n * 1e6, irqs=(q1 - q0) / n, calls=calls / n)
                    results.setdefault((size, phase, cfg), []).append(x)
                    print(f"{size} {phase} {label(cfg)}: {x['reads_s']:.0f} reads/s, {x['cpu_us']:.1f} us CPU/read "
                          f"(sys {x['sys_us']:.1f}), machine {x['machine_us']:.1f}, {x['irqs']:.2f} irq/read",
                          file=sys.stderr)
        for c in runner.ctxs.values():
            c.close()
        for r in runner.readers.values():
            r.close()
        os.close(runner.fd)
    print(f"| size | rows | config | reads/s | MB/s | CPU us/read | sys us/read | machine CPU us/read | "
          f"irq+softirq us/read | disk irqs/read | syscalls/read |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (size, phase, cfg), xs in results.items():
        m = {k: statistics.median(x[k] for x in xs) for k in xs[0]}
        print(f"| {size} | {phase} | {label(cfg)} | {m['reads_s']:.0f} | {m['mb_s']:.0f} | {m['cpu_us']:.1f} | "
              f"{m['sys_us']:.1f} | {m['machine_us']:.1f} | {m['irq_us']:.1f} | {m['irqs']:.2f} | {m['calls']:.3f} |")
    print(f"\nload at the end {os.getloadavg()[0]:.2f}; medians of {args.rounds} rounds, configs alternated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
