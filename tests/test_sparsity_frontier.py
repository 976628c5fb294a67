"""tools/sparsity_frontier.py: its analysis FFN is the model's FFN, selections keep what they claim,
and its byte accounting counts what a cache would miss."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder

_spec = importlib.util.spec_from_file_location(
    "sparsity_frontier", Path(__file__).resolve().parents[1] / "tools" / "sparsity_frontier.py")
sf = importlib.util.module_from_spec(_spec)
sys.modules["sparsity_frontier"] = sf          # its dataclasses look their module up while being built
_spec.loader.exec_module(sf)

IDS = [3, 17, 99, 5, 42, 7, 250, 11, 64, 33, 8, 120]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("frontier")
    folder = convert(tm.make_llama(d / "llama", tied=False), d / "llama.flashlm", dtype="f32", progress=False)
    return Model(open_folder(folder))


def _ffn(model, name, keep, cache=0, dip=1.0):
    weights = sf.layer_weights(model)
    return sf.AnalysisFFN(weights, sf.Scorer(weights, None, None), sf.Method(name, keep, dip), cache,
                          model.config.d_model)


def test_dense_analysis_ffn_reproduces_the_model(model):
    model.reset()
    ref = model.forward(IDS, all_logits=True)
    backend = model.ffn_backend
    model.ffn_backend = _ffn(model, "dense", 1.0)
    model.ffn_backend.dense_phase = False
    model.ffn_backend.bytes_read = model.ffn_backend.neuron_tokens = 0
    try:
        model.reset()
        got = model.forward(IDS, all_logits=True)
    finally:
        model.ffn_backend = backend
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_oracle_keeps_the_top_k_contributions(model):
    ffn = _ffn(model, "oracle", 0.25)
    ffn.dense_phase, ffn.bytes_read, ffn.neuron_tokens = False, 0, 0
    h = np.random.default_rng(0).standard_normal((3, model.config.d_model)).astype(np.float32)
    out = np.empty_like(h)
    ffn(0, h, out)
    w = ffn.w[0]
    g, u = h @ w.gate.T, h @ w.up.T
    a = g / (1 + np.exp(-g)) * u
    k = ffn.k
    expected = np.stack([a[t, np.argsort(-np.abs(a[t]))[:k]] @ w.down[np.argsort(-np.abs(a[t]))[:k]] for t in range(3)])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert ffn.bytes_read == 3 * k * 3 * model.config.d_model * sf.F16       # gate|up|down rows, no cache
    assert ffn.neuron_tokens == 3 * k


def test_lru_counts_only_missing_rows_and_evicts_the_oldest():
    lru = sf.LRU(10, capacity=4)
    assert lru.admit(np.array([0, 1, 2])) == 3
    assert lru.admit(np.array([1, 2, 3])) == 1
    assert lru.admit(np.array([4, 5])) == 2             # over capacity: 0 (oldest) then 1 leave
    assert set(np.flatnonzero(lru.cached)) == {2, 3, 4, 5}
    assert lru.admit(np.array([0, 2])) == 1


def test_dip_prefers_cached_neurons_in_close_calls(model):
    plain, dip = _ffn(model, "oracle", 0.25, cache=80), _ffn(model, "oracle", 0.25, cache=80, dip=4.0)
    h = np.random.default_rng(1).standard_normal((16, model.config.d_model)).astype(np.float32)
    for ffn in (plain, dip):
        ffn.dense_phase, ffn.bytes_read, ffn.neuron_tokens = False, 0, 0
        ffn(0, h, np.empty_like(h))
    assert dip.bytes_read < plain.bytes_read


def test_griffin_fixes_its_selection_from_the_prompt(model):
    ffn = _ffn(model, "griffin", 0.5)
    ffn.bytes_read, ffn.neuron_tokens = 0, 0
    rng = np.random.default_rng(2)
    ffn(0, rng.standard_normal((6, model.config.d_model)).astype(np.float32), np.empty((6, model.config.d_model), np.float32))
    fill = ffn.fix_prompt_selection()
    assert len(ffn.fixed[0]) == ffn.k and fill == sum(len(f) for f in ffn.fixed) * ffn.row_bytes
    ffn.dense_phase = False
    h = rng.standard_normal((2, model.config.d_model)).astype(np.float32)
    out = np.empty_like(h)
    ffn(0, h, out)
    w, sel = ffn.w[0], ffn.fixed[0]
    g, u = h @ w.gate[sel].T, h @ w.up[sel].T
    np.testing.assert_allclose(out, (g / (1 + np.exp(-g)) * u) @ w.down[sel], rtol=1e-4, atol=1e-5)
    assert ffn.bytes_read == 0                          # decoding reads nothing: the set was read once


@pytest.mark.parametrize("kind,t", [("drelu", 0.0), ("fatrelu", 0.5)])
def test_relu_gated_families_analysed_with_their_own_formula(kind, t, tmp_path):
    """dReLU's relu(up) and FATReLU's threshold are in the analysis FFN: the dense analysis reproduces
    the model, and the exact selector at keep 1 reads no neuron whose contribution is zero."""
    src = tm.make_relu_family(tmp_path / "src", kind=kind, threshold=t)
    m = Model(open_folder(convert(src, tmp_path / "m.flashlm", dtype="f32", progress=False)))
    m.reset()
    ref = m.forward(IDS, all_logits=True)
    weights = sf.layer_weights(m)                    # from the model's own backend, before it is replaced
    for name in ("dense", "gateup-wina"):
        ffn = sf.AnalysisFFN(weights, sf.Scorer(weights, None, None), sf.Method(name, 1.0), 0, m.config.d_model)
        ffn.dense_phase, ffn.bytes_read, ffn.neuron_tokens = False, 0, 0
        m.ffn_backend = ffn
        m.reset()
        np.testing.assert_allclose(m.forward(IDS, all_logits=True), ref, rtol=1e-4, atol=1e-4)
    w = ffn.w[0]
    h = np.random.default_rng(3).standard_normal((4, m.config.d_model)).astype(np.float32)
    g, u = h @ w.gate.T, h @ w.up.T
    a = np.where(g > t, g, 0) * (np.maximum(u, 0) if kind == "drelu" else u)
    np.testing.assert_allclose(sf.contribution(g, u), a, rtol=1e-6, atol=1e-6)
    assert (a == 0).mean() > 0.3                     # the families' zeros are really there


class _Ids:
    """A tokenizer double for greedy(): the prompt is IDS, an answer prints as its token ids."""
    encode = staticmethod(lambda text: list(IDS))
    decode = staticmethod(lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
    is_eos = staticmethod(lambda t: False)


def test_margin_fallback_recomputes_unsure_tokens_with_every_neuron(model):
    weights = sf.layer_weights(model)
    backend = model.ffn_backend

    def run(name, keep, fb, fk=1.0):
        f = sf.AnalysisFFN(weights, sf.Scorer(weights, None, None), sf.Method(name, keep, fallback=fb, fallback_keep=fk),
                           0, model.config.d_model)
        model.ffn_backend = f
        return sf.greedy(model, f, _Ids, "", 8, fb), f
    try:
        dense, _ = run("dense", 1.0, 0.0)
        sparse, _ = run("oracle", 0.1, 0.0)
        always, f_always = run("oracle", 0.1, 1e9)          # every decoded token is unsure: all dense
        never, f_never = run("oracle", 0.1, 1e-30)
        _, f_half = run("oracle", 0.1, 1e9, 0.5)            # unsure tokens get the top half instead
    finally:
        model.ffn_backend = backend
    assert sparse.ids != dense.ids                           # keep 10% changes this tiny model's answer
    assert always.ids == dense.ids and f_always.fallbacks == 8 and f_always.neuron_tokens == 8 * len(weights) * model.config.n_ff
    assert never.ids == sparse.ids and f_never.fallbacks == 0
    assert f_half.neuron_tokens == 8 * len(weights) * round(0.5 * model.config.n_ff)
    assert sf.divergence(sparse, dense)["position"] == next(i for i, (a, b) in enumerate(zip(sparse.ids, dense.ids)) if a != b)


def test_perplexity_fallback_marks_the_unsure_positions_across_the_models_chunks(model, monkeypatch):
    """The batched check's second pass computes exactly the positions the first found unsure with
    more neurons, also when the model runs the window in several chunks."""
    weights = sf.layer_weights(model)
    backend, ids = model.ffn_backend, (IDS * 8)[:90]
    monkeypatch.setattr(model.state, "chunk", 16)      # 81 sparse positions -> 6 chunks
    make = lambda name, keep, fb: sf.AnalysisFFN(weights, sf.Scorer(weights, None, None),
                                                 sf.Method(name, keep, fallback=fb), 0, model.config.d_model)
    try:
        got = {}
        for key, (name, keep, fb) in {"dense": ("dense", 1.0, 0.0), "all": ("oracle", 0.1, 1e9),
                                      "none": ("oracle", 0.1, 1e-30), "sparse": ("oracle", 0.1, 0.0)}.items():
            model.ffn_backend = f = make(name, keep, fb)
            got[key] = sf.perplexity(model, f, ids, ctx=89, prompt=8, fallback=fb)
    finally:
        model.ffn_backend = backend
    assert got["sparse"]["perplexity"] != got["dense"]["perplexity"]
    assert got["all"]["perplexity"] == pytest.approx(got["dense"]["perplexity"], rel=1e-5)
    assert got["all"]["kept_fraction"] == 1.0
    assert got["none"]["perplexity"] == pytest.approx(got["sparse"]["perplexity"], rel=1e-6)
