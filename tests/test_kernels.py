"""Numba kernels against plain numpy references."""
import numpy as np
import pytest

from flashlm.runtime import kernels as K


def _f16(a):
    return a.astype(np.float16).view(np.uint16)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("half", [False, True])
def test_matmul(T, half):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, 70)).astype(np.float32)
    w = rng.standard_normal((45, 70)).astype(np.float32)
    out = np.empty((T, 45), np.float32)
    K.matmul(x, _f16(w) if half else w, out)
    ref = x @ (w.astype(np.float16).astype(np.float32) if half else w).T
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_f16_widening_handles_every_class():
    bits = np.array([0, 1, 0x3FF, 0x400, 0x3C00, 0x7BFF, 0x8001, 0xC000, 0x8000], np.uint16)  # 0, subnormals, normals
    # row i of `w` holds only element i, so out[i] is that element widened (NaN/inf excluded by design)
    w = np.zeros((len(bits), len(bits)), np.uint16)
    w[np.arange(len(bits)), np.arange(len(bits))] = bits
    res = np.empty((1, len(bits)), np.float32)
    K.matmul(np.ones((1, len(bits)), np.float32), w, res)
    np.testing.assert_array_equal(res[0], bits.view(np.float16).astype(np.float32))


def _torch_activation(g, u, act, thr):
    """a = act(g) * u by torch's own functions: silu, tanh-GELU, F.threshold (FATReLU, what MiniCPM-S /
    ProSparse run; thr 0 is ReLU), and relu on both sides for dReLU (TurboSparse / Bamboo)."""
    torch = pytest.importorskip("torch", reason="torch is the reference for the gated activations")
    F = torch.nn.functional
    g, u = torch.from_numpy(np.asarray(g, np.float32)), torch.from_numpy(np.asarray(u, np.float32))
    if act == K.ACT_SILU:
        a = F.silu(g) * u
    elif act == K.ACT_GELU_TANH:
        a = F.gelu(g, approximate="tanh") * u
    elif act == K.ACT_RELU_GATE:
        a = F.threshold(g, float(thr), 0.0) * u
    else:
        a = F.threshold(g, float(thr), 0.0) * F.relu(u)
    return a.numpy()


def _ffn_reference(h, gate, up, down, bias, act, thr=0.0):
    u = h @ up.T
    if act == K.ACT_RELU:
        a = np.maximum(u + bias, 0)
    else:   # torch's own activations are the reference for the gated kinds
        a = _torch_activation(h @ gate.T, u, act, thr)
    return a @ down.T


# (act, FATReLU threshold): every FFN activation the kernels run
ALL = np.zeros(0, np.int32)      # an FFN kernel's keep: every row
ACTS = [(K.ACT_SILU, 0.0), (K.ACT_GELU_TANH, 0.0), (K.ACT_RELU_GATE, 0.0), (K.ACT_RELU_GATE, 0.4),
        (K.ACT_DRELU, 0.0), (K.ACT_DRELU, 0.3), (K.ACT_RELU, 0.0)]


def test_select_rows_keeps_the_rows_scored_above_the_threshold():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal(40).astype(np.float32)
    neuron_of_row = rng.permutation(40)[:25].astype(np.int32)       # 25 cached rows of 40 neurons
    out = np.full(40, -1, np.int32)
    k = K.select_rows(scores, neuron_of_row, 20, np.float32(0.3), out)     # the first 20 rows are live
    want = [r for r in range(20) if scores[neuron_of_row[r]] > 0.3]
    assert 0 < len(want) < 20 and out[:k].tolist() == want and (out[k:] == -1).all()

