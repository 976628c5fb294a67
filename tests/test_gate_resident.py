"""The resident-part bundle layouts (`convert --resident gate`: rows hold up | down, W_gate dense;
`--resident gate,up`: rows hold the down column, W_gate and W_up dense). Every run mode over them must
compute the same FFN as the full layout, a selected neuron must cost what its row holds, and the
gate/exact selectors must use the dense tensors instead of copies."""
from __future__ import annotations

import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.calibrate import calibrate
from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.predictor import read_calibration
from flashlm.runtime.safetensors_file import read_header

IDS = [3, 17, 99, 5, 42, 7, 250, 11, 64, 33, 8, 120, 1, 2, 9, 15]   # a 10-token prompt takes the BLAS path
PROMPT = 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate_resident")
    src = tm.make_llama(d / "llama", tied=False)
    full = convert(src, d / "full.flashlm", dtype="f32", progress=False)
    gr = convert(src, d / "gr.flashlm", dtype="f32", resident=("gate",), progress=False)
    down = convert(src, d / "down.flashlm", dtype="f32", resident=("gate", "up"), progress=False)
    calibrate(down, n_tokens=300, ranks=(4, 8), selector="exact", keep=1.0, progress=False)
    # The exact rule at keep 100%: flash then computes every neuron, through the dense W_gate.
    calibrate(gr, n_tokens=300, ranks=(4, 8), selector="exact", keep=1.0, progress=False)
    return src, full, gr, down


def _run(folder, predictors=None, **rt):
    model = Model(open_folder(folder), RuntimeConfig(kv_dtype="f32", **rt), predictors=predictors)
    try:
        pre = model.forward(IDS[:PROMPT], all_logits=True)
        dec = [model.forward([t])[0] for t in IDS[PROMPT:]]
        return np.concatenate([pre, np.stack(dec)]), model.ffn_backend.stats
    finally:
        model.close()


def test_layout_holds_up_and_down_and_the_dense_gate(folders):
    _, full, gr, down = folders
    f, g = open_folder(full), open_folder(gr)
    assert [p.name for p in g.bundles.parts] == ["up", "down"] and g.bundles.gate_resident
    assert not f.bundles.gate_resident
    assert g.bundles.row_bytes * 3 == f.bundles.row_bytes * 2
    c = g.config
    for i in range(c.n_layers):
        assert g.dense[f"layers.{i}.ffn.gate.weight"].shape == (c.n_ff, c.d_model)
    o = open_folder(down)
    assert [p.name for p in o.bundles.parts] == ["down"] and o.bundles.up_resident and o.bundles.gate_resident
    assert o.bundles.row_bytes * 3 == f.bundles.row_bytes
    assert f"layers.0.ffn.up.weight" in o.dense


@pytest.mark.parametrize("variant", ["gate", "gate,up"])
@pytest.mark.parametrize("mode", ["dense", "mmap", "naive"])
def test_every_mode_over_the_resident_part_layouts_equals_the_full_layout(folders, mode, variant):
    _, full, gr, down = folders
    ref, _ = _run(full)
    got, _ = _run(gr if variant == "gate" else down, mode=mode, io="buffered")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


class AllNeurons:
    """The exact selector at keep 100%: every neuron (a SwiGLU FFN has no zero contributions)."""

    def __init__(self, n_ff):
        self.all = np.arange(n_ff, dtype=np.int32)
        self.hot = self.all[::-1].copy()

    def predict(self, h):
        return self.all


@pytest.mark.parametrize("variant", ["gate", "gate,up"])
@pytest.mark.parametrize("capacity_fraction", [1.0, 0.3])
def test_flash_over_the_resident_part_layouts_with_an_exact_selector_equals_dense(folders, capacity_fraction, variant):
    """Sparse layers (neuron cache, background reads, overflow streaming) over up|down rows with the
    gate from DRAM compute exactly the dense FFN when the selector keeps what the FFN needs."""
    _, full, gr, down = folders
    ref, _ = _run(full)
    folder = open_folder(gr if variant == "gate" else down)
    c = folder.config
    model = Model(folder, RuntimeConfig(mode="flash", window=2, io="buffered", layer_io="sparse", kv_dtype="f32"),
                  predictors=[AllNeurons(c.n_ff) for _ in range(c.n_layers)])
    ffn = model.ffn_backend
    if capacity_fraction < 1:
        from flashlm.runtime.neuron_cache import NeuronCache
        cap = int(c.n_ff * capacity_fraction)
        ffn.caches = [NeuronCache(c.n_ff, cap, k.row_elems, k.rows.dtype, window=2) for k in ffn.caches]
    got = np.concatenate([model.forward(IDS[:PROMPT], all_logits=True)] + [model.forward([t]) for t in IDS[PROMPT:]])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    st = ffn.stats
    assert st.wanted > 0
    # What was read is up|down rows only: every miss costs the gate-resident stride.
    assert ffn.reader.stats.useful_bytes == (st.wanted - st.hits) * folder.bundles.stride_bytes
    if capacity_fraction < 1:
        assert st.overflow > 0
    model.close()


