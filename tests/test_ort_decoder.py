"""The whole decoder as one onnxruntime graph (runtime/ort_model.py OrtDecoder: GroupQueryAttention over the
bound KV cache) against the per-layer sessions with numba attention (OrtLayers), on tiny random checkpoints
converted to q4_1: same weights, so with f32 activations and an f32 KV cache the two paths differ only by
float rounding. A wrong RoPE convention, a K/V written at the wrong position or a wrong KV length would
move the logits by O(1) (these are chaotic random models)."""
import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.errors import FlashlmError
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime import ort_model
from flashlm.runtime.ort_model import OrtDecoder, OrtLayers

IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180, 33, 5, 77, 120, 9, 15]
MODELS = {"llama-gqa-tied": lambda p: tm.make_llama(p, tied=True, n_kv_heads=2),
          "qwen2-bias": lambda p: tm.make_llama(p, tied=False, qwen2=True),
          # q/k norms, sandwich norms, GeGLU, a scale that is not 1/sqrt(head_dim); no sliding layer
          # sliding-window layers (window 5, shorter than the trace) with their own RoPE base, a global one
          "gemma3-sliding": lambda p: tm.make_gemma3(p, layer_types=["sliding_attention", "full_attention"]),
          "opt-learned-positions": tm.make_opt}


