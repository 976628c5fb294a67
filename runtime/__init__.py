"""flashlm runtime: load a converted model folder and generate text, streaming FFN neurons from flash."""
import os


def _numba_cache_dir() -> None:
    # numba reads NUMBA_CACHE_DIR once, at import: point it at a user-writable place before any kernel
    # module is imported, so compiled kernels survive across runs even from a read-only install.
    base = os.environ.get("FLASHLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashlm")
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(base, "numba"))


_numba_cache_dir()
__version__ = "0.1.0"