def test_calibrated_gate_and_exact_rules_use_the_dense_gate(folders, tmp_path):
    import shutil
    src, full, gr, down = folders
    folder = tmp_path / "gr.flashlm"
    shutil.copytree(gr, folder)
    header, _, _ = read_header(folder / "predictor.safetensors")
    assert not any(n.endswith(".gate_rows") for n in header) and any(n.endswith(".up_rows") for n in header)
    # keep 100% with exact scores: flash equals dense through the calibrated rule and the dense W_gate
    ref, _ = _run(full)
    got, st = _run(folder, mode="flash", io="buffered", layer_io="sparse")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert st.wanted > 0
    # The down-only layout: the exact rule keeps no copies at all, W_gate and W_up are the dense ones.
    header, _, _ = read_header(down / "predictor.safetensors")
    assert not any(n.endswith("_rows") for n in header)
    got, st = _run(down, mode="flash", io="buffered", layer_io="sparse")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # The gate rule keeps no copy of W_gate either: its DRAM is the low-rank up map and the norms.
    calibrate(folder, n_tokens=300, ranks=(4, 8), selector="gate", keep=0.5, progress=False)
    header, _, _ = read_header(folder / "predictor.safetensors")
    assert not any(n.endswith("_rows") for n in header)
    c = open_folder(folder).config
    gate_bytes = c.n_ff * c.d_model * 2          # what a copy would take, even as f16
    assert max(read_calibration(open_folder(folder)).predictor_bytes) < gate_bytes
    got, st = _run(folder, mode="flash", io="buffered", layer_io="sparse")
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.7 and st.wanted < st.tokens * c.n_layers * c.n_ff


def test_gate_resident_needs_a_gated_ffn_and_float_weights(tmp_path):
    from flashlm.converters.source import ConversionError
    with pytest.raises(ConversionError, match="gated FFN"):
        convert(tm.make_opt(tmp_path / "opt"), tmp_path / "o.flashlm", resident=("gate",), progress=False)
    with pytest.raises(ConversionError, match="float"):
        convert(tm.make_llama(tmp_path / "l", tied=False), tmp_path / "l.flashlm", dtype="q8_0",
                resident=("gate", "up"), progress=False)


@pytest.mark.parametrize("variant,selector", [("gate", "gate"), ("gate", "exact"), ("gate,up", "exact")])
def test_predictors_take_the_kernels_projections_and_select_the_same(folders, tmp_path, monkeypatch, variant, selector):
    """Over a resident-part layout the FFN kernel computes gate.h (and up.h) once per layer call; the
    gate/exact rules take those products instead of multiplying by the same tensors again. The
    selection and the logits are what the predictor's own products give (sharing disabled)."""
    import shutil
    from flashlm.runtime.ffn import BundleKernel
    from flashlm.runtime.predictor import LayerPredictor
    _, _, gr, down = folders
    folder = tmp_path / "m.flashlm"
    shutil.copytree(gr if variant == "gate" else down, folder)
    calibrate(folder, n_tokens=300, ranks=(4, 8), selector=selector, keep=0.5, progress=False)
    passed = []
    predict = LayerPredictor.predict

    def spy(self, h, gate_h=None, up_h=None):
        passed.append((gate_h is not None, up_h is not None))
        return predict(self, h, gate_h=gate_h, up_h=up_h)

    monkeypatch.setattr(LayerPredictor, "predict", spy)
    shared, st = _run(folder, mode="flash", io="buffered", layer_io="sparse")
    uses_up = selector == "exact" and variant == "gate,up"     # else W_up is the predictor's own copy
    assert passed and all(p == (True, uses_up) for p in passed)
    monkeypatch.setattr(BundleKernel, "projections", lambda self, layer, g, u: (None, None))
    passed.clear()
    own, st_own = _run(folder, mode="flash", io="buffered", layer_io="sparse")
    assert passed and not any(g for g, _ in passed)
    # the same selections; the sums may differ in the last bit (cache row order follows the I/O thread)
    assert st.wanted == st_own.wanted
    np.testing.assert_allclose(shared, own, rtol=1e-5, atol=1e-6)
