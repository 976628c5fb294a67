"""The forward pass: token ids -> logits, with a KV cache. One layer = attention + FFN over bundle rows."""
from __future__ import annotations

import math
import time

import numpy as np

from . import kernels as K
from .config import ModelConfig, RuntimeConfig
from .errors import FlashlmError
from .ffn import bundle_kernel
from .memory import KV_DTYPES, build_ffn, plan_memory
from .modelfile import MATRICES_FILE, ROW_CRC_TENSOR, ModelFileError, ModelFolder, read_verified, tensors_from_buffer


class ContextFull(FlashlmError):
    """More tokens than the KV cache holds (--ctx)."""


def _as_cache(x: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """x in the KV cache's storage: f16 bits (uint16) or f32."""
    return x.astype(np.float16).view(np.uint16) if cache.dtype == np.uint16 else x


class GraphFFN:
    """The FFN backend of a run whose FFN layers all live in the onnxruntime graphs: nothing to call,
    only the counters every backend keeps."""

    def __init__(self):
        from .ffn import FlashStats
        self.stats = FlashStats()

    def __call__(self, layer, h, out):
        raise RuntimeError("the FFN of this model runs inside its onnxruntime sessions")

    def close(self) -> None:
        pass


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
    """Batch-1 decoder: dense weights resident, FFN rows wherever the run mode puts them (runtime/ffn.py)."""

    def __init__(self, folder: ModelFolder, runtime: RuntimeConfig | None = None):
        self.runtime = runtime = runtime or RuntimeConfig()
        t0 = time.perf_counter()
        self.config = c = folder.config
        self.folder = folder
        predictors, calibration = None, None
        if runtime.mode == "flash":
            from .predictor import calibration_report
            calibration = calibration_report(folder.path)
        self.plan = plan_memory(folder, runtime, calibration)      # refuses before anything big is read
        if runtime.mode == "flash":
            from .predictor import load_predictors
            sparse = [i for i, kind in enumerate(self.plan.layer_kinds) if kind == "sparse"]
            predictors = load_predictors(folder.path, c, sparse)
        self.threads = K.set_threads(runtime.threads)
        self.ctx_len = min(runtime.ctx_len, c.max_position)
        self.w = tensors_from_buffer(read_verified(folder, "dense.safetensors"), folder.dense)
        # Block-quantized dense weights run in onnxruntime sessions (runtime/ort_model.py); a dense-mode
        # run of a quantized folder keeps its FFN layers whole there too (ffn_matrices.safetensors).
        self.ort = None
        quantized = any(t.storage is not None and t.storage.block_elems > 1 for t in folder.dense.values())
        ffn_in_graph = quantized and runtime.mode == "dense" and bool(folder.matrices)
        self.kernel = bundle_kernel(c, folder.bundles, self.threads)
        biases = [self.w.get(f"layers.{i}.ffn.up.bias") for i in range(c.n_layers)]
        if ffn_in_graph:
            self.ffn_backend = GraphFFN()
        else:
            self.ffn_backend = build_ffn(folder, runtime, self.plan, self.kernel, biases, predictors,
                                         row_crc=self.w.get(ROW_CRC_TENSOR))
        self.lm_head = self.w["tok_embeddings"] if c.tied_embeddings else self.w["lm_head"]
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
        if quantized:
            self._build_sessions(ffn_in_graph)
        kv_shape = (c.n_layers, self.ctx_len, c.n_kv_heads, c.head_dim)
        kv_dtype = KV_DTYPES[runtime.kv_dtype]
        self.k_cache = np.zeros(kv_shape, kv_dtype)     # [layer, position, kv head, head_dim], f32 or f16 bits
        self.v_cache = np.zeros(kv_shape, kv_dtype)
        self.history: list[int] = []                    # token ids whose K/V are in the cache, in order
        self._blas_scratch = None
        self.on_ffn_input = None                        # calibration hook: f(layer, h[T, d])
        self.load_seconds = time.perf_counter() - t0

    def _build_sessions(self, ffn_in_graph: bool) -> None:
        """onnxruntime sessions over the quantized weights, then drop every buffer only they needed:
        the sessions hold their own (prepacked) copies; numba keeps the embedding rows and biases."""
        from .ort_model import OrtLayers
        from .quant import from_rows
        from .storage import block_format
        c, folder = self.config, self.folder
        matrices = {}
        if ffn_in_graph:
            matrices = tensors_from_buffer(read_verified(folder, MATRICES_FILE), folder.matrices)

        def weight(name):
            entry = folder.matrices.get(name) if name in matrices else folder.dense[name]
            arr = matrices[name] if name in matrices else self.w[name]
            fmt = block_format(entry.storage) if entry.storage is not None else None
            return from_rows(arr, fmt, entry.shape[1]) if fmt is not None else arr

        lm_head = "tok_embeddings" if c.tied_embeddings else "lm_head"
        from .ort_graph import F32_ACTIVATIONS, INT8_ACTIVATIONS
        level = INT8_ACTIVATIONS if self.runtime.int8_activations else F32_ACTIVATIONS
        self.ort = OrtLayers(c, weight, [ffn_in_graph] * c.n_layers, self.threads, lm_head, level)
        del matrices
        keep = ("tok_embeddings", "pos_embeddings", ROW_CRC_TENSOR)
        self.w = {n: np.array(a) for n, a in self.w.items() if n in keep or a.ndim == 1}
        self.lm_head = None
        self._no_rope = (np.zeros((0, c.head_dim // 2), np.float32),) * 2
        self._down_bias = [self.w[f"layers.{i}.ffn.down.bias"] for i in range(c.n_layers)] if c.ffn_bias else None
        self._ffn_post_norm = (lambda l, y: self._norm(y.copy(), f"layers.{l}.ffn_post_norm", y)) \
            if c.sandwich_norm else None
        import gc
        from .ort_graph import release_freed_memory
        gc.collect()
        release_freed_memory()

    def _forward_sessions(self, tokens, pos0, all_logits):
        T = len(tokens)
        rope = [(cos[pos0:pos0 + T], sin[pos0:pos0 + T]) if cos is not None else self._no_rope
                for cos, sin in (r if r is not None else (None, None) for r in self.rope)]
        x = self.ort.forward(self.embed(tokens, pos0), pos0, self.k_cache, self.v_cache, rope, self.attn_scale,
                             ffn=self.ffn, down_bias=self._down_bias, post_norm=self._ffn_post_norm)
        self.history.extend(int(t) for t in tokens)
        self.ffn_backend.stats.tokens += T
        return self.ort.logits(x if all_logits else x[-1:])

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
        self._matmul(x, self.w[name + ".weight"], out)
        bias = self.w.get(name + ".bias")
        if bias is not None:
            out += bias

    def _matmul(self, x, w, out):
        if x.shape[0] >= K.BLAS_MIN_TOKENS:
            self._blas_scratch = K.matmul_batched(x, w, out, self._blas_scratch)
        else:
            K.matmul(x, w, out)

    def embed(self, tokens: np.ndarray, pos0: int) -> np.ndarray:
        x = self.folder.dense["tok_embeddings"].storage.decode(self.w["tok_embeddings"][tokens])
        if self.config.embed_scale != 1.0:
            x *= np.float32(self.config.embed_scale)
        if self.config.pos_kind == "learned":
            lo = pos0 + self.config.pos_offset
            x += self.folder.dense["pos_embeddings"].storage.decode(self.w["pos_embeddings"][lo:lo + len(tokens)])
        return x

    # --- the forward pass ----------------------------------------------------------------------------
    def ffn(self, layer: int, h: np.ndarray, out: np.ndarray) -> None:
        """out[T, d] = FFN(h), with the rows the run mode provides."""
        if self.on_ffn_input is not None:
            self.on_ffn_input(layer, h)
        self.ffn_backend(layer, h, out)

    def forward(self, tokens, *, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at positions self.pos.. and append them to the KV cache.

        Returns logits [T, vocab] if all_logits else [1, vocab] for the last token.
        """
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        T, pos0 = len(tokens), self.pos
        if pos0 + T > self.ctx_len:
            raise ContextFull(f"context full: {pos0} + {T} tokens exceed the context length {self.ctx_len} (--ctx)")
        if self.ort is not None:
            return self._forward_sessions(tokens, pos0, all_logits)
        H, Hkv, hd, d = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
        x = self.embed(tokens, pos0)                          # [T, d] residual stream
        xn = np.empty_like(x)
        q = np.empty((T, H * hd), np.float32)
        k = np.empty((T, Hkv * hd), np.float32)
        v = np.empty((T, Hkv * hd), np.float32)
        att = np.empty((T, H, hd), np.float32)
        o = np.empty((T, d), np.float32)
        qk_raw = np.empty((T * H, hd), np.float32) if c.qk_norm else None
        on = np.empty_like(o) if c.sandwich_norm else None
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
            self.k_cache[layer, pos0:pos0 + T] = _as_cache(k3, self.k_cache)
            self.v_cache[layer, pos0:pos0 + T] = _as_cache(v.reshape(T, Hkv, hd), self.v_cache)
            K.attention(q3, self.k_cache[layer], self.v_cache[layer], pos0, self.attn_scale,
                        c.layer_window(layer), att)
            self._linear(att.reshape(T, H * hd), p + "attn.o", o)
            self._residual_add(x, o, p + "attn_post_norm", on)
            self._norm(x, p + "ffn_norm", xn)
            self.ffn(layer, xn, o)
            self._residual_add(x, o, p + "ffn_post_norm", on)
            if c.ffn_bias:
                x += self.w[p + "ffn.down.bias"]
        self.history.extend(int(t) for t in tokens)
        self.ffn_backend.stats.tokens += T
        if not all_logits:
            x = x[-1:]
        xn = np.empty_like(x)
        self._norm(x, "norm", xn)
        logits = np.empty((len(x), c.vocab_size), np.float32)
        self._matmul(xn, self.lm_head, logits)
        return logits

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
        if self.ort is not None:
            self._warmup_sessions()
            if isinstance(self.ffn_backend, GraphFFN):
                return
        wdt = self.w["layers.0.attn.q.weight"].dtype if self.ort is None else np.uint16
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
            if c.pos_kind == "rope":
                K.rope(q, self.rope[0][0][:T], self.rope[0][1][:T])
            rows = np.zeros((2, self.folder.bundles.stride_items), rows_dt)
            for bias in (None, np.zeros(2, np.float32)):
                self.kernel(x, rows, 2, np.arange(2, dtype=np.int32), bias, np.empty_like(x))
        if rows_dt == np.uint8:                         # the prompt path of quantized rows
            xb = np.ones((K.BLAS_MIN_TOKENS, c.d_model), np.float32)
            self.kernel(xb, rows, 2, np.arange(2, dtype=np.int32), None, np.empty_like(xb))
        if c.norm_kind == "layer":
            K.layernorm(x, np.ones(c.d_model, np.float32), np.zeros(c.d_model, np.float32), 1e-5, np.empty_like(x))

    def _warmup_sessions(self) -> None:
        c = self.config
        for T in (1, 2):
            qkv = np.zeros((T, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim), np.float32)
            kv = np.zeros((T, c.n_kv_heads, c.head_dim), self.k_cache.dtype)
            cs = np.zeros((T, c.head_dim // 2), np.float32) if c.pos_kind == "rope" else self._no_rope[0]
            K.rope_kv_attention(qkv, c.n_heads, cs, cs, kv, kv.copy(), 0, self.attn_scale, 0,
                                np.empty((T, c.n_heads * c.head_dim), np.float32))

    def reset_io_stats(self) -> None:
        """Start the flash accounting afresh (e.g. after prefill, so figures describe decoding)."""
        self.ffn_backend.stats.reset()
        reader = getattr(self.ffn_backend, "reader", None)
        if reader is not None:
            reader.reset_stats()

    def close(self) -> None:
        self.ffn_backend.close()
