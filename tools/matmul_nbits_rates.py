"""How fast onnxruntime's MatMulNBits runs one decode matvec on this machine, per storage type and shape.

    python tools/matmul_nbits_rates.py [--shapes 576x576,960x576,3072x576,576x1536,49152x576] [--types q4_0,q4_1,q8_0]
                                       [--threads 1] [--activations int8]

One session per (type, shape) holding a single linear built the way flashlm builds its graphs
(runtime/ort_graph.py: q4_1 includes its min correction), random weights, one input row; CPU time per
run(), best of 5 rounds. The weights of one linear fit in L2/L3, so these are cache-hot rates: a decode
token streams every layer's weights from DRAM and runs slower than the sum of these figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x576,960x576,3072x576,576x1536,49152x576", help="NxK comma list (SmolLM2's)")
    ap.add_argument("--types", default="q4_0,q4_1,q8_0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--activations", default="int8", choices=["int8", "f32"],
                    help="MatMulNBits inputs: int8 blocks (accuracy_level 4) or f32 (accuracy_level 0)")
    args = ap.parse_args()
    from flashlm.runtime.ort_graph import GraphBuilder, session
    from flashlm.runtime.quant import quantize
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, {args.activations} activations, CPU time per run(), best of 5")
    print("| type | N x K | us / run | G weights / s |\n| --- | --- | ---: | ---: |")
    for kind in args.types.split(","):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            g = GraphBuilder("rate", args.activations)
            g.output(g.linear(g.input("x", k), quantize(rng.standard_normal((n, k)).astype(np.float32), kind)), "y", n)
            sess = session(g, args.threads)
            feed = {"x": rng.standard_normal((1, k)).astype(np.float32)}
            runs = max(10, int(3e7 // (n * k)))
            for _ in range(10):
                sess.run(None, feed)
            best = float("inf")
            for _ in range(5):
                t0 = time.process_time()
                for _ in range(runs):
                    sess.run(None, feed)
                best = min(best, (time.process_time() - t0) / runs)
            print(f"| {kind} | {n} x {k} | {best * 1e6:.1f} | {n * k / best / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
