"""The contract between source readers (GGUF, Hugging Face) and the model writer.

A source reader turns a checkpoint into canonical tensors: float32 numpy arrays in PyTorch orientation
([out_features, in_features]), Q/K rows in the Hugging Face rotate-half RoPE convention, named by the
templates below. It loads one tensor per `load()` call so conversion never holds the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from flashlm.runtime.config import ModelConfig

SUPPORTED_SOURCES = (
    "GGUF files with general.architecture 'llama' (SmolLM2, TinyLlama, Llama 2/3, Mistral in GGUF)",
    "Hugging Face folders (config.json + *.safetensors) with architectures "
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, OPTForCausalLM",
)


class ConversionError(Exception):
    """A source that cannot be converted; the message names the file and the problem."""


def expected_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor a source must provide for config `c`, with its shape."""
    d, hd, ff = c.d_model, c.head_dim, c.n_ff
    q, kv = c.n_heads * hd, c.n_kv_heads * hd
    t: dict[str, tuple[int, ...]] = {"tok_embeddings": (c.vocab_size, d), "norm.weight": (d,)}
    if c.norm_kind == "layer":
        t["norm.bias"] = (d,)
    if c.pos_kind == "learned":
        t["pos_embeddings"] = (c.max_position + c.pos_offset, d)
    if not c.tied_embeddings:
        t["lm_head"] = (c.vocab_size, d)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        t[p + "attn_norm.weight"] = (d,)
        t[p + "ffn_norm.weight"] = (d,)
        if c.norm_kind == "layer":
            t[p + "attn_norm.bias"] = (d,)
            t[p + "ffn_norm.bias"] = (d,)
        t[p + "attn.q.weight"] = (q, d)
        t[p + "attn.k.weight"] = (kv, d)
        t[p + "attn.v.weight"] = (kv, d)
        t[p + "attn.o.weight"] = (d, q)
        if c.attn_qkv_bias:
            t[p + "attn.q.bias"], t[p + "attn.k.bias"], t[p + "attn.v.bias"] = (q,), (kv,), (kv,)
        if c.attn_out_bias:
            t[p + "attn.o.bias"] = (d,)
        if c.ffn_kind == "swiglu":
            t[p + "ffn.gate.weight"] = (ff, d)
        t[p + "ffn.up.weight"] = (ff, d)
        t[p + "ffn.down.weight"] = (d, ff)
        if c.ffn_bias:
            t[p + "ffn.up.bias"] = (ff,)
            t[p + "ffn.down.bias"] = (d,)
    return t


def is_ffn_bundle_tensor(name: str) -> bool:
    """Tensors that go into the per-layer row-column bundles (biases stay dense)."""
    return ".ffn." in name and name.endswith(".weight")


@dataclass
class SourceInfo:
    tokenizer_json: str | None = None          # contents of a tokenizers-library tokenizer.json
    chat_template: str | None = None           # jinja2 source
    generation_config: dict = field(default_factory=dict)  # HF generation_config keys
    special_tokens: dict = field(default_factory=dict)     # {"bos_token": "<s>", "eos_token": ...} for templates
    description: dict = field(default_factory=dict)        # what was converted (format, files, sizes)


class Source(Protocol):
    config: ModelConfig
    info: SourceInfo

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape, known without loading data."""

    def load(self, name: str) -> np.ndarray:
        """One canonical tensor as float32 in canonical orientation."""

    def close(self) -> None: ...
