"""The forward pass with resident weights in onnxruntime sessions and attention in numba.

Measured on SmolLM2 (2 cores): a `run()` costs a few microseconds of Python and onnxruntime
overhead, a numba call about one; with 30 layers that overhead is as large as the matvecs
themselves, so the graph is cut only where numba must run (attention over the KV cache, or an FFN
whose rows stream from flash):

    head_0:            x -> norm -> [q|k|v]                                   (one MatMulNBits)
    numba:             RoPE, store k/v, attention                           -> att
    mid_l (FFN here):  att, x -> x += o(att); x += down(swiglu([gate|up](norm(x)))); [q|k|v]_(l+1)
    tail_l (FFN not):  att, x -> x += o(att); h = norm(x)      then the FFN backend, x += ffn(h),
                                                                  head_(l+1): x -> [q|k|v]
    lm:                x -> norm -> lm_head

so a fully resident model makes n_layers + 2 runs and n_layers numba calls per forward.

Threads. A decode token's matvecs are 5-40 us each, so splitting one across threads pays only if the
other thread is awake: waking a sleeping onnxruntime worker costs ~25 us on this 2-core VM. Measured on
SmolLM2 q4 with 2 threads and no spinning: ~176 voluntary context switches per decode token, and decode
slower with 2 threads than with 1 (51 vs 67 tok/s, idle machine). Two policies (RuntimeConfig.ort_spin_us):
  spin_us > 0 (default 10): every session splits its nodes across `threads` and its idle worker spins
    spin_us before sleeping, so a session's consecutive nodes find it awake; it wakes about once per
    session (once per layer) and, spinning no longer than a numba attention call, stops before the next
    session's worker starts. Prompts run whole through each session (onnxruntime splits their rows).
  spin_us = 0: every session runs on the calling thread (intra_op 1) except `lm` (one 49152 x 576 matvec,
    worth a wake-up), decode attention runs serially in numba, and a prompt's T tokens are split into
    `threads` row blocks that go through each session concurrently (onnxruntime releases the GIL in run();
    each row of these graphs is independent of the others) while attention over the whole block stays one
    parallel numba call.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import kernels as K
from .config import ModelConfig
from .ort_graph import INT8_ACTIVATIONS, GraphBuilder, bounded_spinning, session


SPLIT_MIN_ROWS = 8      # a prompt block below this is not worth a thread handoff


class OrtLayers:
    """Sessions over one model's resident weights. `weight(name)` -> QTensor, f16-bits or f32 array;
    `ffn_in_graph[l]`: layer l's FFN weights are resident matrices (else `ffn(l, h, out)` runs it)."""

    def __init__(self, c: ModelConfig, weight, ffn_in_graph: list[bool], threads: int, lm_head_name: str,
                 accuracy_level: int = INT8_ACTIVATIONS, on_session=None, spin_us: int = 0):
        self.c = c
        self._on_session = on_session       # called after each session is built (the model releases mapped pages)
        self.accuracy_level = accuracy_level
        self.ffn_in_graph = ffn_in_graph
        self.qkv_width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        self.threads = threads
        # The threading policy (module docstring): split every session across the threads, or only the lm_head.
        self.split = threads > 1 and spin_us > 0 and bounded_spinning()
        self._spin_us = spin_us if self.split else 0
        layer_threads = threads if self.split else 1
        # Prompt row blocks beyond the first run on these threads (module docstring).
        self._workers = ThreadPoolExecutor(threads - 1, thread_name_prefix="flashlm-ort") \
            if threads > 1 and not self.split else None
        L = c.n_layers
        # The lm_head first: building a session briefly holds ~2.5x its weights (source pages, f32 scales,
        # onnxruntime's packing), and the largest matrix is cheapest while nothing else is resident yet.
        self.lm = self._session("lm", threads, lambda g: self._lm(g, weight, lm_head_name))
        self.head0 = self._session("head_0", layer_threads, lambda g: self._head(g, weight, 0, g.input("x", c.d_model)))
        self.mid, self.tail, self.heads = [None] * L, [None] * L, [None] * L
        for l in range(L):
            if ffn_in_graph[l]:
                self.mid[l] = self._session(f"mid_{l}", layer_threads, lambda g, l=l: self._mid(g, weight, l))
            else:
                self.tail[l] = self._session(f"tail_{l}", layer_threads, lambda g, l=l: self._tail(g, weight, l))
                if l + 1 < L:
                    self.heads[l + 1] = self._session(f"head_{l + 1}", layer_threads,
                                                      lambda g, l=l: self._head(g, weight, l + 1, g.input("x", c.d_model)))
        self._step = self._bind_decode() if all(ffn_in_graph) else None

    def _bind_decode(self) -> dict:
        """Fixed buffers bound to head_0, every mid_l and lm for one-token steps: run_with_iobinding then
        converts no feeds and allocates no outputs (measured ~6 us less than run() per call, 32 calls per
        SmolLM2 token). The residual ping-pongs between two rows (mid_l reads one and writes the other:
        onnxruntime may write an output before it has read every input)."""
        c = self.c
        step = {"x": [np.zeros((1, c.d_model), np.float32) for _ in range(2)],
                "att": np.zeros((1, c.n_heads * c.head_dim), np.float32),
                "qkv": np.zeros((1, self.qkv_width), np.float32),
                "x_lm": np.zeros((1, c.d_model), np.float32), "logits": np.zeros((1, c.vocab_size), np.float32)}

        def bind(sess, inputs, outputs):
            b = sess.io_binding()
            for name, arr in inputs:
                b.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            for name, arr in outputs:
                b.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            return b
        x, L = step["x"], c.n_layers
        step["head_0"] = bind(self.head0, [("x", x[0])], [("qkv", step["qkv"])])
        step["mid"] = [bind(self.mid[l], [("att", step["att"]), ("x", x[l % 2])],
                            [("x_out", x[(l + 1) % 2])] + ([("qkv", step["qkv"])] if l + 1 < L else []))
                       for l in range(L)]
        step["lm"] = bind(self.lm, [("x", step["x_lm"])], [("logits", step["logits"])])
        return step

    # --- graph pieces -----------------------------------------------------------------------------
    def _session(self, name, threads, build):
        g = GraphBuilder(name, self.accuracy_level)
        build(g)
        sess = session(g, threads, self._spin_us)
        del g
        if self._on_session is not None:
            self._on_session()
        return sess

    def _norm(self, g, weight, x, prefix):
        c = self.c
        if c.norm_kind == "rms":
            return g.rmsnorm(x, weight(prefix + ".weight"), c.norm_eps)
        return g.layernorm(x, weight(prefix + ".weight"), weight(prefix + ".bias"), c.norm_eps)

    def _head(self, g, weight, l, x):
        c = self.c
        p = f"layers.{l}.attn."
        xn = self._norm(g, weight, x, f"layers.{l}.attn_norm")
        bias = [weight(p + n + ".bias") if c.attn_qkv_bias else None for n in "qkv"]
        qkv = g.linears(xn, [weight(p + n + ".weight") for n in "qkv"], bias, "qkv")
        if c.qk_norm:
            # Per-head RMSNorm of q and k before RoPE (Qwen 3, Gemma 3): split, norm over head_dim, rejoin.
            hd, nq, nk = c.head_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            q, k, v = g.node("Split", [qkv, g.const(np.array([nq, nk, nk], np.int64))], "split", n_out=3, axis=-1)
            heads = []
            for t, name, n in ((q, "q_norm", nq), (k, "k_norm", nk)):
                t3 = g.node("Reshape", [t, g.const(np.array([0, n // hd, hd], np.int64))], "heads")
                t3 = g.rmsnorm(t3, weight(p + name + ".weight"), c.norm_eps)
                heads.append(g.node("Reshape", [t3, g.const(np.array([0, n], np.int64))], "heads"))
            qkv = g.node("Concat", [*heads, v], "qkv", axis=-1)
        g.output(qkv, "qkv", self.qkv_width)

    def _attn_out(self, g, weight, l):
        c = self.c
        att = g.input("att", c.n_heads * c.head_dim)
        x = g.input("x", c.d_model)
        p = f"layers.{l}."
        o = g.linear(att, weight(p + "attn.o.weight"), weight(p + "attn.o.bias") if c.attn_out_bias else None, "o")
        if c.sandwich_norm:
            o = self._norm(g, weight, o, p + "attn_post_norm")
        return g.add(x, o)

    def _mid(self, g, weight, l):
        c = self.c
        x = self._attn_out(g, weight, l)
        h = self._norm(g, weight, x, f"layers.{l}.ffn_norm")
        p = f"layers.{l}.ffn."
        if c.gated:
            gate_up = g.linears(h, [weight(p + "gate.weight"), weight(p + "up.weight")], [None, None], "gate_up")
            a = g.gated(gate_up, c.n_ff, {"swiglu": "silu", "reglu": "relu", "drelu": "drelu",
                                          "geglu": "gelu_tanh"}[c.ffn_kind], c.act_threshold)
        else:
            a = g.relu(g.linear(h, weight(p + "up.weight"), weight(p + "up.bias") if c.ffn_bias else None, "up"))
        y = g.linear(a, weight(p + "down.weight"), weight(p + "down.bias") if c.ffn_bias else None, "down")
        if c.sandwich_norm:
            y = self._norm(g, weight, y, f"layers.{l}.ffn_post_norm")
        x = g.add(x, y)
        g.output(x, "x_out", c.d_model)
        if l + 1 < c.n_layers:
            self._head(g, weight, l + 1, x)

    def _tail(self, g, weight, l):
        x = self._attn_out(g, weight, l)
        g.output(x, "x_out", self.c.d_model)
        g.output(self._norm(g, weight, x, f"layers.{l}.ffn_norm"), "h", self.c.d_model)

    def _lm(self, g, weight, lm_head_name):
        x = g.input("x", self.c.d_model)
        g.output(g.linear(self._norm(g, weight, x, "norm"), weight(lm_head_name), None, "logits"), "logits",
                 self.c.vocab_size)

    # --- running ----------------------------------------------------------------------------------
    def forward(self, x, pos0, k_cache, v_cache, rope, scale, ffn=None, down_bias=None, post_norm=None):
        """x[T, d] embeddings of tokens at positions pos0..; caches [layer, ctx, Hkv, hd]; rope[l] = layer
        l's (cos, sin) rows for these positions (empty: no RoPE). Returns the final residual stream
        [T, d] (logits come from `logits`). An FFN outside the graph: x += ffn(h) (post_norm(l, y, out):
        sandwich-norm layers normalize y first), + down_bias[l]."""
        c = self.c
        T = x.shape[0]
        if T == 1 and self._step is not None:
            return self._decode_step(x, pos0, k_cache, v_cache, rope, scale)
        att = np.empty((T, c.n_heads * c.head_dim), np.float32)
        attention = K.rope_kv_attention_serial if T == 1 else K.rope_kv_attention
        run = self._run
        qkv = run(self.head0, {"x": x})[0]
        for l in range(c.n_layers):
            cos, sin = rope[l]
            attention(qkv, c.n_heads, cos, sin, k_cache[l], v_cache[l], pos0, scale, c.layer_window(l), att)
            if self.ffn_in_graph[l]:
                outs = run(self.mid[l], {"att": att, "x": x})
                x = outs[0]
                if l + 1 < c.n_layers:
                    qkv = outs[1]
            else:
                x, h = run(self.tail[l], {"att": att, "x": x})
                y = np.empty_like(h)
                ffn(l, h, y)
                if post_norm is not None:
                    post_norm(l, y)
                x += y
                if down_bias is not None:
                    x += down_bias[l]
                if l + 1 < c.n_layers:
                    qkv = run(self.heads[l + 1], {"x": x})[0]
        return x

    def _decode_step(self, x, pos0, k_cache, v_cache, rope, scale):
        """forward() of one token through the bound buffers (every layer's FFN in its mid_l graph). Returns
        one of those buffers: valid until the next call."""
        c, step = self.c, self._step
        xs, att, qkv = step["x"], step["att"], step["qkv"]
        xs[0][:] = x
        self.head0.run_with_iobinding(step["head_0"])
        for l in range(c.n_layers):
            cos, sin = rope[l]
            K.rope_kv_attention_serial(qkv, c.n_heads, cos, sin, k_cache[l], v_cache[l], pos0, scale,
                                       c.layer_window(l), att)
            self.mid[l].run_with_iobinding(step["mid"][l])
        return xs[c.n_layers % 2]

    def _run(self, sess, feeds: dict) -> list:
        """sess.run over row blocks of the feeds, one per thread, concurrently (prompts of at least
        SPLIT_MIN_ROWS rows per block), else on this thread."""
        T = next(iter(feeds.values())).shape[0]
        if self._workers is None or T < SPLIT_MIN_ROWS * self.threads:
            return sess.run(None, feeds)
        cuts = [T * i // self.threads for i in range(self.threads + 1)]
        pending = [self._workers.submit(sess.run, None, {k: v[a:b] for k, v in feeds.items()})
                   for a, b in zip(cuts[1:-1], cuts[2:])]
        parts = [sess.run(None, {k: v[:cuts[1]] for k, v in feeds.items()})] + [p.result() for p in pending]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown()
            self._workers = None

    def logits(self, x) -> np.ndarray:
        """[T, vocab] logits of the final residual rows x; for one row, a buffer valid until the next call."""
        if len(x) == 1 and self._step is not None:
            self._step["x_lm"][:] = x
            self.lm.run_with_iobinding(self._step["lm"])
            return self._step["logits"]
        return self.lm.run(None, {"x": np.ascontiguousarray(x)})[0]
