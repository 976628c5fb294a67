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


def _ffn_reference(h, gate, up, down, bias, act):
    torch = pytest.importorskip("torch", reason="torch is the reference for the gated activations")
    u = h @ up.T
    if act == K.ACT_RELU:
        a = np.maximum(u + bias, 0)
    else:   # torch's own activations are the reference for the gated kinds
        g = torch.from_numpy(h @ gate.T)
        g = torch.nn.functional.silu(g) if act == K.ACT_SILU else torch.nn.functional.gelu(g, approximate="tanh")
        a = g.numpy() * u
    return a @ down.T


@pytest.mark.parametrize("act", [K.ACT_SILU, K.ACT_GELU_TANH, K.ACT_RELU])
@pytest.mark.parametrize("T", [1, 3])
def test_ffn_bundles_matches_numpy_in_any_row_order(act, T):
    swiglu = act != K.ACT_RELU
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
    ref = _ffn_reference(h, gate, up, down, bias, act)
    for perm in (np.arange(n, dtype=np.int32), rng.permutation(n).astype(np.int32)):
        r = np.ascontiguousarray(rows[perm])
        out = np.empty((T, d), np.float32)
        K.ffn_bundles(h, r, n, perm, b, act, *offs, np.zeros((3, T, d), np.float32), out)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # only the first n_rows rows count: the rest of a cache matrix is free space
    out = np.empty((T, d), np.float32)
    K.ffn_bundles(h, rows, 20, np.arange(n, dtype=np.int32), b, act, *offs, np.zeros((2, T, d), np.float32), out)
    np.testing.assert_allclose(out, _ffn_reference(h, gate[:20], up[:20], down[:, :20], bias[:20], act),
                               rtol=1e-4, atol=1e-4)


def test_gate_np_matches_kernel_activation():
    g = np.linspace(-8, 8, 101).astype(np.float32)
    torch = pytest.importorskip("torch", reason="torch is the reference for the gated activations")
    np.testing.assert_allclose(K.gate_np(g, K.ACT_GELU_TANH),
                               torch.nn.functional.gelu(torch.from_numpy(g), approximate="tanh").numpy(), atol=1e-6)
    np.testing.assert_allclose(K.gate_np(g, K.ACT_SILU), torch.nn.functional.silu(torch.from_numpy(g)).numpy(),
                               atol=1e-6)


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
    for act in (K.ACT_SILU, K.ACT_GELU_TANH):
        K.contribution(g, u, norm, act, out)
        np.testing.assert_allclose(out, np.abs(K.gate_np(g, act) * u) * norm, rtol=1e-5, atol=1e-6)
        K.contribution(g, u, np.zeros(0, np.float32), act, out)
        np.testing.assert_allclose(out, np.abs(K.gate_np(g, act) * u), rtol=1e-5, atol=1e-6)
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
