"""Seeded, bounded fuzzing of every input flashlm reads: GGUF files, HF folders (config.json and
safetensors headers), model folders (manifest.json, side files), command lines, and files that change
under a running model.

Every case is a `flashlm` command run in a child worker (tests/fuzz_worker.py), so a native crash is
caught as a dead worker and pinned on its case. An invalid input must give: a nonzero exit, exactly
one line on stderr naming the file (or the flag) at fault, no traceback, in under 2 s. Random byte
flips may also be harmless (a changed letter in a chat template): those cases may succeed, but fail
only in the same clean way. The mutations are drawn from fixed seeds, so a failure reproduces.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import tiny_models as tm
from test_gguf_source import write_tiny

WORKER = Path(__file__).with_name("fuzz_worker.py")
TIME_LIMIT_S = 2.0
SEED = 20261201


# --- running cases ------------------------------------------------------------------------------------

def run_cases(cases: list[dict], tmp: Path) -> list[dict]:
    """Run every case in worker processes; a worker killed by a signal marks its case and is restarted."""
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    results: dict[int, dict] = {}
    first = 0
    while first < len(cases):
        proc = subprocess.run([sys.executable, str(WORKER), str(spec), str(first)], capture_output=True,
                              text=True, timeout=600, cwd=tmp)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["i"]] = msg
                started = None
        if started is None:
            assert proc.returncode == 0, f"fuzz worker failed outside a case: {proc.stderr[-2000:]}"
            break
        results[started] = {"i": started, "code": proc.returncode, "stdout": "", "seconds": 0.0,
                            "stderr": f"worker died (exit {proc.returncode}): {proc.stderr[-1500:]}", "crash": True}
        first = started + 1
    return [results[i] for i in range(len(cases))]


def problems(case: dict, r: dict) -> list[str]:
    """What is wrong with one case's result (empty: it behaved)."""
    if r.get("crash") or r["code"] < 0:
        return [f"native crash: {r['stderr'][:300]}"]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    if case["expect"] == "any" and r["code"] == 0:
        return [] if "Traceback" not in r["stderr"] else ["traceback on a successful run"]
    out = []
    if r["code"] == 0:
        out.append("exit code 0 for an invalid input")
    if "Traceback" in r["stderr"] or r["code"] == 99:
        out.append("traceback: " + " | ".join(lines[-3:]))
    elif len(lines) != 1:
        out.append(f"{len(lines)} stderr lines: {lines[:3]}")
    elif not any(name in lines[0] for name in case["names"]):
        out.append(f"error does not name any of {case['names']}: {lines[0]!r}")
    if r["seconds"] > TIME_LIMIT_S:
        out.append(f"took {r['seconds']:.2f} s")
    return out


def check_all(cases: list[dict], tmp: Path) -> None:
    results = run_cases(cases, tmp)
    bad = [f"{c['what']}: {p}" for c, r in zip(cases, results) for p in problems(c, r)]
    assert not bad, f"{len(bad)} of {len(cases)} fuzz cases misbehaved:\n" + "\n".join(bad)


def case(what: str, argv: list, names: list, expect: str = "error") -> dict:
    return {"what": what, "argv": [str(a) for a in argv], "names": [str(n) for n in names], "expect": expect}


# --- GGUF ---------------------------------------------------------------------------------------------

def _offset(reader: gguf.GGUFReader, part: np.ndarray) -> int:
    """Byte position of one of GGUFReader's parts inside the file it maps."""
    return part.ctypes.data - reader.data.ctypes.data


def _put(data: bytearray, pos: int, fmt: str, value) -> None:
    data[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, value)


