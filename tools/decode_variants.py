"""Decode (and prefill) speed of one folder under several runtime settings, in one process, alternating.

    python tools/decode_variants.py FOLDER --threads 2 --rounds 8 --set ort_spin_us=0 --set ort_spin_us=10

Every `--set` is one variant (comma-separated RuntimeConfig fields, e.g. `ort_spin_us=0,kv_dtype=f32`).
All variants are loaded into this process and take turns, round by round: 32 decode tokens (wall and
CPU ms per token, getrusage: on a loaded machine CPU time is the steadier figure) and one pp128 prefill.
Under load this compares the variants against each other in one run; it is not an idle-machine figure
(tools/bench_llamacpp.py, each engine in its own child, is).
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _variant(spec: str) -> dict:
    from flashlm.runtime.config import RuntimeConfig
    types = {f.name: f.type for f in dataclasses.fields(RuntimeConfig)}
    out = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in types:
            raise SystemExit(f"--set {spec}: RuntimeConfig has no field {key!r}")
        kind = str(types[key])
        out[key] = (value.lower() in ("1", "true", "yes")) if kind.startswith("bool") else \
            int(value) if kind.startswith("int") else value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per round")
    ap.add_argument("--pp", type=int, default=128, help="prefill tokens per round (0: none)")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="one variant: FIELD=VALUE[,FIELD=VALUE]")
    args = ap.parse_args()
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.loader import load
    sets = args.sets or [""]
    ctx = args.tokens + max(args.pp, 9) + 8
    models = {s or "default": load(args.folder, RuntimeConfig(ctx_len=ctx, threads=args.threads, **_variant(s)))[0]
              for s in sets}
    ids = np.random.default_rng(0).integers(100, 40000, size=ctx)

    def decode(model, n):
        model.reset()
        model.forward(ids[:1])
        for i in range(1, n + 1):
            model.forward(ids[i:i + 1])

    def prefill(model, n):
        model.reset()
        model.forward(ids[:n])
    for m in models.values():
        decode(m, 8)
        if args.pp:
            prefill(m, args.pp)
    dec = {k: [] for k in models}
    pre = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            decode(m, args.tokens)
            wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            n = args.tokens + 1
            dec[k].append((1e3 * wall / n, 1e3 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n))
            if args.pp:
                t0 = time.perf_counter()
                prefill(m, args.pp)
                pre[k].append(args.pp / (time.perf_counter() - t0))
    print(f"{args.folder}, threads {args.threads or 'all'}, {args.rounds} rounds of {args.tokens + 1} decode tokens"
          + (f" and pp{args.pp}" if args.pp else ""))
    print("| variant | decode wall ms/token (min / median) | decode CPU ms/token (min / median) | prefill t/s (median) |")
    print("| --- | ---: | ---: | ---: |")
    for k in models:
        wall, cpu = sorted(a for a, _ in dec[k]), sorted(b for _, b in dec[k])
        pp = sorted(pre[k])
        print(f"| {k} | {wall[0]:.2f} / {wall[len(wall) // 2]:.2f} | {cpu[0]:.2f} / {cpu[len(cpu) // 2]:.2f} | "
              + (f"{pp[len(pp) // 2]:.0f} |" if pp else "- |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
