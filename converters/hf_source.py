"""Hugging Face checkpoint folders (config.json + safetensors) as a conversion Source.

Only headers are read up front: every tensor's file, dtype and offsets come from `read_header`, so a
multi-gigabyte model is indexed without loading it, and `load()` reads exactly one tensor. HF Llama-family
Q/K weights are already in the rotate-half RoPE layout the canonical names promise, so no permutation.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from flashlm.converters.source import SUPPORTED_SOURCES, ConversionError, SourceInfo, expected_tensors
from flashlm.runtime.config import ModelConfig
from flashlm.runtime.safetensors_file import SafetensorsError, read_header, read_tensor

# BambooForCausalLM: PowerInfer's Bamboo and TurboSparse-Mistral, a Mistral layer with dReLU
# (relu(gate) * relu(up)); their config says hidden_act "relu", the architecture says both sides.
# SparseLlamaForCausalLM: ProSparse-Llama 2 (hidden_act "fatrelu", threshold in hidden_act_param).
DRELU_ARCHS = ("BambooForCausalLM",)
LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
               "SparseLlamaForCausalLM", *DRELU_ARCHS)
GEMMA3_ARCHS = ("Gemma3ForCausalLM",)   # the text-only model; Gemma3ForConditionalGeneration (vision) is refused
OPT_ARCHS = ("OPTForCausalLM",)
ROPE_TYPES = (None, "default", "linear", "llama3")   # the scaling kinds the runtime implements
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

# HF module path (inside a layer, or top level) -> canonical prefix; ".weight"/".bias" is carried over.
LLAMA_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "mlp.gate_proj": "ffn.gate", "mlp.up_proj": "ffn.up", "mlp.down_proj": "ffn.down",
    "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",   # Qwen3
}
# Gemma 3 names its norms by position: post_attention_layernorm is the sandwich norm after attention,
# pre_feedforward_layernorm is what Llama calls post_attention_layernorm.
GEMMA3_LAYER = {**LLAMA_LAYER, "post_attention_layernorm": "attn_post_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "ffn_post_norm"}
LLAMA_TOP = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head"}
LLAMA_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
OPT_LAYER = {
    "self_attn_layer_norm": "attn_norm", "final_layer_norm": "ffn_norm",
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.o", "fc1": "ffn.up", "fc2": "ffn.down",
}
OPT_TOP = {"model.decoder.embed_tokens.weight": "tok_embeddings",
           "model.decoder.embed_positions.weight": "pos_embeddings",
           "model.decoder.final_layer_norm.weight": "norm.weight",
           "model.decoder.final_layer_norm.bias": "norm.bias",
           "lm_head.weight": "lm_head"}
OPT_LAYER_RE = re.compile(r"model\.decoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read JSON ({e})") from None


def _ids(v, key: str, where: Path) -> list[int]:
    """eos_token_id may be null, an int or a list."""
    if v is None:
        return []
    ids = v if isinstance(v, list) else [v]
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31 for x in ids):
        raise ConversionError(f"{where}: field {key!r} must be a token id or a list of them, got {v!r}")
    return ids


# ---------------------------------------------------------------------------------------------- config

class _Fields:
    """Typed reads of config.json fields: a wrong type or an out-of-range value is an error naming the
    field (JSON has no int/bool distinction Python respects: `true` is an int and `"false"` is truthy)."""

    MAX_INT = 1 << 31

    def __init__(self, cfg: dict, where: Path):
        self.cfg, self.where = cfg, where

    def _fail(self, key: str, what: str, value) -> ConversionError:
        return ConversionError(f"{self.where}: field {key!r} must be {what}, got {value!r}")

    def int(self, key: str, default=..., *, low: int = 1, null_is_default: bool = False) -> int:
        v = self.cfg.get(key, default)
        if v is ... or (v is None and not null_is_default):
            raise ConversionError(f"{self.where}: required field {key!r} is missing")
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= self.MAX_INT:
            raise self._fail(key, f"an integer in [{low}, {self.MAX_INT}]", v)
        return v

    def float(self, key: str, default: float, *, source: dict | None = None) -> float:
        v = (self.cfg if source is None else source).get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise self._fail(key, "a finite number > 0", v)
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.cfg.get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._fail(key, "true or false", v)
        return v

    def str(self, key: str, default: str) -> str:
        v = self.cfg.get(key, default)
        if not isinstance(v, str):
            raise self._fail(key, "a string", v)
        return v


def _rope(cfg: dict, where: Path) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None). transformers 5 writes both into `rope_parameters`;
    older configs have top-level `rope_theta` and `rope_scaling` (with "type" instead of "rope_type")."""
    raw = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(raw, dict):
        raise ConversionError(f"{where}: field 'rope_scaling' must be an object, got {raw!r}")
    params = dict(raw)
    f = _Fields(cfg, where)
    theta = f.float("rope_theta", 10000.0, source=params) if "rope_theta" in params else f.float("rope_theta", 10000.0)
    params.pop("rope_theta", None)
    kind = params.pop("rope_type", None) or params.pop("type", None)
    params.pop("type", None)
    if kind not in ROPE_TYPES:
        raise ConversionError(f"{where}: RoPE scaling type {kind!r} is not supported (supported: linear, llama3)")
    if kind in (None, "default"):
        return theta, None
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}[kind]
    for key in needed:
        params[key] = f.float(key, None, source=params)
    if kind == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ConversionError(f"{where}: rope scaling high_freq_factor must exceed low_freq_factor")
    return theta, {"rope_type": kind, **params}


