"""tools/make_synthetic.py: a tiny synthetic ReLU model is written, runs, and has the sparsity it promises."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from flashlm.converters.source import expected_tensors
from flashlm.converters.writer import write_model
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder

_spec = importlib.util.spec_from_file_location(
    "make_synthetic", Path(__file__).resolve().parent.parent / "tools" / "make_synthetic.py")
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)

TINY = dict(d_model=128, n_layers=3, n_ff=512, n_heads=4, vocab=500, max_position=512, predictor_rank=16)
N_TOKENS = 400          # enough for a held-out rank-16 fit of a 128-dim input


def tiny(seed=0, **kw):
    return ms.SyntheticReluSource(**{**TINY, "seed": seed, **kw})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(source, folder, per-layer FFN inputs h [N_TOKENS, d] captured from the real forward pass)."""
    src = tiny()
    out = write_model(src, tmp_path_factory.mktemp("synth") / "tiny.flashlm", progress=False)
    model = Model(open_folder(out))
    captured: dict[int, list[np.ndarray]] = {}
    model.on_ffn_input = lambda layer, h: captured.setdefault(layer, []).append(h.copy())
    tokens = np.random.default_rng(1).integers(0, TINY["vocab"], N_TOKENS)
    logits = model.forward(tokens[:20], all_logits=True)           # prefill 20 tokens...
    assert logits.shape == (20, TINY["vocab"]) and np.isfinite(logits).all()
    model.forward(tokens[20:])                                     # ...then the rest
    hs = {layer: np.concatenate(parts) for layer, parts in captured.items()}
    return src, out, hs


def _preact(src, layer, h):
    return h @ src.load(f"layers.{layer}.ffn.up.weight").T + src.load(f"layers.{layer}.ffn.up.bias")


def test_normal_helpers():
    for p in (1e-4, 0.05, 0.5, 0.9737):
        assert abs(float(ms.normal_cdf(ms.normal_quantile(p))) - p) < 1e-9
    assert abs(ms.normal_quantile(0.975) - 1.959963985) < 1e-8
    u = np.random.default_rng(0).standard_normal(2_000_000)
    for z in (-0.3, 1.0, 2.0):
        a = np.maximum(u - z, 0)
        m1, m2 = ms.relu_moments(z)
        assert abs(a.mean() - m1) < 3e-3 and abs((a * a).mean() - m2) < 5e-3


def test_source_protocol_and_folder(written):
    src, out, hs = written
    assert src.shapes() == expected_tensors(src.config)
    for name, shape in src.shapes().items():
        assert src.load(name).shape == shape and src.load(name).dtype == np.float32
    folder = open_folder(out)
    assert folder.config.architecture == "opt" and folder.config.ffn_kind == "relu"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "synthetic"
    assert manifest["source"]["recipe"]["predictor_rank"] == 16
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == TINY["vocab"]
    ids = tok.encode("Hello, flash!").ids
    assert tok.decode(ids) == "Hello, flash!" and tok.decode([499]) == " t499"
    assert sorted(hs) == list(range(TINY["n_layers"])) and all(h.shape == (N_TOKENS, 128) for h in hs.values())


def test_every_layer_is_sparse_on_real_inputs(written):
    src, _, hs = written
    for layer, h in hs.items():
        active = _preact(src, layer, h) > 0                      # [tokens, n_ff]
        frac = active.mean()
        assert 0.03 <= frac <= 0.12, (layer, frac)
        per_token = active.mean(axis=1)
        assert per_token.min() > 0.01 and per_token.max() < 0.2, (layer, per_token.min(), per_token.max())
        # pre-activations really are ~N(0, 1) before the bias
        u = _preact(src, layer, h) - src.load(f"layers.{layer}.ffn.up.bias")
        assert 0.7 < u.std() < 1.3 and abs(u.mean()) < 0.15, (layer, u.mean(), u.std())


