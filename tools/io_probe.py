"""Measure this device's flash read throughput with direct I/O (like fio) and write a device profile.

    python tools/io_probe.py [--file /var/tmp/flashlm-io-probe.bin] [--size 2] [--seconds 1.5]
                             [--write-profile devices/NAME.toml] [--keep]

For each read size (4K..1M) and concurrency (1/4/16/32 threads), every thread loops over its own list
of random size-aligned offsets with O_DIRECT `os.preadv` into its own page-aligned buffer for a fixed
time: the equivalent of `fio --rw=randread --ioengine=psync --direct=1 --numjobs=T --bs=B`. Python
threads release the GIL inside the syscall, so this matches fio (see ../shared/DESIGN.md); one
thread-pool task per read would not. Then sequential 1 MiB reads, and the same workload through
`runtime.flash_reader.FlashReader` so its efficiency against the raw disk is visible.

The test file (random bytes, so no layer of the stack can shortcut zeros) is created on the target
disk, reused if it already exists and is large enough, and deleted afterwards if this run created it
(unless --keep). MB means 10^6 bytes. Expect ~15% run-to-run noise; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import datetime
import mmap
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flashlm.runtime.flash_reader import DirectIOUnsupported, FlashReader, aligned_empty  # noqa: E402

SIZES = [4096, 16384, 65536, 262144, 1 << 20]
THREADS = [1, 4, 16, 32]
SEQ_THREADS = [1, 4]
GiB = 1 << 30


def _label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def ensure_file(path: str, size: int) -> bool:
    """Create `path` with `size` random bytes unless it already holds that many; True if created."""
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return False
    rng = np.random.default_rng(0)
    chunk = 8 << 20
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


def sequential_point(fd, file_size, nthreads, seconds, bs=1 << 20):
    region = file_size // nthreads // bs * bs      # each thread streams through its own region

    def offsets(i):
        return bs, [i * region + j * bs for j in range(region // bs)]
    return _run_threads(fd, nthreads, seconds, offsets)


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


def reader_layer_point(path, file_size, seconds, layer_bytes=256 << 20, stride=16384, threads=4):
    """FlashReader.read_layer of a 256 MiB layer into a reused page-aligned array: fetched MB/s."""
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


def _disk_info(path: str) -> dict:
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


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else repr(round(v, 2))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def write_profile(path: str, name: str, res: dict, disk: dict, file_size: int, seconds: float) -> None:
    vm = psutil.virtual_memory()
    lines = [f"# Device profile written by tools/io_probe.py on {datetime.date.today().isoformat()}.",
             "# MB = 10^6 bytes per second; random reads are O_DIRECT at random size-aligned offsets.",
             "", "[device]",
             f"name = {_toml_value(name)}",
             f"cores = {psutil.cpu_count(logical=False) or os.cpu_count()}",
             f"logical_cpus = {os.cpu_count()}",
             f"ram_bytes = {vm.total}",
             f"page_size = {os.sysconf('SC_PAGE_SIZE')}",
             f"os = {_toml_value(platform.system() + ' ' + platform.release())}",
             f"machine = {_toml_value(platform.machine())}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in disk.items()]
    lines += ["", "[probe]",
              f"file_bytes = {file_size}",
              f"seconds_per_point = {seconds}",
              'method = "python threads, each looping os.preadv(O_DIRECT) over its own offsets (fio psync numjobs)"',
              "", "[flash]",
              f"read_bytes = {_toml_value(SIZES)}",
              f"threads = {_toml_value(THREADS)}",
              f"sequential_threads = {_toml_value(SEQ_THREADS)}",
              f"sequential_1m_mb_s = {_toml_value([res['seq'][t][0] for t in SEQ_THREADS])}",
              "", "# MB/s for each read size (key, bytes) at each of flash.threads",
              "[flash.random_mb_s]"]
    lines += [f"{bs} = {_toml_value([res['rand'][bs, t][0] for t in THREADS])}" for bs in SIZES]
    lines += ["", "# reads per second, same layout", "[flash.random_iops]"]
    lines += [f"{bs} = {_toml_value([float(round(res['rand'][bs, t][1])) for t in THREADS])}" for bs in SIZES]
    fr = res["reader"]
    keys = list(fr["rows"])
    lines += ["", "# runtime.flash_reader.FlashReader on the same file (direct, random 16 KiB rows)",
              "[flash.flashreader]",
              f"read_rows_threads = {_toml_value([t for t, _ in keys])}",
              f"read_rows_rows_per_call = {_toml_value([k for _, k in keys])}",
              f"read_rows_useful_mb_s = {_toml_value([fr['rows'][k][0] for k in keys])}",
              "# ratio to raw random 16K reads at the same number of threads",
              f"read_rows_vs_raw = {_toml_value([round(fr['rows'][t, k][0] / res['rand'][16384, t][0], 2) for t, k in keys])}",
              "# read_layer of a 256 MiB layer (1 MiB pieces, 4 threads), and its ratio to sequential 1M x 4 threads",
              f"read_layer_mb_s = {_toml_value(fr['layer'])}",
              f"read_layer_vs_raw = {_toml_value(round(fr['layer'] / res['seq'][4][0], 2))}",
              ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default="/var/tmp/flashlm-io-probe.bin",
                    help="test file on the disk to measure (not tmpfs)")
    ap.add_argument("--size", type=float, default=2.0, help="test file size in GiB (default 2)")
    ap.add_argument("--seconds", type=float, default=1.5, help="seconds per measurement point")
    ap.add_argument("--write-profile", metavar="TOML", help="write a device profile, e.g. devices/NAME.toml")
    ap.add_argument("--name", help="device name in the profile (default: the profile's file stem)")
    ap.add_argument("--keep", action="store_true", help="keep the test file even if this run created it")
    a = ap.parse_args(argv)

    size = int(a.size * GiB) // (1 << 20) * (1 << 20)
    print(f"test file {a.file}: ", end="", flush=True)
    t = time.perf_counter()
    created = ensure_file(a.file, size)
    print(f"created {size / GiB:.2f} GiB in {time.perf_counter() - t:.1f} s" if created else "reused", flush=True)
    try:
        try:
            fd = os.open(a.file, os.O_RDONLY | os.O_DIRECT)
            os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        except OSError as e:
            print(f"error: O_DIRECT refused on {a.file} ({e}); put --file on a real disk, not tmpfs", file=sys.stderr)
            return 2
        res = {"rand": {}, "seq": {}, "reader": {"rows": {}}}
        try:
            print(f"\nrandom O_DIRECT reads, {a.seconds:g} s per point: MB/s (k reads/s)")
            print(f"{'size':>6} " + " ".join(f"{f'{t} thr':>17}" for t in THREADS))
            for bs in SIZES:
                cells = []
                for nt in THREADS:
                    el, nbytes, nreads = random_point(fd, size, bs, nt, a.seconds)
                    res["rand"][bs, nt] = (nbytes / el / 1e6, nreads / el)
                    cells.append(f"{nbytes / el / 1e6:8.0f} ({nreads / el / 1e3:5.1f}k)")
                print(f"{_label(bs):>6} " + " ".join(f"{c:>17}" for c in cells), flush=True)
            for nt in SEQ_THREADS:
                el, nbytes, nreads = sequential_point(fd, size, nt, a.seconds)
                res["seq"][nt] = (nbytes / el / 1e6, nreads / el)
            print("sequential 1M: " + ", ".join(f"{res['seq'][t][0]:.0f} MB/s ({t} thr)" for t in SEQ_THREADS))
        finally:
            os.close(fd)

        print("\nFlashReader (direct, 16 KiB rows, 4 threads): random rows per call, vs raw random 16K reads")
        for nt, k in ((4, 64), (4, 512), (16, 512)):
            useful, fetched, rps = reader_rows_point(a.file, size, a.seconds, k, threads=nt)
            res["reader"]["rows"][nt, k] = (useful, fetched)
            raw = res["rand"][16384, nt][0]
            print(f"  read_rows {nt:2d} threads, {k:4d} rows/call: {useful:6.0f} MB/s useful ({rps / 1e3:5.1f}k reads/s)"
                  f" = {useful / raw:.2f}x raw 16K x {nt} threads ({raw:.0f})")
        layer = reader_layer_point(a.file, size, a.seconds)
        res["reader"]["layer"] = layer
        seq4 = res["seq"][4][0]
        print(f"  read_layer 4 threads, 256 MiB layer:  {layer:6.0f} MB/s = {layer / seq4:.2f}x sequential 1M x 4 threads"
              f" ({seq4:.0f})")

        if a.write_profile:
            name = a.name or Path(a.write_profile).stem
            write_profile(a.write_profile, name, res, _disk_info(a.file), size, a.seconds)
            print(f"\nwrote {a.write_profile}")
    except DirectIOUnsupported as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if created and not a.keep:
            os.unlink(a.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
