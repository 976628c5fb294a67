"""The command line as a user runs it: stdout carries only generated text, errors are one clear line."""
import json
import subprocess
import sys

import pytest

import tiny_models as tm


def flashlm(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "flashlm", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = tm.make_llama(d / "src", tied=True)
    r = flashlm("convert", src, "-o", d / "m.flashlm", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    return d / "m.flashlm"


def test_run_stdout_is_only_the_generated_text(model):
    r = flashlm("run", model, "-p", "hello world", "-n", "8", "--temp", "0", "--stats")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and "tokens/s" not in r.stdout
    from flashlm.runtime.modelfile import open_folder
    from flashlm.runtime.model import Model
    from flashlm.runtime.tokenizer import Tokenizer
    folder = open_folder(model)
    m, tok = Model(folder), Tokenizer.from_folder(folder.path, folder.manifest)
    ids = tok.encode("hello world")
    logits = m.forward(ids)[-1]
    out = []
    for _ in range(8):
        out.append(int(logits.argmax()))
        if tok.is_eos(out[-1]):
            out.pop()
            break
        logits = m.forward([out[-1]])[-1]
    assert r.stdout == tok.decode(out, skip_special_tokens=True) + "\n"


def test_prompt_from_stdin_and_chat_flag(model):
    a = flashlm("run", model, "-n", "4", "--temp", "0", stdin="hello world")
    b = flashlm("run", model, "-p", "hello world", "-n", "4", "--temp", "0")
    assert a.returncode == 0 and a.stdout == b.stdout
    c = flashlm("run", model, "-p", "hello", "-n", "4", "--temp", "0", "--chat", "--system", "be brief")
    assert c.returncode == 0, c.stderr


def test_info_json(model):
    r = flashlm("info", model, "--json")
    info = json.loads(r.stdout)
    assert info["config"]["n_layers"] == 2 and info["bytes"]["ffn_bundles"] > 0


@pytest.mark.parametrize("args, message", [
    (["convert", "/nonexistent.gguf"], "no such file"),
    (["info", "/tmp"], "manifest.json: missing"),
])
def test_errors_are_one_clear_line(args, message):
    r = flashlm(*args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr


def test_budget_refused_before_loading(model):
    r = flashlm("run", model, "-p", "hi", "--budget", "1KiB", "--mode", "hybrid")
    assert r.returncode == 1 and "too small" in r.stderr and "Traceback" not in r.stderr


def test_chat_repl_commands(model):
    r = flashlm("chat", model, "-n", "4", "--temp", "0", stdin="hello\n/stats\n/reset\n/system be nice\nhi\n/bye\n")
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr and "tokens/s" in r.stderr


def test_verbose_errors_keep_their_traceback():
    r = flashlm("-v", "info", "/tmp")
    assert r.returncode == 1 and "Traceback" in r.stderr and "manifest.json: missing" in r.stderr.splitlines()[-1]


def test_bad_runtime_setting_is_one_line(model):
    r = flashlm("run", model, "-p", "hi", "--ctx", "0")    # refused by the flag's type, before anything loads
    assert r.returncode == 2 and r.stderr.strip() == \
        "flashlm run: error: argument -c/--ctx: 0 is below the minimum 1 (see flashlm run --help)"
    from flashlm.runtime.config import RuntimeConfig      # ... and by RuntimeConfig for library callers
    with pytest.raises(Exception, match="ctx_len 0: the context must hold at least one token"):
        RuntimeConfig(ctx_len=0)
    with pytest.raises(Exception, match="activations 'int4': use auto, int8, mixed or f32"):
        RuntimeConfig(activations="int4")


def test_help_describes_the_tool_in_whole_sentences():
    r = flashlm("--help")
    assert r.returncode == 0
    description = r.stdout.split("\n\n")[1].replace("\n", " ")
    assert description.startswith("On-device LLM inference") and description.rstrip().endswith(".")
