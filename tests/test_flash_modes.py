"""Flash, naive, hybrid and mmap modes compute what dense mode computes; budgets are enforced up front."""
import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.calibrate import calibrate
from flashlm.converters.convert import convert
from flashlm.runtime import modelfile
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.builder import activation_bytes
from flashlm.runtime.builder import compute_threads
from flashlm.runtime.memory import BudgetError, Placement, parse_size, plan_memory
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder

FAR_LESS = 0.5     # flash with a window of 4 must read at most half of what naive reads
IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180, 33, 5, 77, 120, 9, 15]


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt")
    out = convert(tm.make_opt(d / "src"), d / "opt.flashlm", dtype="f16", progress=False)
    calibrate(out, n_tokens=400, ranks=(8, 16, 32), progress=False)
    return out


def _run_ids(model):
    """Logits of IDS: the first 6 as one prompt, the rest decoded one at a time."""
    pre = model.forward(IDS[:6], all_logits=True)
    dec = [model.forward([t])[0].copy() for t in IDS[6:]]
    return np.concatenate([pre, np.stack(dec)])


def _logits(folder, **rt):
    model = Model(open_folder(folder), RuntimeConfig(**rt))
    try:
        return _run_ids(model), model.ffn_backend.stats, model
    finally:
        model.close()


class OraclePredictor:
    """Predicts exactly the neurons whose ReLU is non-zero (reads the true up rows and bias)."""

    def __init__(self, up, bias):
        self.up, self.bias = up, bias
        self.hot = np.arange(len(up), dtype=np.int32)[::-1].copy()     # pinning order: any fixed order

    def predict(self, h):
        active = (h @ self.up.T + self.bias) > 0
        return np.flatnonzero(active.any(axis=0)).astype(np.int32)


class OracleComputeFilter(OraclePredictor):
    """The oracle, also telling the FFN which cached rows a decode token may skip: its scores are the
    true pre-activations and its compute threshold 0, so exactly the inactive ones."""

    def predict(self, h):
        self.last = (h @ self.up.T + self.bias)[0].astype(np.float32)
        return super().predict(h)

    def compute_filter(self):
        return self.last, np.float32(0.0)


def _fixed_bytes(folder, mode="naive"):
    f = open_folder(folder)
    return plan_memory(f, RuntimeConfig(mode=mode), activations=activation_bytes(f, compute_threads(None))).total


def _oracles(folder):
    dense = Model(open_folder(folder))
    d = dense.config.d_model
    out = []
    for i, rows in enumerate(dense.ffn_backend.layer_rows):
        up = dense.folder.bundles.decode_part(rows, "up")
        out.append(OraclePredictor(up, dense.w[f"layers.{i}.ffn.up.bias"]))
    return out


def _oracle_flash(folder_path, **rt):
    """Flash mode over an oracle selector, every layer sparse, window 2, f32 KV caches (with f16 ones a 1e-7
    difference of FFN summation order can flip one rounding); `rt` adds RuntimeConfig fields."""
    return Model(open_folder(folder_path), RuntimeConfig(mode="flash", window=2, io="buffered", layer_io="sparse",
                                                         kv_dtype="f32", **rt), predictors=_oracles(folder_path))


