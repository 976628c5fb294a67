"""GGUFSource: tiny GGUF files written here with gguf.GGUFWriter, and the real SmolLM2 GGUF against transformers."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from tokenizers import Tokenizer

from flashlm.converters.gguf_source import GGUFSource, _bytes_to_unicode, permute_qk, unpermute_qk
from flashlm.converters.source import ConversionError, SUPPORTED_SOURCES, expected_tensors

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ",
    "12345 3.14 and 1,000,000",
    "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass",
    "multiple   spaces\n\n\nand newlines\r\n",
    "emoji 🙂🚀 and CJK 你好，世界 and accents café naïve",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'll we've they're",
    "UPPER lower MiXeD",
    "a<|im_end|>b",
    "https://example.com/path?q=1&r=2",
    "",
    " ",
    "\n",
]


# --- Q/K permutation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [64, 8])
@pytest.mark.parametrize("n_head", [1, 3])
def test_unpermute_inverts_permute(head_dim, n_head):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, 24)).astype(np.float32)
    b = rng.standard_normal(n_head * head_dim).astype(np.float32)
    assert not np.array_equal(permute_qk(w, n_head), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, n_head), n_head), b)


def test_permute_is_llama_cpp_interleave():
    # rotate-half pairs (i, i + hd/2) become adjacent rows (2i, 2i+1) in every head
    rows = np.arange(16)
    np.testing.assert_array_equal(permute_qk(rows, 2), [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15])


# --- tiny synthetic GGUFs ----------------------------------------------------------------------------

D, N_FF, N_HEADS, N_KV, N_LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = D // N_HEADS
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<｜end▁of▁sentence｜>"]  # last: not byte-level
GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _gpt2_vocab():
    tokens = [*CONTROL_TOKENS, *_bytes_to_unicode().values(), *(m.replace(" ", "") for m in GPT2_MERGES), "<think>"]
    types = [3] * len(CONTROL_TOKENS) + [1] * (len(tokens) - len(CONTROL_TOKENS) - 1) + [4]
    return tokens, types


def _spm_vocab():
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "he", "ll", "lo", "llo", "▁he", "▁hello", "▁w", "or",
              "▁wor", "▁world", "▁▁", "a", "b", "▁a"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|im_end|>", "<tool>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return tokens, types, scores


def _tensors(rng, vocab: int, tied: bool = True) -> dict[str, np.ndarray]:
    """GGUF name -> float32 weight in HF orientation (Q/K not yet permuted)."""
    t = {"token_embd.weight": rng.standard_normal((vocab, D)), "output_norm.weight": rng.standard_normal(D)}
    if not tied:
        t["output.weight"] = rng.standard_normal((vocab, D))
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": rng.standard_normal(D), p + "ffn_norm.weight": rng.standard_normal(D),
              p + "attn_q.weight": rng.standard_normal((N_HEADS * HEAD_DIM, D)),
              p + "attn_k.weight": rng.standard_normal((N_KV * HEAD_DIM, D)),
              p + "attn_v.weight": rng.standard_normal((N_KV * HEAD_DIM, D)),
              p + "attn_output.weight": rng.standard_normal((D, N_HEADS * HEAD_DIM)),
              p + "ffn_gate.weight": rng.standard_normal((N_FF, D)), p + "ffn_up.weight": rng.standard_normal((N_FF, D)),
              p + "ffn_down.weight": rng.standard_normal((D, N_FF))}
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_tiny(path, *, arch="llama", tokenizer="gpt2", pre="gpt2", drop=(), tied=True, extra_kv=None,
               extra_tensors=None, seed=0):
    """A tiny llama GGUF; returns {gguf name: HF-orientation weight as the file stores it after dequantizing}."""
    if tokenizer == "gpt2":
        tokens, types = _gpt2_vocab()
    else:
        tokens, types, scores = _spm_vocab()
    weights = _tensors(np.random.default_rng(seed), len(tokens), tied) | (extra_tensors or {})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_block_count(N_LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    for key, value in (extra_kv or {}).items():
        getattr(w, key)(value)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(GPT2_MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(0)
        w.add_add_bos_token(False)
    else:
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)
    stored = {}
    for name, value in weights.items():
        if name in drop:
            continue
        if ".attn_q." in name:
            value = permute_qk(value, N_HEADS)
        elif ".attn_k." in name:
            value = permute_qk(value, N_KV)
        if value.ndim == 2 and "ffn" in name:   # a mix of F32 and Q8_0 tensors, as real files have
            q = gguf.quants.quantize(value, QT.Q8_0)
            w.add_tensor(name, q, raw_dtype=QT.Q8_0)
            value = gguf.quants.dequantize(q, QT.Q8_0)
        else:
            w.add_tensor(name, value)
        stored[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def test_tiny_llama_config_and_tensors(tmp_path):
    path = tmp_path / "tiny.gguf"
    stored = write_tiny(path, tied=False)
    src = GGUFSource(path)
    c = src.config
    assert (c.n_layers, c.d_model, c.n_ff, c.n_heads, c.n_kv_heads, c.head_dim) == (N_LAYERS, D, N_FF, N_HEADS, N_KV, HEAD_DIM)
    assert (c.rope_theta, c.max_position, c.norm_eps, c.tied_embeddings) == (50000.0, 256, pytest.approx(1e-5), False)
    assert c.vocab_size == len(_gpt2_vocab()[0]) and c.rope_scaling is None
    # eos 0 (<|endoftext|>) plus <|im_end|>, which the chat template ends turns with
    assert c.bos_token_id == 1 and c.eos_token_ids == [0, 2]
    assert src.shapes() == expected_tensors(c)
    assert src.load("tok_embeddings").dtype == np.float32
    for gguf_name, canon in [("token_embd.weight", "tok_embeddings"), ("output.weight", "lm_head"),
                             ("blk.1.ffn_down.weight", "layers.1.ffn.down.weight"),
                             ("blk.0.attn_output.weight", "layers.0.attn.o.weight")]:
        np.testing.assert_array_equal(src.load(canon), stored[gguf_name])
    # Q/K come back in HF rotate-half order
    np.testing.assert_array_equal(src.load("layers.1.attn.q.weight"), unpermute_qk(stored["blk.1.attn_q.weight"], N_HEADS))
    np.testing.assert_array_equal(src.load("layers.0.attn.k.weight"), unpermute_qk(stored["blk.0.attn_k.weight"], N_KV))
    info = src.info
    tok = Tokenizer.from_str(info.tokenizer_json)
    assert tok.get_vocab_size(with_added_tokens=True) == c.vocab_size   # no added token got a new id
    assert tok.encode("a<｜end▁of▁sentence｜>").ids[-1] == 3
    assert info.chat_template == TEMPLATE
    assert info.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}
    assert info.generation_config == {"bos_token_id": 1, "eos_token_id": c.eos_token_ids}
    assert info.description["format"] == "gguf" and info.description["name"] == "tiny"
    assert info.description["bytes"] == path.stat().st_size
    src.close()


def test_linear_rope_scaling(tmp_path):
    write_tiny(tmp_path / "t.gguf", extra_kv={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                               "add_rope_scaling_factor": 4.0})
    assert GGUFSource(tmp_path / "t.gguf").config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_rope_freqs_tensor_is_refused(tmp_path):
    write_tiny(tmp_path / "t.gguf", extra_tensors={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)})
    with pytest.raises(ConversionError, match="llama3 rope scaling from GGUF is not supported"):
        GGUFSource(tmp_path / "t.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError) as e:
        GGUFSource(path)
    assert str(path) in str(e.value) and "'gpt2' is not supported" in str(e.value)
    assert all(s in str(e.value) for s in SUPPORTED_SOURCES)


def test_truncated_file(tmp_path):
    full, cut = tmp_path / "full.gguf", tmp_path / "cut.gguf"
    write_tiny(full)
    last = gguf.GGUFReader(str(full)).tensors[-1]
    cut.write_bytes(full.read_bytes()[: last.data_offset + last.n_bytes // 2])
    with pytest.raises(ConversionError, match="truncated") as e:
        GGUFSource(cut)
    assert str(cut) in str(e.value)


def test_corrupt_header(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        GGUFSource(bad)


def test_missing_tensor(tmp_path):
    write_tiny(tmp_path / "t.gguf", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ConversionError, match=r"layers\.1\.ffn\.up\.weight"):
        GGUFSource(tmp_path / "t.gguf")


def test_wrong_shape(tmp_path):
    write_tiny(tmp_path / "t.gguf", extra_tensors={"blk.0.attn_norm.weight": np.ones(D + 1, np.float32)})
    with pytest.raises(ConversionError, match=r"layers\.0\.attn_norm\.weight.*shape"):
        GGUFSource(tmp_path / "t.gguf")


def test_unknown_pre_tokenizer(tmp_path):
    write_tiny(tmp_path / "t.gguf", pre="mystery")
    with pytest.raises(ConversionError, match="mystery"):
        GGUFSource(tmp_path / "t.gguf")


def _assert_same_tokenization(tokenizer_json: str, hf, texts):
    ours = Tokenizer.from_str(tokenizer_json)
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == hf.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


@pytest.mark.parametrize("tokenizer,pre", [("gpt2", "gpt2"), ("gpt2", "llama-bpe"), ("llama", None)])
def test_tiny_tokenizers_match_transformers(tmp_path, tokenizer, pre):
    from transformers import AutoTokenizer
    write_tiny(tmp_path / "t.gguf", tokenizer=tokenizer, pre=pre)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    texts = TEXTS + ["hello world", " hello  world the in<think>", "he<tool>llo\n\nworld"]
    _assert_same_tokenization(GGUFSource(tmp_path / "t.gguf").info.tokenizer_json, hf, texts)
    if tokenizer == "llama":   # sentencepiece files add BOS by default
        assert Tokenizer.from_str(GGUFSource(tmp_path / "t.gguf").info.tokenizer_json).encode("hello").ids[0] == 1


# --- the real SmolLM2-135M-Instruct Q4_1 GGUF ---------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    src = GGUFSource(smollm2_gguf)
    yield src
    src.close()


@pytest.mark.slow
def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.n_layers, c.d_model, c.n_ff, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert c.tied_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0 and c.max_position == 8192
    assert c.eos_token_ids == [2] and c.bos_token_id == 1   # eos is <|im_end|> already
    assert smollm2.shapes() == expected_tensors(c)
    assert smollm2.info.special_tokens["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in smollm2.info.chat_template


@pytest.fixture(scope="module")
def hf_smollm2_state(smollm2_hf):
    """transformers' own dequantized (and Q/K un-permuted) weights for the same file."""
    return smollm2_hf[0].state_dict()


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2, hf_smollm2_state):
    names = {"tok_embeddings": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    parts = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn.q.weight": "self_attn.q_proj.weight", "attn.k.weight": "self_attn.k_proj.weight",
             "attn.v.weight": "self_attn.v_proj.weight", "attn.o.weight": "self_attn.o_proj.weight",
             "ffn.gate.weight": "mlp.gate_proj.weight", "ffn.up.weight": "mlp.up_proj.weight",
             "ffn.down.weight": "mlp.down_proj.weight"}
    for i in range(smollm2.config.n_layers):
        names |= {f"layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in parts.items()}
    assert set(names) == set(smollm2.shapes())
    for ours, theirs in names.items():
        np.testing.assert_array_equal(smollm2.load(ours), hf_smollm2_state[theirs].numpy(), err_msg=ours)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf):
    hf = smollm2_hf[1]
    _assert_same_tokenization(smollm2.info.tokenizer_json, hf, TEXTS)
    tok = json.loads(smollm2.info.tokenizer_json)
    assert {t["content"] for t in tok["added_tokens"] if t["special"]} >= {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}


def test_qkv_bias_is_unpermuted(tmp_path):
    rng = np.random.default_rng(1)
    biases = {f"blk.{i}.attn_{p}.bias": rng.standard_normal(n * HEAD_DIM).astype(np.float32)
              for i in range(N_LAYERS) for p, n in (("q", N_HEADS), ("k", N_KV), ("v", N_KV))}
    write_tiny(tmp_path / "t.gguf", extra_tensors=biases)
    src = GGUFSource(tmp_path / "t.gguf")
    assert src.config.attn_qkv_bias and src.shapes() == expected_tensors(src.config)
    for i in range(N_LAYERS):
        for p in "qkv":
            np.testing.assert_array_equal(src.load(f"layers.{i}.attn.{p}.bias"), biases[f"blk.{i}.attn_{p}.bias"])
