"""flashlm runtime: load a converted model folder and generate text, streaming FFN neurons from flash."""
import os


def _numba_cache_dir() -> None:
    # numba reads NUMBA_CACHE_DIR once, at import: point it at a user-writable place before any kernel
    # module is imported, so compiled kernels survive across runs even from a read-only install.
    base = os.environ.get("FLASHLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashlm")
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(base, "numba"))


def _passive_openmp() -> None:
    # numba's OpenMP workers spin after every parallel region (libgomp's default); with onnxruntime
    # sessions running between numba kernels (quantized weights) a spinning worker takes a core from
    # onnxruntime: SmolLM2 q4 decode measured 541 ms/token wall with 2 threads vs 15 with passive
    # waiting (machine under load). libgomp reads this once, when numba first starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_numba_cache_dir()
_passive_openmp()
__version__ = "0.1.0"
