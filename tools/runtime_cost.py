"""What the runtime itself costs in memory: RSS of a fresh process after each step of starting flashlm.

    python tools/runtime_cost.py [MODEL_FOLDER] [--mode dense] [--dense-engine auto] [--json]

Each row is measured in the same fresh child process, cumulatively, from /proc/self/status (VmRSS, and
the anonymous / file-backed split); the model folder defaults to the embedded SmolLM2. The steps: bare
Python; numpy; the flashlm runtime modules (numba, llvmlite, the tokenizers bindings, jinja2 come in with
them); the model's tokenizer; the heap trimmed as load() does (the tokenizer frees most of what it allocates);
the model built with its weights (dense or the given mode); the numba kernels loaded from their cache
or compiled (warm-up); two decode steps; and onnxruntime's import, which a quantized folder run by the
onnxruntime dense engine has already paid while building.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
rows = []
def step(name, t0):
    rows.append(dict(step=name, seconds=round(time.perf_counter() - t0, 3), **status()))
folder, mode, engine = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter(); step("python", t)
t = time.perf_counter(); import numpy; step("+ numpy", t)
t = time.perf_counter()
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.loader import load
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.tokenizer import Tokenizer
step("+ flashlm runtime modules (numba, llvmlite, tokenizers, jinja2)", t)
t = time.perf_counter()
f = open_folder(folder); tok = Tokenizer.from_folder(f.path, f.manifest)
step("+ tokenizer (%d tokens)" % tok.vocab_size, t)
t = time.perf_counter()
from flashlm.runtime.process_memory import release_freed_heap
release_freed_heap(); step("+ heap trimmed (as load() does after the tokenizer)", t)
t = time.perf_counter()
model, _, plan = load(folder, RuntimeConfig(mode=mode, ctx_len=512, dense_engine=engine), warmup=False)
step("+ model built, %s mode (planned %.1f MiB)" % (mode, plan.total / 2**20), t)
t = time.perf_counter(); model.warmup(); step("+ numba kernels (warm-up)", t)
t = time.perf_counter(); model.forward([1]); model.forward([2]); step("+ two decode steps", t)
t = time.perf_counter(); import onnxruntime; step("+ onnxruntime import (already in if the engine is onnxruntime)", t)
print(json.dumps(rows))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--dense-engine", default="auto", help="quantized dense weights: onnxruntime | numba | auto")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    folder = a.model
    if folder is None:
        from flashlm.runtime.default_model import default_model_folder
        folder = str(default_model_folder())
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), a.mode, a.dense_engine], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr.strip().splitlines()[-1])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    if a.json:
        print(json.dumps(rows))
        return
    print(f"runtime cost, {Path(folder).name} ({a.mode}, dense engine {a.dense_engine}); RSS of one fresh "
          f"process, cumulative")
    print("| step | RSS MiB | +MiB | anon MiB | file MiB | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    prev = 0
    for r in rows:
        print(f"| {r['step']} | {r['VmRSS'] / 2**20:.1f} | {(r['VmRSS'] - prev) / 2**20:+.1f} | "
              f"{r['RssAnon'] / 2**20:.1f} | {r['RssFile'] / 2**20:.1f} | {r['seconds']:.2f} |")
        prev = r["VmRSS"]


if __name__ == "__main__":
    main()
