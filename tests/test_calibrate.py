"""Predictor training: files, manifest, and quality on held-out tokens of tiny models."""
import json

import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.calibrate import calibrate
from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder, read_verified
from flashlm.runtime.predictor import calibration_report, load_predictors


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    out = {}
    for name, make in (("opt", lambda p: tm.make_opt(p)), ("llama", lambda p: tm.make_llama(p, tied=False))):
        folder = convert(make(d / name), d / f"{name}.flashlm", progress=False)
        out[name] = (folder, calibrate(folder, n_tokens=500, ranks=(8, 16, 64), selector="lowrank", progress=False))
    return out


def test_predictor_file_is_listed_and_verified(calibrated):
    folder, report = calibrated["opt"]
    f = open_folder(folder)
    assert "predictor.safetensors" in f.manifest["files"]
    read_verified(f, "predictor.safetensors")            # sha256 in the manifest matches
    assert calibration_report(folder)["tokens"] == report["tokens"] >= 400


def test_corrupt_or_unlisted_predictor_is_refused(calibrated, tmp_path):
    import shutil
    from flashlm.runtime.modelfile import ModelFileError
    src, _ = calibrated["opt"]
    folder = tmp_path / "m.flashlm"
    shutil.copytree(src, folder)
    path = folder / "predictor.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1                                       # one weight bit: still a valid file
    path.write_bytes(bytes(data))
    config = open_folder(folder).config
    with pytest.raises(ModelFileError, match=r"predictor\.safetensors: sha256 .* does not match"):
        load_predictors(folder, config)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["predictor.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="no sha256 for it"):
        load_predictors(folder, config)


def test_relu_predictor_recall_on_held_out_tokens(calibrated):
    _, report = calibrated["opt"]
    for layer in report["layers"]:
        assert layer["rule"] == "threshold"
        assert layer["recall"] >= 0.95                   # goal 0.99 on training tokens
        assert layer["predicted_fraction"] < layer["true_fraction"] + 0.15
        # the compute threshold (cached rows below it are skipped) sits below the rule's and keeps more
        assert layer["compute_threshold"] <= layer["threshold"]
        assert layer["compute_recall"] >= max(layer["recall"], 0.98)
        assert layer["predicted_fraction"] <= layer["compute_fraction"] < 1.0
    folder, _ = calibrated["opt"]
    preds = load_predictors(folder, open_folder(folder).config)
    assert [p.compute_threshold for p in preds] == [layer["compute_threshold"] for layer in report["layers"]]


def test_swiglu_predictor_ranks_contributions(calibrated):
    folder, report = calibrated["llama"]
    preds = load_predictors(folder, open_folder(folder).config)
    for p, layer in zip(preds, report["layers"]):
        assert p.rule == "topk" and p.gate is not None and p.keep == layer["keep"]
        # random top-50% would capture ~50% of the contribution mass
        assert layer["contribution_recall"] > 0.7
        assert set(layer["windows"]) == {"1", "2", "4", "8"}


def test_flash_with_trained_predictor_stays_close_to_dense(calibrated):
    folder, _ = calibrated["opt"]
    ids = [3, 17, 99, 5, 42, 7, 250, 11, 64, 33]
    dense = Model(open_folder(folder))
    ref = np.concatenate([dense.forward(ids[:4], all_logits=True)] + [dense.forward([t]) for t in ids[4:]])
    flash = Model(open_folder(folder), RuntimeConfig(mode="flash", io="buffered", layer_io="sparse"))
    got = np.concatenate([flash.forward(ids[:4], all_logits=True)] + [flash.forward([t]) for t in ids[4:]])
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    assert np.abs(got - ref).max() < 0.25 * np.abs(ref).max()
    flash.close()


def test_calibrating_twice_replaces_predictors(calibrated, tmp_path):
    folder, _ = calibrated["opt"]
    before = json.loads((folder / "manifest.json").read_text())["files"]["predictor.safetensors"]
    calibrate(folder, n_tokens=300, ranks=(8,), progress=False, seed=1)
    after = json.loads((folder / "manifest.json").read_text())["files"]["predictor.safetensors"]
    assert before["sha256"] != after["sha256"]
    read_verified(open_folder(folder), "predictor.safetensors")


@pytest.fixture(scope="module")
def gate_calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    src = tm.make_llama(d / "llama", tied=False)
    folder = convert(src, d / "llama.flashlm", progress=False)
    # Ranks far below d = 64: the low-rank gate estimate is poor, the resident exact gate is not.
    return src, folder, calibrate(folder, n_tokens=500, ranks=(4, 8), selector="gate", progress=False)


def test_gate_resident_selector_ranks_better_than_low_rank(gate_calibrated):
    _, folder, report = gate_calibrated
    q = report["selector_quality"]
    assert report["selector"] == "gate" and q["gate"] > q["lowrank"] + 0.02
    assert q["exact"] == pytest.approx(1.0)                 # the true top-k by output norm, by definition
    for layer in report["layers"]:
        assert layer["rule"] == "gate" and 0 < layer["output_recall"] <= 1.0


def test_auto_selector_takes_the_cheapest_that_reaches_the_goal(gate_calibrated, tmp_path):
    _, folder, report = gate_calibrated
    q = report["selector_quality"]
    goal = (q["lowrank"] + q["gate"]) / 2                   # gate reaches it, lowrank does not
    again = calibrate(folder, n_tokens=500, ranks=(4, 8), selector="auto", output_recall=goal, progress=False)
    assert again["selector"] == "gate"
    exact = calibrate(folder, n_tokens=300, ranks=(4,), selector="auto", output_recall=0.999, progress=False)
    assert exact["selector"] == "exact"
    src = gate_calibrated[0]
    ref = tm.load_reference(src)
    h = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    for layer, p in enumerate(load_predictors(folder, open_folder(folder).config)):
        mlp = ref.model.layers[layer].mlp
        g, u = h @ mlp.gate_proj.weight.detach().numpy().T, h @ mlp.up_proj.weight.detach().numpy().T
        expected = np.abs(g / (1 + np.exp(-g)) * u) * np.linalg.norm(mlp.down_proj.weight.detach().numpy(), axis=0)
        assert p.rule == "exact" and p.up is None and p.gate is None
        np.testing.assert_allclose(p.scores(h), expected, rtol=2e-2, atol=1e-3)   # f16 bundles
        got, ref_scores = p.predict(h[:1]), p.scores(h[:1])[0]     # decode path: numba, preallocated
        np.testing.assert_allclose(np.sort(ref_scores[got]), np.sort(ref_scores[p.select(ref_scores)]), rtol=1e-5)
    calibrate(folder, n_tokens=500, ranks=(4, 8), selector="gate", progress=False)   # as the fixture left it


def test_gate_selector_scores_with_the_checkpoints_exact_gate(gate_calibrated):
    src, folder, _ = gate_calibrated
    ref = tm.load_reference(src)
    preds = load_predictors(folder, open_folder(folder).config)
    h = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    for layer, p in enumerate(preds):
        mlp = ref.model.layers[layer].mlp
        w_gate = mlp.gate_proj.weight.detach().numpy()
        w_down = mlp.down_proj.weight.detach().numpy()
        assert p.rule == "gate" and p.gate is None and p.gate_rows.shape == w_gate.shape
        g = h @ w_gate.T
        expected = np.abs(g / (1 + np.exp(-g)) * p.up(h)) * np.linalg.norm(w_down, axis=0)
        np.testing.assert_allclose(p.scores(h), expected, rtol=5e-2, atol=1e-3)   # f16 bundles and factors
        sel = p.predict(h[:1])
        top = set(np.argsort(-expected[0])[:p.keep].tolist())
        assert len(sel) == p.keep and len(top & set(sel.tolist())) >= 0.95 * p.keep   # f16 near-ties aside


def test_flash_with_gate_selector_stays_close_to_dense(gate_calibrated):
    _, folder, _ = gate_calibrated
    ids = [3, 17, 99, 5, 42, 7, 250, 11, 64, 33]
    dense = Model(open_folder(folder))
    ref = np.concatenate([dense.forward(ids[:4], all_logits=True)] + [dense.forward([t]) for t in ids[4:]])
    flash = Model(open_folder(folder), RuntimeConfig(mode="flash", io="buffered", layer_io="sparse"))
    got = np.concatenate([flash.forward(ids[:4], all_logits=True)] + [flash.forward([t]) for t in ids[4:]])
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    assert flash.ffn_backend.stats.wanted > 0            # the layers really ran sparse
    flash.close()


def test_decode_prediction_is_the_batched_rule_through_preallocated_buffers(calibrated, gate_calibrated):
    """One token's predict() (numba scores and selection into the run state's buffers) picks the
    neurons the batched numpy rule picks, for every rule, and returns a view of its buffer."""
    folders = [calibrated["opt"][0], calibrated["llama"][0], gate_calibrated[1]]
    rules = set()
    for folder in folders:
        config = open_folder(folder).config
        for p in load_predictors(folder, config):
            rules.add(p.rule)
            h = np.random.default_rng(len(rules)).standard_normal((4, config.d_model)).astype(np.float32)
            for t in range(4):
                ref_scores = p.scores(h[t:t + 1])[0].copy()
                ref = p.select(ref_scores)
                got = p.predict(h[t:t + 1])
                assert np.shares_memory(got, p.buffers.ids)
                assert len(got) == len(ref) and np.all(np.diff(got) > 0)
                np.testing.assert_allclose(np.sort(ref_scores[got]), np.sort(ref_scores[ref]), rtol=1e-5, atol=1e-6)
    assert rules == {"threshold", "topk", "gate"}
