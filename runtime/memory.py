"""The memory plan: what is resident, decided before anything big is read. Pure: no file I/O.

Resident, always: dense weights (attention, norms, lm_head; the token embeddings unless their rows are
read from the file per token, see `embeddings_from_file`), the KV cache for --ctx tokens and the run
state (activation buffers, sized once). Under a whole-process memory limit the runtime itself (its RSS
measured just before planning: Python, numpy, numba, onnxruntime, tokenizer) comes off the limit first;
the budget the rules place FFN rows in is what is left (or --budget, if smaller). Per layer, its FFN rows are RESIDENT (in DRAM for the
whole run), SPARSE (predictor + sliding-window neuron cache, missing rows read per token), STREAM
(read whole from flash each time the layer runs, through two buffers) or MAPPED (used from a memory
map; page faults read them). The run mode is a rule choosing those placements (MODES below); what
the budget cannot hold is refused here, with the numbers, before a byte is loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable

from .config import ModelConfig, RuntimeConfig, dense_engine, kv_storage
from .errors import FlashlmError
from .modelfile import ModelFolder

if TYPE_CHECKING:        # the cost model prices plans (it imports this module); the planner only asks it
    from .cost_model import CostModel

KV_DTYPES = {"f16": "uint16", "f32": "float32"}     # KV cache storage: f16 as its bits, like f16 weights
KV_ITEM_BYTES = {"f16": 2, "f32": 4}
WINDOW_CHOICES = (8, 4, 2, 1)
SCRATCH_BYTES = 4 << 20          # the sparse layers' streaming buffers (overflow, per-token fallback), both halves
PREFILL_CHUNK = 128              # tokens per forward chunk: bounds the run state for long prompts
RUNTIME_OVERHEAD = 160 << 20     # measured: RSS of Python + numpy + numba + loaded kernels + a tiny model: 151 MiB
# What the process adds after the planner's RSS measurement besides what the plan counts: the numba
# kernels' machine code loaded from their cache at warm-up, thread stacks, onnxruntime's per-session
# state. Measured (tools/runtime_cost.py): warm-up +38 MiB on SmolLM2 f16 (numba only).
LATE_RUNTIME_BYTES = 40 << 20


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


class Placement(str, Enum):
    RESIDENT = "resident"
    SPARSE = "sparse"
    STREAM = "stream"
    MAPPED = "mapped"


@dataclass(frozen=True)
class LayerPlan:
    placement: Placement
    cache_rows: int = 0          # SPARSE: neuron-cache capacity (rows)
    window: int = 0              # SPARSE: this layer's sliding window (tokens); 0: the plan's


@dataclass(frozen=True)
class Calibration:
    """What the planner needs from predictor.safetensors (read by the builder, not here)."""
    predictor_bytes: list[int]   # per layer
    report: dict                 # converters/calibrate.py's report: per layer window statistics


@dataclass
class MemoryPlan:
    mode: str
    budget: int | None            # bytes, None = unlimited
    model_bytes: int              # dense + FFN files as stored
    dense: int
    kv_cache: int
    activations: int              # the run state and kernel scratch, as allocated
    layers: list[LayerPlan] = field(default_factory=list)   # where each layer's FFN rows live
    predictors: int = 0
    predictor_layers: list[int] = field(default_factory=list)   # layers whose predictor is loaded (and counted):
    #                               the sparse ones, and resident ones that skip rows by a compute threshold
    scratch: int = 0              # streaming buffers (both halves) and the mapped layer
    ffn_resident: int = 0         # neuron caches + resident layers
    window: int = 0               # sparse layers: sliding window (tokens); the largest where layers differ
    pin_rows: int = 0             # sparse layers: hottest neurons pinned per layer
    stream_buffer_rows: int = 0   # rows per buffer of the whole-layer streamer (0: nothing streams whole)
    sparse_buffer_rows: int = 0   # rows per buffer of the sparse layers' streamer (overflow, fallback)
    est_io_ms: float = 0.0        # flash: estimated flash time per token
    speeds_source: str = ""
    memory_limit: int | None = None   # the whole process (bytes), None: no whole-process limit
    runtime: int = 0              # the runtime itself: RSS measured before planning + LATE_RUNTIME_BYTES
    embeddings_from_file: bool = False   # token embedding rows read from dense.safetensors per token

    @property
    def run_mode(self) -> "RunMode":
        return MODES[self.mode]

    @property
    def total(self) -> int:
        return self.dense + self.kv_cache + self.activations + self.predictors + self.scratch + self.ffn_resident

    @property
    def process_total(self) -> int:
        """What the whole process is planned to hold: the runtime plus everything the plan places."""
        return self.runtime + self.total

    def count(self, placement: Placement) -> int:
        return sum(p.placement == placement for p in self.layers)

    def layers_placed(self, placement: Placement) -> list[int]:
        return [i for i, p in enumerate(self.layers) if p.placement == placement]

    @property
    def layer_kinds(self) -> list[str]:
        return [p.placement.value for p in self.layers]

    @property
    def capacities(self) -> list[int]:
        return [p.cache_rows for p in self.layers]

    def window_of(self, layer: int) -> int:
        """The sliding window of a sparse layer (its own where the plan mixes windows)."""
        return self.layers[layer].window or self.window

    @property
    def resident_layers(self) -> list[int]:
        return self.layers_placed(Placement.RESIDENT)

    def lines(self) -> list[str]:
        out = [f"memory plan ({self.mode}): {_mib(self.total)} of "
               f"{_mib(self.budget) if self.budget else 'unlimited'} budget; model {_mib(self.model_bytes)}",
               f"  dense weights {_mib(self.dense)}, KV cache {_mib(self.kv_cache)}, activations {_mib(self.activations)}"]
        n_sparse, n_res, n_stream = (self.count(p) for p in (Placement.SPARSE, Placement.RESIDENT, Placement.STREAM))
        if self.run_mode.needs_predictors:
            caps = [p.cache_rows for p in self.layers if p.cache_rows]
            wins = sorted({self.window_of(i) for i in self.layers_placed(Placement.SPARSE)}, reverse=True)
            window = (f"window {self.window}" if len(wins) <= 1 else "windows " + ", ".join(
                f"{w} ({sum(self.window_of(i) == w for i in self.layers_placed(Placement.SPARSE))} layers)" for w in wins))
            out.append(f"  layers: {n_sparse} sparse ({window}"
                       + (f", caches {min(caps)}..{max(caps)} rows" if caps else "")
                       + f"), {n_res} resident, {n_stream} streamed; "
                       f"FFN in DRAM {_mib(self.ffn_resident)}, predictors {_mib(self.predictors)}, "
                       f"scratch {_mib(self.scratch)}")
            out.append(f"  estimated flash time {self.est_io_ms:.1f} ms/token (read speeds: {self.speeds_source})")
        elif self.count(Placement.MAPPED):
            out.append(f"  one mapped FFN layer at a time {_mib(self.scratch)}")
        elif self.run_mode.reads_flash:
            out.append(f"  resident FFN layers {n_res} ({_mib(self.ffn_resident)}), "
                       f"streaming buffers {_mib(self.scratch)} ({self.stream_buffer_rows} rows each)")
        else:
            out.append(f"  FFN resident {_mib(self.ffn_resident)}")
        if self.embeddings_from_file:
            out.append("  token embeddings: one row read from dense.safetensors per token (not resident)")
        if self.memory_limit is not None:
            out.append(f"  whole process {_mib(self.process_total)} of the {_mib(self.memory_limit)} memory limit: "
                       f"runtime {_mib(self.runtime)} (RSS before loading + {_mib(LATE_RUNTIME_BYTES)} for kernels "
                       f"and threads) + the plan above")
        else:
            out.append(f"  + runtime overhead outside the budget (Python, numba): ~{_mib(RUNTIME_OVERHEAD)}")
        return out


@dataclass
class _Inputs:
    config: ModelConfig
    folder: ModelFolder
    rt: RuntimeConfig
    costs: CostModel | None
    calibration: Calibration | None


# --- the run modes: each a rule that places every layer's FFN rows ---------------------------------------
def _all(plan: MemoryPlan, n: int, placement: Placement) -> None:
    plan.layers = [LayerPlan(placement) for _ in range(n)]


def _rule_dense(plan: MemoryPlan, x: _Inputs) -> None:
    _all(plan, x.config.n_layers, Placement.RESIDENT)
    # A quantized folder runs its FFN layers whole from ffn_matrices (onnxruntime), not the bundles.
    matrices = x.folder.matrices
    plan.ffn_resident = (sum(t.nbytes for t in matrices.values()) if matrices
                         else x.config.n_layers * x.folder.bundles.layer_bytes)


def _rule_mmap(plan: MemoryPlan, x: _Inputs) -> None:
    _all(plan, x.config.n_layers, Placement.MAPPED)
    plan.scratch = x.folder.bundles.layer_bytes


MIN_STREAM_FRACTION = 16        # streaming buffers shrink to at most 1/16 of a layer each (still MiB-sized reads)


def whole_layer_bytes(folder: ModelFolder) -> tuple[int, int]:
    """(bytes per row, per layer) of a layer read whole: from the packed copy when the folder has one."""
    stride = folder.packed.row_bytes if folder.packed is not None else folder.bundles.stride_bytes
    return stride, stride * folder.config.n_ff


def stream_ring_bytes(folder: ModelFolder, rows: int) -> int:
    """What the whole-layer streamer's ring holds for buffers of 2 x `rows` rows (runtime/layer_stream.py)."""
    from .layer_stream import ring_shape, unit_rows_of
    stride, _ = whole_layer_bytes(folder)
    unit = unit_rows_of(stride, folder.packed is not None, folder.bundles.row_bytes)
    _, n_slots, slot = ring_shape(stride, unit, folder.config.n_ff, 2 * rows * stride)
    return n_slots * slot


