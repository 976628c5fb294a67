"""The forward pass: token ids -> logits, with a KV cache. One layer = attention + FFN over bundle rows."""
from __future__ import annotations

import math
import time

import numpy as np

from .lazy import lazy_module
from .config import ModelConfig, RuntimeConfig, activation_policy, kv_storage
from .errors import FlashlmError
from .builder import build
from .aligned import aligned_empty
from .ffn import GraphFFN
from .memory import KV_DTYPES
from .modelfile import (MATRICES_FILE, ROW_CRC_TENSOR, ModelFileError, ModelFolder, map_verified, release_mapped,
                        tensors_from_buffer)
from .runstate import BLAS_MIN_TOKENS

# numba loads on a kernel's first use: the one-graph decoder runs none (runtime/lazy.py)
K = lazy_module(f"{__package__}.kernels")


WHOLE_NLL_ROWS = 16     # tokens per one-graph run when scoring (their logits rows are held at once)


class ContextFull(FlashlmError):
    """More tokens than the KV cache holds (--ctx)."""


def rope_tables(hd: int, theta: float, scaling: dict | None, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_pos, hd/2] for RoPE base `theta` and HF rope_scaling dict `scaling` (HF semantics)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind != "default":
        raise ModelFileError(f"RoPE scaling type {kind!r} is not supported")
    angles = np.outer(np.arange(n_pos, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Model:
    """Batch-1 decoder: dense weights resident, FFN rows wherever the memory plan puts them (runtime/ffn.py).

    Model(folder, runtime) builds its parts downward (runtime/builder.py: plan, weights, FFN backend, run
    state); the library entry is runtime/loader.py's load(), which also opens the folder and the tokenizer."""

    def __init__(self, folder: ModelFolder, runtime: RuntimeConfig | None = None, *, predictors=None):
        self.runtime = runtime = runtime or RuntimeConfig()
        t0 = time.perf_counter()
        self.config = c = folder.config
        self.folder = folder
        parts = build(folder, runtime, predictors=predictors)    # refuses a budget before anything big is read
        self.plan, self.w, self.kernel, self.ffn_backend = parts.plan, parts.weights, parts.kernel, parts.ffn
        self.costs = parts.costs                        # predicts this plan's time per token (cost_model.py)
        self.widened = parts.widened                    # quantized dense weights widened to f16 (no onnxruntime)
        self.state, self.threads, self.ctx_len = parts.state, parts.threads, parts.ctx_len
        self.embedding_rows = parts.embedding_rows      # None: the embedding matrix is resident (self.w)
        # Block-quantized dense weights run in onnxruntime sessions (runtime/ort_model.py); a dense-mode
        # run of a quantized folder keeps its FFN layers whole there too (the builder gave it a GraphFFN).
        self.ort = None
        self.whole = False                              # self.ort is one OrtDecoder graph (attention included)
        quantized = parts.quantized
        # Quantized weights outside onnxruntime: numba multiplies their stored rows (runtime/qmatmul.py).
        self._q = {} if parts.ort or not quantized else self._quantized_matrices()
        lm_name = "tok_embeddings" if c.tied_embeddings else "lm_head"
        self.lm_head = self._q.get(lm_name, self.w.get(lm_name))
        # One (cos, sin) table per distinct RoPE variant: Gemma 3's sliding layers use another base.
        self.rope = [None] * c.n_layers
        if c.pos_kind == "rope":
            tables = {}
            for i in range(c.n_layers):
                theta, scaling = c.layer_rope(i)
                key = (theta, repr(scaling))
                if key not in tables:
                    tables[key] = rope_tables(c.head_dim, theta, scaling, self.ctx_len)
                self.rope[i] = tables[key]
        self.attn_scale = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(c.head_dim)
        if parts.ort:
            self._build_sessions(isinstance(self.ffn_backend, GraphFFN), parts.whole)
        # [layer, position, kv head, head_dim] for numba's attention; the one-graph decoder's attention node
        # reads and writes [layer, kv head, position, head_dim] (OrtDecoder.kv_shape). Same bytes either way.
        kv_shape = self.ort.kv_shape if self.whole else (c.n_layers, self.ctx_len, c.n_kv_heads, c.head_dim)
        kv_dtype = KV_DTYPES[kv_storage(runtime, self.whole)]
        # [layer, position, kv head, head_dim], f32 or f16 bits. On anonymous mmap pages (zero, allocated on
        # first touch) rather than np.zeros: numpy advises huge pages for large arrays, and one token then
        # makes 2 MiB of every layer's cache resident (measured on SmolLM2 at ctx 2048: +42 MiB RSS on the
        # first token); this way the RSS grows with the positions used.
        self.k_cache = aligned_empty(kv_shape, kv_dtype)
        self.v_cache = aligned_empty(kv_shape, kv_dtype)
        self.history: list[int] = []                    # token ids whose K/V are in the cache, in order
        self._blas_scratch = None
        self.on_ffn_input = None                        # calibration hook: f(layer, h[T, d])
        self.forward_s = 0.0                            # wall time in forward() since reset_io_stats() ...
        self.forward_tokens = 0                         # ... over this many tokens (the critical path's clock)
        self.load_seconds = time.perf_counter() - t0

    def _quantized_matrices(self) -> dict:
        """QDense views over every block-quantized dense matrix's stored rows (nothing is copied but
        f16 scales, widened once)."""
        from .qmatmul import QDense
        dense = self.folder.dense
        def quantized(name):
            e = dense.get(name)
            if e is None or e.storage is None or e.storage.block_elems == 1:
                return False
            return name != "tok_embeddings" or self.config.tied_embeddings    # the lookup decodes its rows
        return {n: QDense.from_stored(a, dense[n].storage, dense[n].shape[1]) for n, a in self.w.items() if quantized(n)}

    def _build_sessions(self, ffn_in_graph: bool, whole: bool) -> None:
        """onnxruntime sessions over the quantized weights, then drop every buffer only they needed:
        the sessions hold their own (prepacked) copies; numba keeps the embedding rows and biases."""
        from .ort_model import OrtDecoder, OrtLayers
        from .quant import from_rows
        from .storage import block_format
        c, folder = self.config, self.folder
        matrices, matrices_buf = {}, None
        if ffn_in_graph:
            matrices_buf = map_verified(folder, MATRICES_FILE)
            matrices = tensors_from_buffer(matrices_buf, folder.matrices)

        def weight(name):
            entry = folder.matrices.get(name) if name in matrices else folder.dense[name]
            arr = matrices[name] if name in matrices else self.w[name]
            fmt = block_format(entry.storage) if entry.storage is not None else None
            return from_rows(arr, fmt, entry.shape[1]) if fmt is not None else arr

        lm_head = "tok_embeddings" if c.tied_embeddings else "lm_head"
        from .ort_graph import release_freed_memory
        # Any view of the mapped dense file reaches its map (tok_embeddings may not be among the weights).
        mapped = [self.w["norm.weight"]] + ([matrices_buf] if ffn_in_graph else [])

        def release():
            # Each session holds its prepacked copies: hand back the mapped pages building it touched, so
            # the peak holds one session's source pages, not the model's. What numba still reads (the
            # embedding rows of the tokens seen, norms, biases) faults back in page by page.
            for buf in mapped:
                release_mapped(buf)
            # and the heap each build freed, before the next build: SmolLM2 q4_1 peak 257 MiB with this
            # trim per session, 260-262 with only the final one (tools/rss_run.py, two runs each)
            release_freed_memory()
        self.whole = whole
        if self.whole:
            self.ort = OrtDecoder(c, weight, self.threads, lm_head, self.rope, self.ctx_len, kv_storage(self.runtime, True),
                                  activation_policy(self.runtime), on_session=release, spin_us=self.runtime.ort_spin_us)
        else:
            self.ort = OrtLayers(c, weight, [ffn_in_graph] * c.n_layers, self.threads, lm_head, activation_policy(self.runtime),
                                 on_session=release, spin_us=self.runtime.ort_spin_us)
        del matrices, mapped
        keep = ("pos_embeddings", ROW_CRC_TENSOR) + (() if self.embedding_rows else ("tok_embeddings",))
        self.w = {n: a for n, a in self.w.items() if n in keep or a.ndim == 1}
        self.lm_head = None
        self._no_rope = (np.zeros((0, c.head_dim // 2), np.float32),) * 2
        self._down_bias = [self.w[f"layers.{i}.ffn.down.bias"] for i in range(c.n_layers)] if c.ffn_bias else None
        self._ffn_post_norm = (lambda l, y: self._norm(y.copy(), f"layers.{l}.ffn_post_norm", y)) \
            if c.sandwich_norm else None
        import gc
        gc.collect()
        release_freed_memory()

    def _forward_whole(self, tokens, all_logits: bool, out, chunk: int) -> None:
        """forward() through the one-graph decoder: each chunk is one run() that also yields its logits."""
        if self.on_ffn_input is not None:
            raise FlashlmError("the FFN input hook needs the per-layer sessions (RuntimeConfig ort_graph='layers')")
        st = self.state
        for s in range(0, len(tokens), chunk):
            part = tokens[s:s + chunk]
            T = len(part)
            x = st.x[:T]
            st.tokens[:T] = part
            self.embed(st.tokens[:T], self.pos, x)
            last = s + chunk >= len(tokens)
            logits = self.ort.forward(x, self.pos, self.k_cache, self.v_cache, all_rows=all_logits)
            self.history.extend(int(t) for t in part)
            self.ffn_backend.stats.tokens += T
            if all_logits:
                out[s:s + T] = logits
            elif last:
                out[:] = logits

    def _layers_sessions(self, x, pos0):
        """The decoder layers through the onnxruntime sessions (x [T, d] embeddings); returns x."""
        T = x.shape[0]
        rope = [(cos[pos0:pos0 + T], sin[pos0:pos0 + T]) if cos is not None else self._no_rope
                for cos, sin in (r if r is not None else (None, None) for r in self.rope)]
        x = self.ort.forward(x, pos0, self.k_cache, self.v_cache, rope, self.attn_scale,
                             ffn=self.ffn, down_bias=self._down_bias, post_norm=self._ffn_post_norm)
        self.history.extend(int(t) for t in self.state.tokens[:T])
        if isinstance(self.ffn_backend, GraphFFN):      # other backends count their tokens themselves
            self.ffn_backend.stats.tokens += T
        return x

    # --- helpers -------------------------------------------------------------------------------------
    def _norm(self, x, prefix, out):
        c = self.config
        if c.norm_kind == "rms":
            K.rmsnorm(x, self.w[prefix + ".weight"], c.norm_eps, out)
        else:
            K.layernorm(x, self.w[prefix + ".weight"], self.w[prefix + ".bias"], c.norm_eps, out)

    def _residual_add(self, x, o, post_norm, scratch):
        """x += o, or x += norm(o) for sandwich-norm layers (Gemma)."""
        if scratch is None:
            x += o
        else:
            self._norm(o, post_norm, scratch)
            x += scratch

    def _linear(self, x, name, out):
        w = name + ".weight"
        self._matmul(x, self._q.get(w, self.w.get(w)), out)
        bias = self.w.get(name + ".bias")
        if bias is not None:
            out += bias

    def _matmul(self, x, w, out):
        if not isinstance(w, np.ndarray):               # QDense: block-quantized stored rows
            w.matmul(x, out)
        elif x.shape[0] >= BLAS_MIN_TOKENS:
            self._blas_scratch = K.matmul_batched(x, w, out, self._blas_scratch)
        else:
            K.matmul(x, w, out)

    def embed(self, tokens: np.ndarray, pos0: int, out: np.ndarray) -> None:
        """out[T, d] = the tokens' embedding rows (+ learned positions), widened to f32."""
        c = self.config
        emb = self._storage("tok_embeddings")
        if self.embedding_rows is not None:
            self.embedding_rows.lookup(tokens, out)
        elif emb.block_elems == 1:
            K.gather_rows(self.w["tok_embeddings"], tokens, out)
        else:
            out[:] = emb.decode(self.w["tok_embeddings"][tokens])
        if c.embed_scale != 1.0:
            out *= np.float32(c.embed_scale)
        if c.pos_kind == "learned":
            lo = pos0 + c.pos_offset
            out += self._storage("pos_embeddings").decode(self.w["pos_embeddings"][lo:lo + len(tokens)])

    def _storage(self, name: str):
        """The storage type of a dense tensor as this model holds it (f16 when widened for numba)."""
        from .storage import STORAGE_TYPES
        return STORAGE_TYPES["f16"] if self.widened and self.folder.dense[name].storage.block_elems > 1 \
            else self.folder.dense[name].storage

    # --- the forward pass ----------------------------------------------------------------------------
    def ffn(self, layer: int, h: np.ndarray, out: np.ndarray) -> None:
        """out[T, d] = FFN(h), with the rows the memory plan provides."""
        if self.on_ffn_input is not None:
            self.on_ffn_input(layer, h)
        self.ffn_backend(layer, h, out)

    def forward(self, tokens, *, all_logits: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """Run `tokens` at positions self.pos.. and append them to the KV cache, in chunks of the run
        state's size (PREFILL_CHUNK tokens).

        Returns logits [T, vocab] if all_logits else [1, vocab] for the last token, written into `out`
        if given (decoding passes the run state's logits row: nothing is allocated per token).
        """
        c = self.config
        tokens = self._check_tokens(tokens)
        T = len(tokens)
        t0 = time.perf_counter()
        if out is None:
            out = np.empty((T if all_logits else 1, c.vocab_size), np.float32)
        chunk = self.state.chunk
        if self.whole:
            self._forward_whole(tokens, all_logits, out, chunk)
        else:
            for s in range(0, T, chunk):
                x = self._layers(tokens[s:s + chunk])
                if all_logits:
                    self._head(x, out[s:s + len(x)])
            if not all_logits:
                self._head(x[-1:], out)
        self.forward_s += time.perf_counter() - t0
        self.forward_tokens += T
        return out

    def forward_nll(self, tokens, targets) -> float:
        """Like forward(tokens), but returns sum_j -log p(targets[j] | everything up to tokens[j]).

        What perplexity needs, without a [T, vocab] logits array: the layers run over whole chunks (a
        streamed layer is read once per chunk), then the head one row at a time into the run state's
        logits row, so scoring holds no more memory than the plan counts for decoding."""
        tokens = self._check_tokens(tokens)
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(targets) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(targets)} targets")
        if targets.min() < 0 or targets.max() >= self.config.vocab_size:
            raise ValueError(f"targets must be token ids below {self.config.vocab_size}")
        t0 = time.perf_counter()
        row = self.state.logits
        nll = 0.0
        chunk = self.state.chunk
        if self.whole:
            # The one graph yields logits only with its layers: score in sub-chunks whose [n, vocab] logits
            # stay near the size of the run state's buffers (WHOLE_NLL_ROWS rows).
            logits = np.empty((WHOLE_NLL_ROWS, self.config.vocab_size), np.float32)
            for s in range(0, len(tokens), WHOLE_NLL_ROWS):
                n = min(WHOLE_NLL_ROWS, len(tokens) - s)
                self._forward_whole(tokens[s:s + n], True, logits[:n], chunk)
                for j in range(n):
                    nll += K.neg_log_softmax_at(logits[j], targets[s + j])
        else:
            for s in range(0, len(tokens), chunk):
                x = self._layers(tokens[s:s + chunk])
                for j in range(len(x)):
                    self._head(x[j:j + 1], row)
                    nll += K.neg_log_softmax_at(row[0], targets[s + j])
        self.forward_s += time.perf_counter() - t0
        self.forward_tokens += len(tokens)
        return nll

    def _check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise ValueError("forward() needs at least one token")
        if self.pos + len(tokens) > self.ctx_len:
            raise ContextFull(f"context full: {self.pos} + {len(tokens)} tokens exceed the context length "
                              f"{self.ctx_len} (--ctx)")
        return tokens

    def _head(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.ort is not None:
            out[:] = self.ort.logits(x)
            return
        xn = self.state.xn[:len(x)]
        self._norm(x, "norm", xn)
        self._matmul(xn, self.lm_head, out)

    def _layers(self, tokens: np.ndarray) -> np.ndarray:
        """The decoder layers over at most one chunk of tokens; returns the residual stream x [T, d]."""
        c, st = self.config, self.state
        T, pos0 = len(tokens), self.pos
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        x, xn, o = st.x[:T], st.xn[:T], st.o[:T]
        st.tokens[:T] = tokens
        self.embed(st.tokens[:T], pos0, x)                  # [T, d] residual stream
        if self.ort is not None:
            return self._layers_sessions(x, pos0)
        q, k, v, att = st.q[:T], st.k[:T], st.v[:T], st.att[:T]
        qk_raw = st.qk_raw if c.qk_norm else None
        on = st.on[:T] if c.sandwich_norm else None
        for layer in range(c.n_layers):
            p = f"layers.{layer}."
            self._norm(x, p + "attn_norm", xn)
            self._linear(xn, p + "attn.q", q)
            self._linear(xn, p + "attn.k", k)
            self._linear(xn, p + "attn.v", v)
            if c.qk_norm:   # per-head RMSNorm (Qwen 3, Gemma 3); the kernel must not write its input
                for proj, n_h in ((q, H), (k, Hkv)):
                    raw = qk_raw[:T * n_h]
                    raw[:] = proj.reshape(T * n_h, hd)
                    self._norm(raw, p + f"attn.{'q' if proj is q else 'k'}_norm", proj.reshape(T * n_h, hd))
            q3, k3 = q.reshape(T, H, hd), k.reshape(T, Hkv, hd)
            if c.pos_kind == "rope":
                cos, sin = self.rope[layer]
                K.rope(q3, cos[pos0:pos0 + T], sin[pos0:pos0 + T])
                K.rope(k3, cos[pos0:pos0 + T], sin[pos0:pos0 + T])
            K.store_kv(k3, self.k_cache[layer, pos0:pos0 + T])
            K.store_kv(v.reshape(T, Hkv, hd), self.v_cache[layer, pos0:pos0 + T])
            K.attention(q3, self.k_cache[layer], self.v_cache[layer], pos0, self.attn_scale,
                        c.layer_window(layer), att)
            self._linear(att.reshape(T, H * hd), p + "attn.o", o)
            self._residual_add(x, o, p + "attn_post_norm", on)
            self._norm(x, p + "ffn_norm", xn)
            self.ffn(layer, xn, o)
            self._residual_add(x, o, p + "ffn_post_norm", on)
            if c.ffn_bias:
                x += self.w[p + "ffn.down.bias"]
        self.history.extend(tokens.tolist())
        return x

    @property
    def pos(self) -> int:
        return len(self.history)

    def reset(self, pos: int = 0) -> None:
        """Forget the KV cache from position `pos` on (0: start a new sequence)."""
        del self.history[pos:]

    def warmup(self) -> None:
        """Compile (or load from the numba cache) every kernel for this model's dtypes, decode and prefill
        shapes, on scratch arrays: nothing is read from flash and no cache changes."""
        c = self.config
        if self.whole:
            return                                      # no numba kernel runs between the graph's runs
        if self.ort is not None:
            self._warmup_sessions()
            if isinstance(self.ffn_backend, GraphFFN):
                return
        if self._q:
            for T in (1, 2):
                self._matmul(np.ones((T, c.d_model), np.float32), self._q["layers.0.attn.q.weight"],
                             np.empty((T, c.n_heads * c.head_dim), np.float32))
        wdt = self.w["layers.0.attn.q.weight"].dtype if self.ort is None and not self._q else np.uint16
        rows_dt = self.folder.bundles.dtype
        for T in (1, 2):
            x = np.ones((T, c.d_model), np.float32)
            o = np.empty((T, 4), np.float32)
            K.matmul(x, np.zeros((4, c.d_model), wdt), o)
            K.matmul(x, np.zeros((4, c.d_model), np.uint16), o)
            K.widen_rows(np.zeros((4, c.d_model), wdt), 0, 4, np.empty((4, c.d_model), np.float32))
            if rows_dt != np.uint8:                     # quantized rows: the kernel calls below cover them
                K.widen_rows(np.zeros((4, 8), rows_dt), 0, 4, np.empty((4, 8), np.float32))
            self._norm(x, "norm", np.empty_like(x))
            q = np.ones((T, c.n_heads, c.head_dim), np.float32)
            kv = np.zeros((T + 1, c.n_kv_heads, c.head_dim), self.k_cache.dtype)
            K.attention(q, kv, kv, 0, self.attn_scale, c.layer_window(0), np.empty_like(q))
            K.store_kv(np.ones((T, c.n_kv_heads, c.head_dim), np.float32), kv[:T])
            if c.pos_kind == "rope":
                K.rope(q, self.rope[0][0][:T], self.rope[0][1][:T])
            rows = np.zeros((2, self.folder.bundles.stride_items), rows_dt)
            for bias in (None, np.zeros(2, np.float32)):
                self.kernel(x, rows, 2, np.arange(2, dtype=np.int32), bias, np.empty_like(x))
            if self._storage("tok_embeddings").block_elems == 1 and "tok_embeddings" in self.w:
                K.gather_rows(self.w["tok_embeddings"], np.zeros(T, np.int64), x)
        if rows_dt == np.uint8:                         # the prompt path of quantized rows
            xb = np.ones((BLAS_MIN_TOKENS, c.d_model), np.float32)
            self.kernel(xb, rows, 2, np.arange(2, dtype=np.int32), None, np.empty_like(xb))
        if c.norm_kind == "layer":
            K.layernorm(x, np.ones(c.d_model, np.float32), np.zeros(c.d_model, np.float32), 1e-5, np.empty_like(x))

    def _warmup_sessions(self) -> None:
        c = self.config
        for T in (1, 2):
            qkv = np.zeros((T, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim), np.float32)
            kv = np.zeros((T, c.n_kv_heads, c.head_dim), self.k_cache.dtype)
            cs = np.zeros((T, c.head_dim // 2), np.float32) if c.pos_kind == "rope" else self._no_rope[0]
            for attention in (K.rope_kv_attention, K.rope_kv_attention_serial):
                attention(qkv, c.n_heads, cs, cs, kv, kv.copy(), 0, self.attn_scale, 0,
                          np.empty((T, c.n_heads * c.head_dim), np.float32))

    def reset_io_stats(self) -> None:
        """Start the flash accounting afresh (e.g. after prefill, so figures describe decoding)."""
        self.ffn_backend.reset_stats()
        self.forward_s, self.forward_tokens = 0.0, 0

    def critical_path(self):
        """Per-token split of the forwards since reset_io_stats() (runtime/critical_path.py)."""
        from .critical_path import critical_path
        fs = self.ffn_backend.stats
        self.ffn_backend.io_counts()                    # reads started ahead are finished and counted
        return critical_path(self.forward_s, self.forward_tokens, io_wait_s=fs.io_s, mem_s=fs.mm_s,
                             predict_s=fs.predict_s, io_busy_s=fs.io_busy_s, ffn_s=fs.ffn_s)

    def close(self) -> None:
        self.ffn_backend.close()
        if self.ort is not None:
            self.ort.close()
        if self.embedding_rows is not None:
            self.embedding_rows.close()
