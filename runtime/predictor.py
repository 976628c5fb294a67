"""Per-layer sparsity predictors: which FFN neurons will the next token need?

A predictor is low rank, d -> r -> n_ff: score = (h @ A.T) @ B.T + c, from the layer's normalized FFN
input h. What the score estimates depends on the FFN (see converters/calibrate.py):
- ReLU family: the pre-activation up.h + b; neurons with score > threshold are predicted active.
- SwiGLU: the contribution |silu(gate.h) * up.h|; the `keep` neurons with the largest scores are used
  (SwiGLU is not naturally sparse, so a count, not a sign, decides).
Stored in predictor.safetensors: layers.{i}.predictor.A [r, d], .B [n_ff, r] (f16), .c [n_ff] (f32),
.hot [n_ff] (neurons by calibration frequency), with each layer's rule and statistics in the metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels as K
from .safetensors_file import read_header, read_tensor

PREDICTOR_FILE = "predictor.safetensors"


@dataclass
class LayerPredictor:
    A: np.ndarray            # [r, d] f16 bits (uint16), widened inside the matmul kernel
    B: np.ndarray            # [n_ff, r] f16 bits
    c: np.ndarray            # [n_ff] f32
    rule: str                # "threshold" or "topk"
    threshold: float = 0.0
    keep: int = 0            # neurons kept per token for "topk"
    hot: np.ndarray | None = None   # neuron ids ordered by calibration activation frequency, hottest first

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes + self.c.nbytes

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h [T, d] -> scores [T, n_ff]."""
        z = np.empty((h.shape[0], self.A.shape[0]), np.float32)
        K.matmul(h, self.A, z)
        s = np.empty((h.shape[0], self.B.shape[0]), np.float32)
        K.matmul(z, self.B, s)
        s += self.c
        return s

    def select(self, scores: np.ndarray) -> np.ndarray:
        """Predicted neuron ids (int32, sorted) for one token's scores [n_ff]."""
        if self.rule == "threshold":
            return np.flatnonzero(scores > self.threshold).astype(np.int32)
        k = min(self.keep, scores.size)
        return np.sort(np.argpartition(-scores, k - 1)[:k]).astype(np.int32)

    def predict(self, h: np.ndarray) -> np.ndarray:
        """Union of the predicted neurons of all T tokens in h [T, d]."""
        s = self.scores(h)
        if len(s) == 1:
            return self.select(s[0])
        return np.unique(np.concatenate([self.select(row) for row in s])).astype(np.int32)


def load_predictors(folder: Path) -> tuple[list[LayerPredictor], dict]:
    """(one LayerPredictor per layer, calibration report) from a model folder."""
    path = Path(folder) / PREDICTOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no predictors; run `flashlm calibrate {folder}` first")
    header, start, meta = read_header(path)
    layers = json.loads(meta["layers"])
    out = []
    for i, info in enumerate(layers):
        t = {k: read_tensor(path, header[f"layers.{i}.predictor.{k}"], start) for k in ("A", "B", "c", "hot")}
        out.append(LayerPredictor(A=t["A"].view(np.uint16), B=t["B"].view(np.uint16), c=t["c"], rule=info["rule"],
                                  threshold=info.get("threshold", 0.0), keep=info.get("keep", 0),
                                  hot=t["hot"].astype(np.int32)))
    return out, json.loads(meta.get("report", "{}"))