def _head_dim(f: _Fields, d: int, heads: int) -> int:
    if f.cfg.get("head_dim") is not None:
        return f.int("head_dim")
    if d < heads:
        raise ConversionError(f"{f.where}: num_attention_heads {heads} exceeds hidden_size {d}")
    return d // heads


def _llama_ffn(f: _Fields, arch: str) -> tuple[str, float]:
    """(ffn_kind, act_threshold) from hidden_act: silu -> SwiGLU; relu -> ReGLU relu(gate) * up (ReluLLaMA),
    or dReLU relu(gate) * relu(up) for the Bamboo architecture; fatrelu -> ReGLU whose gate passes only
    values above hidden_act_param (FATReLU: ProSparse, MiniCPM-S; transformers' F.threshold)."""
    act = f.str("hidden_act", "silu")
    drelu = arch in DRELU_ARCHS
    allowed = ("relu", "fatrelu") if drelu else ("silu", "relu", "fatrelu")
    if act not in allowed:
        raise ConversionError(f"{f.where}: hidden_act {act!r} is not supported for {arch} ({' or '.join(allowed)})")
    threshold = 0.0
    if act == "fatrelu":
        v = f.cfg.get("hidden_act_param")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise ConversionError(f"{f.where}: field 'hidden_act_param' (the FATReLU threshold of hidden_act fatrelu) "
                                  f"must be a finite number >= 0, got {v!r}")
        threshold = float(v)
    return ("drelu" if drelu else "swiglu" if act == "silu" else "reglu"), threshold


def _llama_config(cfg: dict, arch: str, where: Path) -> ModelConfig:
    f = _Fields(cfg, where)
    ffn_kind, act_threshold = _llama_ffn(f, arch)
    if f.bool("mlp_bias", False):
        raise ConversionError(f"{where}: mlp_bias=true is not supported")
    max_pos = f.int("max_position_embeddings")
    window = f.int("sliding_window", None, null_is_default=True) if cfg.get("sliding_window") is not None else None
    # Qwen2 carries sliding_window even when use_sliding_window is false; only an active window matters.
    if f.bool("use_sliding_window", True) and window is not None and window < max_pos:
        raise ConversionError(f"{where}: sliding-window attention not supported "
                              f"(sliding_window {window} < max_position_embeddings {max_pos})")
    theta, scaling = _rope(cfg, where)
    d, heads = f.int("hidden_size"), f.int("num_attention_heads")
    attn_bias = f.bool("attention_bias", False)
    head_dim = _head_dim(f, d, heads)
    return ModelConfig(
        architecture="llama", vocab_size=f.int("vocab_size"), d_model=d,
        n_layers=f.int("num_hidden_layers"), n_heads=heads,
        n_kv_heads=f.int("num_key_value_heads", heads, null_is_default=True), head_dim=head_dim,
        n_ff=f.int("intermediate_size"), ffn_kind=ffn_kind, act_threshold=act_threshold, norm_kind="rms",
        norm_eps=f.float("rms_norm_eps", 1e-6), pos_kind="rope", max_position=max_pos,
        rope_theta=theta, rope_scaling=scaling, tied_embeddings=f.bool("tie_word_embeddings", False),
        attn_qkv_bias=attn_bias or arch == "Qwen2ForCausalLM", attn_out_bias=attn_bias,
        qk_norm=arch == "Qwen3ForCausalLM")


