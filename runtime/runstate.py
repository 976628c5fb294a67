"""The run state: every activation buffer a forward pass writes, sized once from the config.

A forward pass runs its tokens in chunks of at most `chunk` (PREFILL_CHUNK) through these buffers,
so decoding allocates nothing per token and a long prompt needs no more memory than one chunk. The
memory plan's activation line is `RunState.nbytes_for(...)`, the same sizes this allocates.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig


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
    }


class RunState:
    def __init__(self, config: ModelConfig, chunk: int):
        self.chunk = chunk
        for name, (shape, dtype) in _shapes(config, chunk).items():
            setattr(self, name, np.zeros(shape, dtype))

    @staticmethod
    def nbytes_for(config: ModelConfig, chunk: int) -> int:
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in _shapes(config, chunk).values())
