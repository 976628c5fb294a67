"""int8 predictors: the scaled int8 kernel against numpy, the int8 maps' selections against the f16 maps'
on the same recorded inputs (recall of the true active set), and the memory plan counting what they hold."""
import json

import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.calibrate import _write_predictors, calibrate, record_ffn_inputs
from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.cost_model import CostModel
from flashlm.runtime.memory import plan_memory
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import ModelFileError, open_folder
from flashlm.runtime.predictor import (PREDICTOR_FILE, LowRank, dequantize_rows_int8, load_predictors,
                                       quantize_rows_int8, read_calibration)
from flashlm.runtime.safetensors_file import read_header, read_tensor


def test_int8_rows_round_trip_within_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 33)).astype(np.float32) * rng.uniform(0.01, 10, (40, 1)).astype(np.float32)
    w[3] = 0.0                                               # an all-zero row: scale 0, zeros back
    q, s = quantize_rows_int8(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s[3] == 0 and not q[3].any()
    err = np.abs(dequantize_rows_int8(q, s) - w)
    assert (err <= s[:, None] * 0.5 * (1 + 1e-5) + 1e-30).all()
    assert (np.abs(q).max(axis=1)[s > 0] == 127).all()       # each row's peak uses the full range


@pytest.mark.parametrize("T", [1, 5])
def test_int8_low_rank_scores_equal_numpy(T):
    """LowRank with int8 maps (kernels.matmul_scaled) computes (h @ (qA sA).T) @ (qB sB).T + c."""
    rng = np.random.default_rng(T)
    d, r, n_ff = 96, 16, 301                                 # n_ff not a multiple of the kernel's blocks of 32
    a, b = rng.standard_normal((r, d)).astype(np.float32), rng.standard_normal((n_ff, r)).astype(np.float32)
    c = rng.standard_normal(n_ff).astype(np.float32)
    (qa, sa), (qb, sb) = quantize_rows_int8(a), quantize_rows_int8(b)
    m = LowRank(qa, qb, c, A_scale=sa, B_scale=sb)
    h = rng.standard_normal((T, d)).astype(np.float32)
    ref = (h.astype(np.float64) @ (qa.astype(np.float64) * sa[:, None]).T) @ (qb.astype(np.float64) * sb[:, None]).T + c
    got = m(h).copy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert m.nbytes == qa.nbytes + qb.nbytes + c.nbytes + sa.nbytes + sb.nbytes == r * d + n_ff * r + 4 * (n_ff + r + n_ff)
    # and int8 stays close to the f32 map it came from (one step of 1/127 of each row's peak)
    exact = (h @ a.T) @ b.T + c
    assert np.abs(got - exact).max() < 0.05 * np.abs(exact).max()


@pytest.fixture(scope="module")
def q4_pair(tmp_path_factory):
    """The same tiny q4_0 OPT twice, calibrated alike (same tokens, same hold-out) with f16 and int8 maps."""
    d = tmp_path_factory.mktemp("i8")
    src = tm.make_opt(d / "src")
    out = {}
    for dtype in ("f16", "int8"):
        folder = convert(src, d / f"{dtype}.flashlm", bundle_dtype="q4_0", progress=False)
        out[dtype] = (folder, calibrate(folder, n_tokens=400, ranks=(8, 16), progress=False, predictor_dtype=dtype))
    return out


def test_auto_predictor_dtype_is_int8_for_quantized_rows(q4_pair, tmp_path):
    folder, _ = q4_pair["int8"]
    header, _, _ = read_header(folder / PREDICTOR_FILE)
    assert {t["dtype"] for n, t in header.items() if n.endswith((".A", ".B"))} == {"I8"}
    f16_header, _, _ = read_header(q4_pair["f16"][0] / PREDICTOR_FILE)
    assert {t["dtype"] for n, t in f16_header.items() if n.endswith((".A", ".B"))} <= {"F16", "F32"}
    from flashlm.converters.calibrate import predictor_dtype_of
    assert predictor_dtype_of(open_folder(folder), "auto") == "int8"
    f16_folder = convert(tm.make_opt(tmp_path / "src"), tmp_path / "f16.flashlm", dtype="f16", progress=False)
    assert predictor_dtype_of(open_folder(f16_folder), "auto") == "f16"


def test_int8_selection_recall_matches_f16(q4_pair):
    """On the model's own recorded FFN inputs, the runtime's int8 predictors (one token at a time, the
    decode path) recall the true active set (up.h + b > 0 from the q4 rows the kernels use) about as the
    f16 ones do, reading about as many neurons; calibration's reports say the same."""
    reports = {k: r for k, (_, r) in q4_pair.items()}
    for f16, i8 in zip(reports["f16"]["layers"], reports["int8"]["layers"]):
        assert i8["unquantized"]["recall"] == f16["recall"]       # the same fit, before rounding to int8
        assert i8["recall"] >= f16["recall"] - 0.02
        assert i8["predicted_fraction"] <= f16["predicted_fraction"] + 0.02
    folder = q4_pair["f16"][0]
    model = Model(open_folder(folder))
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, 96).tolist()
    hs = record_ffn_inputs(model, [ids], progress=False)
    truth = []
    for layer, h in enumerate(hs):
        up = model.folder.bundles.decode_part(model.ffn_backend.layer_rows[layer], "up")
        truth.append(h @ up.T + model.w[f"layers.{layer}.ffn.up.bias"] > 0)
    model.close()
    got = {}
    for dtype, (f, _) in q4_pair.items():
        preds = load_predictors(f, open_folder(f).config)
        hit = total = read = 0
        for layer, (h, t) in enumerate(zip(hs, truth)):
            for tok in range(len(h)):
                sel = np.zeros(t.shape[1], bool)
                sel[preds[layer].predict(h[tok:tok + 1])] = True
                hit, total, read = hit + (sel & t[tok]).sum(), total + t[tok].sum(), read + sel.sum()
        got[dtype] = (hit / total, read / total)
    assert got["int8"][0] >= got["f16"][0] - 0.02, got
    assert got["int8"][1] <= got["f16"][1] * 1.05, got


