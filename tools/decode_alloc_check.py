"""How much a decode token allocates: Python's tracemalloc (which numpy reports its array buffers to)
over 30 decode tokens after a warm-up, per run mode.

    python tools/decode_alloc_check.py MODEL_FOLDER [--budget 30MiB]

Prints, per mode, the traced peak above the start (every transient allocation counts, numpy arrays
and Python objects alike) and the numpy bytes still allocated at the end. A per-token array of the
FFN width would show as at least n_ff * 4 bytes of peak.
"""
from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.model import Model
    from flashlm.runtime.modelfile import open_folder
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--budget", default="30MiB", help="flash mode's budget")
    a = ap.parse_args(argv)
    for rt in (RuntimeConfig(mode="dense"), RuntimeConfig(mode="naive", io="buffered"),
               RuntimeConfig(mode="flash", budget=a.budget, layer_io="sparse", io="buffered")):
        m = Model(open_folder(a.model), rt)
        m.warmup()
        ids = np.random.default_rng(0).integers(0, m.config.vocab_size, 40)
        tok = np.zeros(1, np.int64)
        m.forward(ids[:4])
        for t in ids[4:10]:
            tok[0] = t
            m.forward(tok, out=m.state.logits)
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        for t in ids[10:40]:
            tok[0] = t
            m.forward(tok, out=m.state.logits)
        _, peak = tracemalloc.get_traced_memory()
        live = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
        tracemalloc.stop()
        print(f"{rt.mode:6s} 30 decode tokens: traced peak {peak - start:,} B above the start; numpy bytes still "
              f"allocated {sum(s.size for s in live.statistics('filename')):,}; n_ff * 4 = {m.config.n_ff * 4:,} B")
        m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
