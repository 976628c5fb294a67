"""Tiny-model fixtures for tools/aarch64_check.py: built where torch is, checked where it is not.

    python tools/aarch64_fixture_check.py make OUT     # host: tiny HF models -> flashlm folders + references
    python tools/aarch64_fixture_check.py check OUT    # target (no torch): every run mode against them

`make` converts two tiny random models (Llama with tied embeddings and GQA, SwiGLU; OPT, ReLU) into
f16 flashlm folders, and the Llama also into q8_0 (whose dense weights need onnxruntime or, where it
cannot run, the numba fallback: the host records the fallback's logits for it), calibrates their predictors, and records for a fixed token sequence the logits
of transformers (the independent reference) and of this host's flashlm in every run mode. `check`
runs the same modes on the target machine and compares: dense against transformers (f16 weights, so
3e-2), every mode against the host's same mode (1e-3: only instruction selection differs, e.g. FMA
contraction on aarch64), and the exact modes (naive, mmap, hybrid) against the target's own dense run;
the flash modes compute only the neurons their predictor selects, so they are held to the host's
result. Exit status 1 on a mismatch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUANTIZED = "llama-q8"      # q8_0 dense weights: onnxruntime where it works, else the numba fallback
IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180, 33, 5, 77, 120, 9, 15]
# name -> RuntimeConfig fields; a budget is (fixed parts) + this many FFN layers' bytes
MODES = {
    "dense": {},
    "naive": {"mode": "naive"},
    "mmap": {"mode": "mmap"},
    "hybrid": {"mode": "hybrid", "budget_layers": 3.5},
    "flash-sparse": {"mode": "flash", "window": 2, "layer_io": "sparse"},
    "flash-auto": {"mode": "flash", "budget_layers": 3.0, "pin": 0.1},
}


def run_modes(folder: Path, modes: list[str]) -> dict[str, np.ndarray]:
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.model import Model
    from flashlm.runtime.modelfile import open_folder
    from flashlm.runtime.builder import activation_bytes
    from flashlm.runtime.builder import compute_threads
    from flashlm.runtime.memory import plan_memory
    f = open_folder(folder)
    fixed = plan_memory(f, RuntimeConfig(ctx_len=64, mode="naive"), activations=activation_bytes(f, compute_threads(None))).total
    layer = f.config.n_ff * f.bundles.stride_bytes
    out = {}
    for name in modes:
        rt = dict(MODES[name])
        if "budget_layers" in rt:
            rt["budget"] = str(int(fixed + rt.pop("budget_layers") * layer))
        model = Model(open_folder(folder), RuntimeConfig(ctx_len=64, **rt))
        try:
            pre = model.forward(IDS[:6], all_logits=True)
            dec = [model.forward([t])[0] for t in IDS[6:]]
        finally:
            model.close()
        out[name] = np.concatenate([pre, np.stack(dec)]).astype(np.float32)
    return out


def make(out: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models as tm
    from flashlm.converters.calibrate import calibrate
    from flashlm.converters.convert import convert
    out.mkdir(parents=True, exist_ok=True)
    src = out / "src"
    from flashlm.runtime import engines
    llama = tm.make_llama(src / "llama", tied=True)
    sources = {"llama": (llama, "f16"), "opt": (tm.make_opt(src / "opt"), "f16"), QUANTIZED: (llama, "q8_0")}
    for name, (s, dtype) in sources.items():
        folder = convert(s, out / f"{name}.flashlm", dtype=dtype, force=True, progress=False)
        if name != QUANTIZED:       # calibration records FFN inputs, which a quantized dense run keeps in onnxruntime
            calibrate(folder, n_tokens=400, ranks=(8, 16), progress=False)
        ref = tm.reference_logits(s, IDS)
        if name == QUANTIZED:       # the host's reference is the numba path a target without onnxruntime takes
            os.environ[engines.ENV] = "off"
            engines.onnxruntime_status.cache_clear()
        np.savez(out / f"{name}-reference.npz", transformers=ref, **run_modes(folder, modes_of(name)))
        os.environ.pop(engines.ENV, None)
        engines.onnxruntime_status.cache_clear()
    (out / "fixtures.json").write_text(json.dumps({"ids": IDS, "models": list(sources),
                                                   "modes": {name: modes_of(name) for name in sources}}))


def modes_of(name: str) -> list[str]:
    """The q8_0 model has no predictors: the modes that need none."""
    return [m for m in MODES if name != QUANTIZED or not m.startswith("flash")]


def check(out: Path) -> int:
    import platform
    from flashlm.runtime.engines import onnxruntime_status
    meta = json.loads((out / "fixtures.json").read_text())
    status = onnxruntime_status()
    print(f"onnxruntime: {'usable, ' if status.usable else 'not usable: '}{status.detail}")
    bad = 0
    print(f"{'model':6s} {'mode':13s} {'vs host':>10s} {'vs dense':>10s} {'vs transformers':>16s}   ({platform.machine()})")
    for name in meta["models"]:
        ref = np.load(out / f"{name}-reference.npz")
        got = run_modes(out / f"{name}.flashlm", meta["modes"][name])
        for mode in meta["modes"][name]:
            d_host = float(np.abs(got[mode] - ref[mode]).max())
            d_dense = float(np.abs(got[mode] - got["dense"]).max())
            d_tf = float(np.abs(got[mode] - ref["transformers"]).max())
            # the flash modes skip the neurons their predictor leaves out: exact only against the host
            exact = not mode.startswith("flash")
            # q8_0 weights: transformers ran the float originals, so only the host's same path is a reference
            ok = d_host <= 1e-3 and (not exact or d_dense <= 1e-3) and (mode != "dense" or d_tf <= 3e-2
                                                                      or name == QUANTIZED)
            bad += not ok
            print(f"{name:6s} {mode:13s} {d_host:10.2e} {d_dense:10.2e} {d_tf:16.2e}   {'ok' if ok else 'MISMATCH'}")
    print("all modes match" if not bad else f"{bad} mismatches")
    return 1 if bad else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("make", "check"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] == "make":
        make(Path(argv[1]))
        return 0
    return check(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
