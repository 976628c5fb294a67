"""What a model folder must hold for its config: the config fields' types and ranges, and the tensors
(names, shapes) a config implies. The one place both the converter (what to write) and the loader (what
to check before any kernel runs) take this from."""
from __future__ import annotations

import dataclasses
import math
import types
import typing

from .config import FFN_KINDS, SUPPORTED_ARCHITECTURES, ModelConfig
from .errors import FlashlmError

# Sizes every kernel indexes with: zero or negative values make them divide by zero or write out of bounds.
POSITIVE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_ff", "max_position")
CHOICES = {"architecture": SUPPORTED_ARCHITECTURES, "ffn_kind": FFN_KINDS, "norm_kind": ("rms", "layer"),
           "pos_kind": ("rope", "learned")}
MAX_DIM = 1 << 24       # far above any real model; a bigger value is a corrupt or hostile manifest


class ConfigError(ValueError, FlashlmError):
    """A config field of the wrong type or out of range; `field` names it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"config.{field}: {problem}")
        self.field = field


def _allowed(annotation) -> tuple[type, ...]:
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    out = []
    for h in hints:
        origin = typing.get_origin(h) or h
        out += [int, float] if origin is float else [type(None) if h is type(None) else origin]
    return tuple(out)


def _check_type(name: str, value, annotation) -> None:
    allowed = _allowed(annotation)
    if isinstance(value, bool) and bool not in allowed:      # JSON true is not a size
        raise ConfigError(name, f"{value!r} is a boolean, expected {annotation}")
    if not isinstance(value, allowed):
        raise ConfigError(name, f"{value!r} is a {type(value).__name__}, expected {annotation}")


def config_from_dict(d) -> ModelConfig:
    """A ModelConfig from the manifest's "config" object, every field type- and range-checked."""
    if not isinstance(d, dict):
        raise ConfigError("", "the config is not a JSON object")
    hints = typing.get_type_hints(ModelConfig)
    values = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f.name, "missing")
            continue
        _check_type(f.name, d[f.name], hints[f.name])
        values[f.name] = d[f.name]
    for name in POSITIVE_FIELDS:
        if not 0 < values[name] <= MAX_DIM:
            raise ConfigError(name, f"{values[name]} is not in 1..{MAX_DIM}")
    for name, choices in CHOICES.items():
        if values[name] not in choices:
            raise ConfigError(name, f"{values[name]!r} is not one of {choices}")
    if values["n_heads"] % values["n_kv_heads"]:
        raise ConfigError("n_kv_heads", f"{values['n_kv_heads']} does not divide n_heads {values['n_heads']}")
    if values["pos_kind"] == "rope" and values["head_dim"] % 2:
        raise ConfigError("head_dim", f"{values['head_dim']} is odd; RoPE rotates pairs")
    for name in ("norm_eps", "rope_theta"):
        if name in values and not (math.isfinite(values[name]) and values[name] > 0):
            raise ConfigError(name, f"{values[name]} is not a positive number")
        if name in values:
            values[name] = float(values[name])   # the kernels take a float64: a JSON int may not fit one
    if "norm_eps" in values and values["norm_eps"] >= 1.0:
        raise ConfigError("norm_eps", f"{values['norm_eps']} is not a normalization epsilon (below 1)")
    for name in ("embed_scale", "attn_scale", "rope_local_theta"):
        v = values.get(name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(name, f"{v} is not a positive number")
        if v is not None:
            values[name] = float(v)
    t = values.get("act_threshold")
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise ConfigError("act_threshold", f"{t} is not a finite number >= 0")
    if t is not None:
        values["act_threshold"] = float(t)
    window, sliding = values.get("sliding_window"), values.get("sliding_layers", [])
    if window is not None and not 0 < window <= MAX_DIM:
        raise ConfigError("sliding_window", f"{window} is not in 1..{MAX_DIM}")
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < values["n_layers"] for i in sliding):
        raise ConfigError("sliding_layers", f"{sliding} must be layer indices below n_layers {values['n_layers']}")
    if sliding and window is None:
        raise ConfigError("sliding_window", "missing, but sliding_layers lists layers")
    if not 0 <= values.get("pos_offset", 0) <= MAX_DIM:
        raise ConfigError("pos_offset", f"{values['pos_offset']} is out of range")
    vocab = values["vocab_size"]
    bos = values.get("bos_token_id")
    if bos is not None and not 0 <= bos < vocab:
        raise ConfigError("bos_token_id", f"{bos} is not a token id below vocab_size {vocab}")
    for t in values.get("eos_token_ids", []):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise ConfigError("eos_token_ids", f"{t!r} is not a token id below vocab_size {vocab}")
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise ConfigError("", str(e)) from None


def expected_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of config `c` with its logical shape (FFN weights included: the converter
    packs those into bundle rows; see is_ffn_bundle_tensor)."""
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
        if c.gated:
            t[p + "ffn.gate.weight"] = (ff, d)
        if c.qk_norm:
            t[p + "attn.q_norm.weight"], t[p + "attn.k_norm.weight"] = (hd,), (hd,)
        if c.sandwich_norm:
            t[p + "attn_post_norm.weight"], t[p + "ffn_post_norm.weight"] = (d,), (d,)
        t[p + "ffn.up.weight"] = (ff, d)
        t[p + "ffn.down.weight"] = (d, ff)
        if c.ffn_bias:
            t[p + "ffn.up.bias"] = (ff,)
            t[p + "ffn.down.bias"] = (d,)
    return t


def is_ffn_bundle_tensor(name: str) -> bool:
    """Tensors that go into the per-layer row-column bundles (biases stay dense)."""
    return ".ffn." in name and name.endswith(".weight")


def expected_dense_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors dense.safetensors must hold for config `c`."""
    return {n: s for n, s in expected_tensors(c).items() if not is_ffn_bundle_tensor(n)}
