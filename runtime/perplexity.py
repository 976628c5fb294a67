"""`flashlm ppl`: perplexity of a text under a run mode, i.e. what sparsity costs in quality."""
from __future__ import annotations

import math
import sys

from tqdm import tqdm

from .model import Model


def perplexity(model: Model, ids: list[int], *, chunk: int, progress: bool = True) -> dict:
    """exp(mean negative log-likelihood) of ids[1:] given the preceding tokens.

    Tokens go through the model `chunk` at a time: chunk 1 is how decoding sees the model (each token's
    FFN predicted and read on its own), larger chunks are faster prefill-style passes. The text is cut
    into windows of at most the context length, each starting from an empty KV cache.
    """
    window = model.ctx_len
    nll, count = 0.0, 0
    with tqdm(total=len(ids) - 1, desc="Perplexity", unit="tok", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(ids) - 1, window):
            seq = ids[start:start + window + 1]
            model.reset()
            for s in range(0, len(seq) - 1, chunk):
                part = seq[s:min(s + chunk, len(seq) - 1)]
                nll += model.forward_nll(part, seq[s + 1:s + 1 + len(part)])
                count += len(part)
                bar.update(len(part))
    return {"perplexity": math.exp(nll / count), "tokens": count, "nll": nll / count}
