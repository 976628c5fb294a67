"""`flashlm tune`: search the run settings for a model under a memory limit on a device, with the
cost model (runtime/cost_model.py), and write the winner as a run profile.

The search covers the run mode (dense when it fits, flash, hybrid), flash's layer modes (the
planner's per-layer choice, or every layer sparse), the sliding window (the sizes the calibration
measured), the pinned hot fraction, reader threads and compute threads. For each setting
the planner (runtime/memory.py) decides per-layer modes and cache sizes within the budget, and the
cost model predicts ms/token and peak memory. Not searched (fixed, and said so in the run profile):
the coalescing gap (the cost model merges adjacent rows and rows within a given gap into one read,
but does not price the bytes a gap reads through, so it cannot weigh a gap) and the
selector's keep fraction (fixed when the predictors were calibrated; recalibrate to change it).

A run profile is TOML with a [run] table of RuntimeConfig fields and the device profile it was tuned
for; `--profile run.toml` on run, chat, bench and serve applies it (flags given explicitly win).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10
    import tomli as tomllib

from .config import RuntimeConfig
from .cost_model import CostModel, TokenCost
from .device import DeviceProfile, ProfileError
from .memory import RUNTIME_OVERHEAD, WINDOW_CHOICES, BudgetError, plan_memory

PIN_CHOICES = (0.0, 0.05, 0.1, 0.2)
IO_THREAD_CHOICES = (1, 2, 4, 8, 16)
RUN_FIELDS = ("mode", "budget", "window", "pin", "io", "io_threads", "max_gap_bytes", "layer_io", "threads", "ctx_len")


@dataclass
class Candidate:
    rt: RuntimeConfig
    plan: object                 # MemoryPlan
    cost: TokenCost

    @property
    def ms(self) -> float:
        return 1e3 * self.cost.total_s

    def describe(self) -> str:
        r = self.rt
        parts = [r.mode]
        if r.mode == "flash":
            kinds = {k: self.plan.layer_kinds.count(k) for k in ("sparse", "resident", "stream")}
            parts += [f"window {self.plan.window}", f"pin {r.pin:g}", f"{r.io_threads} readers",
                      "/".join(f"{n} {k}" for k, n in kinds.items() if n)]
        elif r.mode == "hybrid":
            parts += [f"{len(self.plan.resident_layers)} resident layers", f"{r.io_threads} readers"]
        if self.cost.ring_fraction > 1:
            parts.append(f"ring 1/{self.cost.ring_fraction:g}")
        parts.append(f"{r.threads or 'all'} threads")
        return ", ".join(parts)


def predictor_bytes(folder) -> list[int] | None:
    from .modelfile import ModelFileError
    from .predictor import read_calibration
    try:
        return read_calibration(folder).predictor_bytes
    except ModelFileError:
        return None


def evaluate(folder, rt: RuntimeConfig, profile: DeviceProfile, calibration: dict | None,
             sizes: list[int] | None = None, overheads: dict | None = None) -> Candidate:
    """Plan rt with the run's cost model and price the plan with the same object, as the builder
    would (runtime/builder.py); raises BudgetError when it does not fit. `sizes`: the predictors'
    bytes per layer (read from the folder when None)."""
    from .builder import activation_bytes, compute_threads
    from .predictor import Calibration
    costs = CostModel.for_run(folder, rt, profile=profile, **(overheads or {}))   # threads None: the profile's cores
    cal = None
    if rt.mode == "flash":
        sizes = sizes if sizes is not None else predictor_bytes(folder)
        cal = Calibration(sizes, calibration or {}) if sizes is not None else None
    plan = plan_memory(folder, rt, activations=activation_bytes(folder, compute_threads(rt.threads)), costs=costs,
                       calibration=cal)
    notes = []
    if rt.max_gap_bytes:
        notes.append(f"max_gap {rt.max_gap_bytes} B: the merged reads are priced, the gaps' extra bytes are not")
    return Candidate(rt, plan, costs.plan_cost(plan, cal, pin=rt.pin, notes=notes))


def candidates(folder, profile: DeviceProfile, memory_limit: int, calibration: dict | None, *,
               profile_ref: str, ctx_len: int = 2048, overheads: dict | None = None) -> list[Candidate]:
    """Every setting of the search space that fits, best predicted first."""
    budget = memory_limit - RUNTIME_OVERHEAD
    if budget <= 0:
        raise BudgetError(f"memory limit {memory_limit / 2**20:.0f} MiB is below the runtime's own "
                          f"~{RUNTIME_OVERHEAD / 2**20:.0f} MiB (Python, numpy, numba)")
    has_predictors = calibration is not None and bool(calibration.get("layers"))
    windows = [k for k in WINDOW_CHOICES if has_predictors and str(k) in calibration["layers"][0].get("windows", {})]
    threads = sorted({t for t in (1, 2, 4, 8, profile.cores) if t <= profile.cores})
    base = dict(ctx_len=ctx_len, budget=str(budget), profile=profile_ref)
    sizes = predictor_bytes(folder) if has_predictors else None
    settings = [RuntimeConfig(mode="dense", threads=t, **base) for t in threads]
    settings += [RuntimeConfig(mode="hybrid", threads=t, io_threads=n, **base)
                 for t, n in itertools.product(threads, IO_THREAD_CHOICES)]
    if windows:
        # layer_io "auto": the planner's per-layer choice (it minimizes flash time, so with room to
        # spare it keeps layers resident); "sparse": every layer sparse, which computes only the rows
        # each cache holds - cheaper where compute, not flash, is the bottleneck.
        settings += [RuntimeConfig(mode="flash", window=w, pin=p, threads=t, io_threads=n, layer_io=lio, **base)
                     for w, p, t, n, lio in itertools.product(windows, PIN_CHOICES, threads, IO_THREAD_CHOICES,
                                                              ("auto", "sparse"))]
    out = []
    for rt in settings:
        try:
            out.append(evaluate(folder, rt, profile, calibration, sizes, overheads))
        except BudgetError:
            continue
    if not out:
        raise BudgetError(f"nothing fits in {memory_limit / 2**20:.0f} MiB: not even flash mode's fixed parts "
                          "(dense weights, KV cache, buffers); raise --memory-limit or lower --ctx")
    out.sort(key=lambda c: (c.cost.total_s, c.cost.peak_bytes or 0))
    return out


def run_profile_toml(best: Candidate, *, model: str, device: str, memory_limit: int) -> str:
    from .probe import to_toml
    rt = best.rt
    run = {k: getattr(rt, k) for k in RUN_FIELDS if getattr(rt, k) is not None}
    c = best.cost
    data = {"run": run,
            "tuned": {"model": model, "device": device, "memory_limit_bytes": memory_limit,
                      "not_searched": ["max_gap_bytes (the bytes a gap reads through are not priced)",
                                       "keep fraction (fixed by calibration; recalibrate to change it)"]},
            "predicted": {"ms_per_token": round(1e3 * c.total_s, 3), "peak_bytes": int(c.peak_bytes or 0),
                          **{k: round(v, 3) for k, v in c.per_token_ms().items() if k != "total_ms"}}}
    data["run"]["device"] = device
    return to_toml(data, ["Run profile written by `flashlm tune`; use it with --profile on run, chat, bench, serve."])


def load_run_profile(path: str | Path) -> dict | None:
    """The [run] table of a run profile, or None when `path` is not one (a device profile or a name)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{p}: not valid TOML ({e})") from None
    if "run" not in data:
        return None
    run = data["run"]
    if not isinstance(run, dict):
        raise ProfileError(f"{p}: run: expected a table")
    fields = {f.name: f for f in dataclasses.fields(RuntimeConfig)}
    for k, v in run.items():
        if k != "device" and k not in fields:
            raise ProfileError(f"{p}: run.{k}: not a run setting (one of {', '.join(RUN_FIELDS)}, device)")
    if "device" in run and not isinstance(run["device"], str):
        raise ProfileError(f"{p}: run.device: expected the name or path of a device profile")
    return run


