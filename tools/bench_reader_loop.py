"""The flash reader's two loops on one bundle file: numba batch (libc pread, GIL released) vs Python os.preadv.

    python tools/bench_reader_loop.py FOLDER [--rows 300] [--calls 64] [--threads 4] [--rounds 3] [--io direct]

Each measurement is its own child process (a fresh reader, its numba kernels loaded from the cache by
one warm-up call), the two loops alternated round by round, and every child reads rows of its own
random sets (different seeds: a set read twice would come from the host's cache on a virtual disk).
Per call: `--rows` random bundle rows of a random layer into a permuted out, as a sparse layer's
misses are read. It prints per loop the medians of wall time, MB/s, preadv calls, and the process CPU
time per read (reader threads included: what the reads take from the compute threads on a small
machine), then the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one(folder: str, loop: str, seed: int, rows: int, calls: int, threads: int, io: str) -> dict:
    from flashlm.runtime.aligned import aligned_empty
    from flashlm.runtime.flash_reader import FlashReader
    from flashlm.runtime.modelfile import open_folder
    f = open_folder(folder)
    b = f.bundles
    n_rows = f.config.n_ff
    rng = np.random.default_rng(seed)
    out = aligned_empty((rows, b.stride_bytes), np.uint8)
    with FlashReader(f.file(b.file), layer_offsets=list(b.layer_offsets), stride_bytes=b.stride_bytes,
                     n_rows=n_rows, threads=threads, mode=io, loop=loop) as r:
        r.read_rows(0, np.arange(4), out, np.arange(4))          # warm-up: threads, kernels
        sets = [rng.choice(n_rows, rows, replace=False) for _ in range(calls)]
        dests = [rng.permutation(rows) for _ in range(calls)]
        layers = rng.integers(len(b.layer_offsets), size=calls)
        r.reset_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(calls):
            r.read_rows(int(layers[i]), sets[i], out, dests[i])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return dict(loop=loop, wall_s=wall, cpu_s=cpu, bytes=r.stats.bytes_read, reads=r.stats.reads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--rows", type=int, default=300, help="rows per read_rows call")
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--threads", type=int, default=4, help="reader threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io", choices=["direct", "buffered"], default="direct")
    ap.add_argument("--one", nargs=2, metavar=("LOOP", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.folder, args.one[0], int(args.one[1]), args.rows, args.calls, args.threads, args.io)))
        return 0
    res = {"numba": [], "python": []}
    for r in range(args.rounds):
        for k, loop in enumerate(("numba", "python") if r % 2 == 0 else ("python", "numba")):
            cmd = [sys.executable, __file__, args.folder, "--one", loop, str(1000 + 2 * r + k), "--rows",
                   str(args.rows), "--calls", str(args.calls), "--threads", str(args.threads), "--io", args.io]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"child failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
            x = json.loads(proc.stdout.splitlines()[-1])
            res[loop].append(x)
            print(f"round {r + 1} {loop}: {x['wall_s'] * 1e3:.0f} ms, {x['bytes'] / x['wall_s'] / 1e6:.0f} MB/s, "
                  f"CPU {x['cpu_s'] / x['reads'] * 1e6:.1f} us/read", file=sys.stderr)
    print("| loop | wall ms | MB/s | preadv calls | CPU ms | CPU us/read |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    med = {}
    for loop, xs in res.items():
        m = med[loop] = {k: statistics.median(x[k] for x in xs) for k in ("wall_s", "cpu_s", "bytes", "reads")}
        m["us_per_read"] = statistics.median(x["cpu_s"] / x["reads"] * 1e6 for x in xs)
        print(f"| {loop} | {m['wall_s'] * 1e3:.0f} | {m['bytes'] / m['wall_s'] / 1e6:.0f} | {m['reads']:.0f} | "
              f"{m['cpu_s'] * 1e3:.0f} | {m['us_per_read']:.1f} |")
    n, p = med["numba"], med["python"]
    print(f"\n{Path(args.folder).name}: {args.calls} calls x {args.rows} random rows, {args.threads} reader threads, "
          f"{args.io}, {args.rounds} rounds alternated, medians; numba vs python: wall {p['wall_s'] / n['wall_s']:.2f}x "
          f"faster, CPU per read {p['us_per_read'] / n['us_per_read']:.2f}x less")
    return 0


if __name__ == "__main__":
    sys.exit(main())
