"""Flash, naive and dense modes over quantized bundle rows: the cache machinery is exact given its rows,
every mode computes what dense mode computes on the same bundles, and bytes read fall by the stride ratio."""
import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from test_flash_modes import IDS, OracleComputeFilter, OraclePredictor, _logits


@pytest.fixture(scope="module")
def opt_src(tmp_path_factory):
    return tm.make_opt(tmp_path_factory.mktemp("qopt") / "src")


@pytest.fixture(scope="module")
def opt_q4(opt_src, tmp_path_factory):
    from flashlm.converters.calibrate import calibrate
    out = convert(opt_src, tmp_path_factory.mktemp("q4") / "opt-q4.flashlm", bundle_dtype="q4_0", progress=False)
    calibrate(out, n_tokens=200, ranks=(8,), progress=False)
    return out


def _oracles(folder, kind=OraclePredictor):
    """Oracle predictors from the quantized up rows' values (the rows the kernels compute with)."""
    dense = Model(open_folder(folder))
    out = [kind(dense.folder.bundles.decode_part(rows, "up"), dense.w[f"layers.{i}.ffn.up.bias"])
           for i, rows in enumerate(dense.ffn_backend.layer_rows)]
    dense.close()
    return out


def test_q4_bundles_are_stored_quantized(opt_q4):
    b = open_folder(opt_q4).bundles
    assert b.storage.name == "q4_0.lanes" and b.dtype == np.uint8
    assert b.row_bytes == 2 * 2 * 18 and b.stride_bytes == 128       # 2 parts of 2 blocks, padded to 2^k


@pytest.mark.parametrize("kind", [OraclePredictor, OracleComputeFilter])
@pytest.mark.parametrize("capacity_fraction", [1.0, 0.3])
def test_flash_with_oracle_over_q4_bundles_equals_dense_q4(opt_q4, capacity_fraction, kind):
    """(OracleComputeFilter: decode tokens also skip the cached rows of inactive neurons, exactly.)"""
    # f32 KV caches: with the f16 default a 1e-7 difference of FFN summation order can flip one rounding.
    ref, _, _ = _logits(opt_q4, kv_dtype="f32")                       # dense: the same bundles all resident
    folder = open_folder(opt_q4)
    model = Model(folder, RuntimeConfig(mode="flash", window=2, io="buffered", layer_io="sparse", kv_dtype="f32"),
                  predictors=_oracles(opt_q4, kind))
    ffn = model.ffn_backend
    # the caches hold the rows' 72 bytes of parts (rounded to 80), not the file's 128-byte stride
    assert all(c.rows.shape[1] == folder.bundles.cache_row_bytes == 80 for c in ffn.caches)
    if capacity_fraction < 1:
        from flashlm.runtime.neuron_cache import NeuronCache
        cap = int(folder.config.n_ff * capacity_fraction)
        ffn.caches = [NeuronCache(folder.config.n_ff, cap, c.row_elems, c.rows.dtype, window=2) for c in ffn.caches]
    pre = model.forward(IDS[:6], all_logits=True)                     # prompt path (dequantize + BLAS)
    dec = [model.forward([t])[0] for t in IDS[6:]]                    # decode path (kernel on the blocks)
    np.testing.assert_allclose(np.concatenate([pre, np.stack(dec)]), ref, atol=1e-5)
    st = ffn.stats
    assert st.wanted > 0 and 0 < st.hits < st.wanted
    # (caches at 30% keep little beyond each token's own rows: nothing left to skip there)
    assert (st.cached_skipped > 0) == (kind is OracleComputeFilter and capacity_fraction == 1)
    assert ffn.reader.stats.bytes_read >= (st.wanted - st.hits) * folder.bundles.stride_bytes * \
        (0.99 if capacity_fraction == 1 else 0)
    if capacity_fraction < 1:
        assert st.overflow > 0, "small caches must stream the surplus"
    model.close()


def test_naive_reads_fall_by_the_stride_ratio(opt_src, opt_q4, tmp_path):
    f16 = convert(opt_src, tmp_path / "opt-f16.flashlm", progress=False)
    _, _, m16 = _logits(f16, mode="naive", io="buffered")
    _, _, m4 = _logits(opt_q4, mode="naive", io="buffered")
    ratio = m16.folder.bundles.stride_bytes / m4.folder.bundles.stride_bytes
    assert ratio == 256 / 128                                  # f16 rows: 2 x 64 x 2 bytes
    assert m16.ffn_backend.reader.stats.bytes_read == ratio * m4.ffn_backend.reader.stats.bytes_read


