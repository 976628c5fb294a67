"""The forward pass with resident weights in onnxruntime sessions: OrtDecoder (every FFN resident: the
whole decoder, attention included, as one graph, one run() per token) or OrtLayers (attention in numba
between graphs; needed where an FFN streams from flash). RuntimeConfig.ort_graph picks; OrtLayers below.

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
  spin_us > 0 (default 100): every session splits its nodes across `threads` and its idle worker spins
    spin_us before sleeping, so a session's consecutive nodes find it awake; it wakes about once per
    session (once per layer) and stops as soon as the session's run returns, before the next session's
    worker starts. Prompts run whole through each session (onnxruntime splits their rows).
  spin_us = 0: every session runs on the calling thread (intra_op 1) except `lm` (one 49152 x 576 matvec,
    worth a wake-up), decode attention runs serially in numba, and a prompt's T tokens are split into
    `threads` row blocks that go through each session concurrently (onnxruntime releases the GIL in run();
    each row of these graphs is independent of the others) while attention over the whole block stays one
    parallel numba call.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .lazy import lazy_module
from .config import ModelConfig
from . import onnx_proto
from .ort_graph import GraphBuilder, bounded_spinning, session

# numba loads on a kernel's first use: the one-graph decoder runs none (runtime/lazy.py)
K = lazy_module(f"{__package__}.kernels")


SPLIT_MIN_ROWS = 8      # a prompt block below this is not worth a thread handoff
SESSION_WEIGHTS = 20_000_000     # OrtDecoder: weights per session at most (but one layer at least): the build peak
# ort_graph auto: the one graph only for layers of at most this many weights (OrtDecoder.pays): kept at 3.5M
# (SmolLM2-135M), slower decode at 14.9M and 46.8M (Qwen2.5 0.5B, 1.5B); the cut between is a guess.
ONE_GRAPH_MAX_LAYER_WEIGHTS = 8_000_000


class OrtLayers:
    """Sessions over one model's resident weights. `weight(name)` -> QTensor, f16-bits or f32 array;
    `ffn_in_graph[l]`: layer l's FFN weights are resident matrices (else `ffn(l, h, out)` runs it)."""

    def __init__(self, c: ModelConfig, weight, ffn_in_graph: list[bool], threads: int, lm_head_name: str,
                 activations: str = "int8", on_session=None, spin_us: int = 0):
        self.c = c
        self._on_session = on_session       # called after each session is built (the model releases mapped pages)
        self.activations = activations
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
        self.head0 = self._session("head_0", layer_threads, lambda g: self._head(g, weight, 0))
        self.mid, self.tail, self.heads = [None] * L, [None] * L, [None] * L
        for l in range(L):
            if ffn_in_graph[l]:
                self.mid[l] = self._session(f"mid_{l}", layer_threads, lambda g, l=l: self._mid(g, weight, l))
            else:
                self.tail[l] = self._session(f"tail_{l}", layer_threads, lambda g, l=l: self._tail(g, weight, l))
                if l + 1 < L:
                    self.heads[l + 1] = self._session(f"head_{l + 1}", layer_threads,
                                                      lambda g, l=l: self._head(g, weight, l + 1))
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
        g = GraphBuilder(name, self.activations)
        build(g)
        sess = session(g, threads, self._spin_us)
        del g
        if self._on_session is not None:
            self._on_session()
        return sess

    def _head(self, g, weight, l):
        g.output(qkv_proj(g, self.c, weight, l, g.input("x", self.c.d_model)), "qkv", self.qkv_width)

    def _mid(self, g, weight, l):
        c = self.c
        x = attn_out(g, c, weight, l, g.input("att", c.n_heads * c.head_dim), g.input("x", c.d_model))
        x = ffn_block(g, c, weight, l, x)
        g.output(x, "x_out", c.d_model)
        if l + 1 < c.n_layers:
            g.output(qkv_proj(g, c, weight, l + 1, x), "qkv", self.qkv_width)

    def _tail(self, g, weight, l):
        c = self.c
        x = attn_out(g, c, weight, l, g.input("att", c.n_heads * c.head_dim), g.input("x", c.d_model))
        g.output(x, "x_out", c.d_model)
        g.output(norm(g, c, weight, x, f"layers.{l}.ffn_norm"), "h", c.d_model)

    def _lm(self, g, weight, lm_head_name):
        g.output(lm_logits(g, self.c, weight, lm_head_name, g.input("x", self.c.d_model)), "logits", self.c.vocab_size)

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