@pytest.fixture(scope="module", params=sorted(MODELS))
def folder(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return convert(MODELS[request.param](tmp / "src"), tmp / "m.flashlm", dtype="q4_1", progress=False)


def _session(folder, graph, **kw):
    rt = dict(threads=1, kv_dtype="f32", activations="f32", ort_graph=graph)
    return Model(open_folder(folder), RuntimeConfig(**{**rt, **kw}))


def _trace(model):
    """Prompt logits (all rows), then token steps, then a second prompt chunk on top of the cache, then
    the same after reset(3) (positions 3.. rewritten)."""
    out = [model.forward(IDS[:6], all_logits=True)]
    out += [model.forward([t]).copy() for t in IDS[6:12]]
    out.append(model.forward(IDS[12:17], all_logits=True))
    model.reset(3)
    out.append(model.forward(IDS[8:13], all_logits=True))
    out.append(model.forward([IDS[13]]).copy())
    return np.concatenate(out)


@pytest.mark.parametrize("per_session", [None, 1], ids=["one-session", "a-session-per-layer"])
def test_one_graph_equals_the_layer_sessions(folder, per_session, monkeypatch):
    """The decoder's layers in one session, or each in its own (SESSION_WEIGHTS caps a session's weights;
    the residual ping-pongs between two bound rows across sessions, an odd count for OPT's 3 layers)."""
    if per_session is not None:
        monkeypatch.setattr(ort_model, "SESSION_WEIGHTS", per_session)
    whole, layers = _session(folder, "whole"), _session(folder, "layers")
    assert isinstance(whole.ort, OrtDecoder) and isinstance(layers.ort, OrtLayers)
    # one group for these tiny models, split in two (layer_groups), or a session per layer; + the lm_head's
    n_parts = min(whole.config.n_layers, 2) + 1 if per_session is None else whole.config.n_layers + 1
    assert len(whole.ort.parts) == n_parts
    got, want = _trace(whole), _trace(layers)
    # measured: <= 1e-6 of the largest logit (f32 rounding of two attention implementations)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # The cache itself: [layer, kv head, position, hd] there, [layer, position, kv head, hd] here; RoPE'd K.
    n = whole.pos
    assert whole.k_cache.shape == (layers.k_cache.shape[0], layers.k_cache.shape[2], layers.k_cache.shape[1],
                                   layers.k_cache.shape[3])
    for a, b in ((whole.k_cache, layers.k_cache), (whole.v_cache, layers.v_cache)):
        np.testing.assert_allclose(a.transpose(0, 2, 1, 3)[:, :n], b[:, :n], rtol=1e-4, atol=1e-4 * np.abs(b).max())
    # Scoring goes through the same graph in sub-chunks.
    whole.reset(), layers.reset()
    assert whole.forward_nll(IDS[:-1], IDS[1:]) == pytest.approx(layers.forward_nll(IDS[:-1], IDS[1:]), rel=1e-5)
    whole.close(), layers.close()


def test_layer_groups_cover_the_layers_in_order_and_end_with_a_half_group():
    """SmolLM2's shapes: 30 layers of 3.5M weights under 20M per session -> five groups of 5, then the last
    5 split 3 + 2 (the last session built sets the load's peak); one layer per group when a layer alone
    exceeds the cap; a single group still splits."""
    from types import SimpleNamespace
    smol = SimpleNamespace(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, n_ff=1536, gated=True)
    groups = ort_model.layer_groups(smol, 20_000_000)
    assert [len(g) for g in groups] == [5, 5, 5, 5, 5, 3, 2]
    assert [i for g in groups for i in g] == list(range(30))
    assert [len(g) for g in ort_model.layer_groups(smol, 1)] == [1] * 30
    assert [len(g) for g in ort_model.layer_groups(smol, 10**12)] == [15, 15]


def test_f16_kv_cache_runs_attention_in_f16(tmp_path):
    """GroupQueryAttention takes its inputs in the cache's type: an f16 cache rounds q, k, v to f16 (the
    numba path rounds only k, v). Still close to the f32 path; the plan counts 2 bytes per cached value."""
    src = tm.make_llama(tmp_path / "src", tied=True, n_kv_heads=2)
    out = convert(src, tmp_path / "m.flashlm", dtype="q4_1", progress=False)
    m16, m32 = _session(out, "whole", kv_dtype="f16"), _session(out, "whole")
    assert m16.k_cache.dtype == np.uint16 and m32.k_cache.dtype == np.float32
    assert m16.plan.kv_cache == m16.k_cache.nbytes + m16.v_cache.nbytes
    assert m32.plan.kv_cache == m32.k_cache.nbytes + m32.v_cache.nbytes
    a, b = _trace(m32), _trace(m16)
    err = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < err <= 1e-2, err                         # measured 2e-3


def test_auto_kv_dtype_is_f32_for_the_one_graph_only(tmp_path):
    """kv_dtype auto: an f32 cache under the one graph (its attention node is slower over f16 on CPU), f16
    bits under the per-layer sessions (numba widens in-register); the plan counts what is allocated."""
    src = tm.make_llama(tmp_path / "src", tied=True, n_kv_heads=2)
    out = convert(src, tmp_path / "m.flashlm", dtype="q4_1", progress=False)
    whole, layers = (_session(out, graph, kv_dtype="auto") for graph in ("whole", "layers"))
    assert whole.whole and whole.k_cache.dtype == np.float32 and whole.ort.kv_type == np.float32
    assert not layers.whole and layers.k_cache.dtype == np.uint16
    for m in (whole, layers):
        assert m.plan.kv_cache == m.k_cache.nbytes + m.v_cache.nbytes
    assert RuntimeConfig().kv_dtype == "auto"


@pytest.mark.parametrize("spin", [10, 0])
def test_two_threads_equal_one(tmp_path, spin):
    """Two threads: every session split (workers spinning 10 us), or (spin 0) only the lm_head's."""
    src = tm.make_llama(tmp_path / "src", tied=False, n_kv_heads=2)
    out = convert(src, tmp_path / "m.flashlm", dtype="q4_1", progress=False)
    two = _session(out, "whole", threads=2, ort_spin_us=spin)
    assert two.ort.layer_threads == (2 if spin else 1)
    one, got = _trace(_session(out, "whole")), _trace(two)
    np.testing.assert_allclose(got, one, rtol=1e-4, atol=1e-4 * np.abs(one).max())


def test_auto_picks_one_graph_only_where_it_can(tmp_path):
    """auto: one graph for a resident quantized model; per-layer sessions when the FFN streams (naive
    mode) or for a head_dim GroupQueryAttention refuses (CPU: multiples of 16; the tiny Qwen3's is 24);
    'whole' refuses those with the reason."""
    llama = convert(tm.make_llama(tmp_path / "l", tied=True), tmp_path / "l.flashlm", dtype="q4_1", progress=False)
    assert isinstance(Model(open_folder(llama), RuntimeConfig()).ort, OrtDecoder)
    assert isinstance(Model(open_folder(llama), RuntimeConfig(mode="naive")).ort, OrtLayers)
    with pytest.raises(FlashlmError, match="FFN rows stream"):
        Model(open_folder(llama), RuntimeConfig(mode="naive", ort_graph="whole"))
    qwen3 = convert(tm.make_qwen3(tmp_path / "q"), tmp_path / "q.flashlm", dtype="q8_0", progress=False)
    assert isinstance(Model(open_folder(qwen3), RuntimeConfig()).ort, OrtLayers)
    with pytest.raises(FlashlmError, match="head_dim 24"):
        Model(open_folder(qwen3), RuntimeConfig(ort_graph="whole"))


def _config(**shape):
    from flashlm.runtime.config import ModelConfig
    return ModelConfig(architecture="llama", vocab_size=49152, ffn_kind="swiglu", norm_kind="rms", norm_eps=1e-5,
                       pos_kind="rope", max_position=2048, **shape)


def test_auto_one_graph_rule_follows_the_measured_models():
    """OrtDecoder.pays: SmolLM2-135M's layers (one graph kept) pass, Qwen2.5-0.5B's and
    1.5B's (measured slower: docs/BENCHMARKS.md issue 7 session 8) do not."""
    smollm2 = _config(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, n_ff=1536)
    qwen05 = _config(d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, n_ff=4864)
    qwen15 = _config(d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128, n_ff=8960)
    assert ort_model.layer_weights(smollm2) == 576 * 15 * 64 + 576 * 576 + 3 * 576 * 1536
    assert OrtDecoder.pays(smollm2)
    assert not OrtDecoder.pays(qwen05) and not OrtDecoder.pays(qwen15)


def test_auto_takes_the_layer_sessions_where_the_one_graph_does_not_pay(tmp_path, monkeypatch):
    """Under auto a model whose layers are over the rule's size runs OrtLayers with the f16 cache (and the
    plan counts that cache); 'whole' still builds the one graph."""
    out = convert(tm.make_llama(tmp_path / "src", tied=True, n_kv_heads=2), tmp_path / "m.flashlm", dtype="q4_1",
                  progress=False)
    assert isinstance(Model(open_folder(out), RuntimeConfig(threads=1)).ort, OrtDecoder)
    monkeypatch.setattr(ort_model, "ONE_GRAPH_MAX_LAYER_WEIGHTS", 0)
    auto = Model(open_folder(out), RuntimeConfig(threads=1))
    assert isinstance(auto.ort, OrtLayers) and not auto.whole and auto.k_cache.dtype == np.uint16
    assert auto.plan.kv_cache == auto.k_cache.nbytes + auto.v_cache.nbytes
    whole = Model(open_folder(out), RuntimeConfig(threads=1, ort_graph="whole"))
    assert isinstance(whole.ort, OrtDecoder) and whole.k_cache.dtype == np.float32
    assert whole.plan.kv_cache == whole.k_cache.nbytes + whole.v_cache.nbytes


def test_one_graph_run_never_imports_numba(tmp_path):
    """The one-graph decoder runs no numba kernel, so a process that decodes with it must not pay numba's
    ~65 MiB of RSS (LLVM): `flashlm run` on it, in a fresh interpreter, leaves numba unimported, and the
    per-layer path in the same setting does import it (so the check can fail)."""
    import subprocess
    import sys
    src = tm.make_llama(tmp_path / "src", tied=True, n_kv_heads=2)
    out = convert(src, tmp_path / "m.flashlm", dtype="q4_1", progress=False)
    code = ("import sys; from flashlm.runtime.cli import main; "
            f"main(['run', {str(out)!r}, '-p', 'a b c', '-n', '3', '--temp', '0', '--no-progress', "
            "'--ort-graph', sys.argv[1]]); print('numba' in sys.modules, file=sys.stderr)")
    for graph, want in (("whole", "False"), ("layers", "True")):
        r = subprocess.run([sys.executable, "-c", code, graph], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip().splitlines()[-1] == want, (graph, r.stderr)
