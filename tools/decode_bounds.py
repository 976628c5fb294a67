"""What bounds the one-graph decoder's decode token: its time with pieces of the graph taken out.

    python tools/decode_bounds.py [--folder DIR | --gguf PATH] [--threads 1,2] [--past 128] [--tokens 48] [-r 3]
                                  [--set kv_dtype=f16]

Timing only: the variants compute wrong logits on purpose. Each runs in its own child process (loaded
with the library's defaults plus `--set`), variants alternating rep by rep:
  full         the decoder as built (runtime/ort_model.py OrtDecoder)
  no-attn      every GroupQueryAttention replaced by a slice of its q (the KV caches pass through)
  no-min       the q4_1 min correction left out (MatMulNBits alone, no block sums nor correction MatMul)
  no-attn-min  both
Per variant: decode wall and CPU ms per token (best rep), and the wall ms of the lm_head's run() alone,
so full - no-attn is what attention costs, full - no-min what the q4_1 mins cost, and no-attn-min - lm
roughly the layers' MatMulNBits with their norms and activations. On a loaded machine CPU time is the
steadier figure; the lead's idle rerun is the one to quote.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VARIANTS = ("full", "no-attn", "no-min", "no-attn-min")


def _patch(variant: str) -> None:
    """Rewrite GraphBuilder.node so the graphs the library builds leave the variant's pieces out."""
    import dataclasses

    import flashlm.runtime.ort_graph as og
    from flashlm.runtime import onnx_proto
    from flashlm.runtime.quant import QUANT_TYPES
    node, matmul_nbits = og.GraphBuilder.node, og.GraphBuilder._matmul_nbits

    def patched(self, op, inputs, hint=None, domain="", n_out=1, names=None, **attrs):
        if "attn" in variant and op == "GroupQueryAttention":
            # inputs[0] is [1, T, (H + 2 Hkv) hd]: keep the first H hd columns as the "attention output".
            width = attrs["num_heads"] * self._head_dim
            q = node(self, "Slice", [inputs[0], self.const(np.array([0], np.int64)),
                                     self.const(np.array([width], np.int64)), self.const(np.array([2], np.int64))], "q")
            for name, past in zip(names[1:], inputs[3:5]):
                self.nodes.append(onnx_proto.node("Identity", [past], [name]))
            return [q, names[1], names[2]]
        return node(self, op, inputs, hint, domain, n_out, names, **attrs)

    def no_min(self, x, w, hint):                       # the matrix without its mins: MatMulNBits alone
        plain = QUANT_TYPES["q8_0" if w.qtype.bits == 8 else "q4_0"]
        return matmul_nbits(self, x, dataclasses.replace(w, qtype=plain, mins=None), hint)
    og.GraphBuilder.node = patched
    if "min" in variant:
        og.GraphBuilder._matmul_nbits = no_min


def child(args) -> int:
    _patch(args.variant)
    import flashlm.runtime.ort_graph as og
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.loader import load
    from flashlm.runtime.modelfile import open_folder
    og.GraphBuilder._head_dim = open_folder(args.folder).config.head_dim
    model, _, _ = load(args.folder, RuntimeConfig(ctx_len=args.past + args.tokens + 16, threads=args.threads,
                                                  **json.loads(args.fields)))
    ids = np.random.default_rng(0).integers(100, 40000, size=args.past + args.tokens + 8)
    lm_sess = model.ort.parts[-1][0]

    def rep():
        model.reset()
        model.forward(ids[:args.past])
        lm = {"s": 0.0}
        run = lm_sess.run_with_iobinding

        def timed(b):
            t = time.perf_counter()
            run(b)
            lm["s"] += time.perf_counter() - t
        lm_sess.run_with_iobinding = timed
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.tokens):
            model.forward(ids[args.past + i:args.past + i + 1])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        lm_sess.run_with_iobinding = run
        return [1e3 * v / args.tokens for v in (wall, cpu, lm["s"])]
    model.reset()
    model.forward(ids[:8])
    for i in range(8):
        model.forward(ids[8 + i:9 + i])
    best = min(rep() for _ in range(2))
    print(json.dumps({"wall_ms": best[0], "cpu_ms": best[1], "lm_ms": best[2]}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--set", default="", help="RuntimeConfig fields, comma-separated (e.g. kv_dtype=f16)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--fields", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.threads = int(args.threads)
        return child(args)
    sys.path.insert(0, str(ROOT / "tools"))
    from decode_variants import _variant
    fields = json.dumps(_variant(args.set))
    threads = [int(t) for t in args.threads.split(",")]
    got = {(v, t): [] for t in threads for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from flashlm.converters.convert import convert
            from flashlm.runtime.default_model import embedded_gguf
            folder = str(Path(tmp) / "model.flashlm")
            convert(str(args.gguf or embedded_gguf()), folder, dtype="auto", force=True, progress=False)
        for r in range(args.reps):
            for t in threads:
                for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    out = subprocess.run([sys.executable, __file__, "--child", "--variant", v, "--folder", folder,
                                          "--threads", str(t), "--past", str(args.past), "--tokens", str(args.tokens),
                                          "--fields", fields], capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"child {v} (threads {t}) failed:\n{out.stderr[-2000:]}")
                    got[(v, t)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"decode at past {args.past}, {args.tokens} tokens, best of {args.reps} children each"
          f"{', ' + args.set if args.set else ''} (timing only: these variants compute wrong logits)")
    print("| variant | threads | wall ms/token | CPU ms/token | lm_head run() ms |\n| --- | ---: | ---: | ---: | ---: |")
    for (v, t), rows in got.items():
        print(f"| {v} | {t} | {min(r['wall_ms'] for r in rows):.2f} | {min(r['cpu_ms'] for r in rows):.2f} | "
              f"{min(r['lm_ms'] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
