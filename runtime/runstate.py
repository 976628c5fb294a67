"""The run state: every activation buffer a forward pass writes, sized once from the config.

A forward pass runs its tokens in chunks of at most `chunk` (PREFILL_CHUNK) through these buffers,
so decoding allocates nothing per token and a long prompt needs no more memory than one chunk. The
memory plan's activation line is `RunState.nbytes_for(...)`, the same sizes this allocates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig

# The prompt path's sizes, which the memory plan counts (here, not in kernels.py, so planning needs no numba):
BLAS_MIN_TOKENS = 8         # from this many tokens on, widening weights once and calling BLAS wins
BLAS_BLOCK_BYTES = 4 << 20  # weights widened to f32 per BLAS call, at most


@dataclass(frozen=True)
class PredictBuffers:
    """Where one layer's predictor writes a decode token's work: gate and up estimates [1, n_ff], the
    scores and a selection scratch [n_ff], and the predicted ids [n_ff] (the first m are valid)."""
    gate: np.ndarray
    up: np.ndarray
    scores: np.ndarray
    work: np.ndarray
    ids: np.ndarray

    @classmethod
    def allocate(cls, n_ff: int) -> "PredictBuffers":
        f = lambda shape: np.zeros(shape, np.float32)  # noqa: E731
        return cls(f((1, n_ff)), f((1, n_ff)), f(n_ff), f(n_ff), np.zeros(n_ff, np.int32))


PREDICT_SLOTS = 2


def _shapes(c: ModelConfig, chunk: int) -> dict[str, tuple[tuple[int, ...], type]]:
    d, H, Hkv, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    return {
        "tokens": ((chunk,), np.int64),
        "x": ((chunk, d), np.float32),           # residual stream
        "xn": ((chunk, d), np.float32),          # normalized input of attention / FFN
        "o": ((chunk, d), np.float32),           # attention output projection, then FFN output
        "q": ((chunk, H * hd), np.float32),
        "k": ((chunk, Hkv * hd), np.float32),
        "v": ((chunk, Hkv * hd), np.float32),
        "att": ((chunk, H, hd), np.float32),
        "logits": ((1, c.vocab_size), np.float32),   # the last token's logits (decode)
        # per-head q/k before their RMSNorm (Qwen 3, Gemma 3), the sublayer output norm (Gemma 3)
        "qk_raw": ((chunk * H if c.qk_norm else 0, hd), np.float32),
        "on": ((chunk if c.sandwich_norm else 0, d), np.float32),
        # A decode token's neuron prediction (runtime/predictor.py), in two slots: layer i uses slot
        # i % 2, so a lookahead that predicts layer i + 1 while layer i still holds its ids never shares.
        "pred_gate": ((PREDICT_SLOTS, 1, c.n_ff), np.float32),
        "pred_up": ((PREDICT_SLOTS, 1, c.n_ff), np.float32),
        "pred_scores": ((PREDICT_SLOTS, c.n_ff), np.float32),
        "pred_work": ((PREDICT_SLOTS, c.n_ff), np.float32),
        "pred_ids": ((PREDICT_SLOTS, c.n_ff), np.int32),
    }


class RunState:
    def __init__(self, config: ModelConfig, chunk: int):
        self.chunk = chunk
        for name, (shape, dtype) in _shapes(config, chunk).items():
            setattr(self, name, np.zeros(shape, dtype))

    def predict_buffers(self, layer: int) -> PredictBuffers:
        """The prediction buffers layer `layer`'s predictor writes a decode token's scores and ids into."""
        s = layer % PREDICT_SLOTS
        return PredictBuffers(self.pred_gate[s], self.pred_up[s], self.pred_scores[s], self.pred_work[s],
                              self.pred_ids[s])

    @staticmethod
    def nbytes_for(config: ModelConfig, chunk: int) -> int:
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in _shapes(config, chunk).values())
