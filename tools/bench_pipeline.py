"""The pipeline's benchmark: flash mode with and without the pipeline, in one run, engines alternated.

    python tools/bench_pipeline.py MODEL [--budget 50%] [--rounds 3] [-n 16] [-p 8] [--ctx 256]
        [--engines auto,always,off] [--profile this-machine-2core] [--io-threads 4] [--mode flash] [-t THREADS]
        [-- extra flashlm bench flags]

Engines: `auto` is the default pipeline (the lookahead kept on or off as its own trial of decode tokens
measures, runtime/pipeline_switch.py), `always` the pipeline with --pipeline-always (the lookahead on
every decode token), `off` --no-pipeline. Each round runs `flashlm bench --one --json` once per engine,
each in its own child process (its own page cache drop, load, warm-up repetition: the switch's trial runs
in the warm-up), the order rotated every round.
Per engine it prints the median over rounds of: ms/token, the critical path (I/O wait, I/O busy, the
disk's idle time ms - busy, memory management on the compute thread, compute and its predictor / FFN
kernel / other parts), max(I/O busy, compute) and the ratio of ms/token to it,
the overlap, bytes per token, the lookahead's recall and the share of the bytes read that its misses
cost, and the streamed layers' read rate against the device profile's sequential rate (the probe's
1 MiB reads at the reader's thread count). Then the decode speedup of the pipeline over --no-pipeline.
The issue's targets: ms/token <= 1.3x max(I/O busy, compute), speedup >= 1.6x, streamed layers at
>= 80 % of the sequential rate, guess misses <= 10 % of the bytes read.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_child(model: str, args, mode: str, pipeline, budget: str | None = None) -> dict:
    """One `flashlm bench --one` child (its own process): its decode row. pipeline: True (the default
    pipeline), False (--no-pipeline) or "always" (--pipeline-always); `budget` defaults to args.budget.
    (tools/bench_flash_dtypes.py runs its children through this too.)"""
    cmd = [sys.executable, "-m", "flashlm", "bench", model, "--one", "--json", "--mode", mode,
           "-p", str(args.prompt), "-n", str(args.tokens), "-r", str(args.reps), "--ctx", str(args.ctx),
           "--io-threads", str(args.io_threads), "--budget", budget or args.budget] + args.extra
    if args.profile:
        cmd += ["--profile", args.profile]
    if not pipeline:
        cmd.append("--no-pipeline")
    elif pipeline == "always":
        cmd.append("--pipeline-always")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench child failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    row = next((r for r in rows if r.get("test", "").startswith("tg")), None)
    if row is None:
        raise SystemExit(f"bench child printed no decode row ({' '.join(cmd)}): {rows[-1:]}")
    return row


def median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".1f", scale=1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--engines", default="auto,always,off", help="comma-separated: auto, always, off")
    ap.add_argument("--mode", default="flash", help="flash, hybrid, naive, or several comma-separated (one table each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", "--tokens", type=int, default=16, help="decode tokens per repetition")
    ap.add_argument("-p", "--prompt", type=int, default=8, help="prompt tokens of the pp test (0: none)")
    ap.add_argument("-r", "--reps", type=int, default=1, help="timed repetitions per child (after a warm-up one)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--profile", default="this-machine-2core")
    ap.add_argument("--json", action="store_true", help="also print every child's tg row")
    ap.add_argument("-t", "--threads", type=int, default=None, help="compute threads of every child (default: all cores)")
    # more flashlm bench flags after `--` (e.g. -- --window 2); argparse leaves them to parse_known_args
    args, extra = ap.parse_known_args()
    args.extra = [a for a in extra if a != "--"] + (["-t", str(args.threads)] if args.threads else [])

    from flashlm.runtime.device import load_device
    seq = load_device(args.profile).flash_speeds(args.io_threads).sequential_mb_s if args.profile else None
    for mode in args.mode.split(","):
        table(args, mode.strip(), seq)
    return 0


ENGINES = {"auto": (True, "pipeline"), "always": ("always", "pipeline, --pipeline-always"),
           "off": (False, "--no-pipeline")}


def table(args, mode: str, seq) -> None:
    names = [e.strip() for e in args.engines.split(",")]
    bad = [e for e in names if e not in ENGINES]
    if bad or "off" not in names or len(names) < 2:
        raise SystemExit(f"--engines: {bad or names}: use two or more of {', '.join(ENGINES)}, off among them")
    rows = {e: [] for e in names}
    for r in range(args.rounds):
        for e in names[r % len(names):] + names[:r % len(names)]:
            row = run_child(args.model, args, mode, ENGINES[e][0])
            rows[e].append(row)
            print(f"{mode} round {r + 1} {ENGINES[e][1]}: {row['ms_per_token']:.1f} ms/token", file=sys.stderr)
            if args.json:
                print(json.dumps(row))
    head = ["engine", "ms/tok", "io wait", "io busy", "disk idle", "io CPU", "mem", "mem (I/O thread)", "compute",
            "predict", "FFN kernels", "other compute", "max(busy, compute)", "ratio", "overlap %", "MiB/tok", "reads/tok", "guess recall %",
            "guess-miss bytes %", "lookahead on %", "stream MB/s", "of seq %"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    ms, med = {}, {}
    for e in names:
        rs = rows[e]
        m = med[e] = {k: median(rs, k) for k in (
            "ms_per_token", "io_wait_ms", "io_busy_ms", "disk_idle_ms", "io_cpu_ms", "mem_ms", "mem_bg_ms", "compute_ms",
            "predict_ms", "ffn_kernel_ms", "other_compute_ms", "bound_ms",
            "bound_ratio", "overlap", "bytes_per_token", "reads_per_token", "guess_recall", "guess_miss_fraction",
            "lookahead_on", "stream_mb_s")}
        ms[e] = m["ms_per_token"]
        cells = [ENGINES[e][1], fmt(m["ms_per_token"]), fmt(m["io_wait_ms"]), fmt(m["io_busy_ms"]), fmt(m["disk_idle_ms"]),
                 fmt(m["io_cpu_ms"]), fmt(m["mem_ms"]), fmt(m["mem_bg_ms"]), fmt(m["compute_ms"]), fmt(m["predict_ms"]),
                 fmt(m["ffn_kernel_ms"]), fmt(m["other_compute_ms"]), fmt(m["bound_ms"]),
                 fmt(m["bound_ratio"], ".2f"), fmt(m["overlap"], ".0f", 100), fmt(m["bytes_per_token"], ".2f", 2**-20),
                 fmt(m["reads_per_token"], ".0f"), fmt(m["guess_recall"], ".1f", 100),
                 fmt(m["guess_miss_fraction"], ".1f", 100), fmt(m["lookahead_on"], ".0f", 100),
                 fmt(m["stream_mb_s"], ".0f"),
                 fmt(m["stream_mb_s"] / seq if m["stream_mb_s"] and seq else None, ".0f", 100)]
        print("| " + " | ".join(cells) + " |")
    trials = [(r.get("trial_ms_on"), r.get("trial_ms_off")) for e in names if e == "auto" for r in rows[e]]
    r0 = rows[names[0]][0]
    speed = "; ".join(f"{ENGINES[e][1]} {ms['off'] / ms[e]:.2f}x" for e in names if e != "off")
    print(f"\n{Path(args.model).name}, mode {mode}, budget {args.budget} ({r0['budget']} bytes), window "
          f"{r0['window']}, {args.tokens} decode tokens x {args.reps} rep(s) x {args.rounds} rounds, medians; "
          f"decode speedup over --no-pipeline: {speed}"
          + (f"; sequential rate {seq:.0f} MB/s ({args.profile}, {args.io_threads} threads)" if seq else ""))
    if any(t[0] is not None for t in trials):
        print("auto's last trial per child (median ms/token lookahead on / off, pairs the lookahead won / "
              "compared, trials, trial tokens): " + ", ".join(
                  f"{r['trial_ms_on']:.0f}/{r['trial_ms_off']:.0f} {r.get('trial_pairs_won')}/{r.get('trial_pairs')} "
                  f"{r.get('trials')} {r.get('trial_tokens')}" for r in rows.get("auto", []) if r.get("trial_ms_on")))
        print(trial_counts(rows.get("auto", [])))
    # the issue's targets, for the pipeline's row (None: not applicable to this mode / not measured)
    e = "auto" if "auto" in names else names[0]
    mp = med[e]
    checks = {"ms/token <= 1.3x max(busy, compute)": mp["bound_ratio"] is not None and mp["bound_ratio"] <= 1.3,
              "speedup >= 1.6x": ms["off"] / ms[e] >= 1.6,
              "never slower than --no-pipeline": ms[e] <= ms["off"],
              "guess misses <= 10% of bytes": None if mp["guess_miss_fraction"] is None else mp["guess_miss_fraction"] <= 0.10,
              "streamed layers >= 80% of sequential": None if not (mp["stream_mb_s"] and seq) else mp["stream_mb_s"] >= 0.8 * seq}
    off = med["off"]
    if e == "auto" and mp["lookahead_on"] == 0 and off["reads_per_token"] and off["bytes_per_token"] \
            and abs(mp["reads_per_token"] / off["reads_per_token"] - 1) < 0.01 \
            and abs(mp["bytes_per_token"] / off["bytes_per_token"] - 1) < 0.01:
        # (within 1 %, not equal: the trial's guesses leave the caches in a slightly different state)
        print("(auto's switch ran every timed token with the lookahead off, reading what --no-pipeline "
              "reads (within 1 %): its ms difference from --no-pipeline is this run's noise)")
    print(f"targets ({ENGINES[e][1]}): " + "; ".join(f"{k}: {'met' if v else 'not met'}" for k, v in checks.items()
                                                   if v is not None) + "\n")


def trial_counts(rows: list[dict]) -> str:
    """What the lookahead bought and cost in the switch's trial tokens (all of auto's children pooled,
    medians of the children's per-token means), on vs off: the token's ms, the compute thread's I/O wait and cache
    bookkeeping, the reader's busy time, reads and MiB, the reader threads' CPU and its CPU per read."""
    cells = []
    for name, scale, spec in (("ms", 1, ".1f"), ("io_wait_ms", 1, ".1f"), ("mem_ms", 1, ".1f"), ("io_busy_ms", 1, ".1f"),
                              ("reads", 1, ".0f"), ("bytes", 2**-20, ".2f"), ("io_cpu_ms", 1, ".1f")):
        on, off = median(rows, f"trial_on_{name}"), median(rows, f"trial_off_{name}")
        if on is not None and off is not None:
            cells.append(f"{name} {fmt(on, spec, scale)} / {fmt(off, spec, scale)}")
    on_r, off_r = median(rows, "trial_on_reads"), median(rows, "trial_off_reads")
    on_c, off_c = median(rows, "trial_on_io_cpu_ms"), median(rows, "trial_off_io_cpu_ms")
    if on_r and off_r and on_c is not None and off_c is not None:
        cells.append(f"CPU us/read {1e3 * on_c / on_r:.1f} / {1e3 * off_c / off_r:.1f}")
    return "auto's trial tokens per token, lookahead on / off: " + ("; ".join(cells) if cells else "-")


if __name__ == "__main__":
    sys.exit(main())