@pytest.mark.parametrize("mode", ["naive", "hybrid", "mmap"])
def test_streaming_modes_equal_dense(opt_folder, mode):
    ref, _, _ = _logits(opt_folder)
    budget = None
    if mode == "hybrid":   # room for the fixed parts and one and a half FFN layers
        folder = open_folder(opt_folder)
        budget = str(int(_fixed_bytes(opt_folder) + 1.5 * folder.bundles.layer_bytes))
    got, stats, model = _logits(opt_folder, mode=mode, budget=budget, io="buffered")
    np.testing.assert_allclose(got, ref, atol=1e-5)
    if mode == "hybrid":
        assert model.plan.resident_layers == [1]        # one layer fits: the middle one (spread)


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("capacity_fraction", [1.0, 0.3])
def test_flash_with_oracle_predictor_is_exact(opt_folder, capacity_fraction, pipeline):
    """Cache machinery (window, delete-by-swap, append, overflow streaming, the lookahead's early
    admissions) is exact given its rows. (f32 KV caches: with f16 ones a 1e-7 difference of FFN
    summation order can flip one rounding.)"""
    ref, _, _ = _logits(opt_folder, kv_dtype="f32")
    folder = open_folder(opt_folder)
    model = _oracle_flash(opt_folder, pipeline=pipeline)
    ffn = model.ffn_backend
    if capacity_fraction < 1:
        from flashlm.runtime.neuron_cache import NeuronCache
        cap = int(folder.config.n_ff * capacity_fraction)
        ffn.caches = [NeuronCache(folder.config.n_ff, cap, c.row_elems, c.rows.dtype, window=2) for c in ffn.caches]
    np.testing.assert_allclose(_run_ids(model), ref, atol=1e-5)
    st = ffn.stats
    assert st.wanted > 0 and 0 < st.hits < st.wanted
    # Every wanted neuron that was not resident is read exactly once (into the cache or, overflowing,
    # through the streaming buffers), and nothing else is but the lookahead's over-fetched rows:
    # distinct rows requested == misses + over-fetched.
    misses = st.wanted - st.hits
    overfetched = st.guess_rows - st.guess_used
    # (a guess only takes free rows and rows leaving the window: caches at 30 % are always full)
    assert (st.guess_rows > 0) == (pipeline and capacity_fraction == 1) and 0 <= overfetched <= st.guess_rows
    assert st.guess_used + st.guess_missed <= misses
    assert ffn.reader.stats.useful_bytes == (misses + overfetched) * folder.bundles.stride_bytes
    assert ffn.io_counts()[0] >= misses * folder.bundles.stride_bytes
    if capacity_fraction < 1:
        assert 0 < st.overflow < misses, "small caches must stream the surplus, and only the surplus"
    model.close()


@pytest.mark.parametrize("pipeline", [True, False])
def test_cached_rows_the_filter_rules_out_are_skipped_exactly(opt_folder, pipeline):
    """A decode token computes only the cached rows its predictor does not rule out (compute_filter):
    with the oracle's filter (skip exactly the inactive neurons) the logits stay dense's, and rows were
    skipped; a filter that rules out every cached row changes them (the filter is what decides)."""
    ref, _, _ = _logits(opt_folder, kv_dtype="f32")
    rt = RuntimeConfig(mode="flash", window=4, io="buffered", layer_io="sparse", kv_dtype="f32", pipeline=pipeline)
    folder = open_folder(opt_folder)
    oracles = _oracles(opt_folder)
    filtered = [OracleComputeFilter(o.up, o.bias) for o in oracles]
    model = Model(folder, rt, predictors=filtered)
    np.testing.assert_allclose(_run_ids(model), ref, atol=1e-5)
    assert model.ffn_backend.stats.cached_skipped > 0
    model.close()
    for f in filtered:
        f.compute_filter = lambda f=f: (f.last, np.float32(np.inf))
    model = Model(folder, rt, predictors=filtered)
    assert np.abs(_run_ids(model)[6:] - ref[6:]).max() > 1e-3
    model.close()


def test_resident_layers_keep_their_predictor_and_skip_rows_exactly(opt_folder):
    """Flash with room for every layer resident: the plan keeps each layer's predictor (it has a compute
    threshold), counted in the plan, and a decode token computes only the rows its filter leaves (the
    oracle's: exactly the active ones), so the logits stay dense's; without a filter every row runs."""
    ref, _, _ = _logits(opt_folder, kv_dtype="f32")
    folder = open_folder(opt_folder)
    rt = RuntimeConfig(mode="flash", io="buffered", kv_dtype="f32")
    model = Model(folder, rt)                                  # its own calibrated predictors
    plan = model.plan
    model.close()
    assert plan.resident_layers == list(range(folder.config.n_layers))
    assert plan.predictor_layers == plan.resident_layers and plan.predictors > 0
    oracles = _oracles(opt_folder)
    for kind, skips in ((OracleComputeFilter, True), (OraclePredictor, False)):
        model = Model(folder, rt, predictors=[kind(o.up, o.bias) for o in oracles])
        np.testing.assert_allclose(_run_ids(model), ref, atol=1e-5)
        assert (model.ffn_backend.stats.cached_skipped > 0) == skips
        model.close()


