"""The same model in two storage types, flash mode, each at the same share of its own bytes, in one run.

    python tools/bench_flash_dtypes.py F16_MODEL Q4_MODEL [MORE_MODELS ...] [--budget 50%] [--rounds 3] [-n 12]
        [-p 0] [--ctx 256|auto] [--io-threads 4] [--no-pipeline] [-t THREADS] [-- extra flashlm bench flags]

Issue 7's last benchmark: the synthetic 7B-class ReLU model in q4 at 50% of its bytes reads >= 3x fewer
bytes per token than the f16 model at 50% of its bytes, and decodes >= 2x as fast. Each round runs
`flashlm bench --one --json` once per model, each in its own child process (its own page cache drop,
load and warm-up repetition), the order flipped every round. Per model it prints the median over rounds
of ms/token, bytes and reads (preadv calls) per token, the bundle stride and row size, the rows read per
token (bytes / stride: exact when reads do not read through gaps, --max-gap 0, the default, as every row
is whole 4 KiB blocks or a power-of-two share of one), the hit rate, the critical
path (I/O busy, compute) and the plan (budget, window); then the two ratios against the targets.
Before the runs it prints where each model's budget goes (the planner's parts, computed here as the
bench child's builder computes them: dense, KV cache, activations, predictors, buffers, FFN caches).
More than two folders (e.g. the q4 model with f16 and with int8 predictors): every one after the first
is compared with the first, all in the same run, the order reversed every round.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import fmt, median, run_child  # noqa: E402  (the same bench child and its medians)

def plan_parts(model: str, args) -> dict:
    """The flash plan a bench child will make for `model` (pure planner, nothing loaded): its parts in bytes."""
    from flashlm.runtime.builder import activation_bytes, compute_threads
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.cost_model import CostModel
    from flashlm.runtime.memory import Placement, plan_memory
    from flashlm.runtime.modelfile import open_folder
    from flashlm.runtime.predictor import read_calibration
    folder = open_folder(model)
    threads = compute_threads(args.threads)
    rt = RuntimeConfig(mode="flash", budget=args.budget_of[model], ctx_len=args.ctx, io_threads=args.io_threads,
                       profile=args.profile, threads=args.threads)
    plan = plan_memory(folder, rt, activations=activation_bytes(folder, threads),
                       costs=CostModel.for_run(folder, rt, compute_threads=threads), calibration=read_calibration(folder))
    kinds = plan.layer_kinds
    sparse = plan.layers_placed(Placement.SPARSE)
    wins = sorted({plan.window_of(i) for i in sparse}, reverse=True)
    window = "/".join(f"{w} x{sum(plan.window_of(i) == w for i in sparse)}" for w in wins) if len(wins) > 1 \
        else str(plan.window)
    return {"budget": plan.budget, "dense": plan.dense, "kv": plan.kv_cache, "activations": plan.activations,
            "predictors": plan.predictors, "buffers": plan.scratch, "ffn": plan.ffn_resident, "window": window,
            "layers": "/".join(str(kinds.count(k)) for k in ("sparse", "resident", "stream"))}


KEYS = ("ms_per_token", "bytes_per_token", "reads_per_token", "hit_rate", "io_wait_ms", "io_busy_ms",
        "compute_ms", "mem_ms", "bound_ratio", "guess_miss_fraction")


def stride_of(model: str) -> tuple[int, int, str]:
    """(stride bytes, row bytes, storage) of the folder's bundles, from its manifest."""
    b = json.loads((Path(model) / "manifest.json").read_text())["bundles"]
    return int(b["stride_bytes"]), int(b.get("row_bytes", b["stride_bytes"])), str(b.get("storage", b.get("dtype")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the reference folder (f16 bundles)")
    ap.add_argument("others", nargs="+", help="the same recipe in another storage type (q4_0); more folders are "
                    "each compared with the first")
    ap.add_argument("--budget", default="50%", help="each model's budget, as a share of its own bytes")
    ap.add_argument("--other-budget", default=None,
                    help="the second model's budget instead (e.g. the size that gives it the first one's cache "
                         "share of its FFN rows)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", "--tokens", type=int, default=12, help="decode tokens per repetition")
    ap.add_argument("-p", "--prompt", type=int, default=0, help="prompt tokens of the pp test (0: none)")
    ap.add_argument("-r", "--reps", type=int, default=1, help="timed repetitions per child (after a warm-up one)")
    ap.add_argument("--ctx", default="256",
                    help="the KV cache's length the plans hold (tokens); auto: what the test reaches, -p + -n + 1 "
                         "(llama-bench sizes its context so: n_prompt + n_gen)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--profile", default="this-machine-2core")
    ap.add_argument("--no-pipeline", action="store_true", help="both models with --no-pipeline")
    ap.add_argument("--json", action="store_true", help="also print every child's tg row")
    ap.add_argument("-t", "--threads", type=int, default=None, help="compute threads of every child (default: all cores)")
    # more flashlm bench flags after `--` (e.g. -- --window 2); argparse leaves them to parse_known_args
    args, extra = ap.parse_known_args()
    args.extra = [a for a in extra if a != "--"] + (["-t", str(args.threads)] if args.threads else [])
    if args.ctx == "auto":
        args.ctx = args.prompt + args.tokens + 1
    elif not args.ctx.isdigit() or int(args.ctx) < 1:
        ap.error(f"--ctx {args.ctx!r}: a positive number of tokens or auto")
    args.ctx = int(args.ctx)

    models = [args.base] + args.others
    if len(set(models)) != len(models):
        ap.error("each folder once")
    budgets = {m: (args.other_budget or args.budget) if i else args.budget for i, m in enumerate(models)}
    args.budget_of = budgets
    M = 2**20
    print("| model | budget MiB | dense | KV cache | activations | predictors | buffers | FFN caches + resident "
          "| FFN share | window | layers sparse/resident/streamed |")
    print("|" + "|".join(" --- " for _ in range(11)) + "|")
    for m in models:
        p = plan_parts(m, args)
        print(f"| {Path(m).name} | {p['budget'] / M:.1f} | {p['dense'] / M:.1f} | {p['kv'] / M:.1f} | "
              f"{p['activations'] / M:.1f} | {p['predictors'] / M:.1f} | {p['buffers'] / M:.1f} | {p['ffn'] / M:.1f} | "
              f"{100 * p['ffn'] / p['budget']:.1f} % | {p['window']} | {p['layers']} |")
    print()
    rows = {m: [] for m in models}
    for r in range(args.rounds):
        for m in (models if r % 2 == 0 else models[::-1]):
            row = run_child(m, args, "flash", not args.no_pipeline, budgets[m])
            rows[m].append(row)
            print(f"round {r + 1} {Path(m).name}: {row['ms_per_token']:.1f} ms/token, "
                  f"{row['bytes_per_token'] / 2**20:.2f} MiB/token", file=sys.stderr)
            if args.json:
                print(json.dumps(row))

    head = ["model", "bundles", "stride B", "row B", "size GB", "budget GB", "window", "ms/tok", "MiB/tok",
            "reads/tok", "rows read/tok", "hit %", "io wait", "io busy", "compute", "mem",
            "x bound"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    med = {}
    for m in models:
        rs = rows[m]
        med[m] = {k: median(rs, k) for k in KEYS}
        stride, row_bytes, storage = stride_of(m)
        md, r0 = med[m], rs[0]
        rows_read = md["bytes_per_token"] / stride if md["bytes_per_token"] is not None else None
        cells = [Path(m).name, storage, str(stride), str(row_bytes), fmt(r0["size"], ".2f", 1e-9),
                 fmt(r0["budget"], ".2f", 1e-9), str(r0["window"]), fmt(md["ms_per_token"]),
                 fmt(md["bytes_per_token"], ".2f", 2**-20), fmt(md["reads_per_token"], ".0f"), fmt(rows_read, ".0f"), fmt(md["hit_rate"], ".1f", 100), fmt(md["io_wait_ms"]), fmt(md["io_busy_ms"]),
                 fmt(md["compute_ms"]), fmt(md["mem_ms"]), fmt(md["bound_ratio"], ".2f")]
        print("| " + " | ".join(cells) + " |")
    gaps = {r.get("max_gap") for m in models for r in rows[m]}
    other_budget = f" ({args.other_budget} for the others)" if args.other_budget else ""
    print(f"\nbudget {args.budget} of each model's own bytes{other_budget}, --ctx {args.ctx}, {args.tokens} decode tokens x "
          f"{args.reps} rep(s) x {args.rounds} rounds alternated, medians"
          f"{', --no-pipeline' if args.no_pipeline else ''}, max gap "
          f"{'/'.join(str(g) for g in sorted(gaps, key=str))} B")
    b = med[args.base]
    for other in args.others:
        o = med[other]
        bytes_ratio = b["bytes_per_token"] / o["bytes_per_token"] if o["bytes_per_token"] else None
        speed_ratio = b["ms_per_token"] / o["ms_per_token"] if o["ms_per_token"] else None
        checks = {"bytes per token >= 3x fewer": bytes_ratio is not None and bytes_ratio >= 3.0,
                  "decode >= 2x": speed_ratio is not None and speed_ratio >= 2.0}
        print(f"{Path(other).name} vs {Path(args.base).name}: bytes read per token {fmt(bytes_ratio, '.2f')}x fewer, "
              f"decode {fmt(speed_ratio, '.2f')}x; targets: "
              + "; ".join(f"{k}: {'met' if v else 'not met'}" for k, v in checks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