@pytest.mark.parametrize("act,thr", ACTS)
@pytest.mark.parametrize("T", [1, 3])
def test_ffn_bundles_matches_numpy_in_any_row_order(act, thr, T):
    swiglu = act != K.ACT_RELU
    thr = np.float32(thr)
    rng = np.random.default_rng(1)
    d, n = 24, 50
    h = rng.standard_normal((T, d)).astype(np.float32)
    gate, up = rng.standard_normal((2, n, d)).astype(np.float32)
    down = rng.standard_normal((d, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    if swiglu:
        rows = np.concatenate([gate, up, down.T, np.zeros((n, 5), np.float32)], axis=1)
        offs, b = (d, 0, 2 * d), np.zeros(0, np.float32)
    else:
        rows = np.concatenate([up, down.T], axis=1)
        offs, b = (0, 0, d), bias
    ref = _ffn_reference(h, gate, up, down, bias, act, thr)
    for perm in (np.arange(n, dtype=np.int32), rng.permutation(n).astype(np.int32)):
        r = np.ascontiguousarray(rows[perm])
        out = np.empty((T, d), np.float32)
        K.ffn_bundles(h, r, n, perm, b, act, thr, *offs, np.zeros((3, T, d), np.float32), out, ALL)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # only the first n_rows rows count: the rest of a cache matrix is free space
    out = np.empty((T, d), np.float32)
    K.ffn_bundles(h, rows, 20, np.arange(n, dtype=np.int32), b, act, thr, *offs, np.zeros((2, T, d), np.float32), out,
                  ALL)
    np.testing.assert_allclose(out, _ffn_reference(h, gate[:20], up[:20], down[:, :20], bias[:20], act, thr),
                               rtol=1e-4, atol=1e-4)
    # keep: just these rows (any order, 3 chunks over 7 rows), as if the others were not there
    keep = np.array([17, 2, 30, 5, 11, 29, 0], np.int32)
    K.ffn_bundles(h, rows, n, np.arange(n, dtype=np.int32), b, act, thr, *offs, np.zeros((3, T, d), np.float32), out,
                  keep)
    np.testing.assert_allclose(out, _ffn_reference(h, gate[keep], up[keep], down[:, keep], bias[keep], act, thr),
                               rtol=1e-4, atol=1e-4)
    if swiglu:   # the gate-resident kernel: gate.h (and up.h) precomputed for every neuron
        g_pre, u_pre = h @ gate.T, h @ up.T
        K.ffn_bundles_pregate(h, np.ascontiguousarray(rows[:, d:]), n, np.arange(n, dtype=np.int32), g_pre,
                              np.zeros((0, n), np.float32), act, thr, 0, d, np.zeros((2, T, d), np.float32), out)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        K.ffn_bundles_pregate(h, np.ascontiguousarray(rows[:, 2 * d:]), n, np.arange(n, dtype=np.int32), g_pre,
                              u_pre, act, thr, 0, 0, np.zeros((2, T, d), np.float32), out)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act,thr", [a for a in ACTS if a[0] != K.ACT_RELU])
def test_activate_np_matches_torch(act, thr):
    g = np.linspace(-8, 8, 101).astype(np.float32)
    u = np.linspace(3, -5, 101).astype(np.float32)
    np.testing.assert_allclose(K.activate_np(g, u, act, np.float32(thr)), _torch_activation(g, u, act, thr),
                               atol=1e-5)


@pytest.mark.parametrize("window,scale", [(0, None), (2, None), (4, 0.3)])
def test_attention_is_causal_gqa(window, scale):
    rng = np.random.default_rng(2)
    T, H, Hkv, hd, pos0 = 3, 4, 2, 8, 2
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    kc = rng.standard_normal((10, Hkv, hd)).astype(np.float32)
    vc = rng.standard_normal((10, Hkv, hd)).astype(np.float32)
    out = np.empty_like(q)
    scale = 1 / np.sqrt(hd) if scale is None else scale
    K.attention(q, kc, vc, pos0, scale, window, out)
    for t in range(T):
        for h in range(H):
            n = pos0 + t + 1
            lo = max(0, n - window) if window else 0   # a sliding layer sees its last `window` positions
            s = kc[lo:n, h // 2] @ q[t, h] * scale
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[t, h], (p / p.sum()) @ vc[lo:n, h // 2], rtol=1e-5, atol=1e-5)


def test_decode_selection_kernels_match_numpy():
    """The predictors' per-token kernels (runtime/predictor.py): top-k and threshold selection, the
    contribution score, and the KV store into f16 bits, against numpy."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1536):
        for trial in range(12):
            s = rng.standard_normal(n).astype(np.float32)
            if trial % 3 == 0:
                s = np.round(s * 2).astype(np.float32)         # many ties
            if trial % 4 == 0:
                s = np.sort(s)                                 # sorted input: no quadratic quickselect
            k = int(rng.integers(1, n + 1))
            ids, work = np.empty(n, np.int32), np.empty(n, np.float32)
            m = K.select_top(s, k, work, ids)
            got = ids[:m]
            ref = np.sort(np.argpartition(-s, k - 1)[:k])
            assert m == k and np.all(np.diff(got) > 0)
            np.testing.assert_array_equal(np.sort(s[got]), np.sort(s[ref]))   # the same values (ties aside)
            m = K.select_above(s, np.float32(0.3), ids)
            np.testing.assert_array_equal(ids[:m], np.flatnonzero(s > 0.3))
    g, u, norm = (rng.standard_normal(64).astype(np.float32) for _ in range(3))
    out = np.empty(64, np.float32)
    for act, thr in [a for a in ACTS if a[0] != K.ACT_RELU]:
        thr = np.float32(thr)
        K.contribution(g, u, norm, act, thr, out)
        np.testing.assert_allclose(out, np.abs(_torch_activation(g, u, act, thr)) * norm, rtol=1e-5, atol=1e-6)
        K.contribution(g, u, np.zeros(0, np.float32), act, thr, out)
        np.testing.assert_allclose(out, np.abs(_torch_activation(g, u, act, thr)), rtol=1e-5, atol=1e-6)
    kv = rng.standard_normal((3, 2, 8)).astype(np.float32)
    bits = np.zeros((3, 2, 8), np.uint16)
    K.store_kv(kv, bits)
    np.testing.assert_array_equal(bits, kv.astype(np.float16).view(np.uint16))      # round to nearest even
    f32 = np.zeros_like(kv)
    K.store_kv(kv, f32)
    np.testing.assert_array_equal(f32, kv)


@pytest.mark.parametrize("T,window", [(1, 0), (3, 2)])
def test_serial_rope_kv_attention_equals_the_parallel_kernel(T, window):
    """The decode-token variant (one thread) computes exactly what the parallel kernel does."""
    rng = np.random.default_rng(4)
    H, Hkv, hd, pos0 = 4, 2, 8, 3
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * hd)).astype(np.float32)
    cos, sin = rng.standard_normal((2, T, hd // 2)).astype(np.float32)
    outs = []
    for kernel in (K.rope_kv_attention, K.rope_kv_attention_serial):
        kc = rng.standard_normal((10, Hkv, hd)).astype(np.float16).view(np.uint16)
        kc[:] = 0
        vc = kc.copy()
        kc[:pos0] = vc[:pos0] = np.arange(pos0 * Hkv * hd, dtype=np.float16).reshape(pos0, Hkv, hd).view(np.uint16)
        q, out = qkv.copy(), np.empty((T, H * hd), np.float32)
        kernel(q, H, cos, sin, kc, vc, pos0, 0.3, window, out)
        outs.append((out, q, kc, vc))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
