"""HFSource against tiny random transformers checkpoints: config mapping, exact tensors, clear errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

import tiny_models
from flashlm.converters.hf_source import HFSource, parse_config
from flashlm.converters.source import ConversionError, expected_tensors

pytestmark = pytest.mark.slow

BUILDERS = {
    "llama_tied": lambda d: tiny_models.make_llama(d, 1, tied=True, n_kv_heads=4),
    "llama_gqa": lambda d: tiny_models.make_llama(d, 2, tied=False, n_kv_heads=2),
    "qwen2": lambda d: tiny_models.make_llama(d, 3, tied=False, qwen2=True),
    "opt": lambda d: tiny_models.make_opt(d, 4),
    "llama_bf16_sharded": lambda d: tiny_models.make_llama(d, 5, tied=False, dtype=torch.bfloat16, sharded=True),
}
EXPECTED_CONFIG = {
    "llama_tied": dict(architecture="llama", n_kv_heads=4, tied_embeddings=True, attn_qkv_bias=False, n_ff=160),
    "llama_gqa": dict(architecture="llama", n_kv_heads=2, tied_embeddings=False, attn_qkv_bias=False),
    "qwen2": dict(architecture="llama", n_kv_heads=2, attn_qkv_bias=True, attn_out_bias=False),
    "opt": dict(architecture="opt", n_layers=3, n_ff=192, ffn_kind="relu", norm_kind="layer", pos_kind="learned",
                pos_offset=2, max_position=128, tied_embeddings=True, attn_qkv_bias=True, attn_out_bias=True,
                ffn_bias=True),
    "llama_bf16_sharded": dict(architecture="llama", tied_embeddings=False),
}

# canonical name -> HF name, written independently of the converter's own table.
LLAMA_HF = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
            "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
            "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj", "ffn.down": "mlp.down_proj"}
OPT_HF = {"attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm", "attn.q": "self_attn.q_proj",
          "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.out_proj",
          "ffn.up": "fc1", "ffn.down": "fc2"}


def hf_name(name: str, arch: str) -> str:
    top = {"tok_embeddings": "embed_tokens.weight", "pos_embeddings": "embed_positions.weight",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    if name == "lm_head":
        return "lm_head.weight"
    prefix, table = ("model.decoder.", OPT_HF) if arch == "opt" else ("model.", LLAMA_HF)
    if name in top:
        hf = top[name]
        return prefix + (hf.replace("norm.", "final_layer_norm.") if arch == "opt" else hf)
    _, i, rest = name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"{prefix}layers.{i}.{table[module]}.{kind}"


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: build(root / kind) for kind, build in BUILDERS.items()}


@pytest.fixture
def llama_copy(folders, tmp_path) -> Path:
    """A private copy of the tied Llama folder that a test may damage."""
    return Path(shutil.copytree(folders["llama_tied"], tmp_path / "m"))


@pytest.mark.parametrize("kind", BUILDERS)
def test_config_fields(folders, kind):
    c = HFSource(folders[kind]).config
    common = dict(vocab_size=300, d_model=64, n_heads=4, head_dim=16, max_position=128, bos_token_id=1,
                  eos_token_ids=[2])
    if c.architecture == "llama":
        common.update(n_layers=2, n_ff=160, ffn_kind="swiglu", norm_kind="rms", pos_kind="rope", norm_eps=1e-5,
                      rope_theta=50000.0, rope_scaling=None, pos_offset=0)
    for field, want in {**common, **EXPECTED_CONFIG[kind]}.items():
        assert getattr(c, field) == want, field


@pytest.mark.parametrize("kind", BUILDERS)
def test_tensors_equal_transformers(folders, kind):
    src = HFSource(folders[kind])
    assert src.shapes() == expected_tensors(src.config)
    # Loading in float32 widens bf16 exactly, so the comparison stays exact for the bf16 checkpoint.
    state = tiny_models.load_reference(folders[kind]).state_dict()
    for name in src.shapes():
        got = src.load(name)
        assert got.dtype == np.float32, name
        np.testing.assert_array_equal(got, state[hf_name(name, src.config.architecture)].numpy(), err_msg=name)


def test_sharded_bf16_is_read_from_several_files(folders):
    src = HFSource(folders["llama_bf16_sharded"])
    assert len(src.info.description["files"]) > 1
    assert {info["dtype"] for _, info, _ in src._index.values()} == {"BF16"}


def test_side_files(folders):
    info = HFSource(folders["llama_gqa"]).info
    assert Tokenizer.from_str(info.tokenizer_json).get_vocab_size() == 300
    assert info.chat_template == tiny_models.CHAT_TEMPLATE
    assert info.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert info.generation_config["temperature"] == 0.7
    assert info.description["format"] == "hf" and info.description["architecture"] == "LlamaForCausalLM"
    assert info.description["bytes"] == (folders["llama_gqa"] / "model.safetensors").stat().st_size


def test_chat_template_list_and_jinja_file(llama_copy):
    cfg_path = llama_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    cfg_path.write_text(json.dumps(cfg))
    assert HFSource(llama_copy).info.chat_template == "D"
    (llama_copy / "chat_template.jinja").write_text("J")
    assert HFSource(llama_copy).info.chat_template == "J"


# ---------------------------------------------------------------------------------- config-only rules

def llama_cfg(**kw) -> dict:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64}
    return {**base, **kw}


def test_rope_parameters_and_legacy_rope_scaling():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32, "rope_theta": 5e5}
    c = parse_config(llama_cfg(rope_parameters=llama3), {}, Path("config.json"))   # transformers 5 layout
    assert c.rope_theta == 5e5
    assert c.rope_scaling == {k: v for k, v in llama3.items() if k != "rope_theta"}
    c = parse_config(llama_cfg(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}), {}, Path("c"))
    assert (c.rope_theta, c.rope_scaling) == (1e6, {"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConversionError, match="yarn"):
        parse_config(llama_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}), {}, Path("c"))


def test_eos_list_and_generation_config_eos_are_merged():
    c = parse_config(llama_cfg(eos_token_id=[5, 6]), {"eos_token_id": [6, 7]}, Path("c"))
    assert c.eos_token_ids == [5, 6, 7]


@pytest.mark.parametrize("cfg, message", [
    (llama_cfg(hidden_act="gelu"), "hidden_act"),
    (llama_cfg(mlp_bias=True), "mlp_bias"),
    (llama_cfg(architectures=["MistralForCausalLM"], sliding_window=32), "sliding-window"),
    ({**llama_cfg(architectures=["OPTForCausalLM"], ffn_dim=16), "do_layer_norm_before": False}, "do_layer_norm"),
    (llama_cfg(architectures=["OPTForCausalLM"], ffn_dim=16, word_embed_proj_dim=4), "word_embed_proj_dim"),
    (llama_cfg(architectures=["OPTForCausalLM"], ffn_dim=16, activation_function="gelu"), "activation"),
])
def test_unsupported_variants_are_refused(cfg, message):
    with pytest.raises(ConversionError, match=message):
        parse_config(cfg, {}, Path("config.json"))


def test_mistral_window_covering_the_context_is_accepted():
    c = parse_config(llama_cfg(architectures=["MistralForCausalLM"], sliding_window=4096), {}, Path("c"))
    assert c.architecture == "llama"


# ------------------------------------------------------------------------------------- damaged folders

def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    with pytest.raises(ConversionError) as e:
        HFSource(tmp_path)
    assert "config.json" in str(e.value) and "LlamaForCausalLM" in str(e.value)


def test_truncated_safetensors(llama_copy):
    path = llama_copy / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(ConversionError, match="model.safetensors"):
        HFSource(llama_copy)


def test_missing_tensor(llama_copy):
    path = llama_copy / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ConversionError, match=r"layers\.1\.ffn\.up\.weight.*model\.safetensors"):
        HFSource(llama_copy)


def test_unknown_tensor(llama_copy):
    path = llama_copy / "model.safetensors"
    save_file({**load_file(path), "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}, path)
    with pytest.raises(ConversionError, match="q_norm"):
        HFSource(llama_copy)


def test_shape_mismatch_names_file(llama_copy):
    cfg_path = llama_copy / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "intermediate_size": 128}))
    with pytest.raises(ConversionError, match="model.safetensors.*shape"):
        HFSource(llama_copy)
