"""perplexity against numpy over transformers' logits, bench's JSON rows, device profiles (also found
when flashlm runs from outside the checkout)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.runtime.device import DEFAULT_SEQUENTIAL_MB_S, ProfileError, load_device, shipped_profile
from flashlm.runtime.loader import load
from flashlm.runtime.perplexity import perplexity

IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180, 33, 5, 77, 120, 9, 15, 44, 91]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    src = tm.make_llama(d / "src", tied=False)
    return src, convert(src, d / "m.flashlm", dtype="f32", progress=False)


def _numpy_perplexity(logits: np.ndarray, ids) -> float:
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_perplexity_matches_numpy_over_transformers_logits(llama, chunk):
    src, folder = llama
    expected = _numpy_perplexity(tm.reference_logits(src, IDS), IDS)
    model, _, _ = load(folder)
    result = perplexity(model, IDS, chunk=chunk, progress=False)
    assert result["tokens"] == len(IDS) - 1
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_perplexity_windows_restart_from_an_empty_cache(llama):
    src, folder = llama
    from flashlm.runtime.config import RuntimeConfig
    model, _, _ = load(folder, RuntimeConfig(ctx_len=8))         # 21 predicted tokens in windows of 8
    got = perplexity(model, IDS, chunk=3, progress=False)
    nll, n = 0.0, 0
    for start in range(0, len(IDS) - 1, 8):
        seq = IDS[start:start + 9]
        z = tm.reference_logits(src, seq)[:-1].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(seq) - 1), seq[1:]].sum()
        n += len(seq) - 1
    assert got["tokens"] == n and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_bench_json_rows(llama):
    _, folder = llama
    r = subprocess.run([sys.executable, "-m", "flashlm", "bench", str(folder), "--mode", "dense,naive", "-p", "4",
                        "-n", "3", "-r", "2", "--ctx", "64", "--io", "buffered", "--max-gap", "8192", "--activations", "f32", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["mode"], row["test"]) for row in rows] == [("dense", "pp4"), ("dense", "tg3"),
                                                            ("naive", "pp4"), ("naive", "tg3")]
    for row in rows:
        assert row["model"] == "m.flashlm" and len(row["samples_ts"]) == 2 and row["avg_ts"] > 0
        assert row["avg_ts"] == pytest.approx(sum(row["samples_ts"]) / 2)
        assert row["max_gap"] == 8192, "bench passes --max-gap to its children"
        assert row["activations"] == "f32", "and --activations (f32: never what auto picks)"
        assert row["peak_rss"] > 0
    from flashlm.runtime.modelfile import open_folder
    f = open_folder(folder)
    dense_tg, naive_tg = rows[1], rows[3]
    assert dense_tg["bytes_per_token"] == 0 and dense_tg["io"] is None
    # naive reads every FFN layer whole for every decode token, nothing else
    from flashlm.runtime.memory import whole_layer_bytes
    # (the reader ring reads ahead across tokens, at most one token's layers on this 2-layer model, so
    # the 3 timed tokens' window holds their bytes give or take one token's worth)
    per_token = f.config.n_layers * whole_layer_bytes(f)[1]
    assert abs(naive_tg["bytes_per_token"] - per_token) <= per_token / 3 and naive_tg["io"] == "buffered"
    assert naive_tg["reads_per_token"] >= f.config.n_layers
    assert naive_tg["predicted_ms"] > 0 and dense_tg["predicted_ms"] > 0     # the run's cost model on its plan
    # the critical path: the compute thread's time splits into I/O wait + memory management + compute;
    # the reader's busy time is its own clock (dense reads nothing)
    for row in (dense_tg, naive_tg):
        assert row["pipeline"] is True
        assert row["io_wait_ms"] + row["mem_ms"] + row["compute_ms"] == pytest.approx(row["ms_per_token"])
        assert row["bound_ms"] == max(row["io_busy_ms"], row["compute_ms"])
        # compute splits into predictors + FFN kernels + the rest; the wall time into disk busy + disk idle
        assert row["predict_ms"] + row["ffn_kernel_ms"] <= row["compute_ms"] + 1e-9
        assert row["predict_ms"] + row["ffn_kernel_ms"] + row["other_compute_ms"] == pytest.approx(row["compute_ms"])
        assert row["disk_idle_ms"] == pytest.approx(max(0.0, row["ms_per_token"] - row["io_busy_ms"]))
    assert naive_tg["ffn_kernel_ms"] > 0
    assert dense_tg["io_busy_ms"] == 0 and dense_tg["overlap"] is None and dense_tg["io_wait_ms"] == 0
    # (waiting includes the I/O thread's wake-up, so on a loaded machine it can exceed the busy time)
    assert naive_tg["io_wait_ms"] > 0 and naive_tg["io_busy_ms"] > 0 and 0 <= naive_tg["overlap"] <= 1
    assert naive_tg["stream_mb_s"] > 0 and naive_tg["flash_mb_s"] > 0


def load_speeds(profile, threads):
    return load_device(profile).flash_speeds(threads)


def test_load_speeds_from_profiles(tmp_path):
    d = load_speeds(None, 4)
    assert d.source == "built-in defaults" and d.sequential_mb_s == DEFAULT_SEQUENTIAL_MB_S
    # a shipped profile, by name: its thread columns, read against the TOML itself (the figures change
    # whenever the profile is re-probed)
    import tomllib
    from flashlm.runtime.device import shipped_profile
    flash = tomllib.loads(shipped_profile("this-machine-2core").read_text())["flash"]
    col = {t: flash["threads"].index(t) for t in (1, 4)}
    seq = {t: flash["sequential_1m_mb_s"][flash["sequential_threads"].index(t)] for t in (1, 4)}
    p = load_speeds("this-machine-2core", 4)
    assert p.random_mb_s[16384] == pytest.approx(flash["random_mb_s"]["16384"][col[4]])
    assert p.sequential_mb_s == pytest.approx(seq[4])
    one = load_speeds("this-machine-2core", 1)
    assert one.random_mb_s[16384] == pytest.approx(flash["random_mb_s"]["16384"][col[1]])
    assert one.sequential_mb_s == pytest.approx(seq[1])
    # at a measured size the measured rate; between sizes a bigger read never costs less
    assert p.random_seconds(16384) == pytest.approx(16384 / (p.random_mb_s[16384] * 1e6))
    mid = (4096 + 16384) // 2
    assert p.random_seconds(4096) <= p.random_seconds(mid) <= p.random_seconds(16384)
    assert p.stream_seconds(int(seq[4] * 1000)) == pytest.approx(1e-3)
    with pytest.raises(ProfileError, match="no such device profile"):
        load_speeds("no-such-device", 4)
    bad = tmp_path / "bad.toml"
    bad.write_text("[flash]\nthreads = [1]\n")
    with pytest.raises(ProfileError, match=r"bad\.toml: "):
        load_speeds(str(bad), 4)


def test_device_profiles_are_found_from_outside_the_checkout(tmp_path):
    code = ("from flashlm.runtime.device import shipped_profile, load_device; "
            "p = shipped_profile('this-machine-2core'); s = load_device('this-machine-2core').flash_speeds(4); "
            "print(p.is_file(), s.source == str(p))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
    assert shipped_profile("no-such-device") is None


def test_bench_reps_see_fresh_token_ids(llama, monkeypatch):
    """Every repetition of a bench test (the warm-up's included) feeds its own token ids, and decode ids are
    not the prompt's: a neuron cache outlives model.reset(), so repeated ids would pre-load the timed rows."""
    from flashlm.runtime import bench
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.model import Model
    seen: list[list[int]] = []
    real = Model.forward

    def recording(self, tokens, **kw):
        seen.append([int(t) for t in np.asarray(tokens).reshape(-1)])
        return real(self, tokens, **kw)
    monkeypatch.setattr(Model, "forward", recording)
    _, folder = llama
    bench.bench_one(folder, RuntimeConfig(ctx_len=64), pp=4, tg=3, reps=2)
    prompts, decodes = seen[:3], seen[3:]                  # 3 prompt tests, then 3 x (1 + 3) decode steps
    assert len(prompts) == 3 and all(len(p) == 4 for p in prompts) and len(decodes) == 12
    decode_runs = [sum(decodes[4 * r:4 * r + 4], []) for r in range(3)]
    assert len({tuple(p) for p in prompts}) == 3, "each repetition's prompt is its own"
    assert len({tuple(d) for d in decode_runs}) == 3, "each repetition's decode tokens are their own"
    assert all(d[:4] != p for p, d in zip(prompts, decode_runs)), "decode does not replay the prompt"