# --- graph pieces shared by the per-layer sessions and the whole-decoder graph ---------------------------
def norm(g, c: ModelConfig, weight, x, prefix):
    if c.norm_kind == "rms":
        return g.rmsnorm(x, weight(prefix + ".weight"), c.norm_eps)
    return g.layernorm(x, weight(prefix + ".weight"), weight(prefix + ".bias"), c.norm_eps)


def qkv_proj(g, c: ModelConfig, weight, l, x):
    """Layer l's [q|k|v] of the residual rows x (before RoPE)."""
    p = f"layers.{l}.attn."
    xn = norm(g, c, weight, x, f"layers.{l}.attn_norm")
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
    return qkv


def attn_out(g, c: ModelConfig, weight, l, att, x):
    """x + o(att) (sandwich-norm layers normalize o first)."""
    p = f"layers.{l}."
    o = g.linear(att, weight(p + "attn.o.weight"), weight(p + "attn.o.bias") if c.attn_out_bias else None, "o")
    if c.sandwich_norm:
        o = norm(g, c, weight, o, p + "attn_post_norm")
    return g.add(x, o)


def ffn_block(g, c: ModelConfig, weight, l, x):
    """x + FFN(norm(x)) with layer l's resident FFN matrices."""
    h = norm(g, c, weight, x, f"layers.{l}.ffn_norm")
    p = f"layers.{l}.ffn."
    if c.gated:
        gate_up = g.linears(h, [weight(p + "gate.weight"), weight(p + "up.weight")], [None, None], "gate_up")
        a = g.gated(gate_up, c.n_ff, {"swiglu": "silu", "reglu": "relu", "drelu": "drelu",
                                      "geglu": "gelu_tanh"}[c.ffn_kind], c.act_threshold)
    else:
        a = g.relu(g.linear(h, weight(p + "up.weight"), weight(p + "up.bias") if c.ffn_bias else None, "up"))
    y = g.linear(a, weight(p + "down.weight"), weight(p + "down.bias") if c.ffn_bias else None, "down")
    if c.sandwich_norm:
        y = norm(g, c, weight, y, f"layers.{l}.ffn_post_norm")
    return g.add(x, y)


def lm_logits(g, c: ModelConfig, weight, lm_head_name, x):
    return g.linear(norm(g, c, weight, x, "norm"), weight(lm_head_name), None, "logits")


