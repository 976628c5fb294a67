"""Flash, naive, hybrid and mmap modes compute what dense mode computes; budgets are enforced up front."""
import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.calibrate import calibrate
from flashlm.converters.convert import convert
from flashlm.runtime import modelfile
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.memory import BudgetError, parse_size, plan_memory
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder

IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180, 33, 5, 77, 120, 9, 15]


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt")
    out = convert(tm.make_opt(d / "src"), d / "opt.flashlm", dtype="f16", progress=False)
    calibrate(out, n_tokens=400, ranks=(8, 16, 32), progress=False)
    return out


def _logits(folder, **rt):
    model = Model(open_folder(folder), RuntimeConfig(**rt))
    try:
        pre = model.forward(IDS[:6], all_logits=True)
        dec = [model.forward([t])[0] for t in IDS[6:]]
        return np.concatenate([pre, np.stack(dec)]), model.ffn_backend.stats, model
    finally:
        model.close()


class OraclePredictor:
    """Predicts exactly the neurons whose ReLU is non-zero (reads the true up rows and bias)."""

    def __init__(self, up, bias):
        self.up, self.bias = up, bias

    def predict(self, h):
        active = (h @ self.up.T + self.bias) > 0
        return np.flatnonzero(active.any(axis=0)).astype(np.int32)


def _oracles(folder):
    dense = Model(open_folder(folder))
    d = dense.config.d_model
    out = []
    for i, rows in enumerate(dense.ffn_backend.layer_rows):
        up = dense.folder.bundles.decode_part(rows, "up")
        out.append(OraclePredictor(up, dense.w[f"layers.{i}.ffn.up.bias"]))
    return out


@pytest.mark.parametrize("mode", ["naive", "hybrid", "mmap"])
def test_streaming_modes_equal_dense(opt_folder, mode):
    ref, _, _ = _logits(opt_folder)
    budget = None
    if mode == "hybrid":   # room for the fixed parts and one and a half FFN layers
        folder = open_folder(opt_folder)
        fixed = plan_memory(folder, RuntimeConfig(mode="naive")).total
        budget = str(int(fixed + 1.5 * folder.config.n_ff * folder.bundles.stride_bytes))
    got, stats, model = _logits(opt_folder, mode=mode, budget=budget, io="buffered")
    np.testing.assert_allclose(got, ref, atol=1e-5)
    if mode == "hybrid":
        assert model.plan.resident_layers == [0]


@pytest.mark.parametrize("capacity_fraction", [1.0, 0.3])
def test_flash_with_oracle_predictor_is_exact(opt_folder, capacity_fraction):
    """Cache machinery (window, delete-by-swap, append, overflow streaming) is exact given its rows.
    (f32 KV caches: with f16 ones a 1e-7 difference of FFN summation order can flip one rounding.)"""
    ref, _, _ = _logits(opt_folder, kv_dtype="f32")
    folder = open_folder(opt_folder)
    model = Model(folder, RuntimeConfig(mode="flash", window=2, io="buffered", layer_io="sparse", kv_dtype="f32"))
    ffn = model.ffn_backend
    ffn.predictors = _oracles(opt_folder)
    if capacity_fraction < 1:
        from flashlm.runtime.neuron_cache import NeuronCache
        cap = int(folder.config.n_ff * capacity_fraction)
        ffn.caches = [NeuronCache(folder.config.n_ff, cap, c.row_elems, c.rows.dtype, window=2) for c in ffn.caches]
    pre = model.forward(IDS[:6], all_logits=True)
    dec = [model.forward([t])[0] for t in IDS[6:]]
    np.testing.assert_allclose(np.concatenate([pre, np.stack(dec)]), ref, atol=1e-5)
    st = ffn.stats
    assert st.wanted > 0 and 0 < st.hits < st.wanted
    # Every wanted neuron that was not resident is read exactly once (into the cache or, overflowing,
    # through the scratch buffer), and nothing else is: distinct rows requested == misses.
    misses = st.wanted - st.hits
    assert ffn.reader.stats.useful_bytes == misses * folder.bundles.stride_bytes
    assert ffn.reader.stats.bytes_read >= misses * folder.bundles.stride_bytes
    if capacity_fraction < 1:
        overflow = sum(c.stats.overflow for c in ffn.caches)
        assert 0 < overflow < misses, "small caches must stream the surplus, and only the surplus"
    model.close()


