"""The memory budget: plan what is resident before loading anything, then build the FFN backend.

Resident, always: dense weights (embeddings, attention, norms), the KV cache for --ctx tokens and
activation scratch. Per mode: predictors + neuron caches + a streaming scratch buffer (flash), whole
FFN layers (hybrid), two layer buffers (naive/hybrid streaming), one mapped layer (mmap), everything
(dense). What the budget cannot hold is refused here, with the numbers, before a byte is loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig, RuntimeConfig
from .modelfile import ModelFolder
from .predictor import PREDICTOR_FILE

MODES = ("dense", "flash", "naive", "hybrid", "mmap")
WINDOW_CHOICES = (8, 4, 2, 1)
SCRATCH_BYTES = 4 << 20          # streaming buffer for overflow / whole-layer streaming in flash mode
RUNTIME_OVERHEAD = 200 << 20     # Python, numpy, numba + compiled kernels, reader threads: not in the budget


class BudgetError(ValueError):
    pass


def parse_size(text: str, total: int) -> int:
    """'60%', '0.6' (fractions of `total`), '512MiB', '1.5GB', '2e9' -> bytes."""
    s = str(text).strip()
    m = re.fullmatch(r"([\d.]+(?:e\d+)?)\s*([kmgt]?i?b?|%)?", s.lower())
    if not m:
        raise ValueError(f"cannot read budget {text!r}: use 60%, 0.6, 512MiB or 2GB")
    value, unit = float(m.group(1)), m.group(2) or ""
    if unit == "%":
        return int(total * value / 100)
    if unit == "" and value <= 1.0:
        return int(total * value)
    scale = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
             "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
    if unit not in scale:
        raise ValueError(f"cannot read budget {text!r}: unknown unit {unit!r}")
    return int(value * scale[unit])


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


@dataclass
class MemoryPlan:
    mode: str
    budget: int | None            # bytes, None = unlimited
    model_bytes: int              # dense + FFN files as stored
    dense: int
    kv_cache: int
    activations: int
    predictors: int = 0
    scratch: int = 0
    ffn_resident: int = 0         # neuron caches (flash) or resident layers (hybrid/dense)
    window: int = 0
    capacities: list[int] = field(default_factory=list)   # flash: rows per layer
    resident_layers: list[int] = field(default_factory=list)  # hybrid: layers kept in DRAM

    @property
    def total(self) -> int:
        return self.dense + self.kv_cache + self.activations + self.predictors + self.scratch + self.ffn_resident

    def lines(self) -> list[str]:
        out = [f"memory plan ({self.mode}): {_mib(self.total)} of "
               f"{_mib(self.budget) if self.budget else 'unlimited'} budget; model {_mib(self.model_bytes)}",
               f"  dense weights {_mib(self.dense)}, KV cache {_mib(self.kv_cache)}, activations {_mib(self.activations)}"]
        if self.mode == "flash" and self.capacities:
            n_ff = max(self.capacities) if self.capacities else 0
            out.append(f"  predictors {_mib(self.predictors)}, neuron caches {_mib(self.ffn_resident)} "
                       f"(window {self.window}, {min(self.capacities)}..{n_ff} rows/layer), scratch {_mib(self.scratch)}")
        elif self.mode in ("hybrid", "naive"):
            out.append(f"  resident FFN layers {len(self.resident_layers)} ({_mib(self.ffn_resident)}), "
                       f"streaming buffers {_mib(self.scratch)}")
        elif self.mode == "mmap":
            out.append(f"  one mapped FFN layer at a time {_mib(self.scratch)}")
        else:
            out.append(f"  FFN resident {_mib(self.ffn_resident)}")
        out.append(f"  + runtime overhead outside the budget (Python, numba): ~{_mib(RUNTIME_OVERHEAD)}")
        return out


def _dense_bytes(folder: ModelFolder) -> int:
    from .safetensors_file import read_header
    header, _, _ = read_header(folder.file("dense.safetensors"))
    return sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())


def plan_memory(folder: ModelFolder, rt: RuntimeConfig, calibration: dict | None = None) -> MemoryPlan:
    """Decide what is resident for rt.mode within rt.budget; raises BudgetError if it cannot fit."""
    c: ModelConfig = folder.config
    if rt.mode not in MODES:
        raise ValueError(f"unknown mode {rt.mode!r}; choose one of {MODES}")
    b = folder.bundles
    layer_bytes = c.n_ff * b["stride_bytes"]
    ffn_bytes = c.n_layers * layer_bytes
    dense = _dense_bytes(folder)
    model_bytes = dense + ffn_bytes
    budget = parse_size(rt.budget, model_bytes) if rt.budget is not None else None
    ctx = min(rt.ctx_len, c.max_position)
    plan = MemoryPlan(rt.mode, budget, model_bytes, dense,
                      kv_cache=2 * c.n_layers * ctx * c.n_kv_heads * c.head_dim * 4,
                      activations=(8 * c.d_model + 2 * c.vocab_size) * 4 * 128 + 128 * ctx * 4 * c.n_heads)
    if rt.mode == "dense":
        plan.ffn_resident = ffn_bytes
    elif rt.mode == "mmap":
        plan.scratch = layer_bytes
    elif rt.mode in ("naive", "hybrid"):
        plan.scratch = 2 * layer_bytes
        if rt.mode == "hybrid" and budget is not None:
            room = budget - plan.total
            n = int(max(0, min(c.n_layers, room // layer_bytes)))
            plan.resident_layers = list(range(n))
            plan.ffn_resident = n * layer_bytes
            if n == c.n_layers:
                plan.scratch = 0
    else:
        _plan_flash(plan, folder, rt, calibration or {})
    if budget is not None and plan.total > budget:
        raise BudgetError(
            f"budget {_mib(budget)} is too small for {rt.mode} mode: it needs {_mib(plan.total)} "
            f"(dense {_mib(plan.dense)} + KV cache {_mib(plan.kv_cache)} at --ctx {ctx} + activations "
            f"{_mib(plan.activations)} + predictors {_mib(plan.predictors)} + buffers {_mib(plan.scratch)} "
            f"+ FFN {_mib(plan.ffn_resident)}); raise --budget or lower --ctx")
    return plan


def _plan_flash(plan: MemoryPlan, folder: ModelFolder, rt: RuntimeConfig, calibration: dict) -> None:
    c = folder.config
    stride = folder.bundles["stride_bytes"]
    pred_info = folder.manifest["files"].get(PREDICTOR_FILE)
    if pred_info is None:
        raise BudgetError(f"{folder.path}: flash mode needs predictors; run `flashlm calibrate {folder.path}`")
    plan.predictors = pred_info["bytes"]
    plan.scratch = max(SCRATCH_BYTES, 64 * stride)
    layers = calibration.get("layers") or [{} for _ in range(c.n_layers)]
    pin = [int(rt.pin * c.n_ff) for _ in range(c.n_layers)]

    def wanted(k: int) -> list[int]:
        # Rows a window of k tokens needed at most during calibration (+ pinned), per layer.
        return [min(c.n_ff, pin[i] + int(layers[i].get("windows", {}).get(str(k), {}).get("max_held", c.n_ff)))
                for i in range(c.n_layers)]

    room = None if plan.budget is None else plan.budget - plan.total
    if room is not None and room < c.n_layers * max(1, max(pin)) * stride:
        raise BudgetError(f"budget {_mib(plan.budget)} is too small for flash mode: the fixed parts need "
                          f"{_mib(plan.total)} (dense {_mib(plan.dense)}, KV cache {_mib(plan.kv_cache)}, predictors "
                          f"{_mib(plan.predictors)}, scratch {_mib(plan.scratch + plan.activations)}), leaving {_mib(max(room, 0))} for neuron caches; "
                          f"raise --budget or lower --ctx")
    if rt.window:
        window = rt.window
    else:
        window = next((k for k in WINDOW_CHOICES if room is None or sum(wanted(k)) * stride <= room), 1)
    want = wanted(window) if str(window) in layers[0].get("windows", {}) else [c.n_ff] * c.n_layers
    if room is not None and sum(want) * stride > room:
        scale = room / (sum(want) * stride)   # too little room for the window: shrink all caches alike
        want = [max(pin[i] + 1, int(w * scale)) for i, w in enumerate(want)]
    plan.window = window
    plan.capacities = want
    plan.ffn_resident = sum(want) * stride


def build_ffn(folder: ModelFolder, rt: RuntimeConfig, plan: MemoryPlan, kernel, biases: list, predictors=None):
    """The FFN backend the plan calls for (see runtime/ffn.py)."""
    from .ffn import MmapFFN, ResidentFFN, SparseFFN, StreamingFFN
    from .flash_reader import FlashReader
    from .modelfile import read_verified, tensors_from_buffer
    from .neuron_cache import NeuronCache
    c, b = folder.config, folder.bundles
    dtype = np.uint16 if b["dtype"] == "F16" else np.float32
    row_elems = b["stride_bytes"] // np.dtype(dtype).itemsize
    path = folder.file(b["file"])
    if rt.mode == "dense":
        ffn = tensors_from_buffer(path, read_verified(folder, b["file"]))
        return ResidentFFN([ffn[f"layers.{i}.ffn.bundles"] for i in range(c.n_layers)], kernel, biases)
    if rt.mode == "mmap":
        return MmapFFN(path, b["layer_offsets"], c.n_ff, row_elems, dtype, kernel, biases)
    reader = FlashReader(path, layer_offsets=b["layer_offsets"], stride_bytes=b["stride_bytes"], n_rows=c.n_ff,
                         mode=rt.io, threads=rt.io_threads, max_gap_bytes=rt.max_gap_bytes,
                         row_bytes=b["stride_bytes"])
    if rt.mode in ("naive", "hybrid"):
        resident = {}
        for i in plan.resident_layers:
            rows = np.empty((c.n_ff, row_elems), dtype)
            reader.read_layer(i, rows)
            resident[i] = rows
        reader.reset_stats()
        return StreamingFFN(reader, resident, kernel, biases, c.n_layers, c.n_ff, row_elems, dtype)
    n_pin = int(rt.pin * c.n_ff)
    caches = [NeuronCache(c.n_ff, cap, row_elems, dtype, window=plan.window,
                          pinned=predictors[i].hot[:n_pin] if n_pin else None)
              for i, cap in enumerate(plan.capacities)]
    ffn = SparseFFN(reader, predictors, caches, kernel, biases, scratch_rows=plan.scratch // b["stride_bytes"],
                    row_elems=row_elems, dtype=dtype, n_rows=c.n_ff, row_bytes=b["row_bytes"],
                    stride_bytes=b["stride_bytes"], layer_io=rt.layer_io)
    ffn.load_pinned()
    reader.reset_stats()
    return ffn
