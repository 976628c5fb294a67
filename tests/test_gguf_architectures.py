"""GGUF architectures qwen2, qwen3 and gemma3 (and llama) end to end, without real model files.

A tiny random transformers checkpoint is written as a GGUF the way llama.cpp's convert_hf_to_gguf lays
it out (its tensor names; Q/K rows interleaved for `llama` only; Gemma's norm weights stored as 1 + w;
the metadata keys llama.cpp reads, Gemma 3's sliding-window pattern and local RoPE base left to
llama.cpp's defaults). flashlm converts that GGUF and must reproduce transformers' logits on the
original checkpoint, prefill and decode: this checks what each architecture's metadata and tensors
mean, independently of the real files (tests/test_real_gguf_models.py).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.converters.gguf_source import GGUFSource, _bytes_to_unicode, permute_qk
from flashlm.converters.source import ConversionError
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder

IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180, 33, 5, 77, 120, 9, 15]
N_PROMPT = 4

LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GEMMA_LAYER = {**LAYER, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(hf: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{(GEMMA_LAYER if arch == 'gemma3' else LAYER)[module]}.{kind}"


def _vocab():
    """A byte-level vocabulary padded with control tokens to the tiny models' vocab size."""
    tokens = list(_bytes_to_unicode().values())
    tokens += [f"<ctl{i}>" for i in range(tm.VOCAB - len(tokens))]
    return tokens, [1] * 256 + [3] * (tm.VOCAB - 256)


def write_gguf(hf_folder, path, arch: str, extra_kv: dict | None = None) -> None:
    model = tm.load_reference(hf_folder)
    cfg, state = model.config, model.state_dict()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(float((rope.get("full_attention") or rope)["rope_theta"]))
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    for key, value in (extra_kv or {}).items():
        getattr(w, key)(value)
    tokens, types = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(tm.BOS)
    w.add_eos_token_id(tm.EOS)
    tied = cfg.tie_word_embeddings
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        value = t.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):   # llama.cpp's RoPE row order
            value = permute_qk(value, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1.0                                              # llama.cpp stores 1 + w
        w.add_tensor(_gguf_name(name, arch), np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MODELS = {
    "llama": lambda p: tm.make_llama(p, tied=False, n_kv_heads=2),
    "qwen2": lambda p: tm.make_llama(p, tied=False, qwen2=True),
    "qwen3": lambda p: tm.make_qwen3(p),
    # 6 layers: llama.cpp's pattern makes layer 5 global; local RoPE base 10000 as llama.cpp assumes
    "gemma3": lambda p: tm.make_gemma3(p, query_pre_attn_scalar=16, rope=(10000.0, 1000000.0)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def gguf_model(request, tmp_path_factory):
    arch = request.param
    hf = MODELS[arch](tmp_path_factory.mktemp(arch + "-hf"))
    path = tmp_path_factory.mktemp(arch + "-gguf") / "tiny.gguf"
    write_gguf(hf, path, arch)
    return arch, path, tm.reference_logits(hf, IDS)


def test_gguf_logits_match_transformers(gguf_model, tmp_path):
    arch, path, ref = gguf_model
    model = Model(open_folder(convert(path, tmp_path / "m.flashlm", dtype="f32", progress=False)),
                  RuntimeConfig(kv_dtype="f32"))      # the exact path: f32 weights and KV cache
    prefill = model.forward(IDS[:N_PROMPT], all_logits=True)
    decode = [model.forward([t])[0] for t in IDS[N_PROMPT:]]
    err = np.abs(np.concatenate([prefill, np.stack(decode)]) - ref).max()
    assert err <= 1e-4, f"{arch}: max abs logit diff {err}"


def test_gemma3_metadata_defaults(tmp_path):
    write_gguf(MODELS["gemma3"](tmp_path / "hf"), tmp_path / "g.gguf", "gemma3")
    c = GGUFSource(tmp_path / "g.gguf").config
    assert (c.architecture, c.ffn_kind, c.qk_norm, c.sandwich_norm) == ("gemma3", "geglu", True, True)
    assert c.sliding_layers == [0, 1, 2, 3, 4] and c.sliding_window == 5     # llama.cpp: every 6th layer global
    assert c.rope_local_theta == 10000.0 and c.rope_theta == 1000000.0
    assert c.embed_scale == pytest.approx(64 ** 0.5) and c.attn_scale == pytest.approx(16 ** -0.5)


def test_gemma3_pattern_array_and_softcapping(tmp_path):
    hf = tm.make_gemma3(tmp_path / "hf", layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    write_gguf(hf, tmp_path / "a.gguf", "gemma3", {"add_sliding_window_pattern": [True, False, True]})
    assert GGUFSource(tmp_path / "a.gguf").config.sliding_layers == [0, 2]
    write_gguf(hf, tmp_path / "b.gguf", "gemma3", {"add_final_logit_softcapping": 30.0})
    with pytest.raises(ConversionError, match="soft-capping"):
        GGUFSource(tmp_path / "b.gguf")
