"""Per-layer sparsity predictors: which FFN neurons will the next token need?

Each predictor is built from low-rank maps d -> r -> n_ff, est = (h @ A.T) @ B.T + c, of the layer's
normalized FFN input h, fitted to the layer's own projections (see converters/calibrate.py):
- ReLU family: one map estimates the pre-activation up.h + b; neurons whose estimate is above a
  calibrated threshold are predicted active.
- SwiGLU: two maps estimate gate.h and up.h; the score is the estimated contribution
  |silu(gate) * up|, and the `keep` neurons with the largest scores are used (SwiGLU is not naturally
  sparse, and the sign of the gate alone is a poor guide).
Stored in predictor.safetensors as layers.{i}.predictor.{up,gate}.{A [r, d], B [n_ff, r], c [n_ff]} and
layers.{i}.predictor.hot [n_ff] (neurons by calibration frequency), rule and rank in the metadata.
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
class LowRank:
    A: np.ndarray            # [r, d] f16 bits (uint16, widened inside the matmul kernel) or f32
    B: np.ndarray            # [n_ff, r] f16 bits or f32
    c: np.ndarray            # [n_ff] f32

    def __call__(self, h: np.ndarray) -> np.ndarray:
        z = np.empty((h.shape[0], self.A.shape[0]), np.float32)
        K.matmul(h, self.A, z)
        s = np.empty((h.shape[0], self.B.shape[0]), np.float32)
        K.matmul(z, self.B, s)
        s += self.c
        return s

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes + self.c.nbytes


def swiglu_score(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return np.abs(gate / (1.0 + np.exp(-gate)) * up)


@dataclass
class LayerPredictor:
    up: LowRank
    gate: LowRank | None     # SwiGLU only
    rule: str                # "threshold" (ReLU) or "topk" (SwiGLU)
    threshold: float = 0.0
    keep: int = 0            # neurons kept per token for "topk"
    hot: np.ndarray | None = None   # neuron ids ordered by calibration activation frequency, hottest first

    @property
    def nbytes(self) -> int:
        return self.up.nbytes + (self.gate.nbytes if self.gate else 0)

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h [T, d] -> scores [T, n_ff]: estimated pre-activation (ReLU) or contribution (SwiGLU)."""
        up = self.up(h)
        return up if self.gate is None else swiglu_score(self.gate(h), up)

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


def _open(folder: Path):
    path = Path(folder) / PREDICTOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no predictors; run `flashlm calibrate {folder}` first")
    header, start, meta = read_header(path)
    return path, header, start, meta


def calibration_report(folder: Path) -> dict:
    """The calibration report stored with the predictors (per-layer recall, window statistics)."""
    return json.loads(_open(folder)[3].get("report", "{}"))


def load_predictors(folder: Path, layers=None) -> list[LayerPredictor | None]:
    """One LayerPredictor per layer in `layers` (default all); None for the others."""
    path, header, start, meta = _open(folder)
    infos = json.loads(meta["layers"])

    def low_rank(prefix: str) -> LowRank | None:
        if prefix + ".A" not in header:
            return None
        t = {k: read_tensor(path, header[f"{prefix}.{k}"], start) for k in ("A", "B", "c")}
        half = {k: t[k].view(np.uint16) if t[k].dtype == np.float16 else t[k] for k in ("A", "B")}
        return LowRank(half["A"], half["B"], t["c"])

    wanted = set(range(len(infos)) if layers is None else layers)
    out = []
    for i, info in enumerate(infos):
        p = f"layers.{i}.predictor"
        out.append(LayerPredictor(up=low_rank(p + ".up"), gate=low_rank(p + ".gate"), rule=info["rule"],
                                  threshold=info.get("threshold", 0.0), keep=info.get("keep", 0),
                                  hot=read_tensor(path, header[p + ".hot"], start).astype(np.int32))
                   if i in wanted else None)
    return out