def test_flash_reads_far_less_than_naive(opt_folder):
    _, naive, m1 = _logits(opt_folder, mode="naive", io="buffered")
    # (without the pipeline: on this tiny random model the lookahead's guesses are poor and over-fetch)
    _, flash, m2 = _logits(opt_folder, mode="flash", window=4, io="buffered", layer_io="sparse", pipeline=False)
    n_naive, n_flash = m1.ffn_backend.io_counts()[0], m2.ffn_backend.io_counts()[0]
    layer_bytes = m1.folder.bundles.layer_bytes
    # every layer, every forward, and what the ring read ahead (at most its two layers) for a next token
    # that never came
    ahead = n_naive - layer_bytes * m1.config.n_layers * (1 + len(IDS) - 6)
    assert 0 <= ahead <= m1.ffn_backend.whole.ring_bytes and ahead % layer_bytes == 0
    _, _, m3 = _logits(opt_folder, mode="naive", io="buffered", pipeline=False)
    assert m3.ffn_backend.io_counts()[0] == layer_bytes * m1.config.n_layers * (1 + len(IDS) - 6)
    assert naive.tokens == flash.tokens == len(IDS)
    assert n_flash < FAR_LESS * n_naive, (n_flash, n_naive)


def test_budget_too_small_is_refused_before_loading(opt_folder, monkeypatch):
    def no_read(*a, **k):
        raise AssertionError("weights were read before the budget check")
    monkeypatch.setattr(modelfile, "read_verified", no_read)
    import flashlm.runtime.builder
    monkeypatch.setattr(flashlm.runtime.builder, "read_verified", no_read)
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
    layer, stream_s = [1000] * 4, 1.0     # resident bytes per layer
    cheap = [[(300, 0.1, 4)]] * 4     # ReLU-like: small window cache, few misses (window 4)
    costly = [[(300, 1.2, 4)]] * 4    # dense-ish SwiGLU on slow random reads: worse than streaming
    kinds, wins, mem, cost = _greedy(4, 1200, layer, stream_s, cheap, "auto")
    assert kinds == ["sparse"] * 4 and wins == [4] * 4 and mem == 1200 and cost == pytest.approx(0.4)
    kinds, wins, mem, cost = _greedy(4, 2100, layer, stream_s, costly, "auto")
    assert kinds.count("resident") == 2 and kinds.count("sparse") == 0 and cost == pytest.approx(2.0)
    kinds, _, _, _ = _greedy(4, 5000, layer, stream_s, cheap, "auto")
    assert kinds == ["resident"] * 4, "with room for everything, nothing is read per token"
    kinds, _, _, _ = _greedy(4, 0, layer, stream_s, cheap, "stream")
    assert kinds == ["stream"] * 4
    # two windows per layer: a sparse layer moves up to the larger window while room is left for it
    two = [[(300, 0.4, 4), (500, 0.1, 8)]] * 4
    kinds, wins, mem, cost = _greedy(4, 1600, layer, stream_s, two, "auto")
    assert kinds == ["sparse"] * 4 and sorted(wins) == [4, 4, 8, 8] and mem == 1600 and cost == pytest.approx(1.0)
    kinds, wins, mem, _ = _greedy(4, 2000, layer, stream_s, two, "auto")
    assert wins == [8] * 4 and mem == 2000
    # a resident layer counted with its predictor costs its bytes too
    kinds, _, mem, _ = _greedy(4, 4000, [1000, 1000, 1100, 1000], stream_s, cheap, "auto")
    assert kinds.count("resident") == 3 and kinds[2] == "sparse" and mem == 3300


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


