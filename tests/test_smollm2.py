"""The real embedded model: SmolLM2-135M-Instruct (Q4_1 GGUF) converted by flashlm against transformers
loading the same GGUF. Q4_1 dequantizes exactly, so f32 storage must give the same greedy text."""
import numpy as np
import pytest

from flashlm.converters.convert import convert
from flashlm.runtime.generate import GenerationStats, stream_generate
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.sampling import SamplingParams
from flashlm.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_NEW = 24


@pytest.fixture(scope="module")
def hf(smollm2_hf):
    return smollm2_hf


@pytest.fixture(scope="module")
def ours(smollm2_gguf, tmp_path_factory):
    out = convert(smollm2_gguf, tmp_path_factory.mktemp("smol") / "smollm2.flashlm", dtype="f32", progress=False)
    folder = open_folder(out)
    model = Model(folder, RuntimeConfig(kv_dtype="f32"))      # the exact reference: f32 weights and KV cache
    model.warmup()
    return model, Tokenizer.from_folder(folder.path, folder.manifest)


def _hf_greedy(hf, ids):
    import torch
    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, num_beams=1,
                             repetition_penalty=1.0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_equals_transformers(ours, hf, prompt):
    model, tok = ours
    ids = tok.encode(prompt)
    assert ids == hf[1].encode(prompt)
    expected = _hf_greedy(hf, ids)
    model.reset()
    logits = model.forward(ids)[-1]
    got = []
    for _ in range(N_NEW):
        t = int(np.argmax(logits))
        got.append(t)
        logits = model.forward([t])[-1]
    assert got == expected, (tok.decode(got), hf[1].decode(expected))


def test_prefill_logits_match_transformers(ours, hf):
    import torch
    model, tok = ours
    ids = tok.encode("Hello! My name is Ada and I like to write programs in")
    model.reset()
    got = model.forward(ids, all_logits=True)
    with torch.no_grad():
        ref = hf[0](torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-3


def test_chat_streams_templated_reply(ours, hf):
    """The chat path end to end: template -> ids (as transformers) -> streamed text == decode(ids)."""
    model, tok = ours
    messages = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    ids = tok.encode_chat(messages)
    ref = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    assert ids == list(ref)
    stats = GenerationStats()
    text = "".join(stream_generate(model, tok, ids, SamplingParams(temperature=0), max_tokens=40, stats=stats))
    assert stats.finish_reason == "stop", "an instruct model ends its turn with <|im_end|>"
    expected = _hf_greedy(hf, ids)
    end = expected.index(2) if 2 in expected else len(expected)
    assert text == hf[1].decode(expected[:end])
    assert "4" in text


def test_stop_string_and_kv_prefix_reuse(ours):
    model, tok = ours
    ids = tok.encode("1, 2, 3, 4, 5,")
    stats = GenerationStats()
    text = "".join(stream_generate(model, tok, ids, SamplingParams(temperature=0), max_tokens=30,
                                   stop=[" 8"], stats=stats))
    assert text == " 6, 7,", text
    assert stats.finish_reason == "stop"
    again = GenerationStats()
    follow_up = ids + tok.encode(" 6")       # " 6" was generated, so its K/V are cached too
    list(stream_generate(model, tok, follow_up, SamplingParams(temperature=0), max_tokens=2, stats=again))
    assert (again.cached_tokens, again.prompt_tokens) == (len(follow_up) - 1, 1)
