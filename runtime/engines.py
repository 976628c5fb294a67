"""Can this process use onnxruntime? Asked once, in a child process, before anything imports it here.

Importing onnxruntime can kill the process outright rather than raise: its aarch64 wheel segfaults
while loading its extension under qemu-user (docs/BENCHMARKS.md, the aarch64 emulation), and a
mismatched build can abort the same way. So the first question runs `import onnxruntime` and a
one-node session in a child; the answer is kept for the life of the process. When onnxruntime cannot
be used, the callers fall back to the numba paths (the builder widens block-quantized dense weights
to f16 for the numba kernels; `flashlm probe` measures numba only) and log why.

FLASHLM_ONNXRUNTIME=off skips onnxruntime without asking (the fallback, on purpose); =on trusts it
without the child.
"""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

ENV = "FLASHLM_ONNXRUNTIME"
CHECK_TIMEOUT_S = 600           # emulated (qemu-user) imports take minutes

_CHECK = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
f = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "check", [f("x", [1, 4]), f("w", [4, 2])],
                      [f("y", [1, 2])])
s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
                         .SerializeToString(), providers=["CPUExecutionProvider"])
y = s.run(None, {"x": np.ones((1, 4), np.float32), "w": np.full((4, 2), 0.5, np.float32)})[0]
assert np.allclose(y, 2.0), y
print(ort.__version__)
"""


@dataclass(frozen=True)
class EngineStatus:
    usable: bool
    detail: str                 # the version when usable, else why not (one line)


@functools.lru_cache(maxsize=None)
def onnxruntime_status() -> EngineStatus:
    """Whether onnxruntime imports and runs a session here, found out once per process."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("off", "0", "no"):
        return EngineStatus(False, f"disabled by {ENV}={setting}")
    if setting in ("on", "1", "yes") or "onnxruntime" in sys.modules:
        return EngineStatus(True, "trusted" if setting else "already imported")
    return check_in_child(_CHECK)


def check_in_child(code: str, timeout: float = CHECK_TIMEOUT_S) -> EngineStatus:
    """Run `code` in a child Python; usable when it exits 0 (its last output line is the detail)."""
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return EngineStatus(False, f"importing onnxruntime took over {timeout:g} s in a child process")
    if proc.returncode == 0:
        return EngineStatus(True, (proc.stdout.strip().splitlines() or [""])[-1])
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return EngineStatus(False, f"a child process importing onnxruntime was killed by {name}")
    last = (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[-1]
    return EngineStatus(False, f"onnxruntime cannot be used: {last}")
