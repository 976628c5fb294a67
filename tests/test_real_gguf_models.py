"""Real Qwen2.5-Coder-0.5B-Instruct (qwen2) and Gemma 3 270M (gemma3) GGUF files, converted by flashlm, against
transformers loading the same GGUF (`gguf_file=`): tokenizer ids, chat-templated ids, greedy continuations.

The files are large, so they are never downloaded here: they are found in $FLASHLM_MODELS (a folder) or in
the cache of ../shared/models/fetch.py ($FLASHLM_GGUF_DIR or ~/.cache/flashlm/gguf); a missing file skips its
tests saying which file and where it was looked for. Storage is f32, so both sides compute on the same
dequantized weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flashlm.converters.convert import convert
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
N_NEW = 20
MODELS = {
    "qwen2.5-coder-0.5b": dict(file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                               prompts=["def fibonacci(n):", "The capital of France is",
                                        "# Sort a list in Python\n"]),
    "gemma-3-270m": dict(file="gemma-3-270m-q4_k_m.gguf",
                         prompts=["The capital of France is", "Once upon a time, in a small village,",
                                  "def fibonacci(n):"]),
}
TEXTS = ["Hello world", "  leading spaces and trailing  ", "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass",
         "emoji 🙂🚀 and CJK 你好，世界 and accents café naïve", "12345 3.14 and 1,000,000",
         "multiple   spaces\n\n\nand newlines\r\n", "<start_of_turn>user\nhi<end_of_turn>", "<|im_start|>a<|im_end|>", ""]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write hello world in C."}]


def model_dirs() -> list[Path]:
    dirs = [os.environ.get("FLASHLM_MODELS"), os.environ.get("FLASHLM_GGUF_DIR"), Path.home() / ".cache/flashlm/gguf"]
    return [Path(d) for d in dirs if d]


def find_model(file: str) -> Path:
    for d in model_dirs():
        if (d / file).is_file():
            return d / file
    pytest.skip(f"{file} not found in {', '.join(map(str, model_dirs()))} (set FLASHLM_MODELS or run "
                f"../shared/models/fetch.py); not downloaded by tests")


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """(spec, our model, our tokenizer, transformers model, transformers tokenizer) for one real file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = MODELS[request.param]
    path = find_model(spec["file"])
    out = convert(path, tmp_path_factory.mktemp(request.param) / "m.flashlm", dtype="f32", progress=False)
    folder = open_folder(out)
    ours = Model(folder)
    tok = Tokenizer.from_folder(folder.path, folder.manifest)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    yield request.param, spec, ours, tok, hf, hf_tok
    ours.close()


def test_tokenizer_ids_equal(pair):
    name, spec, _, tok, _, hf_tok = pair
    for text in TEXTS + spec["prompts"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), (name, text)
        assert tok.decode(ids) == hf_tok.decode(ids), (name, text)
    if name.startswith("gemma"):    # a base model: its file states add_bos_token, and it needs the BOS
        assert tok.encode("hi")[0] == tok.token_to_id("<bos>") == 2


def test_chat_template_ids_equal(pair):
    name, _, _, tok, _, hf_tok = pair
    if hf_tok.chat_template is None:   # Gemma 3 270M (base) carries no template in its metadata
        assert tok.chat_template is None
        return
    want = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"]) if hasattr(want, "keys") else list(want)
    assert tok.encode_chat(CHAT) == want


def test_greedy_continuations_equal(pair):
    import torch
    name, spec, ours, tok, hf, _ = pair
    for prompt in spec["prompts"]:
        ids = tok.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, num_beams=1,
                               eos_token_id=None)[0, len(ids):].tolist()
        ours.reset()
        logits = ours.forward(ids)[-1]
        got = []
        for _ in range(N_NEW):
            got.append(int(np.argmax(logits)))
            logits = ours.forward([got[-1]])[-1]
        assert got == want, (name, prompt, tok.decode(got), tok.decode(want))
