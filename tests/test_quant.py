"""Block math of the quantized storage types against gguf's reference (de)quantizers and numpy."""
import gguf
import numpy as np
import pytest

from flashlm.runtime import quant as Q

GT = gguf.GGMLQuantizationType


def random_gguf_blocks(name: str, n_blocks: int, rng) -> np.ndarray:
    """Random raw GGUF blocks of type `name` whose f16 scale fields are finite, moderate numbers."""
    bs, ts = gguf.GGML_QUANT_SIZES[getattr(GT, name)]
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    # Where each type keeps its f16 fields (d, and m / dmin): overwrite them with sane values.
    f16_at = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [ts - 2]}[name]
    for at in f16_at:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_blocks_repack_bit_exactly(name):
    rng = np.random.default_rng(1)
    bs, _ = gguf.GGML_QUANT_SIZES[getattr(GT, name)]
    n, k = 5, 2 * max(bs, 64)
    raw = random_gguf_blocks(name, n * k // bs, rng)
    ref = gguf.quants.dequantize(raw, getattr(GT, name)).reshape(n, k)
    qt = Q.from_gguf(raw, getattr(GT, name), (n, k))
    assert qt.qtype.name == Q.gguf_target(getattr(GT, name))
    got = qt.dequantize()
    assert got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    # Row slices decode the same as the whole (the embedding lookup decodes single rows).
    np.testing.assert_array_equal(qt.dequantize([3, 1]), ref[[3, 1]])


@pytest.mark.parametrize("type_name", Q.QUANTIZE_TYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 80), (1, 33), (5, 32)])
def test_quantize_matches_gguf_and_bounds(type_name, shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(shape).astype(np.float32)
    w[0, :5] *= 40                                   # an outlier block
    qt = Q.quantize(w, type_name)
    n, k = shape
    kp = -(-k // 32) * 32
    assert qt.shape == shape and qt.block == 32 and qt.scales.shape == (n, kp // 32)
    got = qt.dequantize()
    assert got.shape == shape
    # Identical to gguf's quantize + dequantize of the zero-padded rows.
    padded = np.zeros((n, kp), np.float32)
    padded[:, :k] = w
    gtype = getattr(GT, type_name.upper())
    ref = gguf.quants.dequantize(gguf.quants.quantize(padded, gtype), gtype).reshape(n, kp)[:, :k]
    np.testing.assert_array_equal(got, ref)
    # Error bound per block, independent of gguf: half a quantization step (plus f16 rounding of scale/min);
    # q4_0 spans [-8, 7] steps around the sign of the block's largest value, so the opposite extreme may
    # clip by up to one step.
    blocks = np.zeros((n, kp), np.float32)
    blocks[:, :k] = np.abs(got - w)
    err = blocks.reshape(n, kp // 32, 32).max(axis=2)
    step = np.abs(qt.scales.astype(np.float32))
    amax = np.abs(padded).reshape(n, kp // 32, 32).max(axis=2)
    half = 1.0 if type_name == "q4_0" else 0.5
    assert np.all(err <= half * step + 2e-3 * amax + 1e-6)


def test_nibble_order_is_element_pairs_low_first():
    codes = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    qs = Q.pack_codes(codes, 4)
    assert qs.shape == (1, 16)
    assert qs[0, 0] == (codes[0, 0] | (codes[0, 1] << 4))
    np.testing.assert_array_equal(Q.unpack_codes(qs, 4), codes)


def test_q4_0_and_q8_0_decode_formula():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, size=(3, 64), dtype=np.uint8)
    scales = rng.uniform(0.5, 2, size=(3, 2)).astype(np.float16)
    qt = Q.QTensor(Q.QUANT_TYPES["q4_0"], (3, 50), 32, Q.pack_codes(codes, 4), scales)
    want = ((codes.astype(np.float32) - 8).reshape(3, 2, 32) * scales.astype(np.float32)[..., None]).reshape(3, 64)
    np.testing.assert_array_equal(qt.dequantize(), want[:, :50])
    codes8 = rng.integers(0, 256, size=(2, 32), dtype=np.uint8)
    mins = rng.standard_normal((2, 1)).astype(np.float32)
    s8 = rng.uniform(0.5, 2, size=(2, 1)).astype(np.float32)
    qt8 = Q.QTensor(Q.QUANT_TYPES["q8_1"], (2, 32), 32, codes8, s8, mins)
    np.testing.assert_array_equal(qt8.dequantize(), codes8 * s8 + mins)


def test_bad_layouts_are_refused():
    t = Q.QUANT_TYPES["q4_1"]
    with pytest.raises(Q.QuantError, match="codes"):
        Q.QTensor(t, (2, 64), 32, np.zeros((2, 31), np.uint8), np.zeros((2, 2), np.float16), np.zeros((2, 2), np.float16))
    with pytest.raises(Q.QuantError, match="mins"):
        Q.QTensor(t, (2, 64), 32, np.zeros((2, 32), np.uint8), np.zeros((2, 2), np.float16))
    with pytest.raises(Q.QuantError, match="block size"):
        Q.QTensor(t, (2, 64), 24, np.zeros((2, 32), np.uint8), np.zeros((2, 2), np.float16), np.zeros((2, 2), np.float16))
    with pytest.raises(Q.QuantError, match="needs"):
        Q.from_gguf(np.zeros(10, np.uint8), GT.Q8_0, (2, 32))
    with pytest.raises(Q.QuantError, match="no exact"):
        Q.from_gguf(np.zeros(10, np.uint8), GT.Q2_K, (1, 256))
    with pytest.raises(Q.QuantError, match="cannot quantize"):
        Q.quantize(np.zeros((2, 32), np.float32), "q8_1")


def test_parts_round_trip():
    rng = np.random.default_rng(4)
    qt = Q.quantize(rng.standard_normal((4, 70)).astype(np.float32), "q4_1")
    parts = Q.tensor_parts("w", qt)
    assert set(parts) == {"w.qs", "w.scales", "w.mins"}
    planned = Q.part_shapes("q4_1", (4, 70), 32, "F16")
    assert {s: tuple(p[1]) for s, p in planned.items()} == {s.split(".")[1]: a.shape for s, a in parts.items()}
    back = Q.from_parts("q4_1", (4, 70), {"qs": parts["w.qs"], "scales": parts["w.scales"].view(np.uint16),
                                          "mins": parts["w.mins"].view(np.uint16)})
    assert back.block == 32
    np.testing.assert_array_equal(back.dequantize(), qt.dequantize())
