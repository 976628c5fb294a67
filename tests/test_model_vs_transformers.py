"""flashlm logits against transformers on tiny random checkpoints: prefill and 16+ decode steps."""
import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder

TOLERANCE = {"f32": 1e-4, "f16": 2e-2}
IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180, 33, 5, 77, 120, 9, 15, 260, 4, 6, 12]
N_PROMPT = 6   # the rest (18 tokens) are fed one decode step at a time

MODELS = {
    "llama-gqa-untied": lambda p: tm.make_llama(p, tied=False, n_kv_heads=2),
    "llama-tied-mha": lambda p: tm.make_llama(p, tied=True, n_kv_heads=4),
    "qwen2-bias": lambda p: tm.make_llama(p, tied=False, qwen2=True),
    "llama-relu-reglu": lambda p: tm.make_llama(p, tied=False, hidden_act="relu"),   # relu(gate) * up
    "llama-bf16-sharded": lambda p: tm.make_llama(p, tied=False, sharded=True, dtype=tm.torch.bfloat16),
    "opt": lambda p: tm.make_opt(p),
    "qwen3-qk-norm": lambda p: tm.make_qwen3(p),
    "gemma3-sliding": lambda p: tm.make_gemma3(p, layer_types=["sliding_attention", "sliding_attention",
                                                                "full_attention", "sliding_attention"]),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, tmp_path_factory):
    src = MODELS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, src, tm.reference_logits(src, IDS)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_prefill_and_decode_match_transformers(checkpoint, dtype, tmp_path):
    name, src, ref = checkpoint
    # f32 is the exact path: f32 KV cache too (the f16 default rounds K/V to 11 bits).
    model = Model(open_folder(convert(src, tmp_path / "m.flashlm", dtype=dtype, progress=False)),
                  RuntimeConfig(kv_dtype="f32" if dtype == "f32" else "f16"))
    prefill = model.forward(IDS[:N_PROMPT], all_logits=True)
    decode = [model.forward([t])[0] for t in IDS[N_PROMPT:]]
    ours = np.concatenate([prefill, np.stack(decode)])
    err = np.abs(ours - ref).max()
    assert err <= TOLERANCE[dtype], f"{name} {dtype}: max abs logit diff {err}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_prefill_in_chunks_equals_one_pass(checkpoint, tmp_path):
    _, src, ref = checkpoint
    model = Model(open_folder(convert(src, tmp_path / "m.flashlm", dtype="f32", progress=False)),
                  RuntimeConfig(kv_dtype="f32"))
    a = model.forward(IDS[:10], all_logits=True)
    b = model.forward(IDS[10:], all_logits=True)
    np.testing.assert_allclose(np.concatenate([a, b]), ref, atol=1e-4)
    model.reset(10)                       # rewinding the KV cache replays the same positions
    np.testing.assert_allclose(model.forward(IDS[10:13], all_logits=True), ref[10:13], atol=1e-4)
