"""CPU time of one decode-step `com.microsoft.GroupQueryAttention` call (onnxruntime CPU EP), per KV type and
cache length: the attention node runtime/ort_model.py's OrtDecoder puts in every layer.

    python tools/gqa_rates.py [--heads 9 --kv-heads 3 --head-dim 64] [--past 32] [--ctx 64,256,2048]

SmolLM2's shape by default; packed [q|k|v] input, RoPE inside, past and present bound to one buffer (as the
decoder binds them). One thread, best of 5 rounds of 300 calls, process CPU time.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def per_call_us(H: int, Hkv: int, hd: int, S: int, past: int, half: bool) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    dt, tp = (np.float16, TensorProto.FLOAT16) if half else (np.float32, TensorProto.FLOAT)
    W = (H + 2 * Hkv) * hd
    angles = np.outer(np.arange(S), 1.0 / (10000 ** (np.arange(0, hd, 2) / hd)))
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seqlens", "total", "cos", "sin"],
                            ["out", "prk", "prv"], domain="com.microsoft", num_heads=H, kv_num_heads=Hkv,
                            do_rotary=1, rotary_interleaved=0, scale=float(hd ** -0.5))
    kv = [1, Hkv, S, hd]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "gqa",
        [info("qkv", tp, [1, 1, W]), info("pk", tp, kv), info("pv", tp, kv),
         info("seqlens", TensorProto.INT32, [1]), info("total", TensorProto.INT32, [])],
        [info("out", tp, [1, 1, H * hd]), info("prk", tp, kv), info("prv", tp, kv)],
        [numpy_helper.from_array(np.cos(angles).astype(dt), "cos"), numpy_helper.from_array(np.sin(angles).astype(dt), "sin")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    k, v = np.zeros(kv, dt), np.zeros(kv, dt)
    qkv = np.random.default_rng(0).standard_normal((1, 1, W)).astype(dt)
    out = np.zeros((1, 1, H * hd), dt)
    seqlens, total = np.array([past], np.int32), np.array(past + 1, np.int32)
    b = sess.io_binding()
    b.bind_input("qkv", "cpu", 0, dt, list(qkv.shape), qkv.ctypes.data)
    b.bind_input("seqlens", "cpu", 0, np.int32, [1], seqlens.ctypes.data)
    b.bind_input("total", "cpu", 0, np.int32, [], total.ctypes.data)
    b.bind_output("out", "cpu", 0, dt, list(out.shape), out.ctypes.data)
    for name, a in (("k", k), ("v", v)):
        b.bind_input(f"p{name}", "cpu", 0, dt, kv, a.ctypes.data)
        b.bind_output(f"pr{name}", "cpu", 0, dt, kv, a.ctypes.data)
    for _ in range(50):
        sess.run_with_iobinding(b)
    best = float("inf")
    for _ in range(5):
        t = time.process_time()
        for _ in range(300):
            sess.run_with_iobinding(b)
        best = min(best, (time.process_time() - t) / 300)
    return 1e6 * best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--past", type=int, default=32, help="cached positions before the new token")
    ap.add_argument("--ctx", default="64,256,2048", help="cache lengths (the bound buffer's positions)")
    args = ap.parse_args()
    print("| KV type | cache length | us per call |\n| --- | ---: | ---: |")
    for half in (False, True):
        for S in (int(s) for s in args.ctx.split(",")):
            us = per_call_us(args.heads, args.kv_heads, args.head_dim, S, args.past, half)
            print(f"| {'f16' if half else 'f32'} | {S} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
