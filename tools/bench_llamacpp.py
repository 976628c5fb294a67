"""flashlm (everything in DRAM) vs llama.cpp on the same GGUF: each engine in its own child process.

    python tools/bench_llamacpp.py [--gguf PATH] [--threads 1,2] [--pp 128] [--tg 64] [-r 3] [--dtype auto]
                                   [--breakdown]

Like llama-bench: the prompt is random token ids, decode feeds one token per step without sampling.
Every measurement runs in a fresh child process that loads one engine, warms it up (one prefill and a
short decode) and times one pp and one tg test: two engines in one process share thread pools and
environment (flashlm sets OMP_WAIT_POLICY=PASSIVE on import, which also changes llama.cpp's OpenMP
workers), which made the old same-process comparison unfair. Children run rep by rep, threads by
threads, the engine order flipping every rep (flashlm, llama.cpp / llama.cpp, flashlm, ...) so load
from other processes hits both alike; one table, mean ± sd tokens/s, and the ratios of one run.
flashlm runs with its defaults (a fully resident model: the whole decoder as one onnxruntime graph, one
run() per token, `--activations auto`: mixed on AVX-512, int8 elsewhere), with whichever of `--activations
int8` (every matvec on int8 inputs) and `--activations mixed` (q|k|v on f32 inputs) auto did not pick, with `ort_graph=layers` (a graph between numba attention calls, the previous path),
and at more than one thread also with `--ort-spin-us 0` (no spinning: the layer graphs run on the calling
thread, only the lm_head splits) and `--ort-spin-us 10` (workers spin up to 10 us between a run's nodes
instead of the default 100, and stop when the run returns): which wins depends on how idle the machine is (a spinning
worker loses its core to other jobs), so all are in the table. The first line names the CPU (AVX-512 /
VNNI decide both engines' int8 kernels: a session-1 machine with AVX-512 ran llama.cpp at 146/185 tok/s, this AVX2 EPYC at 60/80).
`--breakdown` also reports where flashlm's decode time goes per token (onnxruntime runs, numba
attention, the rest) from one more child per thread count. Needs `pip install llama-cpp-python`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The children get the environment this process started with: importing flashlm below sets
# OMP_WAIT_POLICY for this process, which must not leak into the llama.cpp child.
CLEAN_ENV = dict(os.environ)

import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))

ENGINES = ("flashlm", "flashlm-int8", "flashlm-mixed", "flashlm-layers", "flashlm-spin0", "flashlm-spin10", "llama.cpp")
SPIN_ENGINES = ("flashlm-spin0", "flashlm-spin10")       # threading policies: they differ only at threads > 1
LABELS = {"flashlm": "flashlm", "flashlm-int8": "flashlm --activations int8", "flashlm-mixed": "flashlm --activations mixed", "flashlm-layers": "flashlm ort_graph=layers", "flashlm-spin0": "flashlm --ort-spin-us 0",
          "flashlm-spin10": "flashlm --ort-spin-us 10",
          "llama.cpp": "llama.cpp"}
# The flashlm variants as RuntimeConfig fields (the default engine is the library's defaults).
VARIANTS = {"flashlm": {}, "flashlm-int8": {"activations": "int8"}, "flashlm-mixed": {"activations": "mixed"}, "flashlm-layers": {"ort_graph": "layers"}, "flashlm-spin0": {"ort_spin_us": 0},
            "flashlm-spin10": {"ort_spin_us": 10}}


def _ids(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(100, 40000, size=n)


# --- children ------------------------------------------------------------------------------------------
def _flashlm(folder: str, threads: int, ctx: int, variant: dict | None = None):
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.loader import load
    model, _, _ = load(folder, RuntimeConfig(ctx_len=ctx, threads=threads, **(variant or {})))

    def prefill(ids):
        model.reset()
        model.forward(ids)

    def decode(ids):
        model.reset()
        model.forward(ids[:1])
        for i in range(1, len(ids)):
            model.forward(ids[i:i + 1])
    return model, prefill, decode


def _llamacpp(gguf: str, threads: int, ctx: int):
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def prefill(ids):
        llm.reset()
        llm.eval([int(t) for t in ids])

    def decode(ids):
        llm.reset()
        llm.eval([int(ids[0])])
        for t in ids[1:]:
            llm.eval([int(t)])
    return llm, prefill, decode


def child(args) -> int:
    """One engine, one thread count: warm up, then time one prefill of pp and one decode of tg tokens."""
    ctx = args.pp + args.tg + 8
    ids = _ids(args.pp + args.tg + 2)
    if args.child == "llama.cpp":
        _, prefill, decode = _llamacpp(str(args.gguf), args.threads, ctx)
    else:
        _, prefill, decode = _flashlm(args.folder, args.threads, ctx, VARIANTS[args.child])
    prefill(ids[:args.pp])
    decode(ids[:9])
    out = {}
    t0 = time.perf_counter()
    prefill(ids[:args.pp])
    out["pp"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode(ids[:args.tg + 1])          # the first token is a 1-token prefill: tg steps are timed with it
    out["tg"] = time.perf_counter() - t0
    print(json.dumps(out))
    return 0


def breakdown_child(args) -> int:
    """Per decode token: wall time in onnxruntime run() calls, in the numba attention kernel, and the rest
    (Python, embedding, logits copy), plus CPU time and context switches of the whole process."""
    import resource

    import flashlm.runtime.ort_model as ort_model
    model, _, _ = _flashlm(args.folder, args.threads, args.tg + 16, VARIANTS[args.variant])
    spent = {"run": 0.0, "attention": 0.0}
    calls = {"run": 0, "attention": 0}

    class Timed:            # wraps one session's run() (tools may look inside; the library never does)
        def __init__(self, sess):
            self.sess = sess

        def run(self, *a):
            return self._timed(self.sess.run, *a)

        def io_binding(self):
            return self.sess.io_binding()

        def run_with_iobinding(self, *a):         # one-token steps run through bound buffers
            return self._timed(self.sess.run_with_iobinding, *a)

        def _timed(self, f, *a):
            t = time.perf_counter()
            r = f(*a)
            spent["run"] += time.perf_counter() - t
            calls["run"] += 1
            return r
    o = model.ort
    if isinstance(o, ort_model.OrtDecoder):     # the whole decoder in a few graphs: one run() per graph
        o.parts = [(Timed(sess), layers, is_lm) for sess, layers, is_lm in o.parts]
    else:
        o.head0, o.lm = Timed(o.head0), Timed(o.lm)
        for group in (o.mid, o.tail, o.heads):
            group[:] = [Timed(s) if s is not None else None for s in group]
    def timed_attention(kernel, *a):
        t = time.perf_counter()
        kernel(*a)
        spent["attention"] += time.perf_counter() - t
        calls["attention"] += 1

    class _K:               # the kernels module as ort_model sees it, with the attention kernel timed
        def __getattr__(self, name):
            if name in ("rope_kv_attention", "rope_kv_attention_serial"):  # forward() and the bound one-token step
                kernel = getattr(attention_module, name)
                return lambda *a: timed_attention(kernel, *a)
            return getattr(attention_module, name)
    attention_module = ort_model.K
    ort_model.K = _K()
    ids = _ids(args.tg + 2)
    model.reset()
    model.forward(ids[:1])
    for i in range(8):
        model.forward(ids[1 + i:2 + i])
    model.reset()
    model.forward(ids[:1])
    for key in spent:
        spent[key], calls[key] = 0.0, 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i in range(args.tg):
        model.forward(ids[1 + i:2 + i])
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ort_model.K = attention_module
    n = args.tg
    print(json.dumps({
        "graph": type(o).__name__,
        "ms_per_token": 1e3 * wall / n, "ort_run_ms": 1e3 * spent["run"] / n, "runs_per_token": calls["run"] / n,
        "attention_ms": 1e3 * spent["attention"] / n, "attention_calls_per_token": calls["attention"] / n,
        "other_ms": 1e3 * (wall - spent["run"] - spent["attention"]) / n,
        "cpu_ms_per_token": 1e3 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n,
        "voluntary_switches_per_token": (r1.ru_nvcsw - r0.ru_nvcsw) / n,
        "involuntary_switches_per_token": (r1.ru_nivcsw - r0.ru_nivcsw) / n}))
    return 0


# --- parent --------------------------------------------------------------------------------------------
def _run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], env=CLEAN_ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {' '.join(argv[:2])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    """CPU model and the int8-relevant ISA extensions, the activations policy auto picks, onnxruntime and
    llama-cpp-python versions."""
    from flashlm.runtime.config import RuntimeConfig, activation_policy
    from flashlm.runtime.cpu import cpu_flags, cpu_name
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags] or ["(flags unknown)"]
    versions = []
    for mod in ("onnxruntime", "llama_cpp"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return (f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {' '.join(isa)} (activations auto: "
            f"{activation_policy(RuntimeConfig())}); {', '.join(versions)}")


def convert_in_child(gguf: Path, out: Path, dtype: str) -> dict:
    code = ("import resource,sys,time; sys.path.insert(0, %r); from flashlm.converters.convert import convert; "
            "t=time.perf_counter(); convert(%r, %r, dtype=%r, force=True, progress=False); "
            "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
            % (str(ROOT), str(gguf), str(out), dtype))
    seconds, rss_kb = subprocess.check_output([sys.executable, "-c", code], text=True, env=CLEAN_ENV).split()
    return {"seconds": float(seconds), "peak_rss_mib": int(rss_kb) / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2-135M Q4_1")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=["auto", "f16", "f32", "q8_0", "q4_0", "q4_1"])
    ap.add_argument("--breakdown", action="store_true", help="also time flashlm's decode token piece by piece")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=[*ENGINES, "breakdown"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="flashlm", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.threads = int(args.threads)
        return breakdown_child(args) if args.child == "breakdown" else child(args)
    from flashlm.runtime.default_model import embedded_gguf
    gguf = args.gguf or embedded_gguf()
    thread_counts = [int(t) for t in args.threads.split(",")]
    from flashlm.runtime.config import RuntimeConfig, activation_policy
    auto = "flashlm-" + activation_policy(RuntimeConfig())         # the default's policy: its row would repeat "flashlm"
    engines = [e for e in ENGINES if e != auto]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed (pip install llama-cpp-python): flashlm only", file=sys.stderr)
        engines = [e for e in engines if e != "llama.cpp"]

    def engines_at(threads):        # the threading policies differ only with more than one thread
        return [e for e in engines if threads > 1 or e not in SPIN_ENGINES]
    times = {(e, t, k): [] for t in thread_counts for e in engines_at(t) for k in ("pp", "tg")}
    breakdown = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model.flashlm"
        conv = convert_in_child(gguf, folder, args.dtype)
        common = ["--gguf", str(gguf), "--folder", str(folder), "--pp", str(args.pp), "--tg", str(args.tg)]
        for rep in range(args.reps):
            for threads in thread_counts:
                order = engines_at(threads)
                for engine in (order if rep % 2 == 0 else order[::-1]):
                    got = _run_child(["--child", engine, "--threads", str(threads), *common])
                    for k in ("pp", "tg"):
                        times[(engine, threads, k)].append(got[k])
        if args.breakdown:
            for threads in thread_counts:
                for variant in ("flashlm", "flashlm-layers"):
                    breakdown[(threads, variant)] = _run_child(["--child", "breakdown", "--variant", variant,
                                                                "--threads", str(threads), *common])
    rows = []
    for (engine, threads, k), secs in times.items():
        n = args.pp if k == "pp" else args.tg
        tps = [n / s for s in secs]
        rows.append({"engine": engine, "threads": threads, "test": f"{k}{n}", "avg_ts": statistics.mean(tps),
                     "stddev_ts": statistics.stdev(tps) if len(tps) > 1 else 0.0})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        for (threads, variant), b in breakdown.items():
            print(json.dumps({"breakdown_threads": threads, "variant": variant, **b}))
        return 0
    print(machine())
    print(f"model: {gguf.name}  flashlm dtype: {args.dtype}  conversion: {conv['seconds']:.1f} s, peak RSS "
          f"{conv['peak_rss_mib']:.0f} MiB  reps: {args.reps} (one child process per engine, threads and rep)")
    print("| engine | threads | test | t/s |\n| --- | ---: | --- | ---: |")
    for row in sorted(rows, key=lambda r: (r["threads"], r["test"][:2] != "pp", r["engine"])):
        print(f"| {LABELS[row['engine']]} | {row['threads']} | {row['test']} | {row['avg_ts']:.1f} ± {row['stddev_ts']:.1f} |")
    by = {(r["engine"], r["threads"], r["test"][:2]): r["avg_ts"] for r in rows}
    for threads in thread_counts:
        for engine in engines_at(threads):
            if engine != "llama.cpp" and ("llama.cpp", threads, "tg") in by:
                print(f"threads {threads}: decode {LABELS[engine]} / llama.cpp "
                      f"{by[(engine, threads, 'tg')] / by[('llama.cpp', threads, 'tg')]:.2f}x, prefill "
                      f"{by[(engine, threads, 'pp')] / by[('llama.cpp', threads, 'pp')]:.2f}x")
    for (threads, _), b in breakdown.items():
        print(f"flashlm decode ({b.get('graph', 'OrtLayers')}), {threads} thread(s), per token: {b['ms_per_token']:.2f} ms wall = onnxruntime "
              f"{b['ort_run_ms']:.2f} ({b['runs_per_token']:.0f} run() calls) + numba attention "
              f"{b['attention_ms']:.2f} ({b['attention_calls_per_token']:.0f} calls) + rest {b['other_ms']:.2f}; "
              f"CPU {b['cpu_ms_per_token']:.2f} ms, context switches {b['voluntary_switches_per_token']:.0f} "
              f"voluntary / {b['involuntary_switches_per_token']:.0f} involuntary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
