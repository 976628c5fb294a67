"""The ReLU-fied families transformers has no class for: FATReLU (ProSparse / MiniCPM-S: hidden_act
fatrelu, threshold hidden_act_param; the gate passes only g > t) and dReLU (TurboSparse / Bamboo:
BambooForCausalLM, relu(gate) * relu(up)). Tiny random checkpoints against transformers' Llama with the
family's MLP formula in torch (tiny_models.relu_family_logits); every FFN backend; the selectors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.calibrate import calibrate
from flashlm.converters.convert import convert
from flashlm.converters.hf_source import HFSource, parse_config
from flashlm.converters.source import ConversionError
from flashlm.runtime import kernels as K
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.predictor import LayerPredictor, LowRank
from test_gate_resident import IDS, PROMPT, _run   # the same prompt/decode split and runner

FAMILIES = {"fatrelu": ("fatrelu", 0.5), "drelu": ("drelu", 0.0), "drelu-fatrelu": ("drelu", 0.3)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    kind, t = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    src = tm.make_relu_family(d / "src", kind=kind, threshold=t)
    return request.param, src, tm.relu_family_logits(src, IDS)


def test_configs_parse_to_their_ffn_kind(family):
    name, src, _ = family
    kind, t = FAMILIES[name]
    c = HFSource(src).config
    assert (c.ffn_kind, c.act_threshold) == ("reglu" if kind == "fatrelu" else "drelu", t)


def _cfg(**over):
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=160, max_position_embeddings=128)
    return {**base, **over}


@pytest.mark.parametrize("over,match", [
    (dict(hidden_act="fatrelu"), r"config\.json: field 'hidden_act_param'.*None"),
    (dict(hidden_act="fatrelu", hidden_act_param=-0.1), r"config\.json: field 'hidden_act_param'.*-0\.1"),
    (dict(hidden_act="fatrelu", hidden_act_param="0.1"), r"config\.json: field 'hidden_act_param'"),
    (dict(hidden_act="gelu"), r"config\.json: hidden_act 'gelu' is not supported"),
    (dict(architectures=["BambooForCausalLM"], hidden_act="silu"),
     r"config\.json: hidden_act 'silu' is not supported for BambooForCausalLM \(relu or fatrelu\)"),
])
def test_unsupported_activation_values_are_one_line_errors(over, match):
    with pytest.raises(ConversionError, match=match) as e:
        parse_config(_cfg(**over), {}, Path("m/config.json"))
    assert "\n" not in str(e.value)


def test_the_activation_is_in_the_model_config_range_checked(tmp_path):
    from flashlm.runtime.schema import ConfigError, config_from_dict
    c = parse_config(_cfg(hidden_act="fatrelu", hidden_act_param=0.25), {}, Path("m/config.json"))
    d = c.to_dict()
    assert config_from_dict(d).act_threshold == 0.25
    with pytest.raises(ConfigError, match="act_threshold"):
        config_from_dict({**d, "act_threshold": -1.0})
    with pytest.raises(ConfigError, match="act_threshold"):
        config_from_dict({**d, "ffn_kind": "swiglu"})        # a threshold on SiLU is not a known model


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_prefill_and_decode_match_the_reference(family, dtype, tmp_path):
    name, src, ref = family
    kind, t = FAMILIES[name]
    out = convert(src, tmp_path / "m.flashlm", dtype=dtype, progress=False)
    ours, _ = _run(out)
    # FATReLU jumps from 0 to t * up at g = t: rounding the weights to f16 moves some gates across it,
    # so f16 rows are checked against the reference on the same f16-rounded weights.
    if dtype == "f16":
        ref = tm.relu_family_logits(src, IDS, f16_weights=True)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, f"{name} {dtype}: {err}"
    # The reference tells the activations apart: plain ReGLU (no threshold, no relu on up) is far off.
    wrong = tm.relu_family_logits(src, IDS, kind="fatrelu", threshold=0.0)
    assert np.abs(wrong - ref).max() > 50 * max(err, 1e-4)


@pytest.mark.parametrize("mode", ["mmap", "naive"])
def test_other_modes_equal_dense(family, mode, tmp_path):
    _, src, ref = family
    out = convert(src, tmp_path / "m.flashlm", dtype="f32", progress=False)
    got, _ = _run(out, mode=mode, io="buffered")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def calibrated(family, tmp_path_factory):
    """The exact rule at keep 100% over the three bundle layouts: full rows (gate and up copies in the
    predictor file), up|down rows with W_gate dense, down-only rows with W_gate and W_up dense."""
    name, src, ref = family
    d = tmp_path_factory.mktemp(name + "-cal")
    folders = {}
    for layout, resident in (("full", ()), ("gate", ("gate",)), ("gate,up", ("gate", "up"))):
        out = convert(src, d / f"{layout}.flashlm", dtype="f32", resident=resident, progress=False)
        calibrate(out, n_tokens=300, ranks=(4, 8), selector="exact", keep=1.0, progress=False)
        folders[layout] = out
    return name, src, ref, folders


@pytest.mark.parametrize("layout", ["full", "gate", "gate,up"])
def test_flash_with_the_exact_selector_equals_dense_and_reads_only_active_neurons(calibrated, layout):
    """The oracle (exact gate and up, keep 100%) selects exactly the neurons whose activation is not
    zero: flash equals dense, and a token reads fewer neurons than the layer has."""
    name, _, ref, folders = calibrated
    folder = open_folder(folders[layout])
    c = folder.config
    got, st = _run(folders[layout], mode="flash", io="buffered", layer_io="sparse")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # dReLU: both sides positive, about a quarter of the neurons; FATReLU t = 0.5: under half
    bound = 0.45 if FAMILIES[name][0] == "drelu" else 0.55
    assert 0 < st.wanted < bound * st.tokens * c.n_layers * c.n_ff, (st.wanted, st.tokens)


def _exact_activity(h, gate, up, kind, t):
    g, u = h @ gate.T, h @ up.T
    return (g > t) & ((u > 0) if kind == "drelu" else (u != 0))


@pytest.mark.parametrize("kind,t", [("drelu", 0.0), ("drelu", 0.3), ("reglu", 0.5)])
def test_selectors_never_pick_a_neuron_scored_zero(kind, t):
    """dReLU's selector uses that a neuron is zero when either gate or up is not positive; FATReLU's
    that it is zero when the gate is at or below t. With exact scores (rule "exact", or "topk" over
    full-rank maps that reproduce the projections) and keep = n_ff the selection is exactly the active
    set; with a smaller keep it is the `keep` largest active contributions."""
    rng = np.random.default_rng(0)
    d, n_ff = 16, 40
    gate, up = (rng.standard_normal((n_ff, d)).astype(np.float32) for _ in range(2))
    down_norm = np.ones(n_ff, np.float32)
    eye = np.eye(d, dtype=np.float32)
    rules = {
        "exact": dict(up=None, gate=None, rule="exact", gate_rows=gate, up_rows=up, down_norm=down_norm),
        "topk": dict(up=LowRank(eye, up, np.zeros(n_ff, np.float32)), gate=LowRank(eye, gate, np.zeros(n_ff, np.float32)),
                     rule="topk"),
        "gate": dict(up=LowRank(eye, up, np.zeros(n_ff, np.float32)), gate=None, rule="gate", gate_rows=gate,
                     down_norm=down_norm),
    }
    for rule, kw in rules.items():
        for keep in (n_ff, 5):
            p = LayerPredictor(keep=keep, ffn_kind=kind, act_threshold=t, hot=np.arange(n_ff, dtype=np.int32), **kw)
            for T in (1, 3):
                h = rng.standard_normal((T, d)).astype(np.float32)
                active = _exact_activity(h, gate, up, kind, t)
                a = np.abs(K.activate_np(h @ gate.T, h @ up.T, K.ACTIVATION_OF_KIND[kind], np.float32(t)))
                want = set()
                for row, act in zip(a, active):
                    ids = np.flatnonzero(act)
                    want |= set(ids[np.argsort(-row[ids], kind="stable")[:keep]].tolist())
                got = p.predict(h)
                assert set(got.tolist()) == want, (rule, keep, T)
                assert 0 < len(want) < n_ff


def test_calibrated_lowrank_selector_runs_and_reads_less(family, tmp_path):
    """The default (cheapest) selector on a ReLU-gated model: low-rank estimates of gate and up; a
    neuron estimated zero on either side (dReLU) or gate at or below t is never read."""
    name, src, ref = family
    out = convert(src, tmp_path / "m.flashlm", dtype="f32", progress=False)
    report = calibrate(out, n_tokens=300, ranks=(4, 8), selector="lowrank", keep=0.5, progress=False)
    assert report["layers"][0]["rule"] == "topk"
    c = open_folder(out).config
    got, st = _run(out, mode="flash", io="buffered", layer_io="sparse")
    assert np.isfinite(got).all() and 0 < st.wanted < 0.5 * st.tokens * c.n_layers * c.n_ff
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.5


@pytest.mark.parametrize("act,t", [("relu", 0.0), ("relu", 0.4), ("drelu", 0.0), ("drelu", 0.4)])
def test_onnxruntime_graph_activation(act, t):
    """The onnxruntime graph's gated activation (quantized dense weights run the FFN there) against
    torch: F.threshold on the gate (FATReLU; t 0 is ReLU), relu on up for dReLU."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from flashlm.runtime.ort_graph import GraphBuilder, session
    rng = np.random.default_rng(1)
    n_ff = 24
    g = GraphBuilder("t")
    g.output(g.gated(g.input("gu", 2 * n_ff), n_ff, act, t), "a", n_ff)
    x = rng.standard_normal((3, 2 * n_ff)).astype(np.float32)
    got = session(g, 1).run(None, {"gu": x})[0]
    F = torch.nn.functional
    gt, ut = torch.from_numpy(x[:, :n_ff]), torch.from_numpy(x[:, n_ff:])
    want = (F.threshold(gt, t, 0.0) * (F.relu(ut) if act == "drelu" else ut)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert (want == 0).mean() > (0.6 if act == "drelu" else 0.4)
