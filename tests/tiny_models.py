"""Tiny random Hugging Face checkpoints built offline with transformers, for converter and runtime tests.

Weights are drawn with std 0.2 (transformers' default init of 0.02 and zero biases would make every
logit nearly equal, so wrong math could still "match"); norm weights are 1 plus noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 300
SPECIALS = ["<unk>", "<s>", "</s>"]   # ids 0, 1, 2: the bos/eos ids written into the model configs
BOS, EOS = 1, 2
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny tokenizer for testing flashlm.",
    "Large language models stream sparse neurons from flash memory.",
    "user: what is the capital of France? assistant: Paris is the capital.",
    "Numbers 0123456789 and punctuation, like commas; colons: and dashes - too.",
] * 4
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
              bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)


def _randomize(model: torch.nn.Module, seed: int, norm_center: float = 1.0) -> None:
    """norm_center: 1 for norms that multiply by w, 0 for Gemma's, which multiply by 1 + w."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():   # tied lm_head is the same Parameter: listed once
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(norm_center + 0.1 * noise if is_norm_weight else 0.2 * noise)


def _write_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained in memory, its vocab filling exactly the model's vocab."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": {"content": "<unk>", "lstrip": False, "rstrip": False}, "chat_template": CHAT_TEMPLATE}))


def _save(model, folder: Path, seed: int, *, dtype=torch.float32, sharded=False, norm_center=1.0) -> Path:
    _randomize(model, seed, norm_center)
    model.to(dtype).save_pretrained(folder, safe_serialization=True,
                                    **({"max_shard_size": "40KB"} if sharded else {}))
    _write_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": True, "temperature": 0.7, "top_p": 0.9}))
    return folder


def make_llama(folder, seed: int = 0, *, tied: bool, n_kv_heads: int = 2, dtype=torch.float32,
               sharded: bool = False, qwen2: bool = False, hidden_act: str = "silu") -> Path:
    """Llama (or Qwen2 with q/k/v biases) with intermediate 160, deliberately not a multiple of 64."""
    cls, cfg_cls = ((transformers.Qwen2ForCausalLM, transformers.Qwen2Config) if qwen2 else
                    (transformers.LlamaForCausalLM, transformers.LlamaConfig))
    cfg = cfg_cls(**COMMON, num_hidden_layers=2, num_key_value_heads=n_kv_heads, intermediate_size=160,
                  rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, hidden_act=hidden_act)
    torch.manual_seed(seed)
    return _save(cls(cfg), Path(folder), seed, dtype=dtype, sharded=sharded)


def make_relu_family(folder, seed: int = 0, *, kind: str, threshold: float = 0.0) -> Path:
    """A Llama checkpoint labelled as a ReLU-fied family transformers has no class for:
    kind "fatrelu": ProSparse's config (SparseLlamaForCausalLM, hidden_act fatrelu, the threshold in
    hidden_act_param); kind "drelu": TurboSparse / Bamboo's (BambooForCausalLM, hidden_act relu, with
    the checkpoint's own predictor tensors mlp.predictor.fc1/fc2, which a converter skips; threshold > 0
    adds hidden_act fatrelu on top). Reference logits: relu_family_logits."""
    from safetensors.torch import load_file, save_file
    folder = make_llama(folder, seed, tied=False, hidden_act="relu")
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if kind == "fatrelu":
        cfg.update(architectures=["SparseLlamaForCausalLM"], hidden_act="fatrelu", hidden_act_param=threshold)
    elif kind == "drelu":
        cfg.update(architectures=["BambooForCausalLM"], model_type="bamboo")
        if threshold:
            cfg.update(hidden_act="fatrelu", hidden_act_param=threshold)
        weights = load_file(folder / "model.safetensors")
        g = torch.Generator().manual_seed(seed + 1)
        for i in range(cfg["num_hidden_layers"]):
            weights[f"model.layers.{i}.mlp.predictor.fc1.weight"] = torch.randn((8, cfg["hidden_size"]), generator=g)
            weights[f"model.layers.{i}.mlp.predictor.fc2.weight"] = torch.randn((cfg["intermediate_size"], 8), generator=g)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        raise ValueError(kind)
    path.write_text(json.dumps(cfg))
    return folder


