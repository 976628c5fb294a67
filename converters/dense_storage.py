"""Which storage type each dense weight gets, and its stored bytes (`convert --dtype`).

  f32, f16          every 2-D weight in that float type (f16: the exact reference path)
  q8_0, q4_0, q4_1  every 2-D weight quantized to that type (runtime/quant.py), except the token
                    embeddings / lm_head of a 4-bit conversion, which get q8_0 (llama.cpp's quantizer
                    keeps them at higher precision too: one matrix read once per token, ~20% of a
                    small model's weights, where 4 bits cost most perplexity). A GGUF tensor already
                    in the requested type is repacked exactly; others are quantized from f32.
  auto (default)    keep the source's precision class: a GGUF tensor whose type maps exactly onto a
                    storage type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) is repacked without
                    loss; float tensors (HF checkpoints, GGUF F16/F32/BF16) and GGUF types without an
                    exact mapping stay f16.
Rows whose length is not a whole number of blocks (k % 32) stay f16 in every quantized mode.
"""
from __future__ import annotations

import numpy as np

from flashlm.runtime import quant as Q
from flashlm.runtime.storage import STORAGE_TYPES

from .source import ConversionError

DTYPE_CHOICES = ("auto", "f32", "f16", "q8_0", "q4_0", "q4_1")
_EMBEDDINGS = ("tok_embeddings", "lm_head")


def exact_storage(source, name: str) -> str | None:
    """The storage type a source tensor repacks into without loss (None: a float or unmapped tensor)."""
    probe = getattr(source, "quantized_storage", None)
    return probe(name) if probe is not None else None


def choose(source, name: str, shape: tuple[int, ...], dtype: str) -> str:
    """Storage type name of the 2-D weight `name` in a `dtype` conversion."""
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"unknown storage dtype {dtype!r}; choose one of {DTYPE_CHOICES}")
    if dtype in ("f32", "f16"):
        return dtype
    exact = exact_storage(source, name)
    if dtype == "auto":
        return exact or "f16"
    want = "q8_0" if dtype.startswith("q4") and name in _EMBEDDINGS else dtype
    if exact == want:
        return want
    if shape[-1] % Q.BLOCK_FORMATS[want].block:
        return "f16"
    return want


def stored(source, name: str, storage: str) -> np.ndarray:
    """The stored array of weight `name` in `storage` (exact repack when the source holds those blocks)."""
    st = STORAGE_TYPES[storage]
    if st.block_elems > 1 and exact_storage(source, name) == storage:
        return Q.to_rows(source.load_quantized(name))
    return st.encode(source.load(name))
