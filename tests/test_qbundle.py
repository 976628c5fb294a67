"""Quantized bundle rows: GGUF repack, numpy / gguf dequantizer references, and the numba kernels."""
import numpy as np
import pytest
from gguf import quants

from flashlm.runtime import kernels as K, qkernels as QK
from flashlm.runtime import quant as Q
from flashlm.runtime.qbundle import (QFORMATS, dequantize_part, from_gguf_blocks, lanes_from_qtensor, permute_input,
                                     qformat, quantize_part, unpermute)

FORMATS = [(name, sd) for name in sorted(QFORMATS) for sd in (np.float16, np.float32)]


def _weights(rng, n, d):
    w = rng.standard_normal((n, d)).astype(np.float32)
    w[0, :32] = 0.0                      # an all-zero block: scale 0
    w[1 % n, 32:64] = 1e-3 * w[1 % n, 32:64] if d > 32 else w[1 % n, 32:64]
    w[-1, -32:] = np.linspace(-4, 4, 32)  # the last (edge) block with the extremes at its ends
    return w


def _part(w, fmt):
    """Lane-major part of w; f32-scale formats hold the f16 GGUF scales widened (so gguf is the reference)."""
    qt = Q.quantize(w, fmt.name)
    qt.scales, qt.mins = qt.scales.astype(fmt.scale_dtype), None if qt.mins is None else qt.mins.astype(fmt.scale_dtype)
    return lanes_from_qtensor(qt, fmt)


@pytest.mark.parametrize("name", sorted(QFORMATS))
def test_gguf_blocks_repack_exactly(name):
    rng = np.random.default_rng(0)
    fmt = qformat(name)
    w = _weights(rng, 7, 96)
    blocks = quants.quantize(w, fmt.gguf_type)
    part = from_gguf_blocks(blocks, fmt)
    assert part.shape == (7, fmt.row_bytes(96)) == blocks.shape          # the same bytes, rearranged
    assert sorted(part.ravel()) == sorted(np.concatenate(                # ... for 4-bit, q8_0 codes are bytes too
        [blocks.reshape(7, 3, -1)[:, :, fmt.block_bytes - fmt.quant_bytes_per_block:].ravel(),
         blocks.reshape(7, 3, -1)[:, :, :fmt.block_bytes - fmt.quant_bytes_per_block].ravel()]))
    np.testing.assert_array_equal(dequantize_part(part, fmt), quants.dequantize(blocks, fmt.gguf_type))
    np.testing.assert_array_equal(part, quantize_part(w, fmt))        # quant.quantize rounds as gguf does


@pytest.mark.parametrize("name", sorted(QFORMATS))
def test_f32_scale_dequantizer_matches_gguf(name):
    rng = np.random.default_rng(1)
    w = _weights(rng, 5, 64)
    f32 = qformat(name, np.float32)
    part = _part(w, f32)
    assert part.shape[1] == f32.row_bytes(64)
    ref = quants.dequantize(quants.quantize(w, f32.gguf_type), f32.gguf_type)
    np.testing.assert_array_equal(dequantize_part(part, f32), ref)


def test_scales_that_do_not_fit_f16_are_refused():
    qt = Q.quantize(np.ones((1, 32), np.float32), "q8_0")
    qt.scales = np.array([[1.0 + 2 ** -20]], np.float32)
    with pytest.raises(ValueError, match="not be exact"):
        lanes_from_qtensor(qt, qformat("q8_0"))


def test_permutation_round_trips():
    h = np.arange(2 * 96, dtype=np.float32).reshape(2, 96)
    p = permute_input(h)
    assert p[0, 1] == h[0, 32] and p[0, 3] == h[0, 1]             # element b*32+j at j*nb+b (nb=3)
    np.testing.assert_array_equal(unpermute(p, np.empty_like(h)), h)


def _bundle(rng, fmt, n, d, swiglu, stride_pad=20):
    names = ["gate", "up", "down"] if swiglu else ["up", "down"]
    w = {k: _weights(rng, n, d) for k in names}
    parts = [_part(w[k], fmt) for k in names]
    pb = fmt.row_bytes(d)
    rows = np.zeros((n, len(names) * pb + stride_pad), np.uint8)   # padding after the parts, like a stride
    rows[:, :len(names) * pb] = np.concatenate(parts, axis=1)
    vals = {k: dequantize_part(p, fmt) for k, p in zip(names, parts)}
    starts = np.array([names.index("up") * pb, names.index("gate") * pb if swiglu else 0, names.index("down") * pb])
    return rows, vals, starts