def test_hot_neurons_fire_far_more_often(written):
    src, _, hs = written
    n_hot = round(0.05 * TINY["n_ff"])
    for layer, h in hs.items():
        bias = src.load(f"layers.{layer}.ffn.up.bias")
        hot = np.argsort(-bias)[:n_hot]                          # top hot_fraction by bias
        assert set(hot) == set(np.flatnonzero(src.neuron_stats(layer)["hot"]))
        freq = (_preact(src, layer, h) > 0).mean(axis=0)
        cold = np.setdiff1d(np.arange(TINY["n_ff"]), hot)
        ratio = freq[hot].mean() / freq[cold].mean()
        assert ratio > 5, (layer, freq[hot].mean(), freq[cold].mean())
        assert 0.3 < freq[hot].mean() < 0.7, (layer, freq[hot].mean())


def _rank_r_fit_r2(h, u, r, rng):
    """Reduced-rank least squares h -> u on half the tokens, R^2 on the other half."""
    idx = rng.permutation(len(h))
    tr, te = idx[: len(h) // 2], idx[len(h) // 2:]
    X = np.c_[h, np.ones(len(h))]
    W, *_ = np.linalg.lstsq(X[tr], u[tr], rcond=None)
    _, _, vt = np.linalg.svd(X[tr] @ W, full_matrices=False)
    W = W @ vt[:r].T @ vt[:r]                                    # keep the top r directions of the fit
    resid = u[te] - X[te] @ W
    return 1 - (resid ** 2).sum() / ((u[te] - u[te].mean(axis=0)) ** 2).sum()


def test_low_rank_structure_is_learnable(written):
    src, _, hs = written
    rng = np.random.default_rng(0)
    for layer, h in hs.items():
        r2 = _rank_r_fit_r2(h, _preact(src, layer, h), 16, rng)
        assert r2 > 0.9, (layer, r2)
    # the same fit on a full-rank up projection fails: the test above measures structure, not the fit
    h = hs[1]
    w = np.random.default_rng(2).standard_normal((TINY["n_ff"], 128)) / np.sqrt(128)
    assert _rank_r_fit_r2(h, h @ w.T, 16, rng) < 0.5


def test_deterministic_per_seed():
    a, b, c = tiny(seed=0), tiny(seed=0), tiny(seed=1)
    for name in ("tok_embeddings", "pos_embeddings", "layers.1.attn.q.weight", "layers.2.ffn.up.weight",
                 "layers.2.ffn.up.bias", "layers.0.ffn.down.weight", "layers.0.ffn.down.bias", "lm_head"):
        assert np.array_equal(a.load(name), b.load(name)), name
        assert not np.allclose(a.load(name), c.load(name)), name
    # tensors differ between layers too
    assert not np.allclose(a.load("layers.0.ffn.up.weight"), a.load("layers.1.ffn.up.weight"))


def test_cli_refuses_without_disk(tmp_path, monkeypatch, capsys):
    class Usage:
        free = 10
    monkeypatch.setattr(ms.shutil, "disk_usage", lambda path: Usage)
    rc = ms.main([str(tmp_path / "m.flashlm"), "--d-model", "64", "--layers", "1", "--n-ff", "128",
                  "--heads", "4", "--vocab", "300", "--predictor-rank", "8", "--no-progress"])
    assert rc == 1 and "refusing" in capsys.readouterr().err
    assert not (tmp_path / "m.flashlm").exists()


def test_cli_writes_and_reports_size(tmp_path, capsys):
    out = tmp_path / "m.flashlm"
    args = [str(out), "--d-model", "64", "--layers", "2", "--n-ff", "256", "--heads", "4", "--vocab", "300",
            "--max-position", "64", "--predictor-rank", "8", "--no-progress"]
    assert ms.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert open_folder(out).config.n_ff == 256
    assert ms.main(args) == 1                                    # exists, no --force
    assert ms.main(args + ["--force", "--seed", "3"]) == 0
