"""Per-layer sparsity predictors: which FFN neurons will the next token need?

Each predictor is built from low-rank maps d -> r -> n_ff, est = (h @ A.T) @ B.T + c, of the layer's
normalized FFN input h, fitted to the layer's own projections (see converters/calibrate.py):
- ReLU family: one map estimates the pre-activation up.h + b; neurons whose estimate is above a
  calibrated threshold are predicted active.
- SwiGLU, rule "topk": two maps estimate gate.h and up.h; the score is the estimated contribution
  |silu(gate) * up|, and the `keep` neurons with the largest scores are used (SwiGLU is not naturally
  sparse, and the sign of the gate alone is a poor guide).
- SwiGLU, rule "gate" (gate resident, two-phase, PowerInfer-2's gate-first order): the layer's exact
  W_gate rows stay in DRAM, so silu(gate.h) is exact; only up.h is estimated (low rank), and the score
  is |silu(gate) * up~| * ||W_down[:, i]|| (WINA's weight-informed ranking: the norm of what neuron i
  adds to the output). On SmolLM2 at keep 50% this cuts the perplexity cost from +46% to a few percent
  (docs/BENCHMARKS.md, tools/sparsity_frontier.py); it costs a third of the FFN in DRAM.
- SwiGLU, rule "exact" (gate and up resident): silu(gate.h) * up.h is computed exactly and the score is
  |a_i| * ||W_down[:, i]||, the true top-k by output norm: +1.3% perplexity at keep 50% on SmolLM2
  (the bundle rows' gate and up parts are then read without need: reading only the down column is
  the layout change this rule is waiting for); two thirds of the FFN in DRAM.
- ReLU-gated FFNs (ReGLU, FATReLU, dReLU) use the gated rules with their own activation in the score:
  dReLU's relu(gate) * relu(up) scores zero when either (estimated) projection is not positive, and
  a neuron scored zero is never selected, so a token reads at most `keep` neurons and often fewer;
  with "exact" (both projections resident) the selection is exactly the active set when keep allows.
Stored in predictor.safetensors as layers.{i}.predictor.{up,gate}.{A [r, d], B [n_ff, r], c [n_ff]}
(A, B in f16, f32 or int8; int8 maps also hold their per-row scales .A_scale [r], .B_scale [n_ff], f32),
layers.{i}.predictor.hot [n_ff] (neurons by calibration frequency) and, for "gate",
layers.{i}.predictor.gate_rows [n_ff, d] and layers.{i}.predictor.down_norm [n_ff], for "exact" also
layers.{i}.predictor.up_rows [n_ff, d] (and no low-rank maps); rule and rank in the metadata. A folder
converted with `convert --resident gate` (rows hold up | down) or `--resident gate,up` (rows hold the
down column) has W_gate (and W_up) in its dense weights: no copies are stored, the rules use those
tensors, and a selected neuron costs only what its row holds (after 4 KiB alignment, docs/BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels as K
from .config import RELU_GATED_KINDS
from .modelfile import ModelFileError
from .runstate import PredictBuffers
from .safetensors_file import read_header, read_tensor
from .storage import float_storage_of

PREDICTOR_FILE = "predictor.safetensors"


@dataclass
class LowRank:
    A: np.ndarray            # [r, d] f16 bits (uint16, widened inside the matmul kernel), f32 or int8
    B: np.ndarray            # [n_ff, r] f16 bits, f32 or int8
    c: np.ndarray            # [n_ff] f32
    A_scale: np.ndarray | None = None    # int8 maps: one f32 scale per row of A [r] and of B [n_ff]
    B_scale: np.ndarray | None = None

    def __post_init__(self):
        # Decode (one token) scores into these: no allocation per token. Longer inputs allocate.
        self.z1 = np.empty((1, self.A.shape[0]), np.float32)
        self.s1 = np.empty((1, self.B.shape[0]), np.float32)

    @property
    def nbytes(self) -> int:
        """What this map holds in DRAM (the memory plan counts the same bytes from the file's header)."""
        return sum(t.nbytes for t in (self.A, self.B, self.c, self.A_scale, self.B_scale) if t is not None)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """Scores [T, n_ff]; for T = 1 a view of this map's own buffer, valid until its next call."""
        T = h.shape[0]
        z = self.z1 if T == 1 else np.empty((T, self.A.shape[0]), np.float32)
        s = self.s1 if T == 1 else np.empty((T, self.B.shape[0]), np.float32)
        if self.A_scale is None:
            K.matmul(h, self.A, z)
        else:
            K.matmul_scaled(h, self.A, self.A_scale, z)
        if self.B_scale is None:
            K.matmul(z, self.B, s)
        else:
            K.matmul_scaled(z, self.B, self.B_scale, s)
        s += self.c
        return s


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [n, k], scale f32 [n]) with w ~ q * scale[:, None]: symmetric, one scale per row (a row's
    largest magnitude maps to 127; an all-zero row gets scale 0 and zeros)."""
    w = np.asarray(w, np.float32)
    peak = np.abs(w).max(axis=1) if w.size else np.zeros(len(w), np.float32)
    scale = (peak / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """f32 [n, k]: what the int8 kernel multiplies by (q * scale per row)."""
    return q.astype(np.float32) * scale[:, None]


def gated_score(gate: np.ndarray, up: np.ndarray, ffn_kind: str, act_threshold: float = 0.0) -> np.ndarray:
    """|act(gate) * up|: a gated neuron's contribution magnitude (SwiGLU: silu, GeGLU: tanh-GELU, ReGLU /
    FATReLU: the thresholded ReLU gate, dReLU: relu(gate) * relu(up), zero when either is not positive)."""
    return np.abs(K.activate_np(gate, up, K.ACTIVATION_OF_KIND[ffn_kind], np.float32(act_threshold)))


def select_top_nonzero(scores: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` largest of one token's scores [n_ff] that are above zero, sorted int32: the selection
    of ReLU-gated FFNs (ReGLU, FATReLU, dReLU), where a neuron scored zero is (estimated) inactive and
    reading it would add nothing."""
    k = min(keep, int(np.count_nonzero(scores > 0)))
    if k == 0:
        return np.zeros(0, np.int32)
    return np.sort(np.argpartition(-scores, k - 1)[:k]).astype(np.int32)