def _reference(h, vals, bias, act, thr=0.0):
    u = h @ vals["up"].T
    if act != K.ACT_RELU:
        g = (h @ vals["gate"].T).astype(np.float64)
        if act == K.ACT_SILU:
            a = g / (1 + np.exp(-g)) * u
        elif act == K.ACT_GELU_TANH:
            a = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u
        else:   # FATReLU gate (thr 0: ReLU); dReLU also zeroes a negative up
            a = np.where(g > thr, g, 0.0) * (u if act == K.ACT_RELU_GATE else np.maximum(u, 0.0))
    else:
        a = np.maximum(u + bias, 0)
    return a @ vals["down"]


@pytest.mark.parametrize("name,sd", FORMATS)
@pytest.mark.parametrize("act,thr", [(K.ACT_SILU, 0.0), (K.ACT_GELU_TANH, 0.0), (K.ACT_RELU_GATE, 0.3),
                                     (K.ACT_DRELU, 0.0), (K.ACT_RELU, 0.0)])
@pytest.mark.parametrize("T", [1, 3])
def test_ffn_qbundles_matches_numpy_in_any_row_order(name, sd, act, thr, T):
    swiglu = act != K.ACT_RELU
    rng = np.random.default_rng(2)
    fmt = qformat(name, sd)
    n, d = 37, 96                                  # odd row count, 3 blocks per part
    rows, vals, starts = _bundle(rng, fmt, n, d, swiglu)
    h = rng.standard_normal((T, d)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q, s = fmt.views(rows)
    for perm, n_rows in ((np.arange(n), n), (rng.permutation(n), n), (rng.permutation(n), 20)):
        perm = perm.astype(np.int32)
        used = perm[:n_rows]
        sub = {k: v[used] for k, v in vals.items()}
        ref = _reference(h, sub, bias[used], act, thr)
        out = np.full((T, d), np.nan, np.float32)
        # rows beyond n_rows hold garbage the kernel must not touch
        qr = np.concatenate([rows[perm], rng.integers(0, 255, (3, rows.shape[1]), dtype=np.uint8)])
        qv, sv = fmt.views(qr)
        QK.ffn_qbundles(permute_input(h), qv, sv, n_rows, perm, np.zeros(0, np.float32) if swiglu else bias,
                        act, np.float32(thr), fmt.array(), starts, np.zeros((3, T, d), np.float32), out,
                        np.zeros(0, np.int32))
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-4 * np.abs(ref).max())
        # keep: only these rows, in any order (the cached rows a decode token computes)
        keep = np.array([n_rows - 1, 0, n_rows // 2], np.int32)
        sub = {k: v[perm[keep]] for k, v in vals.items()}
        QK.ffn_qbundles(permute_input(h), qv, sv, n_rows, perm, np.zeros(0, np.float32) if swiglu else bias,
                        act, np.float32(thr), fmt.array(), starts, np.zeros((3, T, d), np.float32), out, keep)
        ref = _reference(h, sub, bias[perm[keep]], act, thr)
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name,sd", FORMATS)
def test_dequant_rows_gives_the_permuted_values(name, sd):
    rng = np.random.default_rng(3)
    fmt = qformat(name, sd)
    rows, vals, starts = _bundle(rng, fmt, 9, 64, True)
    q, s = fmt.views(rows)
    out = np.empty((4, 3 * 64), np.float32)
    QK.dequant_rows(q, s, 3, 7, fmt.array(), starts, 64, out)          # up, gate, down
    for p, k in enumerate(["up", "gate", "down"]):
        np.testing.assert_array_equal(out[:, p * 64:(p + 1) * 64], permute_input(vals[k][3:7]))


@pytest.mark.parametrize("name", sorted(QFORMATS))
def test_widen_to_f16_rounds_like_numpy(name):
    rng = np.random.default_rng(4)
    fmt = qformat(name)
    rows, vals, starts = _bundle(rng, fmt, 11, 64, False)
    q, s = fmt.views(rows)
    src = np.array([10, 0, 5], np.int32)
    out = np.zeros((3, 128), np.uint16)
    QK.widen_rows_f16(q, s, src, 3, fmt.array(), starts[[0, 2]], 64, out)
    ref = np.concatenate([permute_input(vals["up"][src]), permute_input(vals["down"][src])], axis=1)
    # compared as values: a zero block may come out as -0 in one and +0 in the other
    np.testing.assert_array_equal(out.view(np.float16), ref.astype(np.float16))
