"""Held-out perplexity of one GGUF under llama.cpp and under flashlm's conversions of it, on the same token
ids and the same windows: what int8 activations cost each engine.

    python tools/ppl_llamacpp.py [--gguf PATH] [-f tools/data/heldout.txt] [--ctx 0,512] [--dtypes auto,f16]
                                 [--activations mixed,int8] [--threads 2]

Each window starts from an empty KV cache, as `flashlm ppl` does (`--ctx 0`: one window over the whole
text, flashlm's default for this file; `--ctx 512`: windows of 512 tokens). The ids are flashlm's
tokenization, fed to llama.cpp as they are, so both engines score exactly the same tokens. llama.cpp runs
its own kernels on the GGUF (for Q4_1 weights: activations quantized to Q8_1, int8 blocks of 32, as
flashlm's MatMulNBits do under `--activations int8`; `mixed` keeps q|k|v f32; the default `auto` takes
mixed on AVX-512 and int8 elsewhere); `--dtype f16` is the exact reference. The quantized conversions run once per `--activations` policy. One table:
perplexity per engine and window, and each one's change against flashlm f16. Needs `pip install
llama-cpp-python`.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def llamacpp_nll(gguf: Path, ids: list[int], window: int, threads: int) -> float:
    """Mean negative log-likelihood of ids[1:] under llama.cpp, window by window from an empty cache."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=window + 8, n_batch=512, n_threads=threads, logits_all=True,
                verbose=False)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        seq = ids[start:start + window + 1]
        llm.reset()
        llm.eval(seq[:-1])
        logits = np.asarray(llm.scores[:len(seq) - 1], np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll -= float((logits[np.arange(len(seq) - 1), seq[1:]] - logz).sum())
        count += len(seq) - 1
    llm.close()
    return nll / count


def flashlm_nll(folder: Path, ids: list[int], window: int, threads: int, activations: str) -> float:
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.loader import load
    from flashlm.runtime.memory import PREFILL_CHUNK
    from flashlm.runtime.perplexity import perplexity
    model, _, _ = load(folder, RuntimeConfig(ctx_len=window, threads=threads, activations=activations))
    try:
        return perplexity(model, ids, chunk=PREFILL_CHUNK, progress=False)["nll"]
    finally:
        model.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="default: the embedded SmolLM2-135M Q4_1")
    ap.add_argument("-f", "--file", type=Path, default=ROOT / "tools" / "data" / "heldout.txt")
    ap.add_argument("--ctx", default="0,512", help="window lengths, 0 = the whole text in one window")
    ap.add_argument("--dtypes", default="auto,f16", help="flashlm conversions (convert --dtype)")
    ap.add_argument("--activations", default="mixed,int8", help="policies for the quantized conversions")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from flashlm.converters.convert import convert
    from flashlm.runtime.default_model import embedded_gguf
    from flashlm.runtime.modelfile import open_folder
    from flashlm.runtime.tokenizer import Tokenizer
    gguf = args.gguf or embedded_gguf()
    dtypes = [d for d in args.dtypes.split(",") if d]
    with tempfile.TemporaryDirectory(prefix="flashlm-ppl-") as tmp:
        folders = {}
        for d in dtypes:
            folders[d] = Path(tmp) / f"{d}.flashlm"
            convert(gguf, folders[d], dtype=d, progress=False)
        first = open_folder(folders[dtypes[0]])
        ids = Tokenizer.from_folder(first.path, first.manifest).encode(args.file.read_text())
        runs = [(d, a) for d in dtypes for a in (["f32"] if d == "f16" else args.activations.split(","))]
        rows = []
        for ctx in (int(c) for c in args.ctx.split(",")):
            window = ctx or len(ids)
            label = f"{window} (whole text)" if not ctx else str(window)
            ppl = {f"flashlm {d}" + ("" if d == "f16" else f" ({a} activations)"):
                   math.exp(flashlm_nll(folders[d], ids, window, args.threads, a)) for d, a in runs}
            ppl["llama.cpp"] = math.exp(llamacpp_nll(gguf, ids, window, args.threads))
            rows.append((label, ppl))
    print(f"{gguf.name}, {args.file.name}: {len(ids)} tokens (flashlm's tokenization, fed to both engines)")
    ref = "flashlm f16" if "f16" in dtypes else None
    print("| window | engine | perplexity | vs flashlm f16 |")
    print("| --- | --- | ---: | ---: |")
    for label, ppl in rows:
        for name, value in ppl.items():
            delta = f"{100 * (value / ppl[ref] - 1):+.2f}%" if ref else "-"
            print(f"| {label} | {name} | {value:.4f} | {delta} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