@dataclass
class LayerPredictor:
    up: LowRank | None       # None for "exact"
    gate: LowRank | None     # gated "topk" only
    rule: str                # "threshold" (ReLU), "topk", "gate" or "exact" (gated: SwiGLU, GeGLU)
    threshold: float = 0.0
    keep: int = 0            # neurons kept per token for "topk" and "gate"
    hot: np.ndarray | None = None   # neuron ids ordered by calibration activation frequency, hottest first
    ffn_kind: str = "swiglu"        # which gate activation the contribution score applies
    act_threshold: float = 0.0      # its FATReLU threshold (ReGLU, dReLU)
    gate_rows: np.ndarray | None = None   # "gate", "exact": W_gate [n_ff, d], f16 bits or f32
    up_rows: np.ndarray | None = None     # "exact": W_up [n_ff, d]
    down_norm: np.ndarray | None = None   # "gate", "exact": ||W_down[:, i]|| [n_ff] f32
    # "threshold": the lower threshold of the pipeline's early guess (this layer's predictor applied to the
    # previous layer's FFN input), calibrated to keep GUESS_RECALL of what the true input selects; None:
    # the guess uses `threshold` (predictors calibrated before it existed)
    guess_threshold: float | None = None
    # "threshold": the lower threshold below which a row already in the neuron cache is not computed for a
    # decode token (calibrated to keep COMPUTE_RECALL of the truly active neurons: the FFN kernels then
    # skip most of the window's rows, which cost their dot product and add nothing); None: every cached
    # row is computed (predictors calibrated before it existed)
    compute_threshold: float | None = None

    buffers: PredictBuffers | None = None   # a decode token's scores and ids (the run state's; else own)

    def __post_init__(self):
        n_ff = len(self.down_norm) if self.down_norm is not None else self.up.B.shape[0]
        if self.buffers is None:
            self.buffers = PredictBuffers.allocate(n_ff)
        self._act = K.ACTIVATION_OF_KIND[self.ffn_kind]
        self._thr = np.float32(self.act_threshold)
        # ReLU-gated kinds: a neuron scored zero is never selected (its activation is, or is estimated, 0)
        self._nonzero = self.ffn_kind in RELU_GATED_KINDS
        self._no_norm = np.zeros(0, np.float32)
        self._threshold = np.float32(self.threshold)
        self._guess_threshold = np.float32(self.threshold if self.guess_threshold is None else self.guess_threshold)
        self._compute_threshold = np.float32(self.compute_threshold if self.compute_threshold is not None else 0.0)

    def _rows(self, h: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.empty((h.shape[0], w.shape[0]), np.float32)
        K.matmul(h, w, out)
        return out

    def scores(self, h: np.ndarray, gate_h=None, up_h=None) -> np.ndarray:
        """h [T, d] -> scores [T, n_ff]: estimated pre-activation (ReLU) or contribution (SwiGLU).
        gate_h, up_h: h @ gate_rows.T (h @ up_rows.T) when the caller has them (the FFN kernel computed
        them from the same resident tensors); otherwise this computes them."""
        kind, t = self.ffn_kind, self.act_threshold
        if self.rule in ("gate", "exact"):
            g = self._rows(h, self.gate_rows) if gate_h is None else gate_h
        if self.rule == "exact":
            u = self._rows(h, self.up_rows) if up_h is None else up_h
            return gated_score(g, u, kind, t) * self.down_norm
        up = self.up(h)
        if self.rule == "gate":
            return gated_score(g, up, kind, t) * self.down_norm
        return up if self.gate is None else gated_score(self.gate(h), up, kind, t)

    def select(self, scores: np.ndarray) -> np.ndarray:
        """Predicted neuron ids (int32, sorted) for one token's scores [n_ff]."""
        if self.rule == "threshold":
            return np.flatnonzero(scores > self.threshold).astype(np.int32)
        if self._nonzero:
            return select_top_nonzero(scores, self.keep)
        k = min(self.keep, scores.size)
        return np.sort(np.argpartition(-scores, k - 1)[:k]).astype(np.int32)

    def _predict_one(self, h: np.ndarray, threshold=None, gate_h=None, up_h=None) -> np.ndarray:
        """One token, through the preallocated buffers and the numba selection kernels: nothing is
        allocated. Returns a view of buffers.ids, valid until this layer's next prediction."""
        b = self.buffers
        threshold = self._threshold if threshold is None else threshold
        if self.rule in ("gate", "exact") and gate_h is None:
            K.matmul(h, self.gate_rows, b.gate)
            gate_h = b.gate
        if self.rule == "exact":
            if up_h is None:
                K.matmul(h, self.up_rows, b.up)
                up_h = b.up
            K.contribution(gate_h[0], up_h[0], self.down_norm, self._act, self._thr, b.scores)
        elif self.rule == "gate":
            up = self.up(h)
            K.contribution(gate_h[0], up[0], self.down_norm, self._act, self._thr, b.scores)
        elif self.gate is not None:
            up = self.up(h)
            K.contribution(self.gate(h)[0], up[0], self._no_norm, self._act, self._thr, b.scores)
        else:
            up = self.up(h)
            return b.ids[:K.select_above(up[0], threshold, b.ids)]
        if self._nonzero:
            return b.ids[:K.select_top_above(b.scores, self.keep, np.float32(0.0), b.work, b.ids)]
        return b.ids[:K.select_top(b.scores, self.keep, b.work, b.ids)]

    def compute_filter(self) -> tuple[np.ndarray, np.float32] | None:
        """(scores [n_ff], threshold) of the decode token predict() last scored: a cached row whose
        neuron scores at or below the threshold is surely inactive and need not be computed. None: compute
        every cached row (no compute threshold, or a rule whose scores are not pre-activations)."""
        if self.rule != "threshold" or self.compute_threshold is None:
            return None
        return self.up.s1[0], self._compute_threshold

    def guess(self, h: np.ndarray) -> np.ndarray:
        """The pipeline's early guess of this layer's neurons for one decode token, from the previous
        layer's FFN input h [1, d]: the "threshold" rule at its guess threshold (wider: the guess sees a
        shifted input), other rules as predict(). A view of buffers.ids, like predict()."""
        return self._predict_one(h, self._guess_threshold)

    def predict(self, h: np.ndarray, gate_h=None, up_h=None) -> np.ndarray:
        """Union of the predicted neurons of all T tokens in h [T, d] (T = 1: a view of buffers.ids).
        gate_h, up_h [T, n_ff]: the products h @ gate_rows.T, h @ up_rows.T if the caller already has
        them (the "gate" and "exact" rules then skip their own matmuls; other rules ignore them)."""
        if h.shape[0] == 1:
            return self._predict_one(h, gate_h=gate_h, up_h=up_h)
        s = self.scores(h, gate_h, up_h)
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
    predictor_bytes: list[int]   # per layer: what the predictor keeps resident (low-rank maps, gate/up rows, norms)
    report: dict                 # converters/calibrate.py's report: per layer window statistics


def _check_sha256(folder: Path, path: Path) -> None:
    """The predictors decide which neurons are read: a corrupt file must not silently change that.
    calibrate records their sha256 in the manifest; check it before any tensor is used."""
    mpath = folder / "manifest.json"
    try:
        entry = json.loads(mpath.read_text())["files"][PREDICTOR_FILE]
        expected = entry["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelFileError(f"{path}: no sha256 for it in {mpath}; run `flashlm calibrate {folder}` again") from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise ModelFileError(f"{path}: sha256 {h.hexdigest()[:16]}... does not match the manifest "
                             f"({str(expected)[:16]}...); the file is corrupt or was replaced")


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


def load_predictors(folder: Path, config, layers=None, state=None, gate_rows=None,
                    up_rows=None) -> list[LayerPredictor | None]:
    """One LayerPredictor per layer in `layers` (default all); None for the others. Every tensor's
    shape is checked against `config` (ModelConfig): the matmul kernels index by those shapes.
    `state` (a RunState): the predictors write a decode token's scores into its buffers.
    gate_rows: every layer's resident W_gate of a gate-resident bundle layout; the "gate" and "exact"
    rules then use it instead of a copy in the predictor file (calibrate writes none for such folders);
    up_rows likewise, W_up of a down-only layout, for "exact"."""
    path, header, start, meta = _open(folder)
    _check_sha256(Path(folder), path)
    try:
        infos = json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: metadata 'layers' is missing or not JSON ({e})") from None
    if not isinstance(infos, list) or len(infos) != config.n_layers:
        raise ModelFileError(f"{path}: predictors for {len(infos)} layers, the model has {config.n_layers}")
    d, n_ff = config.d_model, config.n_ff

    def tensor(name: str, shape, int8: bool = False) -> np.ndarray:
        info = header.get(name)
        if info is None:
            raise ModelFileError(f"{path}: tensor {name!r} is missing")
        matrix = len(shape) == 2
        if int8:
            ok = info["dtype"] == "I8"
        else:
            ok = not matrix or float_storage_of(info["dtype"]) is not None
        if tuple(info["shape"]) != tuple(shape) or not ok:
            raise ModelFileError(f"{path}: tensor {name!r} is {info['dtype']} {info['shape']}, expected "
                                 f"{'an I8' if int8 else 'a float'} {list(shape)} for this model")
        t = read_tensor(path, info, start)
        if int8:
            return t
        return t.view(float_storage_of(info["dtype"]).view_dtype) if matrix else t.astype(np.float32)

    def low_rank(prefix: str) -> LowRank | None:
        if prefix + ".A" not in header:
            return None
        rank = header[prefix + ".A"]["shape"][0]
        # int8 maps (calibrate --predictor-dtype int8) carry their per-row scales beside them
        int8 = header[prefix + ".A"]["dtype"] == "I8"
        if int8 and (prefix + ".A_scale" not in header or prefix + ".B_scale" not in header):
            raise ModelFileError(f"{path}: int8 map {prefix!r} has no per-row scales ({prefix}.A_scale, "
                                 f"{prefix}.B_scale); run `flashlm calibrate {folder}` again")
        scales = dict(A_scale=tensor(prefix + ".A_scale", (rank,)), B_scale=tensor(prefix + ".B_scale", (n_ff,))) \
            if int8 else {}
        return LowRank(tensor(prefix + ".A", (rank, d), int8), tensor(prefix + ".B", (n_ff, rank), int8),
                       tensor(prefix + ".c", (n_ff,)), **scales)

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
        rule = info.get("rule")
        up, gate = low_rank(p + ".up"), low_rank(p + ".gate")
        # Which maps each rule needs: low-rank up (all but "exact"), low-rank gate ("topk"), resident
        # exact rows ("gate": W_gate, "exact": W_gate and W_up) with the down-column norms.
        fits = {"threshold": not config.gated and up is not None and gate is None,
                "topk": config.gated and up is not None and gate is not None,
                "gate": config.gated and up is not None and gate is None,
                "exact": config.gated and up is None and gate is None}
        if not fits.get(rule, False):
            raise ModelFileError(f"{path}: layer {i} predictor (rule {rule!r}) does not fit a {config.ffn_kind} FFN")
        resident = {}
        if rule in ("gate", "exact"):
            w_gate = gate_rows[i] if gate_rows is not None and p + ".gate_rows" not in header \
                else tensor(p + ".gate_rows", (n_ff, d))
            resident = {"gate_rows": w_gate, "down_norm": tensor(p + ".down_norm", (n_ff,))}
            if rule == "exact":
                resident["up_rows"] = up_rows[i] if up_rows is not None and p + ".up_rows" not in header \
                    else tensor(p + ".up_rows", (n_ff, d))
        out.append(LayerPredictor(up=up, gate=gate, rule=rule,
                                  threshold=info.get("threshold", 0.0), keep=info.get("keep", 0),
                                  guess_threshold=info.get("guess_threshold"),
                                  compute_threshold=info.get("compute_threshold"),
                                  hot=hot(p + ".hot"), ffn_kind=config.ffn_kind, act_threshold=config.act_threshold,
                                  buffers=state.predict_buffers(i) if state is not None else None, **resident))
    return out
