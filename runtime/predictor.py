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
from .modelfile import ModelFileError
from .safetensors_file import read_header, read_tensor
from .storage import float_storage_of

PREDICTOR_FILE = "predictor.safetensors"


@dataclass
class LowRank:
    A: np.ndarray            # [r, d] f16 bits (uint16, widened inside the matmul kernel) or f32
    B: np.ndarray            # [n_ff, r] f16 bits or f32
    c: np.ndarray            # [n_ff] f32

    def __post_init__(self):
        # Decode (one token) scores into these: no allocation per token. Longer inputs allocate.
        self.z1 = np.empty((1, self.A.shape[0]), np.float32)
        self.s1 = np.empty((1, self.B.shape[0]), np.float32)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """Scores [T, n_ff]; for T = 1 a view of this map's own buffer, valid until its next call."""
        T = h.shape[0]
        z = self.z1 if T == 1 else np.empty((T, self.A.shape[0]), np.float32)
        s = self.s1 if T == 1 else np.empty((T, self.B.shape[0]), np.float32)
        K.matmul(h, self.A, z)
        K.matmul(z, self.B, s)
        s += self.c
        return s


def gated_score(gate: np.ndarray, up: np.ndarray, ffn_kind: str) -> np.ndarray:
    """|act(gate) * up|: a gated neuron's contribution magnitude (SwiGLU: silu, GeGLU: tanh-GELU)."""
    return np.abs(K.gate_np(gate, K.ACTIVATION_OF_KIND[ffn_kind]) * up)


@dataclass
class LayerPredictor:
    up: LowRank
    gate: LowRank | None     # gated FFNs (SwiGLU, GeGLU) only
    rule: str                # "threshold" (ReLU) or "topk" (gated)
    threshold: float = 0.0
    keep: int = 0            # neurons kept per token for "topk"
    hot: np.ndarray | None = None   # neuron ids ordered by calibration activation frequency, hottest first
    ffn_kind: str = "swiglu"        # which gate activation the contribution score applies

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h [T, d] -> scores [T, n_ff]: estimated pre-activation (ReLU) or contribution (SwiGLU)."""
        up = self.up(h)
        return up if self.gate is None else gated_score(self.gate(h), up, self.ffn_kind)

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
        raise ModelFileError(f"{path}: no predictors; run `flashlm calibrate {folder}` first")
    header, start, meta = read_header(path)
    return path, header, start, meta


@dataclass(frozen=True)
class Calibration:
    """What the memory planner needs from predictor.safetensors, read without loading the predictors."""
    predictor_bytes: list[int]   # per layer: the low-rank maps the layer's predictor keeps resident
    report: dict                 # converters/calibrate.py's report: per layer window statistics


def calibration_report(folder: Path) -> dict:
    """The calibration report stored with the predictors (per-layer recall, window statistics)."""
    return json.loads(_open(folder)[3].get("report", "{}"))


def read_calibration(folder) -> Calibration:
    """Sizes and statistics of a ModelFolder's predictors, from the file's header only."""
    path, header, _, meta = _open(folder.path)
    sizes = [0] * folder.config.n_layers
    for name, t in header.items():
        if name.startswith("layers.") and ".predictor." in name and not name.endswith(".hot"):
            layer = int(name.split(".")[1])
            if 0 <= layer < len(sizes):
                sizes[layer] += t["data_offsets"][1] - t["data_offsets"][0]
    try:
        report = json.loads(meta.get("report", "{}"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: metadata 'report' is not JSON ({e})") from None
    layers = report.get("layers") if isinstance(report, dict) else None
    if layers is not None and (not isinstance(layers, list) or len(layers) != folder.config.n_layers):
        raise ModelFileError(f"{path}: the calibration report covers {len(layers) if isinstance(layers, list) else '?'} "
                             f"layers, the model has {folder.config.n_layers}")
    return Calibration(sizes, report if isinstance(report, dict) else {})


def load_predictors(folder: Path, config, layers=None) -> list[LayerPredictor | None]:
    """One LayerPredictor per layer in `layers` (default all); None for the others. Every tensor's
    shape is checked against `config` (ModelConfig): the matmul kernels index by those shapes."""
    path, header, start, meta = _open(folder)
    try:
        infos = json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: metadata 'layers' is missing or not JSON ({e})") from None
    if not isinstance(infos, list) or len(infos) != config.n_layers:
        raise ModelFileError(f"{path}: predictors for {len(infos)} layers, the model has {config.n_layers}")
    d, n_ff = config.d_model, config.n_ff

    def tensor(name: str, shape) -> np.ndarray:
        info = header.get(name)
        if info is None:
            raise ModelFileError(f"{path}: tensor {name!r} is missing")
        if tuple(info["shape"]) != tuple(shape) or (len(shape) == 2 and float_storage_of(info["dtype"]) is None):
            raise ModelFileError(f"{path}: tensor {name!r} is {info['dtype']} {info['shape']}, expected a float "
                                 f"{list(shape)} for this model")
        t = read_tensor(path, info, start)
        return t.view(float_storage_of(info["dtype"]).view_dtype) if len(shape) == 2 else t.astype(np.float32)

    def low_rank(prefix: str) -> LowRank | None:
        if prefix + ".A" not in header:
            return None
        rank = header[prefix + ".A"]["shape"][0]
        return LowRank(tensor(prefix + ".A", (rank, d)), tensor(prefix + ".B", (n_ff, rank)),
                       tensor(prefix + ".c", (n_ff,)))

    def hot(name: str) -> np.ndarray:
        h = read_tensor(path, header[name], start) if name in header else None
        if h is None or h.shape != (n_ff,) or h.dtype.kind not in "iu" or (len(h) and (h.min() < 0 or h.max() >= n_ff)):
            raise ModelFileError(f"{path}: tensor {name!r} must list {n_ff} neuron ids below {n_ff}")
        return h.astype(np.int32)

    wanted = set(range(len(infos)) if layers is None else layers)
    out = []
    for i, info in enumerate(infos):
        p = f"layers.{i}.predictor"
        if i not in wanted:
            out.append(None)
            continue
        up, gate = low_rank(p + ".up"), low_rank(p + ".gate")
        if up is None or (gate is None) == config.gated:
            raise ModelFileError(f"{path}: layer {i} predictor maps do not fit a {config.ffn_kind} FFN")
        out.append(LayerPredictor(up=up, gate=gate, rule=info["rule"],
                                  threshold=info.get("threshold", 0.0), keep=info.get("keep", 0),
                                  hot=hot(p + ".hot"), ffn_kind=config.ffn_kind))
    return out
