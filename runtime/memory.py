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
from .errors import FlashlmError
from .kernels import BLAS_BLOCK_BYTES
from .modelfile import ModelFolder
from .predictor import PREDICTOR_FILE

MODES = ("dense", "flash", "naive", "hybrid", "mmap")
KV_DTYPES = {"f16": np.uint16, "f32": np.float32}      # f16 as its bits, like f16 weights
WINDOW_CHOICES = (8, 4, 2, 1)
SCRATCH_BYTES = 4 << 20          # streaming buffer for overflow / whole-layer streaming in flash mode
PREFILL_CHUNK = 128              # tokens per prefill forward (runtime/generate.py)
RUNTIME_OVERHEAD = 160 << 20     # measured: RSS of Python + numpy + numba + loaded kernels + a tiny model: 151 MiB


class BudgetError(ValueError, FlashlmError):
    """A budget that is unreadable or too small for the run mode; says what would fit."""


def parse_size(text: str, total: int) -> int:
    """'60%', '0.6' (fractions of `total`), '512MiB', '1.5GB', '2e9' -> bytes."""
    s = str(text).strip()
    m = re.fullmatch(r"([\d.]+(?:e\d+)?)\s*([kmgt]?i?b?|%)?", s.lower())
    if not m:
        raise BudgetError(f"cannot read budget {text!r}: use 60%, 0.6, 512MiB or 2GB")
    try:
        value, unit = float(m.group(1)), m.group(2) or ""
    except ValueError:
        raise BudgetError(f"cannot read budget {text!r}: use 60%, 0.6, 512MiB or 2GB") from None
    scale = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
             "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
    if unit not in scale and unit != "%":
        raise BudgetError(f"cannot read budget {text!r}: unknown unit {unit!r}")
    if unit == "%":
        value, fraction = value / 100, True
    else:
        fraction = unit == "" and value <= 1.0
    if not 0 < (value if fraction else value * scale[unit]) < 2**60 or (fraction and value > 1.0):
        raise BudgetError(f"budget {text!r} is out of range: use a fraction in (0, 1], a percentage in (0, 100] "
                         "or a size below 1 EiB")
    return int(total * value) if fraction else int(value * scale[unit])


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
    capacities: list[int] = field(default_factory=list)   # flash: neuron-cache rows per layer (0 = no cache)
    resident_layers: list[int] = field(default_factory=list)  # hybrid/flash: layers kept whole in DRAM
    layer_kinds: list[str] = field(default_factory=list)  # flash: "sparse" | "resident" | "stream" per layer
    est_io_ms: float = 0.0                                  # flash: estimated flash time per token
    speeds_source: str = ""

    @property
    def total(self) -> int:
        return self.dense + self.kv_cache + self.activations + self.predictors + self.scratch + self.ffn_resident

    def lines(self) -> list[str]:
        out = [f"memory plan ({self.mode}): {_mib(self.total)} of "
               f"{_mib(self.budget) if self.budget else 'unlimited'} budget; model {_mib(self.model_bytes)}",
               f"  dense weights {_mib(self.dense)}, KV cache {_mib(self.kv_cache)}, activations {_mib(self.activations)}"]
        if self.mode == "flash" and self.layer_kinds:
            caps = [cap for cap in self.capacities if cap]
            kinds = {k: self.layer_kinds.count(k) for k in ("sparse", "resident", "stream")}
            out.append(f"  layers: {kinds['sparse']} sparse (window {self.window}"
                       + (f", caches {min(caps)}..{max(caps)} rows" if caps else "")
                       + f"), {kinds['resident']} resident, {kinds['stream']} streamed; "
                       f"FFN in DRAM {_mib(self.ffn_resident)}, predictors {_mib(self.predictors)}, "
                       f"scratch {_mib(self.scratch)}")
            out.append(f"  estimated flash time {self.est_io_ms:.1f} ms/token (read speeds: {self.speeds_source})")
        elif self.mode in ("hybrid", "naive"):
            out.append(f"  resident FFN layers {len(self.resident_layers)} ({_mib(self.ffn_resident)}), "
                       f"streaming buffers {_mib(self.scratch)}")
        elif self.mode == "mmap":
            out.append(f"  one mapped FFN layer at a time {_mib(self.scratch)}")
        else:
            out.append(f"  FFN resident {_mib(self.ffn_resident)}")
        out.append(f"  + runtime overhead outside the budget (Python, numba): ~{_mib(RUNTIME_OVERHEAD)}")
        return out


