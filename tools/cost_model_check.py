"""Check the cost model against measurement on this machine: predicted vs measured ms/token for a set
of plans, and tune's pick against the best of a measured grid.

    python tools/cost_model_check.py --profile devices/this-machine-2core.toml --tokens 12 \\
        --plans MODEL_FOLDER:LIMIT [MODEL_FOLDER:LIMIT ...] [--grid MODEL_FOLDER:LIMIT --grid-size 20]

For every MODEL:LIMIT (LIMIT: whole-process memory, e.g. 600MiB), the plans are dense (when it fits),
naive, hybrid and flash (planner's choice, window 1 and 4 where calibrated, and all-sparse), each
with the budget the limit leaves after the runtime's own memory. Predicted: `runtime.tune.evaluate`
with the profile's figures; measured: `runtime.tune.measure_ms` (median ms of --tokens decode steps
after a short prompt, in this process). --grid measures --grid-size settings spread over tune's
ranking (its pick first) and reports the pick's measured time against the best measured one.
Prints markdown tables (for docs/BENCHMARKS.md). Timing noise is ~15% on an idle 2-core machine and
far more under load: run it when `uptime` is low.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _parse(spec: str):
    path, _, limit = spec.rpartition(":")
    return Path(path), limit


def plans_for(folder, limit: int, profile_ref: str, calibration):
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.memory import RUNTIME_OVERHEAD
    budget = str(limit - RUNTIME_OVERHEAD)
    base = dict(budget=budget, profile=profile_ref, ctx_len=256)
    out = [("dense", RuntimeConfig(mode="dense", **base)), ("naive", RuntimeConfig(mode="naive", **base)),
           ("hybrid", RuntimeConfig(mode="hybrid", **base))]
    if calibration and calibration.get("layers"):
        wins = calibration["layers"][0].get("windows", {})
        for w in (1, 4):
            if str(w) in wins:
                out.append((f"flash auto w{w}", RuntimeConfig(mode="flash", window=w, **base)))
        if "2" in wins:
            out.append(("flash sparse w2", RuntimeConfig(mode="flash", window=2, layer_io="sparse", **base)))
    return out


def main(argv=None) -> int:
    from flashlm.runtime.device import load_profile
    from flashlm.runtime.memory import BudgetError, parse_size
    from flashlm.runtime.modelfile import open_folder
    from flashlm.runtime.predictor import calibration_report
    from flashlm.runtime.tune import candidates, evaluate, measure_ms
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--plans", nargs="*", default=[], metavar="MODEL:LIMIT")
    ap.add_argument("--grid", default=None, metavar="MODEL:LIMIT")
    ap.add_argument("--grid-size", type=int, default=20)
    a = ap.parse_args(argv)
    profile = load_profile(a.profile)

    def cal(folder):
        try:
            return calibration_report(folder.path)
        except FileNotFoundError:
            return None

    if a.plans:
        print("| model | limit | plan | predicted ms | measured ms | measured / predicted |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for spec in a.plans:
            path, limit_text = _parse(spec)
            folder = open_folder(path)
            limit = parse_size(limit_text, profile.memory_bytes)
            c = cal(folder)
            for name, rt in plans_for(folder, limit, a.profile, c):
                try:
                    pred = evaluate(folder, rt, profile, c)
                except BudgetError:
                    continue
                got = measure_ms(path, rt, a.tokens)
                print(f"| {path.name} | {limit_text} | {name} ({pred.describe()}) | {pred.ms:.2f} | {got:.2f} | "
                      f"{got / pred.ms:.2f} |", flush=True)
    if a.grid:
        path, limit_text = _parse(a.grid)
        folder = open_folder(path)
        limit = parse_size(limit_text, profile.memory_bytes)
        ranked = candidates(folder, profile, limit, cal(folder), profile_ref=a.profile, ctx_len=256)
        step = max(1, len(ranked) // a.grid_size)
        chosen = [ranked[i] for i in range(0, len(ranked), step)][:a.grid_size]
        print(f"\n{path.name} within {limit_text}: {len(ranked)} settings fit; measuring {len(chosen)} of them")
        print("| rank | setting | predicted ms | measured ms |")
        print("| ---: | --- | ---: | ---: |")
        results = []
        for cand in chosen:
            got = measure_ms(path, dataclasses.replace(cand.rt), a.tokens)
            results.append((cand, got))
            print(f"| {ranked.index(cand) + 1} | {cand.describe()} | {cand.ms:.2f} | {got:.2f} |", flush=True)
        best = min(results, key=lambda r: r[1])
        pick = results[0]
        print(f"\ntune's pick measured {pick[1]:.2f} ms/token; best measured {best[1]:.2f} ms/token "
              f"({best[0].describe()}): pick / best = {pick[1] / best[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
