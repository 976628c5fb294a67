"""Where a one-graph decode token goes inside onnxruntime: its session profiler, per op type and per node.

    python tools/ort_profile.py [--folder DIR | --gguf PATH] [--threads 1,2] [--past 128] [--tokens 64]
                                [--set kv_dtype=f16] [--top 12]

Loads the folder (default: the embedded SmolLM2-135M Q4_1 GGUF converted with --dtype auto into a
temporary folder) with the library's defaults (plus `--set` RuntimeConfig fields), with
`SessionOptions.enable_profiling` on every session it builds, runs a prompt of `--past` tokens, then
`--tokens` decode steps, and sums the profiler's per-node kernel times of the decode runs (the prompt's
runs are left out). One child process per thread count. The profiler adds a few microseconds per node
and per run, so small nodes look dearer than they are: the op-type shares are the point, and the
`model_run` total shows how much the profiler added (compare ms/token with tools/bench_llamacpp.py).
At more than one thread it also counts the nodes that ran a parallel loop in the intra-op pool and the
serial stretches between two of them within a run (what a worker must spin through to stay awake).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(args) -> int:
    import numpy as np
    import onnxruntime as ort
    prefix = str(Path(args.out) / "s")
    plain = ort.InferenceSession

    class Profiled(plain):          # every session the library builds, with the profiler on
        def __init__(self, model, sess_options=None, **kw):
            sess_options.enable_profiling = True
            sess_options.profile_file_prefix = prefix
            super().__init__(model, sess_options, **kw)
    ort.InferenceSession = Profiled
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.loader import load
    from flashlm.runtime.ort_model import OrtDecoder, OrtLayers
    fields = json.loads(args.fields)
    model, _, _ = load(args.folder, RuntimeConfig(ctx_len=args.past + args.tokens + 8, threads=args.threads, **fields))
    o = model.ort
    if isinstance(o, OrtDecoder):
        sessions = [sess for sess, _, _ in o.parts]
    elif isinstance(o, OrtLayers):      # ort_graph=layers: the graphs between numba attention calls
        sessions = [s for s in (o.head0, *o.mid, *o.tail, *o.heads, o.lm) if s is not None]
    else:
        raise SystemExit(f"{args.folder}: the decoder does not run in onnxruntime sessions ({type(o).__name__})")
    ids = np.random.default_rng(0).integers(100, 40000, size=args.past + args.tokens)
    model.reset()
    model.forward(ids[:args.past])
    for i in range(args.tokens):
        model.forward(ids[args.past + i:args.past + i + 1])
    files = [sess.end_profiling() for sess in sessions]
    by_op, by_node, run_us = collections.Counter(), collections.Counter(), 0.0
    pooled, gaps = collections.Counter(), []        # nodes that ran a parallel loop; serial stretches between them
    for part, f in enumerate(files):
        events = json.loads(Path(f).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        if len(runs) < args.tokens:
            raise SystemExit(f"{f}: {len(runs)} runs profiled, expected at least {args.tokens}")
        start = runs[-args.tokens]["ts"]             # the decode runs are the last `tokens`
        run_us += sum(e["dur"] for e in runs[-args.tokens:])
        run_starts = [e["ts"] for e in runs[-args.tokens:]]
        last_end, last_run = None, None
        for e in sorted(events, key=lambda e: e["ts"]):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                op = e["args"]["op_name"]
                shape = "x".join(str(d) for d in next(iter(e["args"]["output_type_shape"][0].values())))
                by_op[op] += e["dur"]
                by_node[(part, e["name"][:-len("_kernel_time")], op, shape)] += e["dur"]
                # A node that entered the intra-op pool logs the blocks its main thread ran (thread_scheduling_stats;
                # empty without a pool): between two such nodes of one run a worker must stay awake or be woken.
                stats = e["args"].get("thread_scheduling_stats") or {}
                if args.threads > 1 and stats.get("main_thread", {}).get("block_size"):
                    pooled[op] += 1
                    run = sum(1 for t in run_starts if t <= e["ts"])
                    if run == last_run:
                        gaps.append(e["ts"] - last_end)
                    last_end, last_run = e["ts"] + e["dur"], run
        os.remove(f)
    n = args.tokens
    gaps.sort()
    print(json.dumps({"threads": args.threads, "run_ms": run_us / n / 1e3, "parts": len(files),
                      "pooled": {op: k / n for op, k in pooled.most_common()},
                      "gap_us": [gaps[int(q * (len(gaps) - 1))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)] if gaps else [],
                      "ops": {op: us / n / 1e3 for op, us in by_op.most_common()},
                      "nodes": [[*key, us / n] for key, us in by_node.most_common(args.top)]}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", help="a converted model folder (default: convert --gguf or the embedded SmolLM2)")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--past", type=int, default=128, help="prompt tokens before the profiled decode steps")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps profiled")
    ap.add_argument("--set", default="", help="RuntimeConfig fields, comma-separated (e.g. kv_dtype=f16,ort_spin_us=0)")
    ap.add_argument("--top", type=int, default=12, help="nodes listed")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--fields", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.threads = int(args.threads)
        return child(args)
    sys.path.insert(0, str(ROOT / "tools"))
    from decode_variants import _variant
    fields = _variant(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from flashlm.converters.convert import convert
            from flashlm.runtime.default_model import embedded_gguf
            folder = str(Path(tmp) / "model.flashlm")
            convert(str(args.gguf or embedded_gguf()), folder, dtype="auto", force=True, progress=False)
        for threads in (int(t) for t in args.threads.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", "--folder", folder, "--threads", str(threads),
                                  "--past", str(args.past), "--tokens", str(args.tokens), "--top", str(args.top),
                                  "--out", tmp, "--fields", json.dumps(fields)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"child (threads {threads}) failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            total = sum(r["ops"].values())
            print(f"\nthreads {threads}{', ' + args.set if args.set else ''}: {r['run_ms']:.2f} ms/token in "
                  f"{r['parts']} run() calls (profiled), kernel time {total:.2f} ms")
            print("| op type | ms / token | share |\n| --- | ---: | ---: |")
            for op, ms in r["ops"].items():
                print(f"| {op} | {ms:.3f} | {100 * ms / total:.1f}% |")
            if r["pooled"]:
                print("nodes per token that ran a parallel loop in the intra-op pool: "
                      + ", ".join(f"{op} {k:.0f}" for op, k in r["pooled"].items())
                      + "; serial stretch between two of them within a run, us (profiled; 10/25/50/75/90th "
                      f"percentile): {' / '.join(str(g) for g in r['gap_us'])} (a worker that spins less than that sleeps)")
            print("| session | node | op | output | us / token |\n| ---: | --- | --- | --- | ---: |")
            for part, name, op, shape, us in r["nodes"]:
                print(f"| {part} | {name} | {op} | {shape} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