def plan_memory(folder: ModelFolder, rt: RuntimeConfig, calibration: dict | None = None) -> MemoryPlan:
    """Decide what is resident for rt.mode within rt.budget; raises BudgetError if it cannot fit."""
    c: ModelConfig = folder.config
    if rt.mode not in MODES:
        raise BudgetError(f"unknown mode {rt.mode!r}; choose one of {MODES}")
    layer_bytes = folder.bundles.layer_bytes
    dense = sum(t.nbytes for t in folder.dense.values())
    model_bytes = folder.model_bytes
    ffn_bytes = model_bytes - dense
    budget = parse_size(rt.budget, model_bytes) if rt.budget is not None else None
    ctx = min(rt.ctx_len, c.max_position)
    # Activations: a prefill chunk's per-token buffers, two logit rows, attention scores, BLAS blocks.
    activations = 4 * (12 * c.d_model * PREFILL_CHUNK + 2 * c.vocab_size + c.n_heads * ctx) + 2 * BLAS_BLOCK_BYTES
    if rt.kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {rt.kv_dtype!r}; choose one of {sorted(KV_DTYPES)}")
    plan = MemoryPlan(rt.mode, budget, model_bytes, dense, activations=activations,
                      kv_cache=2 * c.n_layers * ctx * c.n_kv_heads * c.head_dim * np.dtype(KV_DTYPES[rt.kv_dtype]).itemsize)
    if rt.mode == "dense":
        # A quantized folder runs its FFN layers whole from ffn_matrices (onnxruntime), not the bundles.
        plan.ffn_resident = sum(t.nbytes for t in folder.matrices.values()) if folder.matrices else ffn_bytes
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


def predictor_bytes_per_layer(folder: ModelFolder) -> list[int]:
    from .safetensors_file import read_header
    header, _, _ = read_header(folder.file(PREDICTOR_FILE))
    out = [0] * folder.config.n_layers
    for name, t in header.items():
        if name.startswith("layers.") and ".predictor." in name and not name.endswith(".hot"):
            out[int(name.split(".")[1])] += t["data_offsets"][1] - t["data_offsets"][0]
    return out


