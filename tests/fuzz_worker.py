"""Runs fuzz cases for tests/test_fuzz.py in one child process, a JSON line per case on stdout.

Each case is a `flashlm` command line run through `cli.main` in this process (stdout and stderr
captured), or a named fault driver. Before a case runs, a {"start": i} line is written and flushed: if
the process then dies from a signal (a native crash), the parent knows which case killed it and
restarts the worker after it. Usage: python fuzz_worker.py CASES.json FIRST_INDEX
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    from flashlm.runtime.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:           # argparse errors and --help
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:             # noqa: BLE001 - a traceback is exactly what the fuzz looks for
            err.write(traceback.format_exc())
            code = 99
    return code, out.getvalue(), err.getvalue()


def _fault(kind: str, model: str) -> tuple[int, str, str, float]:
    """Run the model, shrink its bundle file behind its back, run again: must be one error line."""
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.errors import FlashlmError
    from flashlm.runtime.model import Model
    from flashlm.runtime.modelfile import open_folder
    mode = {"mmap_shrink": "mmap", "naive_short_read": "naive"}[kind]
    folder = open_folder(model)
    m = Model(folder, RuntimeConfig(mode=mode, io="buffered"))
    m.forward([1, 2, 3])
    # the file the mode reads: naive streams the packed copy of the rows when the folder has one
    path = folder.file(folder.packed.file if mode == "naive" and folder.packed else "ffn.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    m.reset()
    t0 = time.perf_counter()             # the time to the error is what counts, not the model load
    try:
        for _ in range(3):               # (naive's first layers may come from reads made ahead, before the cut)
            m.forward([1, 2, 3])
    except FlashlmError as e:
        return 1, "", f"flashlm run: error: {e}\n", time.perf_counter() - t0
    except BaseException:                 # noqa: BLE001
        return 99, "", traceback.format_exc(), time.perf_counter() - t0
    return 0, "", "", time.perf_counter() - t0


def _warm_up() -> None:
    """Import what the verbs import lazily, so no case is charged the one-off import time."""
    import flashlm.converters.convert  # noqa: F401
    import flashlm.converters.gguf_source  # noqa: F401
    import flashlm.converters.hf_source  # noqa: F401
    import flashlm.runtime.cli  # noqa: F401
    import flashlm.runtime.generate  # noqa: F401
    import flashlm.runtime.model  # noqa: F401
    import flashlm.runtime.tokenizer  # noqa: F401


def main() -> None:
    _warm_up()
    cases = json.loads(open(sys.argv[1]).read())
    first = int(sys.argv[2])
    for i in range(first, len(cases)):
        case = cases[i]
        print(json.dumps({"start": i}), flush=True)
        t0 = time.perf_counter()
        if "fault" in case:
            code, out, err, seconds = _fault(case["fault"], case["model"])
        else:
            code, out, err = _run_cli(case["argv"])
            seconds = time.perf_counter() - t0
        print(json.dumps({"i": i, "code": code, "stdout": out[-2000:], "stderr": err[-4000:],
                          "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
