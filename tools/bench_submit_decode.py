"""Decode with the flash reader's two submission engines, in one run: pread vs native AIO, alternated.

    python tools/bench_submit_decode.py MODEL [MODEL ...] [--budget 50%] [--rounds 3] [-n 12] [-p 0]
        [--pipelines off,auto] [--submits pread,aio] [--io-threads 4] [-- extra flashlm bench flags]

Every (model, pipeline, submit) point is one `flashlm bench --one --json` child (tools/bench_pipeline.py's
run_child: its own process, page-cache drop, load and warm-up repetition) with `--io-submit pread|aio`;
pipelines `off` (--no-pipeline), `auto` (the default switch) and `always` (--pipeline-always). The
order of the points rotates every round. Per point, medians over rounds: ms/token, I/O busy, the reader
threads' CPU per token and per read, compute, reads and MiB per token. Then per model and pipeline the
decode speedup of aio over pread, and with two models (f16 then q4, issue 7) the second's decode speedup
over the first's for each engine.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline import fmt, run_child  # noqa: E402

PIPELINES = {"auto": True, "always": "always", "off": False}
NAMES = {"auto": "pipeline", "always": "--pipeline-always", "off": "--no-pipeline"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--budget", default="50%", help="each model's budget (a share of its own bytes, or bytes)")
    ap.add_argument("--pipelines", default="off,auto", help="comma-separated: off, auto, always")
    ap.add_argument("--submits", default="pread,aio", help="comma-separated: pread, aio, auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", "--tokens", type=int, default=12)
    ap.add_argument("-p", "--prompt", type=int, default=0)
    ap.add_argument("-r", "--reps", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--profile", default="this-machine-2core")
    ap.add_argument("-t", "--threads", type=int, default=None)
    args, extra = ap.parse_known_args()
    base_extra = [a for a in extra if a != "--"] + (["-t", str(args.threads)] if args.threads else [])
    pipes = [p.strip() for p in args.pipelines.split(",")]
    subs = [s.strip() for s in args.submits.split(",")]
    if any(p not in PIPELINES for p in pipes) or any(s not in ("pread", "aio", "auto") for s in subs):
        raise SystemExit(f"--pipelines from {list(PIPELINES)}, --submits from pread, aio, auto")
    points = list(itertools.product(args.models, pipes, subs))
    rows = {p: [] for p in points}
    for r in range(args.rounds):
        k = r % len(points)
        for model, pipe, sub in points[k:] + points[:k]:
            args.extra = base_extra + ["--io-submit", sub]
            row = run_child(model, args, "flash", PIPELINES[pipe])
            if sub != "auto" and row.get("io_submit") not in (None, sub):
                raise SystemExit(f"{model}: asked for --io-submit {sub}, the reader used {row.get('io_submit')}")
            rows[(model, pipe, sub)].append(row)
            print(f"round {r + 1} {Path(model).name} {NAMES[pipe]} {sub}: {row['ms_per_token']:.1f} ms/token",
                  file=sys.stderr)
    head = ["model", "pipeline", "submit", "ms/tok", "io wait", "io busy", "io CPU", "compute", "reads/tok",
            "CPU us/read", "MiB/tok"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    ms = {}
    for p in points:
        rs = rows[p]

        def med(key):
            vals = [x[key] for x in rs if x.get(key) is not None]
            return statistics.median(vals) if vals else None
        ms[p] = med("ms_per_token")
        per_read = statistics.median(1e3 * x["io_cpu_ms"] / x["reads_per_token"] for x in rs
                                     if x.get("io_cpu_ms") is not None and x.get("reads_per_token"))
        print("| " + " | ".join([Path(p[0]).name, NAMES[p[1]], p[2], fmt(ms[p]), fmt(med("io_wait_ms")),
                                 fmt(med("io_busy_ms")), fmt(med("io_cpu_ms")), fmt(med("compute_ms")),
                                 fmt(med("reads_per_token"), ".0f"), fmt(per_read),
                                 fmt(med("bytes_per_token"), ".2f", 2**-20)]) + " |")
    r0 = rows[points[0]][0]
    print(f"\nbudget {args.budget}, window {r0.get('window')}, {args.tokens} decode tokens x {args.reps} rep(s) x "
          f"{args.rounds} rounds, {args.io_threads} reader threads, points rotated each round, medians")
    for model, pipe in itertools.product(args.models, pipes):
        if "pread" in subs and "aio" in subs:
            print(f"{Path(model).name} {NAMES[pipe]}: aio decode {ms[(model, pipe, 'pread')] / ms[(model, pipe, 'aio')]:.2f}x pread's")
    if len(args.models) == 2:
        a, b = args.models
        for pipe, sub in itertools.product(pipes, subs):
            print(f"{NAMES[pipe]} {sub}: {Path(b).name} decode {ms[(a, pipe, sub)] / ms[(b, pipe, sub)]:.2f}x "
                  f"{Path(a).name}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