def _plan_flash(plan: MemoryPlan, folder: ModelFolder, rt: RuntimeConfig, calibration: dict) -> None:
    """Per layer: keep it resident, run it sparse (predictor + window cache) or stream it whole.

    The choice minimizes the estimated flash time per token within the budget, from the device's
    measured read speeds and the calibrated window statistics: a sparse layer costs its predictor and
    the rows its window held at most, and per token reads the rows the window missed (random reads of
    one bundle each); a streamed layer reads all its rows sequentially; a resident layer costs its
    bytes once. Greedy by time saved per byte, for each window size; the best window wins.
    """
    from .device import load_speeds
    c = folder.config
    stride = folder.bundles.stride_bytes
    if PREDICTOR_FILE not in folder.files:
        raise BudgetError(f"{folder.path}: flash mode needs predictors; run `flashlm calibrate {folder.path}`")
    speeds = load_speeds(rt.profile, rt.io_threads)
    layer_bytes = c.n_ff * stride
    pred = predictor_bytes_per_layer(folder)
    stats = calibration.get("layers") or [{} for _ in range(c.n_layers)]
    n_pin = int(rt.pin * c.n_ff)
    sparse_scratch = max(SCRATCH_BYTES, 64 * stride)   # overflow rows of sparse layers stream through it
    room = None if plan.budget is None else plan.budget - plan.total
    if room is not None and room < 0:
        raise BudgetError(f"budget {_mib(plan.budget)} is too small for flash mode: the fixed parts need "
                          f"{_mib(plan.total)} (dense {_mib(plan.dense)}, KV cache {_mib(plan.kv_cache)}, "
                          f"scratch {_mib(plan.scratch + plan.activations)}); raise --budget or lower --ctx")
    stream_s = speeds.stream_seconds(layer_bytes)
    windows = [rt.window] if rt.window else [k for k in WINDOW_CHOICES if str(k) in stats[0].get("windows", {})] or [1]

    def sparse_option(i: int, k: int):
        w = stats[i].get("windows", {}).get(str(k))
        if w is None:       # no calibration figures for this window: assume it needs the whole layer
            return pred[i] + layer_bytes, 0.0
        need = min(c.n_ff, n_pin + w["max_held"])
        misses = w["miss_fraction"] * stats[i]["predicted_fraction"] * c.n_ff
        return pred[i] + need * stride, misses * speeds.random_seconds(stride)

    best = None
    for k in windows:
        for buffers in (0, 2 * layer_bytes):
            for scratch in (0, sparse_scratch):
                # Streamed layers are read whole into two layer buffers (the next is read while this one
                # computes, as hybrid does), sparse layers need the overflow scratch: a plan pays only
                # for what it uses.
                r = None if room is None else room - buffers - scratch
                if (r is not None and r < 0) or (not scratch and rt.layer_io == "sparse"):
                    continue
                kinds, mem, cost = _greedy(c.n_layers, r, layer_bytes, stream_s,
                                           [sparse_option(i, k) for i in range(c.n_layers)],
                                           rt.layer_io if scratch else "stream")
                if ("stream" in kinds) != bool(buffers) or ("sparse" in kinds) != bool(scratch):
                    continue
                if best is None or cost < best[2] - 1e-9:
                    best = (kinds, mem, cost, k, buffers + scratch)
    if best is None:
        raise BudgetError(f"budget {_mib(plan.budget)} is too small for flash mode: after the fixed parts "
                          f"({_mib(plan.total)}) it cannot hold two FFN layer buffers ({_mib(2 * layer_bytes)}) "
                          f"nor every layer's predictor and cache; raise --budget or lower --ctx")
    kinds, _, cost, window, buffers = best
    plan.scratch += buffers
    plan.window = window
    plan.layer_kinds = kinds
    plan.capacities = [min(c.n_ff, n_pin + stats[i].get("windows", {}).get(str(window), {}).get("max_held", c.n_ff))
                       if kinds[i] == "sparse" else 0 for i in range(c.n_layers)]
    plan.predictors = sum(pred[i] for i in range(c.n_layers) if kinds[i] == "sparse")
    plan.resident_layers = [i for i, kind in enumerate(kinds) if kind == "resident"]
    plan.ffn_resident = sum(plan.capacities) * stride + len(plan.resident_layers) * layer_bytes
    room = None if room is None else room - buffers
    if room is not None and plan.ffn_resident + plan.predictors > room:
        # Forced sparse everywhere (layer_io="sparse") with too little room: shrink every cache alike.
        scale = (room - plan.predictors) / max(1, sum(plan.capacities) * stride)
        if scale <= 0:
            raise BudgetError(f"budget {_mib(plan.budget)} is too small for flash mode with sparse layers: "
                              f"predictors alone need {_mib(plan.predictors)} beyond the fixed parts")
        plan.capacities = [max(n_pin + 1, int(cap * scale)) if cap else 0 for cap in plan.capacities]
        plan.ffn_resident = sum(plan.capacities) * stride
    plan.est_io_ms = 1e3 * cost
    plan.speeds_source = speeds.source


