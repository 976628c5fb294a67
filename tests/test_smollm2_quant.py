"""SmolLM2-135M-Instruct from its Q4_1 GGUF with `convert --dtype auto`: the file's own blocks
(Q4_1 layers, Q8_0 embeddings) in onnxruntime sessions with int8 activations, against transformers
loading the same GGUF (which dequantizes it to f32)."""
import numpy as np
import pytest

from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_NEW = 24
NEAR_TIE = 0.25    # logit gap (transformers) below which an int8-activation flip is a near-tie.
# Measured: "def fibonacci(n):" flips at generated token 13 (ours " max", transformers " n", gap 0.139
# on logits spanning ~30); the other two prompts match all 24 tokens.


@pytest.fixture(scope="module")
def hf(smollm2_hf):
    return smollm2_hf


@pytest.fixture(scope="module")
def folder(smollm2_gguf, tmp_path_factory):
    return open_folder(convert(smollm2_gguf, tmp_path_factory.mktemp("smolq") / "smollm2.flashlm", progress=False))


@pytest.fixture(scope="module")
def ours(folder):
    model = Model(folder)
    model.warmup()
    return model, Tokenizer.from_folder(folder.path, folder.manifest)


def test_auto_keeps_the_gguf_blocks(folder):
    assert folder.dense["layers.0.attn.q.weight"].storage.name == "q4_1"
    assert folder.dense["tok_embeddings"].storage.name == "q8_0"
    assert folder.matrices["layers.3.ffn.down.weight"].storage.name == "q4_1"
    dense = sum(t.nbytes for t in folder.dense.values()) + sum(t.nbytes for t in folder.matrices.values())
    assert dense < 110e6, "the resident weights are the GGUF's bytes (98 MB file), not f16's 270 MB"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_equals_transformers(ours, hf, prompt):
    import torch
    model, tok = ours
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = hf[0].generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, num_beams=1,
                             repetition_penalty=1.0, eos_token_id=None)
    expected = out[0, len(ids):].tolist()
    model.reset()
    logits = model.forward(ids)[-1]
    got = []
    for _ in range(N_NEW):
        t = int(np.argmax(logits))
        got.append(t)
        if t != expected[len(got) - 1]:
            break
        logits = model.forward([t])[-1]
    if got == expected:
        return
    # A flip: only acceptable where transformers itself sees a near-tie between the two tokens.
    i = len(got) - 1
    with torch.no_grad():
        ref = hf[0](torch.tensor([ids + expected[:i]])).logits[0, -1].numpy()
    gap = float(ref[expected[i]] - ref[got[i]])
    assert gap < NEAR_TIE, (f"token {i} of {prompt!r}: ours {tok.decode([got[i]])!r}, transformers "
                            f"{tok.decode([expected[i]])!r}, transformers' logit gap {gap:.3f}")


def test_prefill_logits_close_to_transformers(ours, hf):
    import torch
    model, tok = ours
    ids = tok.encode("Hello! My name is Ada and I like to write programs in")
    model.reset()
    got = model.forward(ids, all_logits=True)
    with torch.no_grad():
        ref = hf[0](torch.tensor([ids])).logits[0].numpy()
    # int8 activations: measured max |diff| 0.46-0.93 per position on logits spanning ~30. The argmax
    # agrees wherever transformers' top two are not a near-tie; measured flips only at gaps of 0.024 and
    # 0.002 (positions 2 and 4 of this prompt since the q4_1 correction by ReduceSum, 9117c7c).
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.1
    assert clear.sum() >= 10 and (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_f32_activations_match_transformers_closely(folder, hf, ours):
    import torch
    _, tok = ours
    model = Model(folder, RuntimeConfig(kv_dtype="f32", activations="f32"))
    ids = tok.encode("Hello! My name is Ada and I like to write programs in")
    got = model.forward(ids, all_logits=True)
    with torch.no_grad():
        ref = hf[0](torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-3
