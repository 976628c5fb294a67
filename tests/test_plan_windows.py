"""Flash plans whose sparse layers take different windows: where the budget is short of every layer's
cache at the larger window, some layers take it and the rest a smaller one; each cache is built with its
layer's window, and the logits equal dense mode's."""
import copy

import numpy as np
import pytest

from flashlm.runtime import predictor as predictor_module
from flashlm.runtime.builder import activation_bytes, compute_threads
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.cost_model import CostModel
from flashlm.runtime.memory import BudgetError, Placement, plan_memory
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.predictor import Calibration, read_calibration
from test_flash_modes import IDS, SLOW_STREAM_PROFILE, _logits, _oracles, deep_opt_folder  # noqa: F401

# window -> (max_held rows, mean share held, share of the wanted rows missed): larger windows hold more
# and miss less, as calibration measures on sparse models
WINDOW_STATS = {"1": (20, 0.08, 0.8), "2": (30, 0.12, 0.6), "4": (45, 0.18, 0.4), "8": (70, 0.3, 0.15)}


@pytest.fixture()
def scenario(deep_opt_folder, monkeypatch):  # noqa: F811
    folder = open_folder(deep_opt_folder)
    real = read_calibration(folder)
    report = copy.deepcopy(real.report)
    for layer in report["layers"]:
        layer["predicted_fraction"] = 0.15
        layer["windows"] = {k: {"max_held": h, "mean_held": m, "miss_fraction": f}
                            for k, (h, m, f) in WINDOW_STATS.items()}
    cal = Calibration(real.predictor_bytes, report)
    monkeypatch.setattr(predictor_module, "read_calibration", lambda f: cal)
    return folder, cal


def _plan(folder, cal, rt, budget):
    return plan_memory(folder, RuntimeConfig(**rt, budget=str(budget)), activations=activation_bytes(folder, compute_threads(None)),
                       costs=CostModel.for_run(folder, RuntimeConfig(**rt)), calibration=cal)


def test_mixed_windows_where_the_larger_does_not_fit_every_layer(scenario, tmp_path):
    folder, cal = scenario
    profile = tmp_path / "slow-stream.toml"
    profile.write_text(SLOW_STREAM_PROFILE)
    rt = dict(mode="flash", io="buffered", profile=str(profile), kv_dtype="f32")
    row = folder.bundles.cache_row_bytes
    # what every layer sparse at window 8 needs (and at window 4): budgets between the two
    all8 = _plan(folder, cal, dict(rt, layer_io="sparse", window=8), 10**10)
    all4 = _plan(folder, cal, dict(rt, layer_io="sparse", window=4), 10**10)
    assert all8.total - all4.total == folder.config.n_layers * (70 - 45) * row
    found = None
    for short in range(row, all8.total - all4.total, row):
        plan = _plan(folder, cal, rt, all8.total - short)
        wins = {plan.window_of(i) for i in plan.layers_placed(Placement.SPARSE)}
        if len(wins) > 1:
            found = (all8.total - short, plan, wins)
            break
    assert found is not None, "some budget must give sparse layers different windows"
    budget, plan, wins = found
    assert plan.total <= budget and plan.window == max(wins)
    for i in plan.layers_placed(Placement.SPARSE):   # each cache sized from its own window's statistics
        assert plan.layers[i].cache_rows == WINDOW_STATS[str(plan.window_of(i))][0]
    # cheaper (estimated) than any one window for every sparse layer within the same budget
    for k in (1, 2, 4, 8):
        try:
            single = _plan(folder, cal, dict(rt, window=k), budget)
        except BudgetError:
            continue
        assert plan.est_io_ms <= single.est_io_ms + 1e-6, (k, plan.est_io_ms, single.est_io_ms)
    assert "windows 8 (" in plan.lines()[2]

    ref, _, _ = _logits(folder.path, kv_dtype="f32")
    model = Model(folder, RuntimeConfig(**rt, budget=str(budget)), predictors=_oracles(folder.path))
    try:
        assert model.plan.layers == plan.layers
        caches = model.ffn_backend.caches
        assert {i: caches[i].window for i in plan.layers_placed(Placement.SPARSE)} == \
            {i: plan.window_of(i) for i in plan.layers_placed(Placement.SPARSE)}
        pre = model.forward(IDS[:6], all_logits=True)
        dec = [model.forward([t])[0].copy() for t in IDS[6:]]
        np.testing.assert_allclose(np.concatenate([pre, np.stack(dec)]), ref, atol=1e-5)
    finally:
        model.close()