def _gemma3_layer_types(cfg: dict, n_layers: int) -> list[str]:
    """transformers 5 lists layer_types; older configs give sliding_window_pattern (every Nth layer global)."""
    types = cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ValueError(f"sliding_window_pattern {pattern!r} is not a positive integer")
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types {types} is not one of sliding_attention/full_attention per layer")
    return list(types)


def _gemma3_rope(cfg: dict, where: Path) -> tuple[float, dict | None, float]:
    """(global base, global scaling, local base). transformers 5 keys rope_parameters by layer type."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        theta, scaling = _rope({"rope_parameters": params["full_attention"]}, where)
        local, local_scaling = _rope({"rope_parameters": params.get("sliding_attention") or {}}, where)
        if local_scaling is not None:
            raise ConversionError(f"{where}: RoPE scaling on sliding layers is not supported")
    else:
        theta, scaling = _rope(cfg, where)
        local = _Fields(cfg, where).float("rope_local_base_freq", 10000.0)
    return theta, scaling, local


def _gemma3_config(cfg: dict, where: Path) -> ModelConfig:
    f = _Fields(cfg, where)
    refuse = {
        f"hidden_activation {cfg.get('hidden_activation')!r} (only gelu_pytorch_tanh)":
            cfg.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"),
        "final_logit_softcapping": cfg.get("final_logit_softcapping") is not None,
        "attn_logit_softcapping": cfg.get("attn_logit_softcapping") is not None,
        "use_bidirectional_attention": f.bool("use_bidirectional_attention", False),
        "attention_bias": f.bool("attention_bias", False),
    }
    for what, bad in refuse.items():
        if bad:
            raise ConversionError(f"{where}: Gemma 3 with {what} is not supported")
    d, heads, n_layers = f.int("hidden_size"), f.int("num_attention_heads"), f.int("num_hidden_layers")
    types = _gemma3_layer_types(cfg, n_layers)
    theta, scaling, local = _gemma3_rope(cfg, where)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return ModelConfig(
        architecture="gemma3", vocab_size=f.int("vocab_size"), d_model=d, n_layers=n_layers, n_heads=heads,
        n_kv_heads=f.int("num_key_value_heads", heads, null_is_default=True),
        head_dim=_head_dim(f, d, heads),
        n_ff=f.int("intermediate_size"), ffn_kind="geglu", norm_kind="rms",
        norm_eps=f.float("rms_norm_eps", 1e-6), pos_kind="rope", max_position=f.int("max_position_embeddings"),
        rope_theta=theta, rope_scaling=scaling, tied_embeddings=f.bool("tie_word_embeddings", True),
        qk_norm=True, sandwich_norm=True, embed_scale=d ** 0.5,
        attn_scale=f.float("query_pre_attn_scalar", 256) ** -0.5,
        sliding_window=f.int("sliding_window") if sliding else None, sliding_layers=sliding,
        rope_local_theta=local)


def _opt_config(cfg: dict, where: Path) -> ModelConfig:
    f = _Fields(cfg, where)
    d = f.int("hidden_size")
    refuse = {
        "do_layer_norm_before=false (post-norm OPT, e.g. opt-350m)": not f.bool("do_layer_norm_before", True),
        f"word_embed_proj_dim {cfg.get('word_embed_proj_dim')} != hidden_size {d}":
            f.int("word_embed_proj_dim", d) != d,
        f"activation_function {cfg.get('activation_function')!r} (only relu)":
            f.str("activation_function", "relu") != "relu",
        "enable_bias=false": not f.bool("enable_bias", True),
        "layer_norm_elementwise_affine=false": not f.bool("layer_norm_elementwise_affine", True),
    }
    for what, bad in refuse.items():
        if bad:
            raise ConversionError(f"{where}: OPT with {what} is not supported")
    heads = f.int("num_attention_heads")
    if d % heads:
        raise ConversionError(f"{where}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
    return ModelConfig(
        architecture="opt", vocab_size=f.int("vocab_size"), d_model=d,
        n_layers=f.int("num_hidden_layers"), n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
        n_ff=f.int("ffn_dim"), ffn_kind="relu", norm_kind="layer", norm_eps=1e-5,  # nn.LayerNorm default
        pos_kind="learned", max_position=f.int("max_position_embeddings"), pos_offset=2,
        tied_embeddings=f.bool("tie_word_embeddings", True),
        attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True)


def parse_config(cfg: dict, generation: dict, where: Path) -> ModelConfig:
    if not isinstance(cfg, dict) or not isinstance(generation, dict):
        raise ConversionError(f"{where}: not a JSON object")
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    try:
        if arch in LLAMA_ARCHS:
            c = _llama_config(cfg, arch, where)
        elif arch in GEMMA3_ARCHS:
            c = _gemma3_config(cfg, where)
        elif arch in OPT_ARCHS:
            c = _opt_config(cfg, where)
        else:
            raise ConversionError(f"{where}: architecture {arch!r} is not supported; supported sources: "
                                  + "; ".join(SUPPORTED_SOURCES))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: missing or invalid field ({e!r})") from None
    bos = cfg.get("bos_token_id", generation.get("bos_token_id"))
    bos_ids = _ids(bos, "bos_token_id", where)
    if len(bos_ids) > 1:
        raise ConversionError(f"{where}: field 'bos_token_id' must be one token id, got {bos!r}")
    c.bos_token_id = bos_ids[0] if bos_ids else None
    # Instruct models often list extra stop tokens (e.g. Llama 3's <|eot_id|>) only in generation_config.
    eos = _ids(cfg.get("eos_token_id"), "eos_token_id", where) + _ids(generation.get("eos_token_id"), "eos_token_id",
                                                                     where.with_name("generation_config.json"))
    out_of_range = [i for i in [*bos_ids, *eos] if i >= c.vocab_size]
    if out_of_range:
        raise ConversionError(f"{where}: token id {out_of_range[0]} (bos/eos) is not below vocab_size {c.vocab_size}")
    c.eos_token_ids = list(dict.fromkeys(eos))
    return c


# --------------------------------------------------------------------------------------------- tensors

def canonical_name(hf_name: str, arch: str) -> str | None:
    """Canonical name for an HF tensor name, or None when it is not a weight we know."""
    opt = arch == "opt"
    if opt and hf_name.startswith("decoder."):   # older OPT checkpoints omit the "model." prefix
        hf_name = "model." + hf_name
    top, layer, layer_re = ((OPT_TOP, OPT_LAYER, OPT_LAYER_RE) if opt else
                            (LLAMA_TOP, GEMMA3_LAYER if arch == "gemma3" else LLAMA_LAYER, LLAMA_LAYER_RE))
    if hf_name in top:
        return top[hf_name]
    m = layer_re.fullmatch(hf_name)
    if m and m[2] in layer:
        return f"layers.{m[1]}.{layer[m[2]]}.{m[3]}"
    return None


def _ignorable(hf_name: str, config: ModelConfig) -> bool:
    # Old Llama checkpoints store the RoPE table; tied models may still store a copy of lm_head.
    # TurboSparse / Bamboo checkpoints carry their own FFN predictors (mlp.predictor.*); flashlm
    # calibrates its own, on its own bundle layout.
    return hf_name.endswith("rotary_emb.inv_freq") or (config.tied_embeddings and hf_name == "lm_head.weight") \
        or (config.ffn_kind == "drelu" and ".mlp.predictor." in hf_name)


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map") if isinstance(_read_json(index), dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no weight_map")
        files = weight_map.values()
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or not f.endswith(".safetensors")]
        if bad:
            raise ConversionError(f"{index}: weight_map entry {bad[0]!r} is not a .safetensors file name in the folder")
        return sorted(set(files))
    if (folder / "model.safetensors").exists():
        return ["model.safetensors"]
    raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors weights are supported)")


class HFSource:
    def __init__(self, folder):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.exists():
            raise ConversionError(f"{config_path}: not found; expected a Hugging Face model folder")
        raw_cfg = _read_json(config_path)
        generation = self._optional_json("generation_config.json") or {}
        self.config = parse_config(raw_cfg, generation, config_path)
        self.files = _weight_files(self.folder)
        self._index = self._index_tensors()   # canonical -> (path, header info, data_start)
        self._check_shapes()
        self.info = SourceInfo(
            tokenizer_json=self._optional_text("tokenizer.json"),
            chat_template=self._chat_template(),
            generation_config=generation,
            special_tokens=self._special_tokens(),
            description={"format": "hf", "path": str(self.folder), "architecture": raw_cfg["architectures"][0],
                         "files": self.files,
                         "bytes": sum(os.path.getsize(self.folder / f) for f in self.files)})

    # -- Source protocol

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(info["shape"]) for name, (_, info, _) in self._index.items()}

    def load(self, name: str) -> np.ndarray:
        path, info, data_start = self._index[name]
        try:
            arr = read_tensor(path, info, data_start)   # bf16 comes back widened to f32
        except (OSError, SafetensorsError) as e:
            raise ConversionError(f"cannot read {name}: {e}") from None   # both errors name the file
        arr = arr.astype(np.float32, copy=False)
        if self.config.architecture == "gemma3" and name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)   # Gemma's RMSNorm scales by (1 + w): the canonical weight is the multiplier
        return arr

    def close(self) -> None:
        pass   # no file stays open between load() calls

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- indexing

    def _index_tensors(self) -> dict:
        index = {}
        for fname in self.files:
            path = self.folder / fname
            if not path.exists():
                raise ConversionError(f"{path}: weight file listed in the index is missing")
            try:
                header, data_start, _ = read_header(path)
            except SafetensorsError as e:   # its message already names the file
                raise ConversionError(str(e)) from None
            except OSError as e:
                raise ConversionError(f"{path}: {e}") from None
            for hf_name, info in header.items():
                name = canonical_name(hf_name, self.config.architecture)
                if _ignorable(hf_name, self.config):
                    continue
                if name is None:
                    raise ConversionError(f"{path}: unexpected tensor {hf_name!r}; this model variant is not supported")
                if info["dtype"] not in FLOAT_DTYPES:
                    raise ConversionError(f"{path}: tensor {hf_name!r} has dtype {info['dtype']}, expected a float type")
                index[name] = (path, info, data_start)
        return index

    def _check_shapes(self) -> None:
        where = ", ".join(self.files)
        # The layer count sizes every later loop and allocation: it must match the tensors present
        # before the expected-tensor table (one entry per layer and weight) is built from it.
        layers = {int(m[1]) for name in self._index if (m := re.match(r"layers\.(\d+)\.", name))}
        n_found = max(layers) + 1 if layers else 0
        if self.config.n_layers != n_found:
            raise ConversionError(f"{self.folder / 'config.json'}: num_hidden_layers is {self.config.n_layers} but "
                                  f"{where} holds tensors for {n_found} layers")
        expected, got = expected_tensors(self.config), self.shapes()
        for name, shape in expected.items():
            if name not in got:
                raise ConversionError(f"{self.folder}: tensor {name} is missing from {where}")
            if got[name] != shape:
                raise ConversionError(f"{self._index[name][0]}: tensor {name} has shape {list(got[name])}, "
                                      f"config.json implies {list(shape)}")
        extra = sorted(set(got) - set(expected))
        if extra:
            raise ConversionError(f"{self.folder}: tensors {extra} in {where} are not used by this config")

    # -- tokenizer and generation side files

    def _optional_text(self, fname: str) -> str | None:
        path = self.folder / fname
        return path.read_text(encoding="utf-8") if path.exists() else None

    def _optional_json(self, fname: str) -> dict | None:
        path = self.folder / fname
        return _read_json(path) if path.exists() else None

    def _chat_template(self) -> str | None:
        # transformers prefers a chat_template.jinja file over the tokenizer_config.json entry.
        text = self._optional_text("chat_template.jinja")
        if text is not None:
            return text
        tmpl = (self._optional_json("tokenizer_config.json") or {}).get("chat_template")
        if isinstance(tmpl, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        return tmpl

    def _special_tokens(self) -> dict:
        tok_cfg = self._optional_json("tokenizer_config.json") or {}
        out = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = tok_cfg.get(key)
            if isinstance(v, dict):   # AddedToken serialised as {"content": "<s>", "lstrip": ...}
                v = v.get("content")
            if isinstance(v, str):
                out[key] = v
        return out
