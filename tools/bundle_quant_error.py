"""How far quantized bundle parts are from a GGUF model's own values.

    python tools/bundle_quant_error.py MODEL.gguf [--type q4_1] [--layers 0,1,...]

A bundle row holds neuron i's gate row, up row (both blocked along d, like GGUF) and down COLUMN
W_down[:, i], which GGUF blocks along n_ff instead: the down column is always requantized along d.
Per projection, against the source values (gguf's dequantizer): the relative RMS error
||Wq - W|| / ||W|| and the largest |Wq - W| relative to max |W|. For gate/up also whether the GGUF
blocks repack exactly (same type as --type: zero error by construction) or must be requantized.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlm.runtime.qbundle import dequantize_part, from_gguf_blocks, qformat, quantize_part  # noqa: E402


def _errors(w: np.ndarray, wq: np.ndarray) -> tuple[float, float]:
    return (float(np.linalg.norm(wq - w) / np.linalg.norm(w)), float(np.abs(wq - w).max() / np.abs(w).max()))


def main(argv=None) -> int:
    import gguf
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--type", default="q4_1", choices=["q4_0", "q4_1", "q8_0"])
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    ap.add_argument("--no-repack", action="store_true",
                    help="requantize gate/up from their values too (what `flashlm convert` does today: it reads "
                         "every GGUF tensor as float)")
    args = ap.parse_args(argv)
    fmt = qformat(args.type)
    reader = gguf.GGUFReader(args.gguf)
    tensors = {t.name: t for t in reader.tensors}
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    layers = [int(x) for x in args.layers.split(",")] if args.layers else range(n_layers)
    print(f"{Path(args.gguf).name}: bundle parts as {args.type} (f16 scales, blocks of 32 along d)")
    print("| layer | projection | GGUF type | how | rel. RMS error | max error / max abs |")
    print("| ---: | --- | --- | --- | ---: | ---: |")
    totals = {}
    for i in layers:
        for proj in ("gate", "up", "down"):
            t = tensors.get(f"blk.{i}.ffn_{proj}.weight")
            if t is None:
                continue
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)     # [out, in] numpy order
            if proj == "down":
                w = np.ascontiguousarray(w.T)                                         # row i = column i
            if proj != "down" and t.tensor_type == fmt.gguf_type and not args.no_repack:
                raw = np.asarray(t.data).view(np.uint8).reshape(w.shape[0], -1)
                wq, how = dequantize_part(from_gguf_blocks(raw, fmt), fmt), "repacked"
            else:
                wq, how = dequantize_part(quantize_part(w, fmt), fmt), "requantized"
            rel, mx = _errors(w, wq)
            totals.setdefault((proj, how), []).append(rel)
            print(f"| {i} | {proj} | {t.tensor_type.name} | {how} | {rel:.4f} | {mx:.4f} |")
    for (proj, how), v in totals.items():
        print(f"mean over layers: {proj} ({how}) rel. RMS error {np.mean(v):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
