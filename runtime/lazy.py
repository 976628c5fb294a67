"""A module bound now and imported on first use (the standard library's importlib.util.LazyLoader).

Why: importing numba costs ~65 MiB of resident memory (LLVM and its own modules: a process importing
numpy + numba measured 92 MiB RSS against 26 with numpy alone), and the one-graph onnxruntime decoder
never calls a numba kernel. The modules it shares with the numba path (model, builder, ffn, ort_model)
name the kernel modules through this, so numba loads the first time a kernel is actually looked up.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """sys.modules[name], or a module object whose first attribute access imports it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # a later plain import finds this one and loads it on first use
    loader.exec_module(module)
    return module