class OrtDecoder:
    """Every decoder layer, attention included, and the lm_head in a few onnxruntime sessions, no numba in
    between: a decode token is one run() per session (OrtLayers makes n_layers + 2, each a handoff to
    numba and, with two threads, a wake of onnxruntime's worker). Attention is
    `com.microsoft.GroupQueryAttention` with packed [q|k|v] input, RoPE applied inside (rotate-half,
    `rotary_interleaved=0`, from our own cos/sin tables), sliding windows as its `local_window_size`, and
    past/present K/V sharing one buffer per layer: the model's KV cache, laid out [layer, kv head, ctx,
    head_dim] (`kv_shape`), bound through IOBinding so onnxruntime writes each new position in place and
    nothing is copied per token. The attention runs in the KV cache's type (GroupQueryAttention's inputs
    and cache share one type): an f16 cache means q, k, v are rounded to f16 before attention and the
    output widened back (tests/test_ort_decoder.py bounds the logits' change), an f32 cache keeps f32.

    Sessions: consecutive layers up to SESSION_WEIGHTS weights each, then the lm_head in its own. Building
    a session briefly holds ~2.5x its weights (our arrays, onnxruntime's copy, its prepacked one). Measured
    on SmolLM2 q4_1 (ctx 2048, peak RSS after load, pp128 and 32 tokens): one session for everything
    548 MiB, 3 layer groups + lm 354, 6 groups + lm 335 (SESSION_WEIGHTS 20M, 7 runs per token), OrtLayers
    379; the last group split in two (layer_groups) brings it to 261 with 8 runs; a 1.5B model in one
    session would hold gigabytes. Prompts run through the same sessions (T rows, one run per session and
    chunk), so the cache is filled by the node that reads it."""

    def __init__(self, c: ModelConfig, weight, threads: int, lm_head_name: str, rope: list, ctx_len: int,
                 kv_dtype: str, activations: str = "int8", on_session=None, spin_us: int = 0):
        self.c, self.ctx_len = c, ctx_len
        self.kv_type = np.float16 if kv_dtype == "f16" else np.float32     # the cache's elements as onnxruntime sees them
        self.kv_shape = (c.n_layers, c.n_kv_heads, ctx_len, c.head_dim)
        # Within a run the worker spins up to spin_us between nodes; when the run returns it stops at once
        # (runtime/ort_graph.py session), so the next session's worker has the other core.
        spin = spin_us if threads > 1 and bounded_spinning() else 0
        # No spinning (spin_us 0): a split layer session would wake its sleeping worker for every parallel
        # node (with spin 10 us it still wakes ~94 times per SmolLM2 token, measured), so the layer groups
        # run on the calling thread and only the lm_head (one large matvec, worth a wake) splits.
        self.layer_threads = threads if spin > 0 else 1
        # The lm_head first: its build holds ~2.5x the largest matrix, cheapest while nothing else is resident
        # (SmolLM2, measured: load peak 409 MiB with the lm_head built last, 335 first).
        g = GraphBuilder("lm", activations)
        rows = g.typed_input("rows", np.int64, ["R"])
        last = g.node("Gather", [g.input("x", c.d_model), rows], "rows", axis=0)
        g.output(lm_logits(g, c, weight, lm_head_name, last), "logits", c.vocab_size)
        lm = (session(g, threads, spin), range(0), True)
        del g
        if on_session is not None:
            on_session()
        self.parts = []                 # (session, layers, is_lm) in running order
        for layers in layer_groups(c, SESSION_WEIGHTS):
            g = GraphBuilder(f"layers_{layers[0]}_{layers[-1]}", activations)
            self._layers_graph(g, weight, layers, rope)
            self.parts.append((session(g, self.layer_threads, spin), layers, False))
            del g
            if on_session is not None:
                on_session()
        self.parts.append(lm)
        self._step = None           # the bound one-token step, made on the first decode (needs the caches)

    @staticmethod
    def pays(c: ModelConfig) -> bool:
        """Whether the one graph is expected to decode faster than OrtLayers (what ort_graph auto follows).
        What it saves is fixed per layer: a run() and a numba call, a few microseconds each. What it costs
        is GroupQueryAttention, dearer in the graph than numba's attention over the f16 cache, more so as
        the position grows. So it pays only where a layer's matvecs are short. Measured (1 thread, decode
        tokens of the two paths interleaved in one process, CPU ms/token min / median, load ~0.2-1,
        docs/BENCHMARKS.md issue 7 session 8): Qwen2.5-Coder-0.5B (14.9M weights a layer) one graph slower
        at every position: past 8 30.42 / 35.08 vs layers 29.92 / 34.30, past 256 33.81 / 39.96 vs
        31.69 / 36.97, past 1024 37.02 / 41.48 vs 35.54 / 39.52; Qwen2.5-Coder-1.5B (46.8M) past 256
        100.70 / 119.16 vs 98.03 / 117.57. SmolLM2-135M (3.5M) decodes within noise of the layers either
        way (past 256 11.73 / 14.65 vs 11.48 / 14.23) and keeps the one graph for what else it gives there:
        prefill at 2 threads 1.6x (session 5's bench) and no numba in the process (~65 MiB of RSS).
        The cut between 3.5M and 14.9M is not measured (no model there)."""
        return layer_weights(c) <= ONE_GRAPH_MAX_LAYER_WEIGHTS

    @staticmethod
    def wanted(c: ModelConfig, ort_graph: str) -> bool:
        """Whether RuntimeConfig.ort_graph asks for the one graph on this model: whole always, auto where
        it pays, layers never (whether the model can run as one is `supports`)."""
        return ort_graph == "whole" or (ort_graph == "auto" and OrtDecoder.pays(c))

    @staticmethod
    def supports(c: ModelConfig) -> str | None:
        """Why this model cannot run as one graph (None: it can)."""
        if c.n_heads % c.n_kv_heads:
            return f"{c.n_heads} query heads are not a multiple of {c.n_kv_heads} KV heads"
        if c.head_dim % 16:
            return f"head_dim {c.head_dim} (GroupQueryAttention on CPU needs a multiple of 16)"
        return None

    def _layers_graph(self, g: GraphBuilder, weight, layers, rope: list) -> None:
        c = self.c
        half = self.kv_type == np.float16
        x = g.input("x", c.d_model)
        seqlens = g.typed_input("seqlens_k", np.int32, [1])                 # positions before the last new one
        total = g.typed_input("total_sequence_length", np.int32, [])        # pos0 + T
        kv = [1, c.n_kv_heads, self.ctx_len, c.head_dim]
        scale = c.attn_scale if c.attn_scale is not None else 1.0 / np.sqrt(c.head_dim)
        tables = {}                                                         # one cos/sin pair per RoPE variant
        batch = g.const(np.array([0], np.int64))
        for l in layers:
            qkv = g.node("Unsqueeze", [qkv_proj(g, c, weight, l, x), batch], "qkv3")     # [1, T, (H + 2 Hkv) hd]
            if half:
                qkv = g.node("Cast", [qkv], "qkv16", to=onnx_proto.FLOAT16)
            ins = [qkv, "", "", g.typed_input(f"past_key_{l}", self.kv_type, kv),
                   g.typed_input(f"past_value_{l}", self.kv_type, kv), seqlens, total]
            rotary = rope[l] is not None
            if rotary:
                key = id(rope[l][0])
                if key not in tables:
                    tables[key] = [g.const(np.ascontiguousarray(t[:self.ctx_len]).astype(self.kv_type), n)
                                   for t, n in zip(rope[l], ("cos", "sin"))]
                ins += tables[key]
            att = g.node("GroupQueryAttention", ins, domain="com.microsoft",
                         names=[None, f"present_key_{l}", f"present_value_{l}"],
                         num_heads=c.n_heads, kv_num_heads=c.n_kv_heads, scale=float(scale),
                         do_rotary=int(rotary), rotary_interleaved=0,
                         # measured: local_window_size w attends to keys p-w+1..p, like layer_window
                         local_window_size=c.layer_window(l) or -1)[0]
            for name in ("key", "value"):
                g.typed_output(f"present_{name}_{l}", self.kv_type, kv)
            if half:
                att = g.node("Cast", [att], "att32", to=onnx_proto.FLOAT)
            att = g.node("Squeeze", [att, batch], "att")
            x = ffn_block(g, c, weight, l, attn_out(g, c, weight, l, att, x))
        g.output(x, "x_out", c.d_model)

    def _bindings(self, k_cache, v_cache, xs, rows, seqlens, total, logits) -> list:
        """One IOBinding per session: part i reads xs[i % 2] and writes xs[(i + 1) % 2] (onnxruntime may
        write an output before it has read every input), the lm part writes logits."""
        shape = [1, *self.kv_shape[1:]]
        out = []
        for i, (sess, layers, is_lm) in enumerate(self.parts):
            b = sess.io_binding()
            x = xs[i % 2]
            b.bind_input("x", "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
            if is_lm:
                b.bind_input("rows", "cpu", 0, np.int64, list(rows.shape), rows.ctypes.data)
                b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            else:
                b.bind_input("seqlens_k", "cpu", 0, np.int32, [1], seqlens.ctypes.data)
                b.bind_input("total_sequence_length", "cpu", 0, np.int32, [], total.ctypes.data)
                for l in layers:
                    for name, cache in (("key", k_cache), ("value", v_cache)):
                        ptr = cache[l].ctypes.data          # past and present: one buffer, written in place
                        b.bind_input(f"past_{name}_{l}", "cpu", 0, self.kv_type, shape, ptr)
                        b.bind_output(f"present_{name}_{l}", "cpu", 0, self.kv_type, shape, ptr)
                y = xs[(i + 1) % 2]
                b.bind_output("x_out", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
            out.append((sess, b))
        return out

    def forward(self, x, pos0: int, k_cache, v_cache, all_rows: bool = False) -> np.ndarray:
        """Logits [1, vocab] of the last of x's T rows (all_rows: [T, vocab]) for embeddings x [T, d] at
        positions pos0..; caches [layer, kv head, ctx, head_dim] (kv_shape), f32 or f16 bits. Stores the T
        positions' K/V. A one-token result is a buffer valid until the next call."""
        T = x.shape[0]
        if k_cache.shape != self.kv_shape or v_cache.shape != self.kv_shape:
            raise ValueError(f"KV cache {k_cache.shape}, the decoder graph was built for {self.kv_shape}")
        if pos0 + T > self.ctx_len:
            raise ValueError(f"positions {pos0}..{pos0 + T - 1} beyond the KV cache's {self.ctx_len}")
        if T == 1 and not all_rows:
            step = self._step
            if step is None or step["k"] is not k_cache or step["v"] is not v_cache:
                step = self._step = self._bind_step(k_cache, v_cache)
            step["x"][0][:] = x
            step["seqlens"][0] = pos0
            step["total"][...] = pos0 + 1
            for sess, b in step["bindings"]:
                sess.run_with_iobinding(b)
            return step["logits"]
        rows = np.arange(T, dtype=np.int64) if all_rows else np.array([T - 1], np.int64)
        logits = np.empty((len(rows), self.c.vocab_size), np.float32)
        xs = [np.ascontiguousarray(x, np.float32), np.empty((T, self.c.d_model), np.float32)]
        seqlens, total = np.array([pos0 + T - 1], np.int32), np.array(pos0 + T, np.int32)
        for sess, b in self._bindings(k_cache, v_cache, xs, rows, seqlens, total, logits):
            sess.run_with_iobinding(b)
        return logits

    def _bind_step(self, k_cache, v_cache) -> dict:
        """Fixed buffers for one-token steps: the step writes x, the position and the length into them."""
        d = self.c.d_model
        step = {"k": k_cache, "v": v_cache, "x": [np.zeros((1, d), np.float32), np.zeros((1, d), np.float32)],
                "rows": np.zeros(1, np.int64), "seqlens": np.zeros(1, np.int32), "total": np.zeros((), np.int32),
                "logits": np.zeros((1, self.c.vocab_size), np.float32)}
        step["bindings"] = self._bindings(k_cache, v_cache, step["x"], step["rows"], step["seqlens"], step["total"],
                                          step["logits"])
        return step

    def close(self) -> None:
        pass


def layer_groups(c: ModelConfig, max_weights: int) -> list[range]:
    """Consecutive layers in as few groups of at most max_weights weights as possible (at least one layer
    each), the same number of layers in each up to one; then the last group split in two.

    Why the split: building a session holds its weights ~1.8 times over for a moment (the mapped source
    pages, the builder's temporaries, onnxruntime's prepacked copy), on top of every session built before
    it, so the last one sets the load's peak. Half as many layers there keeps that peak under the
    decoding process's own (SmolLM2 q4_1, `tools/rss_run.py --phases`: peak 271 -> 261 MiB, the load's
    part 271 -> 256) for one more run() per token."""
    n = min(c.n_layers, max(1, -(-layer_weights(c) * c.n_layers // max_weights)))
    cuts = [c.n_layers * i // n for i in range(n + 1)]
    groups = [range(a, b) for a, b in zip(cuts, cuts[1:])]
    last = groups.pop()
    mid = last.start + (len(last) + 1) // 2
    return groups + [g for g in (range(last.start, mid), range(mid, last.stop)) if len(g)]


def layer_weights(c: ModelConfig) -> int:
    """Weights of one decoder layer's matrices (q|k|v, o, the FFN)."""
    return c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model \
        + (3 if c.gated else 2) * c.d_model * c.n_ff
