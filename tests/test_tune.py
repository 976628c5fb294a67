"""flashlm tune on a tiny calibrated model with fixed device profiles, and run profiles applied by --profile."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import tiny_models as tm
from flashlm.converters.calibrate import calibrate
from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.device import ProfileError, parse_profile
from flashlm.runtime.memory import RUNTIME_OVERHEAD, BudgetError, plan_memory
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.predictor import calibration_report
from flashlm.runtime.probe import to_toml
from flashlm.runtime.tune import apply_run_profile, candidates, evaluate, load_run_profile, run_profile_toml


def device(seq_mb_s: float, rand_mb_s: float) -> dict:
    return {"device": {"name": "fixed", "measured": True, "cores": 2, "ram_bytes": 1 << 33},
            "flash": {"read_bytes": [4096, 1048576], "threads": [1, 16], "sequential_threads": [1],
                      "sequential_1m_mb_s": [seq_mb_s],
                      "random_mb_s": {"4096": [rand_mb_s / 4, rand_mb_s], "1048576": [seq_mb_s, seq_mb_s]}},
            "memory": {"threads": [1, 2], "read_gb_s": [10.0, 20.0]},
            "compute": {"threads": [1, 2], "gweights_s": {"numba-f16": [1.0, 1.8], "numba-f32": [0.5, 0.9]}}}


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    out = convert(tm.make_opt(d / "src"), d / "opt.flashlm", dtype="f16", progress=False)
    calibrate(out, n_tokens=400, ranks=(8, 16), progress=False)
    return out


def _write(tmp_path, name, data):
    p = tmp_path / f"{name}.toml"
    p.write_text(to_toml(data))
    return str(p)


def test_unlimited_memory_picks_dense_with_every_core(opt, tmp_path):
    ref = _write(tmp_path, "fast", device(1000.0, 500.0))
    folder = open_folder(opt)
    ranked = candidates(folder, parse_profile(device(1000.0, 500.0)), 8 << 30, calibration_report(opt),
                        profile_ref=ref, ctx_len=64)
    assert ranked[0].rt.mode in ("dense", "hybrid") and ranked[0].rt.threads == 2
    assert ranked[0].cost.io_busy_s == 0
    assert [c.cost.total_s for c in ranked] == sorted(c.cost.total_s for c in ranked)


def test_slow_compute_and_fast_random_reads_pick_sparse_layers(opt, tmp_path):
    """Matvecs 1000x slower, random reads fast, sequential reads slow: computing only the rows a
    sparse layer holds beats dense even though dense fits, and streaming whole layers is hopeless."""
    data = device(seq_mb_s=2.0, rand_mb_s=1e5)
    data["compute"]["gweights_s"] = {"numba-f16": [0.001, 0.0018], "numba-f32": [0.001, 0.0018]}
    ref = _write(tmp_path, "slowcompute", data)
    folder = open_folder(opt)
    cal = calibration_report(opt)
    limit = 8 << 30
    ranked = candidates(folder, parse_profile(data), limit, cal, profile_ref=ref, ctx_len=64)
    best = ranked[0]
    assert best.rt.mode == "flash" and set(best.plan.layer_kinds) == {"sparse"}
    dense = next(c for c in ranked if c.rt.mode == "dense" and c.rt.threads == best.rt.threads)
    assert best.cost.compute_s < dense.cost.compute_s
    assert all(c.cost.peak_bytes <= limit for c in ranked)
    # the pick is no worse than settings evaluated by hand
    for rt in (dataclasses.replace(best.rt, io_threads=1), dataclasses.replace(best.rt, threads=1),
               dataclasses.replace(best.rt, mode="hybrid", window=None, pin=0.0)):
        assert best.cost.total_s <= evaluate(folder, rt, parse_profile(data), cal).cost.total_s + 1e-12
    with pytest.raises(BudgetError, match="below the runtime"):
        candidates(folder, parse_profile(data), RUNTIME_OVERHEAD // 2, cal, profile_ref=ref)


def test_run_profile_round_trip_and_errors(opt, tmp_path):
    data = device(2.0, 2000.0)
    ref = _write(tmp_path, "dev", data)
    folder = open_folder(opt)
    best = candidates(folder, parse_profile(data), 8 << 30, calibration_report(opt), profile_ref=ref, ctx_len=64)[0]
    run = tmp_path / "run.toml"
    run.write_text(run_profile_toml(best, model=str(opt), device=ref, memory_limit=8 << 30))
    got = apply_run_profile(RuntimeConfig(profile=str(run)))
    assert got.mode == best.rt.mode and got.threads == best.rt.threads and got.ctx_len == 64
    assert got.profile == ref
    explicit = apply_run_profile(RuntimeConfig(profile=str(run), threads=1))
    assert explicit.threads == 1                                  # a flag given explicitly wins
    assert apply_run_profile(RuntimeConfig(profile=ref)).profile == ref   # a device profile passes through
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nmode = "flash"\nwindoe = 4\n')
    with pytest.raises(ProfileError, match=r"bad\.toml: run\.windoe: not a run setting"):
        load_run_profile(bad)


def test_cli_tune_explain_then_run_with_the_run_profile(opt, tmp_path):
    ref = _write(tmp_path, "dev", device(2.0, 2000.0))
    run = tmp_path / "run.toml"
    cli = [sys.executable, "-m", "flashlm"]
    r = subprocess.run(cli + ["tune", str(opt), "--memory-limit", "300MiB", "--profile", ref, "-c", "64",
                              "--explain", "-o", str(run)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "predicted per token" in r.stderr and "flash I/O" in r.stderr and run.exists()
    r = subprocess.run(cli + ["run", str(opt), "--profile", str(run), "-p", "hello", "-n", "3", "--temp", "0",
                              "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