# A device where one scattered row costs 1/77 of streaming a whole (48 KiB) layer: the calibrated
# ~10 missing rows per token make sparse layers pay off, a prompt's union (150+ rows) does not.
SLOW_STREAM_PROFILE = """
[device]
name = "slow-stream"
measured = false
sources = ["tests/test_flash_modes.py: a made-up device for the planner"]
ram_bytes = 8589934592
cores = 2

[flash]
read_bytes = [4096, 1048576]
threads = [1, 4]
sequential_threads = [1, 4]
sequential_1m_mb_s = [50.0, 50.0]
reader_call_us = [0.0, 0.0]     # no per-call cost: the row-vs-stream threshold is the rates alone

[flash.random_mb_s]
4096 = [20.0, 20.0]
1048576 = [20.0, 20.0]

[memory]
threads = [1]
read_gb_s = [10.0]
"""


@pytest.fixture(scope="module")
def deep_opt_folder(tmp_path_factory):
    """12 layers: enough that streaming buffers and sparse buffers pay for themselves in one plan."""
    d = tmp_path_factory.mktemp("opt12")
    out = convert(tm.make_opt(d / "src", n_layers=12), d / "opt12.flashlm", dtype="f16", progress=False)
    calibrate(out, n_tokens=200, ranks=(8,), progress=False)
    return out


