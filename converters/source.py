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
from flashlm.runtime.errors import FlashlmError
from flashlm.runtime.schema import expected_tensors, is_ffn_bundle_tensor  # noqa: F401 (re-exported)

SUPPORTED_SOURCES = (
    "GGUF files with general.architecture 'llama' (SmolLM2, TinyLlama, Llama 2/3, Mistral in GGUF), "
    "'qwen2' (Qwen2/2.5), 'qwen3' or 'gemma3' (Gemma 3 text)",
    "Hugging Face folders (config.json + *.safetensors) with architectures "
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, OPTForCausalLM, "
    "SparseLlamaForCausalLM (ProSparse, FATReLU), BambooForCausalLM (TurboSparse / Bamboo, dReLU)",
)


class ConversionError(FlashlmError):
    """A source that cannot be converted; the message names the file and the problem."""


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


class TiedEmbeddings:
    """A source whose lm_head is dropped in favour of its token embeddings (`convert --tie-embeddings`).

    Many GGUF files of models trained with tied embeddings (Qwen2.5 0.5B-3B) store the matrix twice: as
    token_embd in the file's base type and as output.weight re-quantized at higher precision (Q6_K).
    Tying them keeps one copy: the lookup reads single rows and the lm_head uses the embedding blocks
    (a lower-precision lm_head: measure its perplexity, as docs/BENCHMARKS.md does)."""

    def __init__(self, source):
        import dataclasses
        self._source = source
        self.config = dataclasses.replace(source.config, tied_embeddings=True)
        self.info = source.info

    def shapes(self):
        return {n: s for n, s in self._source.shapes().items() if n != "lm_head"}

    def __getattr__(self, name):          # load, load_quantized, quantized_storage, close, ...
        return getattr(self._source, name)