def stream_ring_rows(n_ff: int) -> list[int]:
    """Rows per buffer the whole-layer streamer's ring may be planned with, largest first: a whole layer,
    then halves down to 1/MIN_STREAM_FRACTION of it."""
    choices = [n_ff]
    while choices[-1] > -(-n_ff // MIN_STREAM_FRACTION):
        choices.append(-(-choices[-1] // 2))
    return choices


def _rule_naive(plan: MemoryPlan, x: _Inputs) -> None:
    """Every layer streamed through buffers of two whole layers (a ring of chunks the readers keep
    filling, runtime/layer_stream.py), or, where the budget is short of that, of the largest fraction
    1/2, 1/4 .. 1/16 of that which fits."""
    _all(plan, x.config.n_layers, Placement.STREAM)
    choices = stream_ring_rows(x.config.n_ff)
    rows = choices[0]
    if plan.budget is not None:
        room = plan.budget - plan.total
        rows = next((r for r in choices if stream_ring_bytes(x.folder, r) <= room), choices[-1])
    plan.scratch = stream_ring_bytes(x.folder, rows)
    plan.stream_buffer_rows = rows


def spread(n: int, n_layers: int) -> set[int]:
    """n layers spaced evenly through the model: between two resident layers the readers of the streamed
    ones keep reading ahead, so the ring never has to absorb a long run of resident layers."""
    return {int((k + 0.5) * n_layers / n) for k in range(n)} if n else set()


def _rule_hybrid(plan: MemoryPlan, x: _Inputs) -> None:
    """As many layers resident as fit beside the streaming buffers, spaced evenly; the rest stream."""
    c, (_, layer_bytes) = x.config, whole_layer_bytes(x.folder)
    _rule_naive(plan, x)
    if plan.budget is None:
        return
    n = int(max(0, min(c.n_layers, (plan.budget - plan.total) // layer_bytes)))
    keep = spread(n, c.n_layers)
    plan.layers = [LayerPlan(Placement.RESIDENT if i in keep else Placement.STREAM) for i in range(c.n_layers)]
    plan.ffn_resident = n * layer_bytes
    if n == c.n_layers:
        plan.scratch, plan.stream_buffer_rows = 0, 0


def _rule_flash(plan: MemoryPlan, x: _Inputs) -> None:
    """Per layer: keep it resident, run it sparse (predictor + window cache) or stream it whole.

    The choice minimizes the estimated flash time per token within the budget, from the cost model
    (the device's measured read speeds) and the calibrated window statistics: a sparse layer costs its
    predictor and the rows its window held at most, and per token reads the rows the window missed
    (random reads of one bundle each); a streamed layer reads all its rows sequentially; a resident
    layer costs its bytes once. Greedy by time saved per byte, for each window size; the best window wins.
    """
    c, rt, costs, b = x.config, x.rt, x.costs, x.folder.bundles
    if x.calibration is None:
        raise BudgetError(f"{x.folder.path}: flash mode needs predictors; run `flashlm calibrate {x.folder.path}`")
    # Sparse layers' caches hold rows without the block padding (BundleLayout.cache_row_bytes); layers used whole (resident, streamed) come
    # from the packed copy where the folder has one (builder.build_ffn), so they are counted packed.
    stride, sparse_layer_bytes = b.stride_bytes, b.layer_bytes
    cache_row = b.cache_row_bytes                # a cached row: its parts, without the file's block padding
    _, layer_bytes = whole_layer_bytes(x.folder)
    pred = x.calibration.predictor_bytes
    stats = x.calibration.report.get("layers") or [{} for _ in range(c.n_layers)]
    # A resident layer may keep its predictor, where it has a compute threshold: a decode token then
    # computes only the rows above it (runtime/ffn.py), not all n_ff (the q4 synthetic model at 50%: its 3
    # resident layers were ~60% of the FFN kernels' rows). The placement is planned with those predictors
    # counted and without; the first wins unless the flash time it adds exceeds the compute it saves.
    resident_pred = [pred[i] if stats[i].get("compute_threshold") is not None else 0 for i in range(c.n_layers)]
    resident_variants = ([([layer_bytes + p for p in resident_pred], True)] if any(resident_pred) else []) + \
        [([layer_bytes] * c.n_layers, False)]          # (without any threshold the two would be one plan)
    n_pin = int(rt.pin * c.n_ff)
    # Two buffers of >= 64 rows for the sparse layers' overflow and fallback streams; more than two
    # layers' worth of rows would never fill.
    sparse_scratch = min(max(SCRATCH_BYTES, 128 * stride), 2 * sparse_layer_bytes)
    # The streamed layers' ring, as naive sizes it: two whole layers, or only where no plan fits beside
    # that, the largest fraction 1/2 .. 1/16 that does. A smaller ring streams slower (measured on
    # Qwen2.5-1.5B at 700 MiB: a quarter ring and two more resident layers read 421 MiB per token
    # instead of 465 and decoded 1.05 instead of 1.91 tok/s); the cost model prices a plan's ring size from
    # the probe's ring figures (CostModel.stream_s), the greedy below at the full ring's rate.
    ring_rows = stream_ring_rows(c.n_ff)
    room = None if plan.budget is None else plan.budget - plan.total
    if room is not None and room < 0:
        raise BudgetError(f"budget {_mib(plan.budget)} is too small for flash mode: the fixed parts need "
                          f"{_mib(plan.total)} (dense {_mib(plan.dense)}, KV cache {_mib(plan.kv_cache)}, "
                          f"scratch {_mib(plan.scratch + plan.activations)}); raise --budget or lower --ctx")
    windows = [rt.window] if rt.window else [k for k in WINDOW_CHOICES if str(k) in stats[0].get("windows", {})] or [1]
    # One window for every sparse layer, each choice in turn; then (unless the window is forced or every
    # layer must be sparse) a plan whose layers may each take any of them: where the budget is just short
    # of every layer's cache at the larger window, some layers take it and the rest the smaller one
    # (measured on the 7B-class model in q4 at 50%: window 8 for all needs 271 MiB of caches, 259 are left).
    window_sets = [(k,) for k in windows] + ([tuple(windows)] if len(windows) > 1 and rt.layer_io != "sparse" else [])

    def sparse_option(i: int, k: int):
        w = stats[i].get("windows", {}).get(str(k))
        if w is None:       # no calibration figures for this window: assume it needs the whole layer
            return pred[i] + c.n_ff * cache_row, 0.0, k
        need = min(c.n_ff, n_pin + w["max_held"])
        return pred[i] + need * cache_row, costs.rows_seconds(costs.missed_rows(stats[i], k, n_pin)), k

    best = None
    for stream_rows in ring_rows:
        if best is not None:
            break
        for ks, buffers in ((ks, b) for ks in window_sets for b in (0, stream_ring_bytes(x.folder, stream_rows))):
            for scratch in (0, sparse_scratch):
                # Streamed layers are read whole into two layer buffers (the next is read while this one
                # computes), sparse layers need their streaming buffers: a plan pays only for what it uses.
                r = None if room is None else room - buffers - scratch
                if (r is not None and r < 0) or (not scratch and rt.layer_io == "sparse"):
                    continue
                # Resident layers with their predictors first (kept on a tie of flash time), then without
                for resident_bytes, with_pred in resident_variants:
                    kinds, wins, mem, cost = _greedy(c.n_layers, r, resident_bytes, costs.layer_stream_s,
                                                     [[sparse_option(i, k) for k in ks] for i in range(c.n_layers)],
                                                     rt.layer_io if scratch else "stream")
                    if ("stream" in kinds) != bool(buffers) or ("sparse" in kinds) != bool(scratch):
                        continue
                    # what the predictors save: the rows of their resident layers a token no longer computes
                    saved = sum(costs.rows_compute_s(c.n_ff * (1.0 - stats[i].get("compute_fraction", 1.0)))
                                for i in range(c.n_layers) if with_pred and kinds[i] == "resident" and resident_pred[i])
                    if best is None or cost - saved < best[-1] - 1e-9:
                        best = (kinds, mem, cost, wins, buffers, scratch, stream_rows if buffers else 0, max(ks),
                                with_pred, cost - saved)
    if best is None:
        raise BudgetError(f"budget {_mib(plan.budget)} is too small for flash mode: after the fixed parts "
                          f"({_mib(plan.total)}) it cannot hold the streaming buffers "
                          f"({_mib(stream_ring_bytes(x.folder, ring_rows[-1]))}) "
                          f"nor every layer's predictor and cache; raise --budget or lower --ctx")
    kinds, _, cost, wins, buffers, scratch, stream_rows, window, with_pred, _ = best
    # Resident and streamed layers cost the same wherever they sit, so the greedy's choice among them is
    # by index; space the resident ones evenly among the others, as hybrid does (`spread`), so the
    # readers of the streamed layers keep reading ahead while a resident layer computes.
    whole = [i for i, kind in enumerate(kinds) if kind != "sparse"]
    keep = {whole[j] for j in spread(kinds.count("resident"), len(whole))}
    kinds = [kind if kind == "sparse" else "resident" if i in keep else "stream" for i, kind in enumerate(kinds)]
    plan.scratch += buffers + scratch
    plan.stream_buffer_rows = stream_rows
    plan.sparse_buffer_rows = scratch // 2 // stride
    sparse_wins = {w for w, kind in zip(wins, kinds) if kind == "sparse"}
    plan.window, plan.pin_rows = max(sparse_wins) if sparse_wins else window, n_pin
    mixed = len(sparse_wins) > 1
    caps = [min(c.n_ff, n_pin + stats[i].get("windows", {}).get(str(wins[i]), {}).get("max_held", c.n_ff))
            if kinds[i] == "sparse" else 0 for i in range(c.n_layers)]
    plan.predictor_layers = [i for i in range(c.n_layers) if kinds[i] == "sparse"]
    plan.predictors = sum(pred[i] for i in plan.predictor_layers)
    n_resident = kinds.count("resident")
    plan.ffn_resident = sum(caps) * cache_row + n_resident * layer_bytes
    room = None if room is None else room - buffers - scratch
    # Resident layers' predictors: all where the placement counted them, else those the room left holds.
    left = None if room is None else room - plan.ffn_resident - plan.predictors
    for i in range(c.n_layers):
        if kinds[i] == "resident" and resident_pred[i] and (with_pred or left is None or pred[i] <= left):
            plan.predictor_layers.append(i)
            plan.predictors += pred[i]
            left = None if left is None else left - pred[i]
    plan.predictor_layers.sort()
    if room is not None and plan.ffn_resident + plan.predictors > room:
        # Forced sparse everywhere (layer_io="sparse") with too little room: shrink every cache alike.
        share = (room - plan.predictors) / max(1, sum(caps) * cache_row)
        if share <= 0:
            raise BudgetError(f"budget {_mib(plan.budget)} is too small for flash mode with sparse layers: "
                              f"predictors alone need {_mib(plan.predictors)} beyond the fixed parts")
        caps = [max(n_pin + 1, int(cap * share)) if cap else 0 for cap in caps]
        plan.ffn_resident = sum(caps) * cache_row
    plan.layers = [LayerPlan(Placement(kind), cap, w if mixed and kind == "sparse" else 0)
                   for kind, cap, w in zip(kinds, caps, wins)]
    plan.est_io_ms = 1e3 * cost
    plan.speeds_source = costs.source


def _greedy(n_layers, room, resident_bytes, stream_s, sparse, layer_io):
    """Start with every layer streamed; upgrade the layer that saves most time per extra byte until
    the room is used. resident_bytes[i]: layer i kept resident (its rows, with its predictor where the
    plan counts one); sparse[i] = [(bytes, seconds per token, window), ...]: running layer i sparse at each
    window the plan may give it (a sparse layer may move up to a larger window, or to resident, later).
    Returns (kinds, windows (0 where not sparse), bytes, seconds)."""
    if layer_io == "sparse":         # every layer sparse, at the (one) window
        first = [options[0] for options in sparse]
        return ["sparse"] * n_layers, [w for _, _, w in first], sum(m for m, _, _ in first), sum(t for _, t, _ in first)
    kinds = ["stream"] * n_layers
    wins = [0] * n_layers
    cost = [stream_s] * n_layers
    mem = [0] * n_layers
    free = float("inf") if room is None else room
    while True:
        choice = None
        for i in range(n_layers):
            options = [("resident", resident_bytes[i], 0.0, 0)]
            if layer_io == "auto" and kinds[i] != "resident":
                options += [("sparse", *o) for o in sparse[i]]
            for kind, m, t, w in options:
                extra, saved = m - mem[i], cost[i] - t
                if saved > 0 and extra <= free:
                    ratio = saved / max(extra, 1)
                    if choice is None or ratio > choice[0]:
                        choice = (ratio, i, kind, m, t, w)
        if choice is None:
            return kinds, wins, sum(mem), sum(cost)
        _, i, kind, m, t, w = choice
        free -= m - mem[i]
        kinds[i], mem[i], cost[i], wins[i] = kind, m, t, w


@dataclass(frozen=True)
class RunMode:
    name: str
    description: str
    rule: Callable[[MemoryPlan, _Inputs], None]   # places every layer's FFN rows
    rows_from: str                # "file": the FFN file read whole at load, sha256-checked;
    #                               "reader": flash reads (CRC-32 per row); "mmap": a memory map
    needs_predictors: bool = False

    @property
    def reads_flash(self) -> bool:
        """FFN rows come from flash while generating (I/O figures mean something)."""
        return self.rows_from != "file"


MODES: dict[str, RunMode] = {m.name: m for m in (
    RunMode("dense", "every FFN row in DRAM (the file read whole at load)", _rule_dense, "file"),
    RunMode("flash", "per layer resident, sparse (predicted rows, window cache) or streamed, the cheapest "
            "flash time the budget allows", _rule_flash, "reader", needs_predictors=True),
    RunMode("naive", "every FFN layer read whole from flash each token (read ahead through a ring of buffers)",
            _rule_naive, "reader"),
    RunMode("hybrid", "as many FFN layers resident as the budget holds (spaced evenly), the rest streamed",
            _rule_hybrid, "reader"),
    RunMode("mmap", "FFN rows used from a memory map, pages dropped after each layer", _rule_mmap, "mmap"),
)}


def _onnxruntime_usable() -> bool:
    from .engines import onnxruntime_status
    return onnxruntime_status().usable


def embeddings_from_file(folder: ModelFolder, rt: RuntimeConfig) -> bool:
    """Read token embedding rows from the file per token instead of keeping the matrix resident?

    Possible unless the matrix is also the lm_head numba runs (tied: resident anyway); a quantized tied
    matrix run by onnxruntime lives in its lm_head session, so the lookup's copy can go. Under
    auto, done whenever memory is constrained (a budget or a memory limit): one row of d_model elements
    per token is a single small read, against a matrix that is a fifth of a small model."""
    c = folder.config
    quantized = any(t.storage is not None and t.storage.block_elems > 1 for t in folder.dense.values())
    # Where onnxruntime cannot run (the builder's numba fallback) the tied matrix is the widened lm_head,
    # resident anyway: its rows come from that copy, as in an unconstrained run (reading them from the
    # file decoded them exactly, 1e-2 off the f16-widened run's logits on the tiny q8_0 model).
    possible = not c.tied_embeddings or (quantized and dense_engine(rt) == "onnxruntime"
                                         and _onnxruntime_usable())
    if rt.embeddings == "auto":
        return possible and (rt.budget is not None or rt.memory_limit is not None)
    return possible and rt.embeddings == "flash"


def plan_memory(folder: ModelFolder, rt: RuntimeConfig, *, activations: int, costs: CostModel | None = None,
                calibration: Calibration | None = None, runtime_bytes: int = 0,
                ram_bytes: int | None = None) -> MemoryPlan:
    """Place every layer's FFN rows for rt.mode within rt.budget and rt.memory_limit; raises BudgetError
    if it cannot fit.

    `activations` is what the run state and kernel scratch allocate (runtime/runstate.py), `costs` the
    flash cost model (needed by flash), `calibration` the predictors' sizes and window statistics,
    `runtime_bytes` the process's RSS measured just before planning (the runtime itself: it counts
    against rt.memory_limit), `ram_bytes` what a percentage memory limit is a share of."""
    c: ModelConfig = folder.config
    mode = MODES.get(rt.mode)
    if mode is None:
        raise BudgetError(f"unknown mode {rt.mode!r}; choose one of {list(MODES)}")
    from_file = embeddings_from_file(folder, rt)
    emb = folder.dense["tok_embeddings"].nbytes
    quantized = any(t.storage is not None and t.storage.block_elems > 1 for t in folder.dense.values())
    dense = sum(t.nbytes for t in folder.dense.values())
    if from_file and not c.tied_embeddings:
        dense -= emb                   # never resident
    elif c.tied_embeddings and quantized and not from_file and dense_engine(rt) == "onnxruntime":
        dense += emb                   # the lookup's copy beside onnxruntime's lm_head copy
    budget = parse_size(rt.budget, folder.model_bytes) if rt.budget is not None else None
    limit = runtime = None
    if rt.memory_limit is not None:
        limit = parse_size(rt.memory_limit, ram_bytes or folder.model_bytes)
        runtime = runtime_bytes + LATE_RUNTIME_BYTES
        room = limit - runtime
        if room <= 0:
            raise BudgetError(f"memory limit {_mib(limit)} does not fit the runtime itself: {_mib(runtime)} "
                              f"(RSS of Python, numpy, numba, onnxruntime and the tokenizer before loading, "
                              f"+ {_mib(LATE_RUNTIME_BYTES)} for kernels and threads)")
        budget = room if budget is None else min(budget, room)
    ctx = min(rt.ctx_len, c.max_position)
    # The one-graph decoder (f32 KV under kv_dtype auto) needs quantized weights in onnxruntime and every
    # FFN resident; counted as f32 wherever it may run (the model may still fall back to f16: an upper bound).
    from .ort_model import OrtDecoder       # (no onnxruntime import: only its graph-choice rule)
    one_graph = quantized and dense_engine(rt) == "onnxruntime" and rt.mode == "dense" and \
        OrtDecoder.wanted(c, rt.ort_graph)
    kv_bytes = KV_ITEM_BYTES[kv_storage(rt, one_graph)]
    plan = MemoryPlan(rt.mode, budget, folder.model_bytes, dense,
                      kv_cache=2 * c.n_layers * ctx * c.n_kv_heads * c.head_dim * kv_bytes,
                      activations=activations, memory_limit=limit, runtime=runtime or 0,
                      embeddings_from_file=from_file)
    mode.rule(plan, _Inputs(c, folder, rt, costs, calibration))
    if budget is not None and plan.total > budget:
        parts = (f"dense {_mib(plan.dense)} + KV cache {_mib(plan.kv_cache)} at --ctx {ctx} + activations "
                 f"{_mib(plan.activations)} + predictors {_mib(plan.predictors)} + buffers {_mib(plan.scratch)} "
                 f"+ FFN {_mib(plan.ffn_resident)}")
        if limit is not None and budget == limit - plan.runtime:
            raise BudgetError(
                f"memory limit {_mib(limit)} is too small for {rt.mode} mode: it needs {_mib(plan.process_total)} "
                f"(runtime {_mib(plan.runtime)} + {parts}); raise --memory-limit, lower --ctx or use another --mode")
        raise BudgetError(f"budget {_mib(budget)} is too small for {rt.mode} mode: it needs {_mib(plan.total)} "
                          f"({parts}); raise --budget or lower --ctx")
    return plan