def test_flash_reads_far_less_than_naive(opt_folder):
    _, naive, m1 = _logits(opt_folder, mode="naive", io="buffered")
    _, flash, m2 = _logits(opt_folder, mode="flash", window=4, io="buffered", layer_io="sparse")
    n_naive = m1.ffn_backend.reader.stats.bytes_read
    n_flash = m2.ffn_backend.reader.stats.bytes_read
    layer_bytes = m1.config.n_ff * m1.folder.bundles.stride_bytes
    assert n_naive == layer_bytes * m1.config.n_layers * (1 + len(IDS) - 6)   # every layer, every forward
    assert n_flash < 0.5 * n_naive, (n_flash, n_naive)      # window 4 reads at most half of what naive reads


def test_budget_too_small_is_refused_before_loading(opt_folder, monkeypatch):
    def no_read(*a, **k):
        raise AssertionError("weights were read before the budget check")
    monkeypatch.setattr(modelfile, "read_verified", no_read)
    import flashlm.runtime.model
    monkeypatch.setattr(flashlm.runtime.model, "read_verified", no_read)
    with pytest.raises(BudgetError, match="too small"):
        Model(open_folder(opt_folder), RuntimeConfig(mode="flash", budget="1%"))
    with pytest.raises(BudgetError, match="too small"):
        Model(open_folder(opt_folder), RuntimeConfig(mode="dense", budget="50%"))


def test_flash_without_predictors_says_calibrate(tmp_path):
    out = convert(tm.make_opt(tmp_path / "src"), tmp_path / "m.flashlm", progress=False)
    with pytest.raises(modelfile.ModelFileError, match="flashlm calibrate"):
        Model(open_folder(out), RuntimeConfig(mode="flash"))


@pytest.mark.parametrize("text, total, expected", [
    ("60%", 1000, 600), ("0.5", 1000, 500), ("512MiB", 0, 512 * 2**20), ("2GB", 0, 2 * 10**9),
    ("1.5GiB", 0, int(1.5 * 2**30)), ("1000", 0, 1000)])
def test_parse_budget(text, total, expected):
    assert parse_size(text, total) == expected


def test_parse_budget_rejects_garbage():
    with pytest.raises(ValueError, match="budget"):
        parse_size("lots", 100)


def test_planner_chooses_sparse_only_where_it_saves_flash_time():
    from flashlm.runtime.memory import _greedy
    layer, stream_s = 1000, 1.0
    cheap = [(300, 0.1)] * 4          # ReLU-like: small window cache, few misses
    costly = [(300, 1.2)] * 4         # dense-ish SwiGLU on slow random reads: worse than streaming
    kinds, mem, cost = _greedy(4, 1200, layer, stream_s, cheap, "auto")
    assert kinds == ["sparse"] * 4 and mem == 1200 and cost == pytest.approx(0.4)
    kinds, mem, cost = _greedy(4, 2100, layer, stream_s, costly, "auto")
    assert kinds.count("resident") == 2 and kinds.count("sparse") == 0 and cost == pytest.approx(2.0)
    kinds, _, _ = _greedy(4, 5000, layer, stream_s, cheap, "auto")
    assert kinds == ["resident"] * 4, "with room for everything, nothing is read per token"
    kinds, _, _ = _greedy(4, 0, layer, stream_s, cheap, "stream")
    assert kinds == ["stream"] * 4


@pytest.mark.parametrize("mode, extra", [("naive", {}), ("flash", {"layer_io": "sparse", "window": 1})])
def test_corrupted_bundle_row_is_detected_when_read(opt_folder, tmp_path, mode, extra):
    import shutil
    from flashlm.runtime.modelfile import ModelFileError
    broken = tmp_path / "broken.flashlm"
    shutil.copytree(opt_folder, broken)
    folder = open_folder(broken)
    b = folder.bundles
    offset = b.layer_offsets[1] + 5 * b.stride_bytes + 10        # layer 1, neuron 5
    with open(broken / "ffn.safetensors", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    model = Model(open_folder(broken), RuntimeConfig(mode=mode, io="buffered", **extra))
    if mode == "flash":   # make sure neuron 5 of layer 1 is wanted
        preds = model.ffn_backend.predictors
        preds[1].select = lambda scores: np.arange(model.config.n_ff, dtype=np.int32)
    with pytest.raises(ModelFileError, match=r"layer 1 neuron 5 .*CRC-32"):
        for t in IDS[:3]:
            model.forward([t])
    model.close()