def _hf_logits_with_quantized_ffn(src, fmt_name):
    """transformers' logits with every FFN weight replaced by its quantized value along d (gguf's
    quantizer and dequantizer): gate/up rows as they are, down columns as rows of W_down.T."""
    import torch
    from gguf import quants
    from flashlm.runtime.qbundle import qformat
    t = qformat(fmt_name).gguf_type
    model = tm.load_reference(src)

    def q(w):                                     # rows of w [n, d] -> dequantized values
        return torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), t), t).astype(np.float32))
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight.copy_(q(mlp.gate_proj.weight))
            mlp.up_proj.weight.copy_(q(mlp.up_proj.weight))
            mlp.down_proj.weight.copy_(q(mlp.down_proj.weight.T.contiguous()).T)
        return model(torch.tensor([IDS])).logits[0].float().numpy()


@pytest.mark.parametrize("bundle_dtype", ["q8_0", "q4_1", "q4_0"])
def test_swiglu_quantized_bundles_equal_transformers_on_the_quantized_values(tmp_path, bundle_dtype):
    """Every mode over q8_0 / q4_1 / q4_0 bundles equals dense; dense equals transformers run with the
    same quantized FFN values (so the only error is the quantization itself, stated below)."""
    src = tm.make_llama(tmp_path / "src", tied=True)
    out = convert(src, tmp_path / "m.flashlm", dtype="f32", bundle_dtype=bundle_dtype, progress=False)
    ref, _, _ = _logits(out, kv_dtype="f32")          # the f32 path against transformers: f32 KV cache too
    for mode in ("naive", "mmap"):
        got, _, _ = _logits(out, mode=mode, io="buffered", kv_dtype="f32")
        np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(ref, _hf_logits_with_quantized_ffn(src, bundle_dtype), atol=1e-4)
    # Quantization error on this tiny random model (logits up to ~6.4), f32 elsewhere: measured max
    # |diff| 0.11 (q8_0), 1.45 (q4_1), 1.59 (q4_0); the bound only catches a broken quantizer.
    hf = tm.reference_logits(src, IDS)
    assert np.abs(ref - hf).max() < {"q8_0": 0.2, "q4_1": 2.5, "q4_0": 2.5}[bundle_dtype]


def test_flash_plan_counts_whole_layers_packed_and_fits_where_naive_does(opt_q4):
    """Layers flash keeps resident or streams come from the packed copy (no padding), so the planner
    counts them packed: a budget that holds every layer packed (but not padded) keeps them all resident,
    and a budget that naive fits is never refused by flash (it can always stream every layer)."""
    from flashlm.runtime.cost_model import CostModel
    from flashlm.runtime.memory import plan_memory, stream_ring_bytes, whole_layer_bytes
    from flashlm.runtime.predictor import read_calibration
    folder = open_folder(opt_q4)
    assert folder.packed is not None and folder.packed.row_bytes < folder.bundles.stride_bytes
    c, packed_layer = folder.config, whole_layer_bytes(folder)[1]
    cal = read_calibration(folder)

    def plan(mode, budget):
        rt = RuntimeConfig(mode=mode, budget=str(budget), ctx_len=64)
        return plan_memory(folder, rt, activations=0, calibration=cal, costs=CostModel.for_run(folder, rt))

    fixed = plan("naive", 10 ** 9).total - plan("naive", 10 ** 9).scratch
    every_packed = fixed + c.n_layers * packed_layer
    assert every_packed < fixed + c.n_layers * folder.bundles.layer_bytes
    p = plan("flash", every_packed)
    assert [lp.placement.value for lp in p.layers] == ["resident"] * c.n_layers
    assert p.ffn_resident == c.n_layers * packed_layer and p.total <= every_packed
    tight = plan("naive", fixed + stream_ring_bytes(folder, -(-c.n_ff // 16))).total   # naive's smallest ring
    q = plan("flash", tight)
    assert q.total <= tight and "stream" in [lp.placement.value for lp in q.layers]
