"""llama.cpp (llama-cpp-python, the `bench` extra) measured the way `flashlm bench` measures a mode, so both
can share one table and one memory cgroup.

`python -m flashlm.runtime.bench_peer GGUF -p 0 -n 16 -r 1` prints one JSON row per test: tokens/s, the
bytes this process read from storage per decoded token (/proc/self/io read_bytes, which counts the page
faults of llama.cpp's memory map), peak RSS. llama.cpp maps the file (mmap, its default); under a cap it
re-reads evicted weight pages from the file, which is what the bytes per token show.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_llamacpp(gguf: str, *, threads: int, pp: int, tg: int, reps: int, ctx: int, seed: int = 0,
                   deadline_s: float | None = None) -> list[dict]:
    """Rows like runtime/bench.py's, for llama.cpp on `gguf`. A decode repetition stops at `deadline_s`
    (seconds after it started) and counts the tokens it finished: under a tight cap one token may take
    a minute."""
    from llama_cpp import Llama
    from .pagecache import drop_file
    drop_file(gguf)                                  # a cold start, as flashlm's bench does
    t0 = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    base = {"model": gguf.rsplit("/", 1)[-1], "size": None, "budget": None, "window": None, "mode": "llama.cpp",
            "threads": threads, "io": "mmap", "load_s": round(time.perf_counter() - t0, 2)}
    ids = [int(t) for t in np.random.default_rng(seed).integers(100, llm.n_vocab() - 100, size=pp + tg + 1)]
    rows = []
    if pp:
        times = []
        for r in range(reps + 1):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids[:pp])
            if r:
                times.append(time.perf_counter() - t)
        rows.append(_row(base, f"pp{pp}", [pp / s for s in times]))
    if tg:
        rates, nbytes, ntok = [], 0, 0
        for r in range(reps + 1 if reps > 1 else reps):   # one repetition: no warm-up pass (it may take minutes)
            llm.reset()
            llm.eval(ids[:1])
            before, t, done = _read_bytes(), time.perf_counter(), 0
            for i in range(tg):
                llm.eval(ids[1 + i:2 + i])
                done += 1
                if deadline_s is not None and time.perf_counter() - t > deadline_s:
                    break
            elapsed = time.perf_counter() - t
            if r or reps == 1:
                rates.append(done / elapsed)
                nbytes += _read_bytes() - before
                ntok += done
        row = _row(base, f"tg{tg}", rates)
        row.update(bytes_per_token=nbytes / max(ntok, 1), reads_per_token=None, hit_rate=None, io_wait_ms=None,
                   mem_ms=None, compute_ms=None, decoded_tokens=ntok)
        rows.append(row)
    for row in rows:
        row["peak_rss"] = _peak_rss()
    return rows


def _row(base: dict, test: str, tps: list[float]) -> dict:
    return dict(base, test=test, avg_ts=statistics.mean(tps), stddev_ts=statistics.stdev(tps) if len(tps) > 1 else 0.0,
                samples_ts=tps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one llama.cpp bench row set, as JSON lines")
    ap.add_argument("gguf")
    ap.add_argument("-p", "--n-prompt", type=int, default=0)
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("-r", "--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--deadline", type=float, default=None, help="stop a decode repetition after this many seconds")
    a = ap.parse_args(argv)
    try:
        rows = bench_llamacpp(a.gguf, threads=a.threads, pp=a.n_prompt, tg=a.n_gen, reps=a.reps, ctx=a.ctx,
                              deadline_s=a.deadline)
    except ImportError:
        print("llama-cpp-python is not installed (pip install 'flashlm[bench]')", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