def test_flash_spaces_its_resident_layers_among_the_streamed_ones(deep_opt_folder):
    """Resident and streamed layers cost the planner the same wherever they sit: flash spaces the resident
    ones evenly (as hybrid does) rather than taking the first layers, so the streamed layers' readers
    keep reading ahead while a resident layer computes."""
    from flashlm.runtime.cost_model import CostModel
    from flashlm.runtime.memory import spread
    from flashlm.runtime.predictor import read_calibration
    folder = open_folder(deep_opt_folder)
    rt = dict(mode="flash", layer_io="stream", ctx_len=64)
    costs, cal = CostModel.for_run(folder, RuntimeConfig(**rt)), read_calibration(folder)
    fixed = plan_memory(folder, RuntimeConfig(mode="naive", ctx_len=64), activations=0).total
    seen = set()
    for extra in range(0, 12 * folder.bundles.layer_bytes, folder.bundles.layer_bytes // 2):
        try:
            p = plan_memory(folder, RuntimeConfig(**rt, budget=str(fixed + extra)), activations=0, costs=costs,
                            calibration=cal)
        except BudgetError:
            continue
        resident = {i for i, lp in enumerate(p.layers) if lp.placement == Placement.RESIDENT}
        assert resident == spread(len(resident), folder.config.n_layers)
        seen.add(len(resident))
    assert len(seen & set(range(2, 11))) >= 3, seen


@pytest.mark.parametrize("pipeline", [True, False])
def test_default_auto_flash_path_mixes_placements_and_equals_dense(deep_opt_folder, tmp_path, monkeypatch, pipeline):
    """The default flash path end to end: layer_io auto, resident + sparse + streamed layers, pinned
    hot neurons, the per-token stream fallback and cache overflow, with an oracle predictor: the
    logits equal dense mode's.

    The tiny random OPT is not sparse (about 58% of neurons fire), so its own calibration never makes
    a sparse layer worth its bytes. The scenario gives layers 0-8 of a 12-layer one the window
    statistics of sparse layers (a window holds 40 rows); their caches are sized from them, so the
    oracle's wider sets overflow and stream, exactly, through the sparse buffers."""
    opt_folder = deep_opt_folder
    import copy
    from flashlm.runtime import predictor as predictor_module
    from flashlm.runtime.cost_model import CostModel
    from flashlm.runtime.predictor import Calibration, read_calibration
    profile = tmp_path / "slow-stream.toml"
    profile.write_text(SLOW_STREAM_PROFILE)
    folder = open_folder(opt_folder)
    real = read_calibration(folder)
    report = copy.deepcopy(real.report)
    for layer in report["layers"][:9]:
        for w in layer["windows"].values():
            w.update(max_held=40, miss_fraction=0.1)
    scenario = Calibration(real.predictor_bytes, report)
    monkeypatch.setattr(predictor_module, "read_calibration", lambda f: scenario)

    # f32 KV caches: the pipeline's cache rows come in another order, and with f16 KV caches a 1e-7
    # difference of FFN summation order can flip a rounding
    rt = dict(mode="flash", io="buffered", pin=0.1, profile=str(profile), kv_dtype="f32")
    costs = CostModel.for_run(folder, RuntimeConfig(**rt))
    activations = activation_bytes(folder, compute_threads(None))
    fixed = plan_memory(folder, RuntimeConfig(mode="naive", kv_dtype="f32"), activations=activations).total
    budget = plan = None
    for extra in range(0, 14 * folder.bundles.layer_bytes, 2048):   # the planner is pure: cheap
        try:
            p = plan_memory(folder, RuntimeConfig(**rt, budget=str(fixed + extra)), activations=activations,
                            costs=costs, calibration=scenario)
        except BudgetError:
            continue
        if all(p.count(k) for k in (Placement.RESIDENT, Placement.SPARSE, Placement.STREAM)):
            budget, plan = str(fixed + extra), p
            break
    assert plan is not None, "some budget must mix resident, sparse and streamed layers"
    ref, _, _ = _logits(opt_folder, kv_dtype="f32")
    model = Model(folder, RuntimeConfig(**rt, budget=budget, pipeline=pipeline), predictors=_oracles(opt_folder))
    try:
        assert model.plan.layer_kinds == plan.layer_kinds and model.plan.pin_rows == int(0.1 * folder.config.n_ff)
        ffn = model.ffn_backend
        sparse = plan.layers_placed(Placement.SPARSE)
        np.testing.assert_allclose(_run_ids(model), ref, atol=1e-5)
        st = ffn.stats
        n_planned = plan.count(Placement.STREAM) * len(IDS[5:])    # 1 prefill + 14 decode forwards
        assert st.streamed_layers > n_planned, "the prompt's union must take the per-token stream fallback"
        assert st.overflow > 0 and st.hits > 0 and st.wanted > st.hits
        # the lookahead guessed every sparse layer that follows another layer, on every decode token
        guessed = [i for i in sparse if i > 0]
        assert (st.guess_used + st.guess_missed > 0) == (pipeline and bool(guessed))
        assert sum(ffn.caches[i].step_count for i in sparse) > 0, "decode tokens must go through the caches"
        for i in sparse:                      # the hottest neurons stayed resident throughout
            cache, hot = ffn.caches[i], ffn.predictors[i].hot[:plan.pin_rows]
            assert cache.is_pinned[hot].all() and (cache.row_of_neuron[hot] >= 0).all()
        # caches hold rows without the file's block padding (none here: 256-byte rows; see test_qflash),
        # and the plan counts them so
        b = folder.bundles
        width = b.cache_row_bytes
        assert b.row_bytes <= width <= b.stride_bytes
        assert all(ffn.caches[i].rows.shape[1] * ffn.caches[i].rows.itemsize == width for i in sparse)
        assert sum(ffn.caches[i].capacity for i in sparse) * width + \
            plan.count(Placement.RESIDENT) * b.n_rows * b.stride_bytes == plan.ffn_resident
    finally:
        model.close()


def test_pipeline_changes_what_is_read_never_what_is_computed(opt_folder):
    """Oracle selector, every layer sparse, caches large enough for a guess to land: the pipeline's
    logits equal --no-pipeline's and dense's; it reads the same neurons and, early, some more (its
    over-fetched rows); whole-layer streaming with and without read-ahead gives identical bits."""
    ref, _, _ = _logits(opt_folder, kv_dtype="f32")
    runs = {}
    for pipeline in (True, False):
        model = _oracle_flash(opt_folder, pipeline=pipeline)
        try:
            runs[pipeline] = _run_ids(model), model.ffn_backend.stats, model.ffn_backend
        finally:
            model.close()
    (on, st_on, ffn_on), (off, st_off, ffn_off) = runs[True], runs[False]
    np.testing.assert_allclose(on, off, atol=1e-5)
    np.testing.assert_allclose(on, ref, atol=1e-5)
    assert st_on.wanted == st_off.wanted and st_off.guess_rows == 0
    recall = st_on.guess_recall
    assert recall is not None and 0 < recall <= 1 and st_on.guess_rows > 0
    stride = open_folder(opt_folder).bundles.stride_bytes
    extra = ffn_on.reader.stats.useful_bytes - ffn_off.reader.stats.useful_bytes
    # what the pipeline reads beyond --no-pipeline: its over-fetched rows, and rows a guess's early
    # eviction (out of the window by the next step, not guessed) made it read again
    assert 0 < extra <= (st_on.guess_rows - st_on.guess_used + st_on.guess_missed) * stride
    a, _, _ = _logits(opt_folder, mode="naive", io="buffered")
    b, _, _ = _logits(opt_folder, mode="naive", io="buffered", pipeline=False)
    np.testing.assert_array_equal(a, b)


def test_switching_lookahead_mid_sequence_is_exact(opt_folder):
    from flashlm.runtime.pipeline_switch import PipelineSwitch
    """Oracle selector, every layer sparse, the lookahead toggled token by token by a trial: logits
    equal dense's, and both settings ran."""
    ref, _, _ = _logits(opt_folder, kv_dtype="f32")
    model = _oracle_flash(opt_folder)
    try:
        ffn = model.ffn_backend
        # a trial from the second decode token on, pairs (on, off), (off, on), that cannot end before both ran
        ffn.switch = PipelineSwitch(pairs=2, accept_wins=1, warm=1, every=2)
        np.testing.assert_allclose(_run_ids(model), ref, atol=1e-5)
        st = ffn.stats
        assert st.decode_tokens == len(IDS) - 6 and 0 < st.lookahead_tokens < st.decode_tokens
        assert st.guess_rows > 0 and ffn.switch.trials >= 1
    finally:
        model.close()


def test_switch_off_reads_exactly_what_no_pipeline_reads(opt_folder):
    """With the switch saying off (no trial reached), the pipeline reads the same rows, bytes and read
    calls as --no-pipeline and computes the same bits: "off" adds nothing."""
    from flashlm.runtime.pipeline_switch import PipelineSwitch
    got = {}
    for pipeline in (True, False):
        model = _oracle_flash(opt_folder, pipeline=pipeline)
        try:
            ffn = model.ffn_backend
            if pipeline:
                ffn.switch = PipelineSwitch(warm=10**9)
            logits = _run_ids(model)
            rs, st = ffn.reader.stats, ffn.stats
            got[pipeline] = (logits, (rs.reads, rs.bytes_read, rs.useful_bytes),
                             (st.wanted, st.hits, st.guess_rows, st.streamed_layers))
        finally:
            model.close()
    np.testing.assert_array_equal(got[True][0], got[False][0])
    assert got[True][1:] == got[False][1:] and got[True][2][2] == 0


def test_guess_pays_weighs_hidden_reads_against_overfetch():
    """The lookahead's per-layer rule: a guess pays while the used rows' hidden read time exceeds the
    over-fetched rows' read time (precision > 1 / (1 + hidden share))."""
    from flashlm.runtime.ffn import guess_pays
    assert guess_pays(0, 0, 0.0, 0.0)                       # no record yet: guess
    assert guess_pays(100, 60, 1.0, 1.0)                    # all hidden: precision 0.6 > 0.5
    assert not guess_pays(100, 40, 1.0, 1.0)                # all hidden, precision 0.4
    assert not guess_pays(100, 90, 1.0, 0.0)                # the compute thread waited for all of it
    assert guess_pays(100, 75, 1.0, 0.5)                    # h 0.5: needs precision > 2/3
    assert not guess_pays(100, 60, 1.0, 0.5)
    assert guess_pays(100, 60, 1.0, 5.0) == guess_pays(100, 60, 1.0, 1.0)   # h is capped at 1
