"""Quantized bundle rows on decode-shaped work: compute on the quantized rows, or widen them once on admission?

    python tools/bench_qbundles.py [--type q4_0] [--d 2560] [--layers 32] [--cached 2048] [--misses 400]
        [--active 0.4] [--tokens 5] [--threads 2]

Per "token" every layer's cache is used once (so the rows come from DRAM, not the CPU caches, as in a
real decode step). Three variants, alternated token by token in one run:

  quant   the FFN kernel on the cached quantized rows (runtime/qkernels.ffn_qbundles); admission = the
          rows read from flash, nothing else
  widen   each missed row dequantized once into an f16 cache row (qkernels.widen_rows_f16), then the
          f16 kernel (kernels.ffn_bundles) over the f16 cache
  f16     the f16 kernel over f16 rows (an f16 model: the reference speed, no admission work)

A widened cache row takes 2 x the d-element parts in f16 (10 KiB at d 2560) where the quantized row
takes its stride (4 KiB for q4_0), so under the same DRAM budget the widened cache holds
stride/(f16 bytes) as many rows: reported as "rows per GiB".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlm.converters.writer import bundle_stride  # noqa: E402
from flashlm.runtime import kernels as K, qkernels as QK  # noqa: E402
from flashlm.runtime.aligned import aligned_empty  # noqa: E402
from flashlm.runtime.qbundle import permute_input, qformat, quantize_part  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="q4_0", choices=["q4_0", "q4_1", "q8_0"])
    ap.add_argument("--d", type=int, default=2560)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cached", type=int, default=2048, help="cached rows per layer")
    ap.add_argument("--misses", type=int, default=400, help="rows admitted per layer per token")
    ap.add_argument("--active", type=float, default=0.4, help="fraction of cached rows with a non-zero ReLU")
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    threads = K.set_threads(args.threads)
    rng = np.random.default_rng(0)
    fmt = qformat(args.type)
    d, n, L = args.d, args.cached, args.layers
    part = fmt.row_bytes(d)
    stride_q = bundle_stride(2 * part)
    stride_f16 = bundle_stride(2 * d * 2)
    # One layer's rows quantized for real, copied to every layer (distinct memory, same values).
    up = rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    down = rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(n)
    one = np.zeros((n, stride_q), np.uint8)
    one[:, :part] = quantize_part(up, fmt)
    one[:, part:2 * part] = quantize_part(down, fmt)
    qrows = [aligned_empty((n, stride_q), np.uint8) for _ in range(L)]
    f16 = np.zeros((n, stride_f16 // 2), np.uint16)
    f16[:, :d] = up.astype(np.float16).view(np.uint16)
    f16[:, d:2 * d] = down.astype(np.float16).view(np.uint16)
    frows = [aligned_empty((n, stride_f16 // 2), np.uint16) for _ in range(L)]
    wrows = [np.zeros((n, 2 * d), np.uint16) for _ in range(L)]     # widened cache rows (unpadded)
    all_rows = np.arange(n, dtype=np.int32)
    for i in range(L):
        qrows[i][:] = one
        frows[i][:] = f16
        q, s = fmt.views(qrows[i])
        QK.widen_rows_f16(q, s, all_rows, n, fmt.array(), np.array([0, part], np.int64), d, wrows[i])
    h = rng.standard_normal((1, d)).astype(np.float32)
    u = (h @ up.T)[0]
    bias = np.full(n, -np.quantile(u, 1 - args.active), np.float32)
    ids = np.arange(n, dtype=np.int32)
    starts = np.array([0, 0, part], np.int64)
    fa = fmt.array()
    partial = np.zeros((threads, 1, d), np.float32)
    out = np.zeros((1, d), np.float32)
    hp = np.zeros((1, d), np.float32)
    src = np.sort(rng.choice(n, args.misses, replace=False)).astype(np.int32)

    def quant():
        for i in range(L):
            q, s = fmt.views(qrows[i])
            QK.ffn_qbundles(permute_input(h, hp), q, s, n, ids, bias, K.ACT_RELU, np.float32(0), fa, starts, partial, out, np.zeros(0, np.int32))
        return 0.0

    def widen():
        t_w = 0.0
        for i in range(L):
            t0 = time.perf_counter()
            q, s = fmt.views(qrows[i])
            # admitted rows are appended at the end of the live rows (neuron_cache), a contiguous block
            QK.widen_rows_f16(q, s, src, args.misses, fa, starts[[0, 2]], d, wrows[i][n - args.misses:])
            t_w += time.perf_counter() - t0
            K.ffn_bundles(permute_input(h, hp), wrows[i], n, ids, bias, K.ACT_RELU, np.float32(0), 0, 0, d, partial, out, np.zeros(0, np.int32))
        return t_w

    def plain_f16():
        for i in range(L):
            K.ffn_bundles(h, frows[i], n, ids, bias, K.ACT_RELU, np.float32(0), 0, 0, d, partial, out, np.zeros(0, np.int32))
        return 0.0

    variants = {"quant": quant, "widen": widen, "f16": plain_f16}
    for f in variants.values():           # compile / warm
        f()
    times = {k: [] for k in variants}
    widen_s = []
    for _ in range(args.tokens):
        for k, f in variants.items():
            t0 = time.perf_counter()
            w = f()
            times[k].append(time.perf_counter() - t0)
            if k == "widen":
                widen_s.append(w)
    gib = 2 ** 30
    row_bytes = {"quant": stride_q, "widen": 2 * d * 2, "f16": stride_f16}
    print(f"{args.type}, d {d}, {L} layers x {n} cached rows, {args.misses} admitted per layer-token, "
          f"{args.active:.0%} active, {threads} threads, {args.tokens} tokens alternated")
    print("| variant | FFN ms/token (median) | of which widening | DRAM per cached row | rows per GiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in variants:
        med = 1e3 * float(np.median(times[k]))
        wid = f"{1e3 * float(np.median(widen_s)):.1f}" if k == "widen" else "-"
        print(f"| {k} | {med:.1f} | {wid} | {row_bytes[k]} B | {gib // row_bytes[k]:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
