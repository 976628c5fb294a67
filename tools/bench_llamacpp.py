"""flashlm (everything in DRAM) vs llama.cpp on the same GGUF, same threads, one run, one machine.

    python tools/bench_llamacpp.py [--gguf PATH] [--threads 1,2] [--pp 128] [--tg 64] [-r 3] [--dtype auto]

Like llama-bench: the prompt is random token ids, decode feeds one token per step without sampling,
each test is repeated -r times after a warm-up and reported as mean ± sd tokens/s. The two engines
alternate rep by rep (flashlm, llama.cpp, flashlm, ...) so load from other processes hits both alike;
the ratios, not the absolute figures, are what one run shows. Needs
`pip install llama-cpp-python` (the `bench` extra). Also times the conversion of the GGUF and its peak
RSS in a child process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _alternate(tests: dict, reps: int) -> dict:
    """tests: engine -> {"pp": fn, "tg": fn}. Warm each up, then run rep by rep, engines interleaved."""
    for fns in tests.values():
        for fn in fns.values():
            fn()
    out = {engine: {k: [] for k in fns} for engine, fns in tests.items()}
    for _ in range(reps):
        for engine, fns in tests.items():
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                out[engine][k].append(time.perf_counter() - t0)
    return out


def flashlm_tests(folder: Path, threads: int, pp: int, tg: int, vocab_ids: np.ndarray) -> dict:
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.loader import load
    model, _, _ = load(folder, RuntimeConfig(ctx_len=pp + tg + 8, threads=threads))

    def prefill():
        model.reset()
        model.forward(vocab_ids[:pp])

    def decode():
        model.reset()
        model.forward(vocab_ids[:1])
        for i in range(tg):
            model.forward(vocab_ids[1 + i:2 + i])
    return {"pp": prefill, "tg": decode}


def llamacpp_tests(gguf: Path, threads: int, pp: int, tg: int, vocab_ids: np.ndarray) -> dict:
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=pp + tg + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    ids = [int(t) for t in vocab_ids]

    def prefill():
        llm.reset()
        llm.eval(ids[:pp])

    def decode():
        llm.reset()
        llm.eval(ids[:1])
        for i in range(tg):
            llm.eval(ids[1 + i:2 + i])
    return {"pp": prefill, "tg": decode}


def convert_in_child(gguf: Path, out: Path, dtype: str) -> dict:
    code = ("import resource,sys,time; sys.path.insert(0, %r); from flashlm.converters.convert import convert; "
            "t=time.perf_counter(); convert(%r, %r, dtype=%r, force=True, progress=False); "
            "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
            % (str(Path(__file__).resolve().parent.parent), str(gguf), str(out), dtype))
    seconds, rss_kb = subprocess.check_output([sys.executable, "-c", code], text=True).split()
    return {"seconds": float(seconds), "peak_rss_mib": int(rss_kb) / 1024}


def main() -> int:
    from flashlm.runtime.default_model import embedded_gguf
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2-135M Q4_1")
    ap.add_argument("--threads", default="2", help="comma list of thread counts, e.g. 1,2")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=["auto", "f16", "f32", "q8_0", "q4_0", "q4_1"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gguf = args.gguf or embedded_gguf()
    rng = np.random.default_rng(0)
    vocab_ids = rng.integers(100, 40000, size=args.pp + args.tg + 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model.flashlm"
        conv = convert_in_child(gguf, folder, args.dtype)
        for threads in (int(t) for t in args.threads.split(",")):
            tests = {"flashlm": flashlm_tests(folder, threads, args.pp, args.tg, vocab_ids)}
            try:
                tests["llama.cpp"] = llamacpp_tests(gguf, threads, args.pp, args.tg, vocab_ids)
            except ImportError:
                print("llama-cpp-python not installed: pip install llama-cpp-python", file=sys.stderr)
            for engine, r in _alternate(tests, args.reps).items():
                for test, n in (("pp", args.pp), ("tg", args.tg)):
                    tps = [n / s for s in r[test]]
                    rows.append({"engine": engine, "test": f"{test}{n}", "threads": threads,
                                 "avg_ts": statistics.mean(tps),
                                 "stddev_ts": statistics.stdev(tps) if len(tps) > 1 else 0.0})
            del tests
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"model: {gguf.name}  flashlm dtype: {args.dtype}  conversion: {conv['seconds']:.1f} s, "
          f"peak RSS {conv['peak_rss_mib']:.0f} MiB")
    print("| engine | threads | test | t/s |\n| --- | ---: | --- | ---: |")
    for row in rows:
        print(f"| {row['engine']} | {row['threads']} | {row['test']} | {row['avg_ts']:.1f} ± {row['stddev_ts']:.1f} |")
    by = {(r["engine"], r["test"][:2], r["threads"]): r["avg_ts"] for r in rows}
    for threads in sorted({r["threads"] for r in rows}):
        if ("llama.cpp", "tg", threads) in by:
            print(f"threads {threads}: decode flashlm / llama.cpp {by[('flashlm', 'tg', threads)] / by[('llama.cpp', 'tg', threads)]:.2f}x, "
                  f"prefill {by[('flashlm', 'pp', threads)] / by[('llama.cpp', 'pp', threads)]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
