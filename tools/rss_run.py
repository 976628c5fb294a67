"""Peak RSS of `flashlm run` vs llama.cpp generating from the same GGUF, each in its own child process.

    python tools/rss_run.py [--gguf PATH] [--ctx 2048] [-n 32] [--dtype auto] [--kv-dtype auto] [--ort-graph auto]

The flashlm folder is converted first (in its own child, not counted). Peak RSS is the child's
ru_maxrss (resident pages at their peak: for llama.cpp that includes the memory-mapped GGUF pages
it touched, as it must read them all).

`--phases` adds where flashlm's RSS goes: one more child loads the same folder step by step through the
library (the imports one by one, tokenizer, model build, first forward, decode) and prints RSS, its
anonymous and file-backed parts (shared-library pages count) and the peak after each step.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a robot who learns to paint."


def _peak_mib(cmd: list[str]) -> float:
    """ru_maxrss of one child (fork + wait4, so earlier children do not count)."""
    pid = os.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed")
    return usage.ru_maxrss / 1024


PHASES = r"""
import sys, time
def mib(label):
    d = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0]) / 1024
    print(f"| {label} | {d['VmRSS']:.0f} | {d['RssAnon']:.0f} | {d['RssFile']:.0f} | {d['VmHWM']:.0f} |", flush=True)
print("| after | RSS MiB | anonymous | file-backed | peak so far |\n| --- | ---: | ---: | ---: | ---: |")
mib("interpreter")
import numpy; mib("import numpy")
import onnxruntime; mib("import onnxruntime")
from pathlib import Path
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.loader import load
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.tokenizer import Tokenizer
from flashlm.runtime.model import Model
from flashlm.runtime.process_memory import release_freed_heap
mib("import flashlm")
folder = open_folder(Path(sys.argv[1]))
tok = Tokenizer.from_folder(folder.path, folder.manifest); release_freed_heap(); mib("tokenizer")
model = Model(folder, RuntimeConfig(ctx_len=int(sys.argv[2]), threads=int(sys.argv[3]), kv_dtype=sys.argv[4]))
mib("model built (weights in their engine)")
model.warmup(); mib("kernel warm-up")
ids = tok.encode(sys.argv[5])
logits = model.forward(ids); mib(f"prompt ({len(ids)} tokens)")
for _ in range(int(sys.argv[6])):
    logits = model.forward([int(logits[-1].argmax())])
mib(f"{sys.argv[6]} decode tokens")
print("numba imported:", "numba" in sys.modules, "| onnx imported:", "onnx" in sys.modules, "| jinja2 imported:", "jinja2" in sys.modules)
"""


def main() -> int:
    from flashlm.runtime.default_model import embedded_gguf
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2-135M Q4_1")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("-n", type=int, default=32, help="tokens to generate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-dtype", default="auto", help="flashlm run --kv-dtype (auto, its default: f32 under the one-graph decoder, else f16)")
    ap.add_argument("--ort-graph", default="auto", choices=["auto", "whole", "layers"],
                    help="flashlm run --ort-graph (onnxruntime: the decoder in a few graphs, or one between attention calls)")
    ap.add_argument("--phases", action="store_true", help="also print flashlm's RSS step by step")
    args = ap.parse_args()
    gguf = args.gguf or embedded_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m.flashlm"
        subprocess.check_call([sys.executable, "-m", "flashlm", "convert", str(gguf), "-o", str(folder),
                               "--dtype", args.dtype, "--no-progress"], stdout=subprocess.DEVNULL)
        ours = _peak_mib([sys.executable, "-m", "flashlm", "run", str(folder), "-p", PROMPT, "-n", str(args.n),
                          "--ctx", str(args.ctx), "--kv-dtype", args.kv_dtype, "-t", str(args.threads),
                          "--temp", "0", "--no-progress", "--ort-graph", args.ort_graph])
        if args.phases:
            subprocess.check_call([sys.executable, "-c", PHASES, str(folder), str(args.ctx), str(args.threads),
                                   args.kv_dtype, PROMPT, str(args.n)])
    code = ("import sys; from llama_cpp import Llama; "
            f"llm = Llama(model_path={str(gguf)!r}, n_ctx={args.ctx}, n_threads={args.threads}, verbose=False); "
            f"llm({PROMPT!r}, max_tokens={args.n}, temperature=0)")
    theirs = _peak_mib([sys.executable, "-c", code])
    print(f"model {gguf.name}, ctx {args.ctx}, {args.n} tokens, {args.threads} threads")
    print(f"| engine | peak RSS |\n| --- | ---: |\n| flashlm run (--dtype {args.dtype}, KV {args.kv_dtype}, --ort-graph {args.ort_graph}) | "
          f"{ours:.0f} MiB |\n| llama.cpp (llama-cpp-python) | {theirs:.0f} MiB |")
    print(f"ratio flashlm / llama.cpp: {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
