"""Convert never loses a model: locked output, atomic replacement, stale partial folders removed,
corrupt weights and full disks refused with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.converters.hf_source import HFSource
from flashlm.converters.source import ConversionError
from flashlm.converters.writer import output_lock, write_model
from flashlm.runtime.modelfile import open_folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tm.make_llama(tmp_path_factory.mktemp("safety") / "src", tied=True)


class _FailAfter:
    """A source whose n-th load raises."""

    def __init__(self, inner, n, exc):
        self.inner, self.n, self.exc = inner, n, exc
        self.config, self.info = inner.config, inner.info

    def shapes(self):
        return self.inner.shapes()

    def load(self, name):
        self.n -= 1
        if self.n < 0:
            raise self.exc
        return self.inner.load(name)

    def close(self):
        pass


def _dir_state(path):
    return sorted(p.name for p in path.iterdir())


def test_second_convert_to_a_locked_path_fails_at_once(src, tmp_path):
    out = tmp_path / "m.flashlm"
    with output_lock(out):
        with pytest.raises(ConversionError, match=r"another `flashlm convert` \(pid \d+\) is writing it"):
            convert(src, out, progress=False)
    convert(src, out, progress=False)
    assert _dir_state(tmp_path) == ["m.flashlm"], "the lock file is gone after release"


def test_stale_partial_folders_are_removed(src, tmp_path):
    out = tmp_path / "m.flashlm"
    for pid in (999999, os.getpid() + 1):
        stale = tmp_path / f".m.flashlm.partial-{pid}"
        stale.mkdir()
        (stale / "ffn.safetensors").write_bytes(b"x" * 1000)
    convert(src, out, progress=False)
    assert _dir_state(tmp_path) == ["m.flashlm"]


def test_failed_force_keeps_the_old_model(src, tmp_path):
    out = convert(src, tmp_path / "m.flashlm", progress=False)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConversionError, match="No space left"):
        write_model(_FailAfter(HFSource(src), 5, OSError(28, "No space left on device")), out, force=True,
                    progress=False)
    assert (out / "manifest.json").read_bytes() == before
    open_folder(out)
    assert _dir_state(tmp_path) == ["m.flashlm"]


def test_force_replaces_the_model_atomically(src, tmp_path):
    out = convert(src, tmp_path / "m.flashlm", progress=False)
    inode = out.stat().st_ino
    convert(src, out, progress=False, force=True)
    assert out.stat().st_ino != inode and open_folder(out)
    assert _dir_state(tmp_path) == ["m.flashlm"]


def test_interrupted_swap_restores_the_old_model(src, tmp_path):
    """Without RENAME_EXCHANGE the swap is two renames; dying between them leaves `.NAME.old-PID`,
    which the next conversion to that path puts back."""
    out = convert(src, tmp_path / "m.flashlm", progress=False)
    os.rename(out, tmp_path / ".m.flashlm.old-12345")
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, out, progress=False)
    open_folder(out)


def test_force_never_deletes_a_folder_that_is_not_a_model(src, tmp_path):
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ConversionError, match="not a flashlm model folder"):
        convert(src, victim, progress=False, force=True)
    assert (victim / "cat.jpg").read_bytes() == b"meow"


def test_output_under_a_file_is_one_line(src, tmp_path):
    f = tmp_path / "hostname"
    f.write_text("x")
    with pytest.raises(ConversionError, match="is not a folder"):
        convert(src, f / "x.flashlm", progress=False)


@pytest.mark.parametrize("value, message", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                            (1e6, "beyond the f16 range")])
@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"])
def test_non_finite_weights_are_refused(src, tmp_path, value, message, tensor):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = load_file(bad / "model.safetensors")
    w[tensor][3, 5] = value
    save_file(w, bad / "model.safetensors")
    with pytest.raises(ConversionError, match=message) as e:
        convert(bad, tmp_path / "m.flashlm", progress=False)
    assert str(bad) in str(e.value)
    assert _dir_state(tmp_path) == ["bad"]


def _convert_cmd(src, out, *extra):
    return [sys.executable, "-m", "flashlm", "convert", str(src), "-o", str(out), "--no-progress", *extra]


def test_full_disk_is_one_line_and_leaves_nothing(src, tmp_path):
    """A file-size limit makes writes fail the way a full disk does (EFBIG instead of ENOSPC)."""
    out = tmp_path / "m.flashlm"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "from flashlm.runtime.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *_convert_cmd(src, out)[3:]], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the model" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert _dir_state(tmp_path) == []


def test_sigkill_mid_convert_then_reconvert(src, tmp_path):
    """Whenever the kill lands, the next convert (with --force) succeeds and nothing stale remains."""
    out = tmp_path / "m.flashlm"
    convert(src, out, progress=False)
    proc = subprocess.Popen(_convert_cmd(src, out, "--force"), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".m.flashlm.partial-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "convert never started writing"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    open_folder(out)                    # the old model is still there
    r = subprocess.run(_convert_cmd(src, out, "--force"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _dir_state(tmp_path) == ["m.flashlm"]
    assert json.loads((out / "manifest.json").read_text())["format"] == "flashlm"