def test_plan_counts_int8_predictors_at_their_bytes(q4_pair):
    """What the planner counts per layer is what the loaded predictor holds, and int8 maps hold about
    half of what f16 maps do."""
    counted = {}
    for dtype, (folder, _) in q4_pair.items():
        f = open_folder(folder)
        cal = read_calibration(f)
        preds = load_predictors(folder, f.config)
        assert cal.predictor_bytes == [p.up.nbytes for p in preds]
        rt = RuntimeConfig(mode="flash", layer_io="sparse", ctx_len=64)
        plan = plan_memory(f, rt, activations=0, costs=CostModel.for_run(f, rt), calibration=cal)
        assert plan.predictors == sum(cal.predictor_bytes)
        counted[dtype] = plan.predictors
    c = open_folder(q4_pair["int8"][0]).config
    r = open_folder(q4_pair["int8"][0])
    rank = read_header(r.path / PREDICTOR_FILE)[0]["layers.0.predictor.up.A"]["shape"][0]
    assert counted["int8"] == c.n_layers * (rank * c.d_model + c.n_ff * rank + 4 * (rank + 2 * c.n_ff))
    assert counted["int8"] < 0.75 * counted["f16"]


def test_int8_map_without_scales_is_refused_naming_the_file(q4_pair, tmp_path):
    import shutil
    folder = tmp_path / "noscale.flashlm"
    shutil.copytree(q4_pair["int8"][0], folder)
    path = folder / PREDICTOR_FILE
    header, start, meta = read_header(path)
    tensors = {n: read_tensor(path, t, start) for n, t in header.items() if not n.endswith("_scale")}
    _write_predictors(open_folder(folder), tensors, json.loads(meta["layers"]), json.loads(meta["report"]))
    with pytest.raises(ModelFileError, match=r"predictor\.safetensors: int8 map .* no per-row scales.*calibrate"):
        load_predictors(folder, open_folder(folder).config)