def gguf_mutations(path: Path) -> list[tuple[str, bytearray, str]]:
    """(description, mutated bytes, expect) for the tiny GGUF at `path`: targeted invalid values for the
    header, metadata and tensor table, truncations, and seeded random byte flips."""
    raw = path.read_bytes()
    r = gguf.GGUFReader(str(path))
    f, t = r.fields, {x.name: x for x in r.tensors}
    out = []

    def mutate(what, pos, fmt, value, expect="error"):
        data = bytearray(raw)
        _put(data, pos, fmt, value)
        out.append((what, data, expect))

    def value_pos(key, part=-1):
        return _offset(r, f[key].parts[part])

    for key, fmt, values in [
        ("llama.attention.head_count", "<I", [0, 3, 2**32 - 1]),
        ("llama.attention.head_count_kv", "<I", [0, 3]),
        ("llama.block_count", "<I", [2**31, 0, 3]),
        ("llama.context_length", "<I", [0]),
        ("llama.embedding_length", "<I", [0, 65, 2**31]),
        ("llama.feed_forward_length", "<I", [0, 7]),
        ("llama.rope.dimension_count", "<I", [0, 8]),
        ("llama.attention.layer_norm_rms_epsilon", "<f", [-1e-5, 0.0, math.nan, math.inf]),
        ("llama.rope.freq_base", "<f", [math.nan, 0.0, -math.inf]),
        ("tokenizer.ggml.bos_token_id", "<I", [10**6]),
    ]:
        for v in values:
            mutate(f"{key}={v}", value_pos(key), fmt, v)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        count_pos = _offset(r, f[key].parts[4])
        n = int(f[key].parts[4][0])
        for v in (2**62, n + 1, n - 1, 0):
            mutate(f"{key} count={v}", count_pos, "<Q", v)
    mutate("token_type[5]=99", _offset(r, f["tokenizer.ggml.token_type"].parts[f["tokenizer.ggml.token_type"].data[5]]),
           "<i", 99)
    first_token_len = _offset(r, f["tokenizer.ggml.tokens"].parts[f["tokenizer.ggml.tokens"].data[0] - 1])
    mutate("tokens[0] length=2**63", first_token_len, "<Q", 2**63)
    first_key = min(f.values(), key=lambda x: x.offset)
    mutate("first key length=2**40", first_key.offset, "<Q", 2**40)
    mutate("head_count value type=string", value_pos("llama.attention.head_count", 2), "<I", 8)
    mutate("head_count value type=99", value_pos("llama.attention.head_count", 2), "<I", 99)
    mutate("version=1", 4, "<I", 1)
    mutate("version=big-endian 3", 4, "<I", 3 << 24)
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    for v in (n_tensors + 1, n_tensors - 1, 2**60):
        mutate(f"tensor count={v}", 8, "<Q", v)
    for v in (n_kv + 1, 2**60):
        mutate(f"metadata count={v}", 16, "<Q", v)
    # Tensor table: parts are [name length, name, n_dims, dims, type, offset].
    q8 = next(x for x in r.tensors if x.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    f32 = next(x for x in r.tensors if x.tensor_type == gguf.GGMLQuantizationType.F32 and len(x.shape) == 2)
    norm = t["blk.1.attn_norm.weight"]
    for x, label in ((q8, "q8"), (f32, "f32")):
        parts = x.field.parts
        off = int(parts[5][0])
        for v in (off + 1, off + 32, off - 32 if off >= 32 else off + 64, 2**62):
            mutate(f"{label} tensor {x.name} offset={v}", _offset(r, parts[5]), "<Q", v)
        d0 = int(parts[3][0])
        for v in (0, d0 * 2, 2**40):
            mutate(f"{label} tensor {x.name} dims[0]={v}", _offset(r, parts[3]), "<Q", v)
        for v in (0, 5):
            mutate(f"{label} tensor {x.name} n_dims={v}", _offset(r, parts[2]), "<I", v)
    mutate("f32 tensor type=F16", _offset(r, f32.field.parts[4]), "<I", int(gguf.GGMLQuantizationType.F16))
    mutate("q8 tensor type=Q4_0", _offset(r, q8.field.parts[4]), "<I", int(gguf.GGMLQuantizationType.Q4_0))
    mutate("q8 tensor type=Q8_1", _offset(r, q8.field.parts[4]), "<I", int(gguf.GGMLQuantizationType.Q8_1))
    mutate("f32 tensor type=I32 (same size)", _offset(r, f32.field.parts[4]), "<I", int(gguf.GGMLQuantizationType.I32))
    mutate("tensor type=999", _offset(r, norm.field.parts[4]), "<I", 999)
    mutate("tensor name length=2**40", _offset(r, norm.field.parts[0]), "<Q", 2**40)
    a, b = t["blk.0.attn_norm.weight"], t["blk.1.ffn_gate.weight"]      # different sizes: overlap/gap
    data = bytearray(raw)
    _put(data, _offset(r, a.field.parts[5]), "<Q", int(b.field.parts[5][0]))
    _put(data, _offset(r, b.field.parts[5]), "<Q", int(a.field.parts[5][0]))
    out.append(("swapped offsets of two tensors of different sizes", data, "error"))
    data = bytearray(raw)
    name_pos = _offset(r, norm.field.parts[1])
    data[name_pos + 4] = ord("0")                                       # blk.1.attn_norm -> blk.0.attn_norm
    out.append(("duplicate tensor name", data, "error"))
    data = bytearray(raw)
    data[name_pos + 6:name_pos + 10] = b"attx"
    out.append(("unknown tensor name", data, "error"))
    data_start = min(x.data_offset for x in r.tensors)
    rng = random.Random(SEED)
    for cut in sorted({rng.randrange(0, len(raw)) for _ in range(8)} | {data_start - 1, len(raw) - 1, 23, 3}):
        out.append((f"truncated to {cut} bytes", bytearray(raw[:cut]), "error"))
    data = bytearray(raw) + b"\0" * 64
    out.append(("64 bytes appended", data, "error"))
    for k in range(25):
        data = bytearray(raw)
        flips = [rng.randrange(0, data_start) for _ in range(rng.randint(1, 3))]
        for pos in flips:
            data[pos] ^= 1 << rng.randrange(8)
        out.append((f"random flip #{k} at {flips}", data, "any"))
    return out


def test_gguf_inputs(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny(src)
    cases = []
    for n, (what, data, expect) in enumerate(gguf_mutations(src)):
        p = tmp_path / f"g{n}.gguf"
        p.write_bytes(bytes(data))
        cases.append(case(f"GGUF {what}", ["convert", p, "-o", tmp_path / f"g{n}.flashlm", "--no-progress"],
                          [p], expect))
    check_all(cases, tmp_path)


def _scalar_value_pos(raw: bytes, key: str) -> int:
    """Where a u32 metadata value of `key` sits: after its 8-byte length, the key and the 4-byte type
    (found by the key's bytes, so a key that is a prefix of another is told apart by its length)."""
    k = key.encode()
    pos = raw.find(struct.pack("<Q", len(k)) + k + struct.pack("<I", 4))
    assert pos > 0, key
    return pos + 8 + len(k) + 4


def test_real_gguf_errors_are_fast(tmp_path, smollm2_gguf):
    """The 2 s problem: an error in a real model's metadata is found before its 49k-token vocabulary
    is parsed."""
    raw = smollm2_gguf.read_bytes()
    cases = []
    for key, value in (("llama.attention.head_count", 0), ("llama.block_count", 2**31)):
        data = bytearray(raw)
        _put(data, _scalar_value_pos(raw, key), "<I", value)
        p = tmp_path / f"smol-{key}.gguf"
        p.write_bytes(bytes(data))
        cases.append(case(f"SmolLM2 {key}={value}", ["convert", p, "-o", tmp_path / "x.flashlm", "--no-progress"],
                          [p]))
    check_all(cases, tmp_path)


# --- Hugging Face folders -------------------------------------------------------------------------------

def _st_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(path: Path, header, data: bytes, *, text: str | None = None) -> None:
    blob = (text if text is not None else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def hf_mutations(src: Path):
    """(description, edit(folder), file named, expect): config.json values and safetensors headers."""
    out = []

    def config(key, value):
        def edit(folder):
            cfg = json.loads((folder / "config.json").read_text())
            if key in ("rope_theta", "rope_scaling"):     # the pre-transformers-5 spelling of rope_parameters
                cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
            if value is _DELETE:
                cfg.pop(key, None)
            else:
                cfg[key] = value
            (folder / "config.json").write_text(json.dumps(cfg))
        out.append((f"config {key}={value!r}", edit, "config.json", "error"))

    for key, values in [
        ("tie_word_embeddings", ["false", "true", 0, 1]),
        ("num_attention_heads", [0, -1, "4", 4.0, 10**9, True, None]),
        ("num_hidden_layers", [10**9, 0, 3, 1, 2**63]),
        ("hidden_size", [0, 63, _DELETE]),
        ("intermediate_size", [0, 10**12]),
        ("vocab_size", [0, 100, 2**40]),
        ("rope_theta", [math.nan, 0, -1, math.inf, "1e4"]),
        ("rms_norm_eps", [-1e-5, 0, math.nan]),
        ("max_position_embeddings", [0, -5, None, 1e999]),
        ("num_key_value_heads", [0, 3]),
        ("head_dim", [0, 7]),
        ("architectures", [[], ["GPT2LMHeadModel"], "LlamaForCausalLM", None]),
        ("rope_scaling", [{"rope_type": "linear"}, {"rope_type": "linear", "factor": 0}, {"rope_type": "yarn", "factor": 2},
                          "linear", {"rope_type": "llama3", "factor": 8}]),
        ("rope_parameters", [{"rope_theta": math.nan}, {"rope_theta": 0}, {"rope_theta": "1e4"},
                             {"rope_theta": 5e4, "rope_type": "linear", "factor": -2}, [5e4],
                             {"rope_theta": 5e4, "rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                              "high_freq_factor": 1, "original_max_position_embeddings": 64}]),
        ("eos_token_id", [10**6, -1, "2", [2, "x"]]),
        ("bos_token_id", [[1, 2], 300]),
        ("attention_bias", ["no"]),
        ("hidden_act", ["gelu", 5]),
    ]:
        for v in values:
            config(key, v)
    for what, text in [("config.json is a list", "[]"), ("config.json is not JSON", "{\"a\": "), ("config.json empty", "")]:
        out.append((what, lambda folder, text=text: (folder / "config.json").write_text(text), "config.json", "error"))

    def header(what, change):
        def edit(folder):
            path = folder / "model.safetensors"
            h, data = _st_header(path)
            result = change(h, data)
            if isinstance(result, tuple):
                h, data = result
            _st_write(path, h, data)
        out.append((f"safetensors {what}", edit, "model.safetensors", "error"))

    def names(h):
        return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])

    def swap(h, _):
        ks = names(h)
        a = ks[0]
        b = next(k for k in ks if h[k]["data_offsets"][1] - h[k]["data_offsets"][0] !=
                 h[a]["data_offsets"][1] - h[a]["data_offsets"][0])
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    header("swapped data_offsets (different sizes)", swap)

    def shift(h, _):
        k = names(h)[3]
        h[k]["data_offsets"] = [v + 4 for v in h[k]["data_offsets"]]
    header("shifted data_offsets", shift)

    def overlap(h, _):
        ks = names(h)
        size = h[ks[2]]["data_offsets"][1] - h[ks[2]]["data_offsets"][0]
        begin = h[ks[1]]["data_offsets"][0]
        h[ks[2]]["data_offsets"] = [begin, begin + size]
    header("overlapping data_offsets", overlap)

    def set_field(field, value, which=0):
        def change(h, _):
            h[names(h)[which]][field] = value
        return change
    header("shape [2**64]", set_field("shape", [2**64]))
    header("shape [2**62, 2**62]", set_field("shape", [2**62, 2**62]))
    header("shape [-1, 64]", set_field("shape", [-1, 64]))
    header("shape of floats", set_field("shape", [300.0, 64.0]))
    header("dtype F16 (size mismatch)", set_field("dtype", "F16"))
    header("dtype I32 (same size)", set_field("dtype", "I32"))
    header("dtype XX", set_field("dtype", "XX"))
    header("data_offsets floats", set_field("data_offsets", [0.0, 4.0]))
    header("data_offsets strings", set_field("data_offsets", ["0", "4"]))
    header("entry is a list", lambda h, _: h.__setitem__(names(h)[0], [1, 2]))
    header("metadata not strings", lambda h, _: h.__setitem__("__metadata__", {"format": 5}))
    header("trailing bytes", lambda h, data: (h, data + b"\0" * 16))
    header("truncated data", lambda h, data: (h, data[:len(data) // 2]))

    def raw(what, transform):
        def edit(folder):
            path = folder / "model.safetensors"
            path.write_bytes(transform(path.read_bytes()))
        out.append((f"safetensors {what}", edit, "model.safetensors", "error"))

    raw("header length 2**63", lambda b: struct.pack("<Q", 2**63) + b[8:])
    raw("header length +1", lambda b: struct.pack("<Q", struct.unpack_from("<Q", b)[0] + 1) + b[8:])
    raw("header length 7", lambda b: struct.pack("<Q", 7) + b[8:])
    raw("5 bytes", lambda b: b[:5])
    raw("header is an array", lambda b: struct.pack("<Q", 2) + b"[]" + b[8 + struct.unpack_from("<Q", b)[0]:])
    raw("header not UTF-8", lambda b: b[:9] + b"\xff" + b[10:])

    def duplicate(folder):
        path = folder / "model.safetensors"
        h, data = _st_header(path)
        k = names(h)[0]
        text = json.dumps(h)
        entry = json.dumps({k: h[k]})[1:-1]
        _st_write(path, None, data, text="{" + entry + ", " + text[1:])
    out.append(("safetensors duplicate key", duplicate, "model.safetensors", "error"))

    def deep(folder):
        path = folder / "model.safetensors"
        h, data = _st_header(path)
        _st_write(path, None, data, text='{"__metadata__": ' + "[" * 100000 + "]" * 100000 + ", " + json.dumps(h)[1:])
    out.append(("safetensors header nested 100000 deep", deep, "model.safetensors", "error"))

    def nan_weight(value):
        def edit(folder):
            from safetensors.numpy import load_file, save_file
            w = load_file(folder / "model.safetensors")
            w["model.layers.0.self_attn.q_proj.weight"][1, 2] = value
            save_file(w, folder / "model.safetensors")
        return edit
    for v in (np.nan, -np.inf):
        out.append((f"weight value {v}", nan_weight(v), "", "error"))
    return out


_DELETE = object()


def test_hf_inputs(tmp_path):
    src = tm.make_llama(tmp_path / "src", tied=True)
    cases = []
    for n, (what, edit, named, expect) in enumerate(hf_mutations(src)):
        folder = tmp_path / f"h{n}"
        shutil.copytree(src, folder)
        edit(folder)
        cases.append(case(f"HF {what}", ["convert", folder, "-o", tmp_path / f"h{n}.flashlm", "--no-progress"],
                          [folder / named, "config.json"] if named == "config.json" else [folder / named], expect))
    check_all(cases, tmp_path)


# --- model folders ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from flashlm.converters.convert import convert
    d = tmp_path_factory.mktemp("fuzzmodel")
    return convert(tm.make_llama(d / "src", tied=True), d / "m.flashlm", progress=False)


BAD_VALUES = [0, -1, 1, 100, 10**9, 2**64, "x", None, [], {}, True, 1.5, math.nan]
MANIFEST_FIELDS = [
    ("config", "vocab_size"), ("config", "d_model"), ("config", "n_layers"), ("config", "n_heads"),
    ("config", "n_kv_heads"), ("config", "head_dim"), ("config", "n_ff"), ("config", "max_position"),
    ("config", "norm_eps"), ("config", "rope_theta"), ("config", "ffn_kind"), ("config", "architecture"),
    ("config", "tied_embeddings"), ("config", "norm_kind"), ("config", "pos_kind"), ("config", "rope_scaling"),
    ("bundles", "stride_bytes"), ("bundles", "row_bytes"), ("bundles", "layer_offsets"), ("bundles", "parts"),
    ("bundles", "dtype"), ("bundles", "alignment"), (None, "dtype"), (None, "format_version"), (None, "files"),
    (None, "config"), (None, "bundles"), ("generation_config", "top_p"), ("generation_config", "temperature"),
    ("generation_config", "repetition_penalty"),
]
# Values under these keys can be harmless (the model still runs, if differently): any clean outcome passes.
TOLERANT = {"eos_token_ids", "bos_token_id", "alignment", "rope_scaling"}
# Deleting these falls back to a documented default (RoPE base 10000, the storage type from the tensors).
DEFAULTED = {"rope_theta", "dtype"}


def manifest_mutations(rng: random.Random):
    out = []
    for section, key in MANIFEST_FIELDS:
        for value in rng.sample(BAD_VALUES, 3):
            out.append((section, key, value))
        out.append((section, key, _DELETE))
    for i in range(8):                        # one entry of a list-valued field
        out.append(("bundles", ("layer_offsets", rng.randrange(2)), rng.choice([1, 4095, -4096, 2**40, "0"])))
        out.append(("bundles", ("parts", rng.randrange(3), rng.choice(["offset", "length", "name"])),
                    rng.choice([0, -1, 10**6, "up", None])))
    return out


def _edit_manifest(m: dict, section, key, value) -> None:
    target = m if section is None else m[section]
    if isinstance(key, tuple):
        for k in key[:-1]:
            target = target[k]
        key = key[-1]
    if value is _DELETE:
        target.pop(key, None)
    else:
        target[key] = value


_SAMPLING_OK = {"top_p": lambda v: 0 < v <= 1, "temperature": lambda v: v >= 0, "repetition_penalty": lambda v: v > 0}


def _expect(section, key, value, unchanged: bool) -> str:
    k = key[0] if isinstance(key, tuple) else key
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if unchanged or k in TOLERANT or (value is _DELETE and k in DEFAULTED):
        return "any"
    if k == "rope_theta" and number and value > 0:      # another RoPE base is a valid (different) model
        return "any"
    if section == "generation_config":     # a valid sampling value (or none) must run; others must not
        if value is _DELETE or value is None:
            return "any"
        return "any" if number and _SAMPLING_OK[k](value) else "error"
    return "error"


def test_model_folder_inputs(tmp_path, model):
    rng = random.Random(SEED)
    cases = []
    for n, (section, key, value) in enumerate(manifest_mutations(rng)):
        folder = tmp_path / f"m{n}.flashlm"
        shutil.copytree(model, folder)
        before = json.loads((folder / "manifest.json").read_text())
        m = json.loads(json.dumps(before))
        _edit_manifest(m, section, key, value)
        (folder / "manifest.json").write_text(json.dumps(m))
        label = f"manifest {section}.{key}={'<deleted>' if value is _DELETE else repr(value)}"
        cases.append(case(label, ["run", folder, "-p", "hi", "-n", "2", "--temp", "0", "--no-progress"],
                          [folder / "manifest.json", folder], _expect(section, key, value, m == before)))
    side = [
        ("tokenizer.json truncated", "tokenizer.json", lambda b: b[:len(b) // 2]),
        ("tokenizer.json one byte changed", "tokenizer.json", lambda b: b.replace(b'"merges"', b'"merges" ', 1)),
        ("chat_template.jinja changed", "chat_template.jinja", lambda b: b + b"{{ 1 }}"),
        ("dense.safetensors byte flip", "dense.safetensors", lambda b: b[:5000] + bytes([b[5000] ^ 1]) + b[5001:]),
        ("dense.safetensors truncated", "dense.safetensors", lambda b: b[:1000]),
        ("ffn.safetensors byte flip", "ffn.safetensors", lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:]),
        ("manifest.json not JSON", "manifest.json", lambda b: b[:-5]),
        ("manifest.json a list", "manifest.json", lambda b: b"[]"),
    ]
    for n, (what, name, transform) in enumerate(side):
        folder = tmp_path / f"s{n}.flashlm"
        shutil.copytree(model, folder)
        (folder / name).write_bytes(transform((folder / name).read_bytes()))
        cases.append(case(what, ["run", folder, "-p", "hi", "-n", "2", "--no-progress"], [folder / name]))
    check_all(cases, tmp_path)


# --- command lines ---------------------------------------------------------------------------------------

def test_command_lines(tmp_path, model):
    text = tmp_path / "text.txt"
    text.write_text("hello world, the quick brown fox jumps over the lazy dog")
    a_file = tmp_path / "hostname"
    a_file.write_text("x")
    src = tm.make_llama(tmp_path / "src", tied=True)
    run = ["run", model, "-p", "hi", "--no-progress"]
    cases = [case(f"run {flag} {v}", [*run, flag, v], [flag]) for flag, v in [
        ("--top-p", "2"), ("--top-p", "nan"), ("--top-p", "0"), ("--temp", "-1"), ("--temp", "inf"),
        ("--top-k", "-5"), ("--min-p", "2"), ("--repeat-penalty", "0"), ("--repeat-penalty", "-1"),
        ("-n", "-1"), ("--window", "0"), ("--budget", "1e999"), ("--budget", "0"), ("--budget", "lots"),
        ("--ctx", "0"), ("--threads", "0"), ("--seed", "-1"), ("--pin", "2"), ("--io-threads", "0"),
        ("--mode", "bogus"), ("--max-gap", "-1")]]
    cases += [
        case("run with an empty model path", ["run", "", "-p", "hi"], ["empty"]),
        case("run -f a folder", [*run, "-f", tmp_path], [tmp_path]),
        case("run -f a missing file", [*run, "-f", tmp_path / "nope.txt"], ["nope.txt"]),
        case("run a missing model", ["run", tmp_path / "nope.flashlm", "-p", "hi"], ["nope.flashlm"]),
        case("info a folder without a model", ["info", tmp_path], [tmp_path]),
        case("info with an empty path", ["info", ""], ["empty"]),
        case("convert a missing source", ["convert", tmp_path / "nope.gguf"], ["nope.gguf"]),
        case("convert to a path under a file", ["convert", src, "-o", a_file / "x.flashlm", "--no-progress"], [a_file]),
        case("convert onto a non-model folder with --force", ["convert", src, "-o", tmp_path, "--force", "--no-progress"],
             [tmp_path]),
        case("convert --dtype q9", ["convert", src, "--dtype", "q9"], ["--dtype"]),
        case("ppl -n 1", ["ppl", model, "-f", text, "-n", "1", "--no-progress"], ["-n"]),
        case("ppl --chunk -1", ["ppl", model, "-f", text, "--chunk", "-1", "--no-progress"], ["--chunk"]),
        case("ppl -f a folder", ["ppl", model, "-f", tmp_path, "--no-progress"], [tmp_path]),
        case("bench --mode bogus", ["bench", model, "--mode", "bogus", "-p", "4", "-n", "2", "-r", "1"], ["bogus"]),
        case("bench -r 0", ["bench", model, "-r", "0"], ["-r"]),
        case("calibrate --keep 0", ["calibrate", model, "--keep", "0"], ["--keep"]),
        case("serve --port 70000", ["serve", model, "--port", "70000"], ["--port"]),
        case("serve --memory-limit 1e999", ["serve", model, "--memory-limit", "1e999"], ["--memory-limit"]),
        case("run --budget too small for hybrid", [*run, "--budget", "1KiB", "--mode", "hybrid"], ["budget"]),
        case("run flash without predictors", [*run, "--budget", "90%", "--mode", "flash"], ["predictor"]),
    ]
    check_all(cases, tmp_path)


def test_zero_tokens_generate_nothing(model):
    r = subprocess.run([sys.executable, "-m", "flashlm", "run", str(model), "-p", "hi", "-n", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "\n", (r.stdout, r.stderr)


# --- files that change under a running model ---------------------------------------------------------------

@pytest.mark.parametrize("fault", ["mmap_shrink", "naive_short_read"])
def test_bundle_file_shrinking_during_a_run(tmp_path, model, fault):
    """--mode mmap used to die with SIGBUS; flash reads with a traceback. Both must be one line."""
    folder = tmp_path / "m.flashlm"
    shutil.copytree(model, folder)
    c = {"what": fault, "fault": fault, "model": str(folder),
         "names": [str(folder / "ffn.safetensors"), str(folder / "ffn_packed.safetensors")],
         "expect": "error"}
    check_all([c], tmp_path)


# --- server requests ---------------------------------------------------------------------------------------

_JUNK = [None, True, -1, 0, 2, 10**12, -1e308, 1.5, "", "x" * 5000, [], [1, "a"], {}, {"a": {"b": [None]}}]


def _mutate_json(value, rng: random.Random, depth: int = 0):
    """One random structural change somewhere inside a JSON value: a field dropped, retyped or added."""
    if isinstance(value, dict) and value and depth < 4 and rng.random() < 0.6:
        # max_tokens stays: without it a request generates up to the context, which bounds nothing here
        # (tests/test_server.py checks max_tokens' validation)
        key = rng.choice(sorted(k for k in value if k != "max_tokens"))
        out = dict(value)
        choice = rng.random()
        if choice < 0.25:
            del out[key]
        elif choice < 0.5:
            out[key] = rng.choice(_JUNK)
        elif choice < 0.6:
            out[rng.choice(["n", "logprobs", "tools", "zzz", "stream_options"])] = rng.choice(_JUNK)
        else:
            out[key] = _mutate_json(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and depth < 4 and rng.random() < 0.6:
        i = rng.randrange(len(value))
        out = list(value)
        out[i] = _mutate_json(value[i], rng, depth + 1) if rng.random() < 0.5 else rng.choice(_JUNK)
        return out
    return rng.choice(_JUNK)


def server_requests(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    chat = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 2, "temperature": 0, "top_p": 0.9, "stop": ["\n"], "seed": 1, "stream": False}
    completion = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0.5, "top_k": 5}
    out = []
    for _ in range(n):
        path, body = rng.choice([("/v1/chat/completions", chat), ("/v1/completions", completion)])
        raw = json.dumps(_mutate_json(body, rng)).encode()
        if rng.random() < 0.15:                                   # byte-level damage on top
            cut = rng.randrange(len(raw))
            raw = raw[:cut] + rng.choice([b"", b"\xff", b"{", b"\x00", b"]]]"]) + raw[cut + 1:]
        out.append((path, raw))
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_requests(tmp_path, model):
    """Seeded random mutations of valid requests: every answer is a 2xx or a 4xx in OpenAI's error shape
    within 2 s, never a 5xx, and the server stays up. (tests/test_server.py has the targeted cases.)"""
    import http.client
    import time
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flashlm", "serve", str(model), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        bad = []
        for k, (path, body) in enumerate(server_requests(random.Random(SEED), 80)):
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            seconds = time.perf_counter() - t0
            conn.close()
            what = f"#{k} {path} {body[:120]!r}"
            if r.status >= 500 or r.status < 200:
                bad.append(f"{what}: status {r.status} {data[:200]!r}")
            elif r.status >= 400:
                try:
                    err = json.loads(data)["error"]
                    assert isinstance(err["message"], str) and err["message"] and "type" in err
                except (ValueError, KeyError, TypeError, AssertionError):
                    bad.append(f"{what}: {r.status} without an OpenAI error object: {data[:200]!r}")
            if r.status >= 400 and seconds > TIME_LIMIT_S:
                bad.append(f"{what}: an error answer took {seconds:.2f} s")
            if proc.poll() is not None:
                bad.append(f"{what}: the server died (exit {proc.returncode})")
                break
        assert not bad, f"{len(bad)} server requests misbehaved:\n" + "\n".join(bad)
    finally:
        proc.terminate()
        proc.wait(30)
