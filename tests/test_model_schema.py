"""The manifest is checked against its schema and the files at open: an edited or corrupt manifest is
refused with the file and the field named, before any kernel could run on a shape it does not fit."""
import json
import shutil

import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import ModelFileError, open_folder
from flashlm.runtime.storage import STORAGE_TYPES, storage_type


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("schema")
    return convert(tm.make_llama(d / "src", tied=True), d / "m.flashlm", dtype="f16", progress=False)


def _edited(folder, tmp_path, edit):
    out = tmp_path / "edited.flashlm"
    shutil.copytree(folder, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _set(section, key, value):
    def edit(m):
        (m if section is None else m[section])[key] = value
    return edit


# Each of these made the kernels read or write out of bounds (segfault, heap corruption) or divide by zero.
@pytest.mark.parametrize("edit, field", [
    (_set("config", "vocab_size", 100), r"tok_embeddings.*shape \[300, 64\].*\[100, 64\]"),
    (_set("config", "n_heads", 0), r"config\.n_heads: 0 is not in"),
    (_set("config", "head_dim", 32), r"attn\.q\.weight.*\[64, 64\].*\[128, 64\]"),
    (_set("config", "n_kv_heads", 1), r"attn\.k\.weight.*\[32, 64\].*\[16, 64\]"),
    (_set("config", "n_kv_heads", 3), r"config\.n_kv_heads: 3 does not divide n_heads 4"),
    (_set("config", "d_model", "64"), r"config\.d_model: '64' is a str"),
    (_set("config", "n_layers", True), r"config\.n_layers: True is a boolean"),
    (_set("config", "n_ff", 100), r"ffn\.row_crc32.*expected uint32 \[2, 100\]"),
    (_set("config", "n_layers", 3), r"layers\.2\.attn_norm\.weight' is missing"),
    (_set("config", "ffn_kind", "gelu"), r"config\.ffn_kind: 'gelu' is not one of"),
    (_set("config", "norm_eps", -1.0), r"config\.norm_eps: -1\.0 is not a positive number"),
    (_set("config", "eos_token_ids", [5000]), r"config\.eos_token_ids: 5000 is not a token id"),
    (lambda m: m["config"].pop("d_model"), r"config\.d_model: missing"),
    (_set("bundles", "storage", "Q9"), r"bundles\.dtype: unknown storage type 'Q9'"),
    (_set("bundles", "dtype", "F32"), r"bundles\.dtype 'F32' is not how f16 is stored"),
    (_set("bundles", "stride_bytes", 256), r"bundles\.stride_bytes 256 must hold a row"),
    (_set("bundles", "row_bytes", 10), r"bundles\.row_bytes is 10"),
    (lambda m: m["bundles"]["layer_offsets"].pop(), r"bundles\.layer_offsets must list 2 offsets"),
    (lambda m: m["bundles"]["layer_offsets"].__setitem__(1, 4096), r"layer 1's bundles .* at byte \d+; the manifest implies .* at 4096"),
    (lambda m: m["bundles"]["parts"].reverse(), r"bundles\.parts must be \['gate', 'up', 'down'\]"),
    (_set(None, "dtype", "q1"), r"unknown storage type 'q1'"),
    (_set(None, "files", []), r"files is missing or not an object"),
])
def test_edited_manifest_is_refused_naming_the_field(llama_folder, tmp_path, edit, field):
    out = _edited(llama_folder, tmp_path, edit)
    with pytest.raises(ModelFileError, match=field) as e:
        open_folder(out)
    assert str(out) in str(e.value), "the message names the file"


def test_checked_folder_is_typed(llama_folder):
    f = open_folder(llama_folder)
    b = f.bundles
    assert f.storage is STORAGE_TYPES["f16"] and b.storage is STORAGE_TYPES["f16"]
    assert [p.name for p in b.parts] == ["gate", "up", "down"]
    assert [p.byte_offset for p in b.parts] == [0, 128, 256] and b.row_bytes == 384 and b.stride_bytes == 512
    assert b.item_offsets() == {"gate": 0, "up": 64, "down": 128} and b.stride_items == 256
    assert f.dense["tok_embeddings"].shape == (300, 64) and f.dense["tok_embeddings"].dtype == np.uint16
    assert f.dense["norm.weight"].storage is None or f.dense["norm.weight"].dtype == np.float32
    # sizes from the typed table add up to the files
    assert f.model_bytes == sum(t.nbytes for t in f.dense.values()) + 2 * 160 * 512


def test_storage_table_round_trips_and_sizes():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    for name, t in STORAGE_TYPES.items():
        if t.block_elems > 1:     # lossy block types: tests/test_quant.py, tests/test_quant_model.py
            continue
        stored = t.encode(x)
        assert stored.dtype == t.view_dtype and stored.shape == t.stored_shape(x.shape)
        assert stored.nbytes == t.nbytes(x.shape) == 3 * t.row_bytes(64)
        if t.block_elems == 1:
            np.testing.assert_allclose(t.decode(stored), x, rtol=1e-3 if name == "f16" else 0, atol=1e-3)
        else:                 # block types: within one quantization step of the block's range
            bits = 8 * t.fields[0][2] // t.block_elems
            np.testing.assert_allclose(t.decode(stored), x, atol=2 * np.abs(x).max() / (2 ** bits - 1))
    assert storage_type("F16") is STORAGE_TYPES["f16"], "older manifests name safetensors dtypes"


def test_model_runs_after_the_checks(llama_folder):
    m = Model(open_folder(llama_folder))
    assert m.forward([1, 5, 7]).shape == (1, 300)