def _greedy(n_layers, room, layer_bytes, stream_s, sparse, layer_io):
    """Start with every layer streamed; upgrade the layer that saves most time per extra byte until
    the room is used. sparse[i] = (bytes, seconds per token) of running layer i sparse."""
    if layer_io == "sparse":
        return ["sparse"] * n_layers, sum(m for m, _ in sparse), sum(t for _, t in sparse)
    kinds = ["stream"] * n_layers
    cost = [stream_s] * n_layers
    mem = [0] * n_layers
    free = float("inf") if room is None else room
    while True:
        choice = None
        for i in range(n_layers):
            options = [("resident", layer_bytes, 0.0)]
            if layer_io == "auto" and kinds[i] == "stream":
                options.append(("sparse", *sparse[i]))
            for kind, m, t in options:
                extra, saved = m - mem[i], cost[i] - t
                if saved > 0 and extra <= free:
                    ratio = saved / max(extra, 1)
                    if choice is None or ratio > choice[0]:
                        choice = (ratio, i, kind, m, t)
        if choice is None:
            return kinds, sum(mem), sum(cost)
        _, i, kind, m, t = choice
        free -= m - mem[i]
        kinds[i], mem[i], cost[i] = kind, m, t


def build_ffn(folder: ModelFolder, rt: RuntimeConfig, plan: MemoryPlan, kernel, biases: list, predictors=None,
              row_crc=None):
    """The FFN backend the plan calls for (see runtime/ffn.py)."""
    from .ffn import MmapFFN, ResidentFFN, SparseFFN, StreamingFFN, read_layer_checked
    from .flash_reader import FlashReader
    from .modelfile import ModelFileError, bundle_layers, read_verified
    from .neuron_cache import NeuronCache
    c, b = folder.config, folder.bundles
    dtype, row_elems = b.dtype, b.stride_items
    path = folder.file(b.file)
    if rt.mode == "dense":
        return ResidentFFN(bundle_layers(folder, read_verified(folder, b.file)), kernel, biases)
    row_crc = row_crc if rt.verify_reads else None
    if rt.mode == "mmap":
        return MmapFFN(path, b.layer_offsets, c.n_ff, row_elems, dtype, kernel, biases, row_crc)
    try:
        reader = FlashReader(path, layer_offsets=b.layer_offsets, stride_bytes=b.stride_bytes, n_rows=c.n_ff,
                             mode=rt.io, threads=rt.io_threads, max_gap_bytes=rt.max_gap_bytes,
                             row_bytes=b.stride_bytes)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open for flash reads ({e.strerror or e})") from None
    all_rows = np.arange(c.n_ff, dtype=np.int32)
    resident = {}
    for i in plan.resident_layers:
        resident[i] = np.empty((c.n_ff, row_elems), dtype)
        read_layer_checked(reader, i, resident[i], row_crc, all_rows)
    if rt.mode in ("naive", "hybrid"):
        reader.reset_stats()
        return StreamingFFN(reader, resident, kernel, biases, c.n_layers, c.n_ff, row_elems, dtype, row_crc)
    streamed = [i for i, kind in enumerate(plan.layer_kinds) if kind == "stream"]
    whole_layers = StreamingFFN(reader, resident, kernel, biases, c.n_layers, c.n_ff, row_elems, dtype, row_crc,
                                streamed=streamed)
    n_pin = int(rt.pin * c.n_ff)
    caches = [NeuronCache(c.n_ff, cap, row_elems, dtype, window=plan.window,
                          pinned=predictors[i].hot[:n_pin] if n_pin else None) if cap else None
              for i, cap in enumerate(plan.capacities)]
    from .device import load_speeds
    sparse_scratch_rows = max(SCRATCH_BYTES // b.stride_bytes, 64) if "sparse" in plan.layer_kinds else 1
    ffn = SparseFFN(reader, predictors, caches, kernel, biases, scratch_rows=sparse_scratch_rows,
                    row_elems=row_elems, dtype=dtype, n_rows=c.n_ff,
                    stride_bytes=b.stride_bytes, speeds=load_speeds(rt.profile, rt.io_threads),
                    whole_layers=whole_layers, layer_io=rt.layer_io, row_crc=row_crc)
    ffn.load_pinned()
    reader.reset_stats()
    return ffn
