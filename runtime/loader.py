"""`load()`: the one library entry from a model folder to a model ready to generate.

Every caller (the CLI's verbs, bench, perplexity, calibration, the server) goes through here, so a
model is always opened, checked, planned and built the same way:
  open_folder (parse + validate the manifest) -> Model (plan the memory, build the FFN backend)
  -> tokenizer -> kernel warm-up.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from .config import RuntimeConfig
from .memory import MemoryPlan
from .model import Model
from .modelfile import open_folder
from .process_memory import release_freed_heap
from .tokenizer import Tokenizer


class Loaded(NamedTuple):
    model: Model
    tokenizer: Tokenizer
    plan: MemoryPlan        # what is resident and why (also model.plan); print plan.lines()


def load(path=None, runtime: RuntimeConfig | None = None, *, warmup: bool = True, progress: bool = False) -> Loaded:
    """Open the model folder at `path` (None: the embedded default model, converted on first use) and
    build it for `runtime`. Raises a FlashlmError subclass (ModelFileError, BudgetError, ...) for bad
    input or a budget that cannot fit, before anything big is read."""
    t0 = time.perf_counter()
    if path is None:
        from .default_model import default_model_folder
        path = default_model_folder(progress=progress)
    folder = open_folder(Path(path))
    tokenizer = Tokenizer.from_folder(folder.path, folder.manifest)   # small and sha256-checked: fails first
    release_freed_heap()        # what building the tokenizer freed (most of what it allocated) goes back
    model = Model(folder, runtime or RuntimeConfig())
    if warmup:
        model.warmup()
    model.load_seconds = time.perf_counter() - t0
    return Loaded(model, tokenizer, model.plan)