def apply_run_profile(rt: RuntimeConfig) -> RuntimeConfig:
    """When rt.profile names a run profile: its settings replace the fields still at their defaults
    (explicit flags win), and rt.profile becomes the device profile it was tuned for."""
    run = load_run_profile(rt.profile) if rt.profile else None
    if run is None:
        return rt
    default = RuntimeConfig()
    changes = {k: v for k, v in run.items() if k != "device" and getattr(rt, k) == getattr(default, k)}
    device = run.get("device")
    if device is not None and not Path(device).is_absolute() and (Path(rt.profile).parent / device).is_file():
        device = str(Path(rt.profile).parent / device)
    return dataclasses.replace(rt, **changes, profile=device)


def measure(folder_path, rt: RuntimeConfig, tokens: int, prompt: int = 8, seed: int = 0,
            text: str | None = None) -> dict:
    """rt measured on this machine: a short prompt, then `tokens` single decode steps (no sampling)
    after one warm-up step, over the tokens of `text` (teacher-forced: what the sliding window sees
    in a real generation) or, without it, random token ids (what a model calibrated on random ids,
    the synthetic ones, was calibrated for). Returns the median ms per step (`ms`) and the decode
    steps' mean split in the cost model's fields (io_wait_ms, io_busy_ms, mem_ms, compute_ms: the
    runtime's own accounting, runtime/critical_path.py) with MiB read per token, so a prediction and
    a measurement compare term by term."""
    import statistics
    import time

    import numpy as np

    from .model import Model
    from .modelfile import open_folder
    folder = open_folder(folder_path)
    need = prompt + tokens + 1
    if text is not None:
        from .tokenizer import Tokenizer
        ids = np.asarray(Tokenizer.from_folder(folder.path, folder.manifest).encode(text)[:need])
        if len(ids) < need:
            raise ValueError(f"the text has {len(ids)} tokens; measuring {tokens} decode steps needs {need}")
    else:
        ids = np.random.default_rng(seed).integers(0, folder.config.vocab_size, need)
    model = Model(folder, rt)
    try:
        model.warmup()
        model.forward(ids[:prompt])
        model.forward(ids[prompt:prompt + 1])
        model.reset_io_stats()
        times = []
        for t in ids[prompt + 1:]:
            t0 = time.perf_counter()
            model.forward([int(t)])
            times.append(time.perf_counter() - t0)
        cp = model.critical_path()
        nbytes, _ = model.ffn_backend.io_counts()
    finally:
        model.close()
    return {"ms": 1e3 * statistics.median(times), "mean_ms": cp.ms, "io_wait_ms": cp.io_wait_ms,
            "io_busy_ms": cp.io_busy_ms, "mem_ms": cp.mem_ms, "compute_ms": cp.compute_ms,
            "mib_read": nbytes / max(1, len(times)) / 2**20}


def measure_ms(folder_path, rt: RuntimeConfig, tokens: int, prompt: int = 8, seed: int = 0,
               text: str | None = None) -> float:
    """Median ms per decode token of rt on this machine (see measure)."""
    return measure(folder_path, rt, tokens, prompt, seed, text)["ms"]