def relu_family_logits(folder, token_ids, *, kind: str | None = None, threshold: float | None = None,
                       f16_weights: bool = False) -> np.ndarray:
    """[T, vocab] logits of a make_relu_family checkpoint: transformers' Llama with each MLP's forward
    replaced by the family's published formula in torch: down(F.threshold(gate(x), t, 0) * up(x))
    (FATReLU, as MiniCPM-S / ProSparse run it; t = 0 is ReLU), dReLU with relu(up(x)) instead of up(x)
    (Bamboo's MLP). kind / threshold override what the config says (to show a wrong activation differs);
    f16_weights: the weight matrices rounded to f16 first (what an f16 conversion stores)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    kind = kind or ("drelu" if cfg["architectures"][0] == "BambooForCausalLM" else "fatrelu")
    t = float(cfg.get("hidden_act_param", 0.0) if threshold is None else threshold)
    config = transformers.LlamaConfig.from_pretrained(folder)
    config.hidden_act, config.architectures = "relu", ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    if f16_weights:   # the matrices; norm weights stay f32 in a conversion
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())
    F = torch.nn.functional

    def mlp_forward(m):
        def forward(x):
            up = m.up_proj(x)
            return m.down_proj(F.threshold(m.gate_proj(x), t, 0.0) * (F.relu(up) if kind == "drelu" else up))
        return forward

    for layer in model.model.layers:
        layer.mlp.forward = mlp_forward(layer.mlp)
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long))
    return out.logits[0].float().numpy()


def make_qwen3(folder, seed: int = 0) -> Path:
    """Qwen3: per-head q/k RMSNorm, no biases, head_dim 24 != hidden/heads (16)."""
    cfg = transformers.Qwen3Config(**COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=24,
                                   intermediate_size=160, rope_theta=50000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return _save(transformers.Qwen3ForCausalLM(cfg), Path(folder), seed)


def make_gemma3(folder, seed: int = 0, *, dtype=torch.float32, layer_types=None, query_pre_attn_scalar=20,
                rope=(1000.0, 100000.0)) -> Path:
    """Gemma 3 text: GeGLU, (1 + w) sandwich norms, q/k norms, sqrt(d) embeddings; sliding-window layers
    (window 5, shorter than the test sequences) interleaved with a global one, each with its own RoPE base
    (local, global); query_pre_attn_scalar 20 != head_dim, so the attention scale is checked too.
    layer_types None: transformers' default pattern (every 6th layer global) over 6 layers."""
    layers = dict(num_hidden_layers=6) if layer_types is None else dict(num_hidden_layers=len(layer_types),
                                                                         layer_types=layer_types)
    cfg = transformers.Gemma3TextConfig(
        **COMMON, **layers, num_key_value_heads=2, head_dim=16, intermediate_size=160,
        rms_norm_eps=1e-6, sliding_window=5, query_pre_attn_scalar=query_pre_attn_scalar,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": rope[0]},
                         "full_attention": {"rope_type": "default", "rope_theta": rope[1]}})
    torch.manual_seed(seed)
    return _save(transformers.Gemma3ForCausalLM(cfg), Path(folder), seed, dtype=dtype, norm_center=0.0)


def make_opt(folder, seed: int = 0, *, n_layers: int = 3) -> Path:
    cfg = transformers.OPTConfig(**COMMON, num_hidden_layers=n_layers, ffn_dim=192, word_embed_proj_dim=64,
                                 do_layer_norm_before=True, activation_function="relu", dropout=0.0)
    torch.manual_seed(seed)
    return _save(transformers.OPTForCausalLM(cfg), Path(folder), seed)


def load_reference(folder) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_logits(folder, token_ids) -> np.ndarray:
    """[T, vocab] float32 logits from transformers for one sequence."""
    model = load_reference(folder)
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long))
    return out.logits[0].float().numpy()
