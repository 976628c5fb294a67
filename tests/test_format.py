"""The model folder: row-column bundles, alignment, atomic writes, verification of corrupt files."""
import json
import zlib

import numpy as np
import pytest
from safetensors import safe_open

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.converters.hf_source import HFSource
from flashlm.converters.source import ConversionError
from flashlm.converters.writer import bundle_stride, write_model
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import ModelFileError, open_folder


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return tm.make_llama(tmp_path_factory.mktemp("llama"), tied=False)


@pytest.mark.parametrize("row, stride", [(384, 512), (512, 512), (3456, 4096), (4096, 4096), (4097, 8192),
                                         (10240, 12288), (1, 1), (100, 128)])
def test_bundle_stride_never_straddles_a_block(row, stride):
    assert bundle_stride(row) == stride
    assert stride % 4096 == 0 or 4096 % stride == 0


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_bundle_rows_hold_gate_up_down_of_one_neuron(llama_src, tmp_path, dtype):
    out = convert(llama_src, tmp_path / "m.flashlm", dtype=dtype, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    b = manifest["bundles"]
    src = HFSource(llama_src)
    d, n_ff = src.config.d_model, src.config.n_ff
    assert [p["name"] for p in b["parts"]] == ["gate", "up", "down"]
    assert b["row_bytes"] == 3 * d * (2 if dtype == "f16" else 4)
    assert b["stride_bytes"] == bundle_stride(b["row_bytes"])
    np_dtype = np.float16 if dtype == "f16" else np.float32
    with safe_open(str(out / "ffn.safetensors"), framework="numpy") as f:   # other tools can open it
        rows = f.get_tensor("layers.1.ffn.bundles")
    raw = np.fromfile(out / "ffn.safetensors", dtype=np.uint8)
    for layer, off in enumerate(b["layer_offsets"]):
        assert off % 4096 == 0, "each layer's first row must be direct-I/O aligned"
    start = b["layer_offsets"][1]
    direct = raw[start:start + n_ff * b["stride_bytes"]].view(np_dtype).reshape(n_ff, -1)
    np.testing.assert_array_equal(direct, rows)
    gate, up, down = (src.load(f"layers.1.ffn.{n}.weight") for n in ("gate", "up", "down"))
    for i in (0, 7, n_ff - 1):
        np.testing.assert_array_equal(rows[i, :d], gate[i].astype(np_dtype))
        np.testing.assert_array_equal(rows[i, d:2 * d], up[i].astype(np_dtype))
        np.testing.assert_array_equal(rows[i, 2 * d:3 * d], down[:, i].astype(np_dtype))
        assert not rows[i, 3 * d:].any(), "padding is zero"


def test_opt_bundle_is_up_row_and_down_column_bias_dense(tmp_path):
    src = tm.make_opt(tmp_path / "opt")
    out = convert(src, tmp_path / "m.flashlm", dtype="f32", progress=False)
    parts = json.loads((out / "manifest.json").read_text())["bundles"]["parts"]
    assert [p["name"] for p in parts] == ["up", "down"]
    s = HFSource(src)
    with safe_open(str(out / "ffn.safetensors"), framework="numpy") as f:
        rows = f.get_tensor("layers.0.ffn.bundles")
    with safe_open(str(out / "dense.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("layers.0.ffn.up.bias"), s.load("layers.0.ffn.up.bias"))
    d = s.config.d_model
    np.testing.assert_array_equal(rows[:, :d], s.load("layers.0.ffn.up.weight"))
    np.testing.assert_array_equal(rows[:, d:2 * d], s.load("layers.0.ffn.down.weight").T)


class _FailingSource:
    """Wraps a source and fails on the n-th load, like a disk error or Ctrl-C mid-conversion."""

    def __init__(self, inner, fail_at, exc):
        self.inner, self.fail_at, self.exc, self.loads = inner, fail_at, exc, 0
        self.config, self.info = inner.config, inner.info

    def shapes(self):
        return self.inner.shapes()

    def load(self, name):
        self.loads += 1
        if self.loads == self.fail_at:
            raise self.exc
        return self.inner.load(name)

    def close(self):
        pass


@pytest.mark.parametrize("exc, raised", [(OSError(28, "No space left on device"), ConversionError),
                                         (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failed_conversion_leaves_nothing(llama_src, tmp_path, exc, raised):
    out = tmp_path / "m.flashlm"
    with pytest.raises(raised):
        write_model(_FailingSource(HFSource(llama_src), 12, exc), out, progress=False)
    assert list(tmp_path.iterdir()) == [], "no output folder and no partial folder"


def test_existing_output_needs_force(llama_src, tmp_path):
    out = convert(llama_src, tmp_path / "m.flashlm", progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        convert(llama_src, out, progress=False)
    convert(llama_src, out, progress=False, force=True)
    open_folder(out)


def test_corrupt_byte_fails_sha256(llama_src, tmp_path):
    out = convert(llama_src, tmp_path / "m.flashlm", progress=False)
    with open(out / "ffn.safetensors", "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelFileError, match=r"ffn\.safetensors.*sha256"):
        Model(open_folder(out))


def test_truncated_file_and_missing_manifest(llama_src, tmp_path):
    out = convert(llama_src, tmp_path / "m.flashlm", progress=False)
    with open(out / "dense.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelFileError, match=r"dense\.safetensors.*truncated"):
        open_folder(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ModelFileError, match="manifest.json: missing"):
        open_folder(out)


def test_unsupported_source_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert(tmp_path / "notes.txt", tmp_path / "x.flashlm")
    assert not (tmp_path / "x.flashlm").exists()


def test_row_check_verifies_packed_rows_against_the_padded_crc(tmp_path):
    """A neuron cache holds rows without the file's zero padding: their check continues the CRC over
    the padding the stride adds, so good rows pass and a flipped bit in the parts is caught."""
    from flashlm.runtime.modelfile import ModelFileError, RowCheck
    rng = np.random.default_rng(1)
    rows = np.zeros((1, 8, 64), np.uint8)                                 # [layers, n_ff, stride]
    rows[..., :40] = rng.integers(0, 255, (1, 8, 40), dtype=np.uint8)     # 40 bytes of parts, 24 of padding
    expected = np.array([[zlib.crc32(r) for r in layer] for layer in rows], np.uint32)
    check = RowCheck(expected, tmp_path / "ffn.safetensors", 64)
    packed = rows[0, :, :48].copy()                                       # a cache row: parts + 8 padding bytes
    check.check(packed[[1, 4]], np.array([1, 4]), 0)
    check.check(rows[0][[2]], np.array([2]), 0)                           # a row at the full stride still checks
    packed[5, 3] ^= 1
    with pytest.raises(ModelFileError, match="layer 0 neuron 5 fails its CRC-32"):
        check.check(packed[[5]], np.array([5]), 0)


def test_row_check_verifies_each_row_the_first_time_it_is_read(tmp_path):
    from flashlm.runtime.modelfile import ModelFileError, RowCheck
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 255, (2, 16, 64), dtype=np.uint8)            # [layers, n_ff, stride]
    expected = np.array([[zlib.crc32(r) for r in layer] for layer in rows], np.uint32)
    check = RowCheck(expected, tmp_path / "ffn.safetensors")
    picked = np.array([3, 7, 7, 1])                                       # a duplicate within one call
    check.check(rows[1][picked], picked, 1)
    bad = rows[1].copy()
    bad[7, 5] ^= 1                                                        # neuron 7 was verified: trusted now
    check.check(bad[[7]], np.array([7]), 1)
    bad[2, 0] ^= 1                                                        # neuron 2 was not: caught on its first read
    with pytest.raises(ModelFileError, match=r"ffn\.safetensors: layer 1 neuron 2 fails its CRC-32"):
        check.check(bad[[0, 2]], np.array([0, 2]), 1)
    check.check(rows[0], np.arange(16), 0)                                # a whole layer, then nothing left to hash
    assert check.unseen_left[0] == 0
    check.check(bad, np.arange(16), 0)
