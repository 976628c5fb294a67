"""Random O_DIRECT read rate of one existing file right now: a few seconds, to tell what the disk gives
at the moment a flash benchmark runs (a rate-limited virtual disk can swing 25x within minutes).

    python tools/disk_rates.py FILE [--sizes 4096,12288,1048576] [--seconds 3] [--threads 8]

Each thread loops over its own aligned random offsets with os.preadv (the way flashlm's reader threads
each loop over a batch of reads); one line per read size: IOPS and MB/s. For the device's characterised
rates use `flashlm probe`; this one reads the benchmark's own file, so the host's cache of it counts too.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import threading
import time

BLOCK = 4096


def rate(path: str, size: int, seconds: float, threads: int) -> tuple[float, float]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        blocks = os.fstat(fd).st_size // BLOCK - -(-size // BLOCK)
        if blocks <= 0:
            raise SystemExit(f"{path}: smaller than one {size}-byte read")
        counts = [0] * threads

        def loop(i: int) -> None:
            buf, rng, end = mmap.mmap(-1, size), random.Random(i), time.perf_counter() + seconds
            while time.perf_counter() < end:
                os.preadv(fd, [buf], rng.randrange(blocks) * BLOCK)
                counts[i] += 1
        ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        return sum(counts) / dt, sum(counts) * size / dt / 1e6
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--sizes", default="4096,12288,1048576")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        iops, mbs = rate(args.file, size, args.seconds, args.threads)
        print(f"{os.path.basename(os.path.dirname(os.path.abspath(args.file)))}/{os.path.basename(args.file)} "
              f"{size} B: {iops:.0f} IOPS, {mbs:.0f} MB/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
