"""Which FFN neurons to keep on a SwiGLU model: held-out perplexity against flash bytes read per token.

Every selector runs inside the real forward pass (runtime/model.py) through an analysis FFN that holds
the layer's exact f32 weights, computes act(gate), up and the contribution a = act(gate) * up for
every neuron, and then sums only the neurons the selector keeps. So perplexity is what the selection
costs, and "bytes read" is what the selector's storage layout would read from flash (f16 rows, no
padding) given a per-layer LRU neuron cache of --cache neurons (0: no cache, every kept row is read).

Selectors (the `layout` decides what is resident and what a neuron costs to read):
  oracle          top-k |a| (not realizable: needs every row; the reference)
  oracle-wina     top-k |a| * ||W_down[:, i]|| (the exact norm of neuron i's output)
  lowrank         the calibrated low-rank predictor (predictor.safetensors): |act(g~) * u~|; bundle
  cats            |act(g)| with W_gate resident (CATS); reads up|down
  gate-lowup      gate resident, exact act(g) times the predictor's low-rank up estimate u~; reads up|down
  gate-lowup-wina the same times ||W_down[:, i]|| (WINA's weight-informed ranking)
  gate-stat       |act(g)| * E|u_i| * ||W_down[:, i]|| (per-neuron statistics from calibration text)
  gateup-wina     W_gate and W_up resident, exact |a| * ||W_down[:, i]||; reads only down columns
  gateup-mass     gateup-wina's score, per token the fewest neurons holding --mass of its score mass
  gateup-layer    gateup-wina with per-layer keep fractions calibrated on --calib-text (mean = --keep):
                  one score-mass share for all layers
  gateup-err      the same with fractions that equalize each layer's relative output error
  gateup-thr      per-layer score thresholds calibrated so each layer keeps --keep on average: the count
                  varies per token; gateup-err-thr / gateup-layer-thr: thresholds at those fractions
  griffin         per prompt (GRIFFIN): top-k by ||a[:, i] / ||a[t]|| ||_2 over the prompt, fixed after
--comp R adds the dropped neurons back through a resident rank-R W_down (truncated SVD, or fitted to
the dropped contributions on the calibration text with --comp-fit) for the gateup-* methods.
--fallback M [--fallback-keep F]: a decoded token whose sparse logits' top two are closer than M is
computed again with every neuron (or the top F share) and its KV replaced; it counts once at that share.
The task check reports where each changed answer first leaves dense's and dense's own margin there.
Any per-token selector with --dip G is DIP's cache-aware masking: scores of neurons already in the
cache are multiplied by G before the top-k, so cached neurons win close calls.

Honest protocol: each window of --ctx tokens starts with --prompt tokens computed dense (what the
runtime does for a prompt: its union is streamed whole) and, for griffin, used to choose the set;
the rest of the window runs sparse and only those positions are scored. The task check greedy-decodes
--gen tokens after each prompt of a prompt file (prompt dense, decode sparse; griffin selects from the
prompt alone) and reports how many answers equal dense's exactly.

    python tools/sparsity_frontier.py MODEL.flashlm --ctx 512 --prompt 128 --keep 0.4,0.5,0.6 \
        --methods oracle,lowrank,cats,gate-lowup-wina,griffin --svg docs/frontier-smollm2.svg
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashlm.runtime import kernels as K
from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.loader import load
from flashlm.runtime.model import Model

HERE = Path(__file__).resolve().parent
F16 = 2          # bytes per stored weight (f16 bundle rows)


ACT = {"fn": None, "thr": 0.0}   # set in layer_weights from the model's ffn_kind and FATReLU threshold


def silu(x):
    """The model's gate activation alone, act(g) (named for SwiGLU, the common case; ReLU / FATReLU
    for the ReLU-gated kinds): what a gate-only score ranks by."""
    return K.activate_np(x, np.float32(1.0), ACT["fn"], ACT["thr"])


def contribution(g, u):
    """a = act(g) * u, or dReLU's relu(g) * relu(u): the family's own formula (runtime/kernels.py)."""
    return K.activate_np(g, u, ACT["fn"], ACT["thr"])


@dataclass
class LayerWeights:
    gate: np.ndarray         # [n_ff, d] f32
    up: np.ndarray           # [n_ff, d]
    down: np.ndarray         # [n_ff, d]: row i = neuron i's down column
    down_norm: np.ndarray    # [n_ff] ||W_down[:, i]||


def layer_weights(model: Model) -> list[LayerWeights]:
    """Each layer's exact projections, widened once from the dense-mode bundle rows."""
    c, layout = model.config, model.folder.bundles
    if not c.gated:
        raise SystemExit(f"{model.folder.path}: ffn_kind {c.ffn_kind!r}; this tool studies gated FFNs "
                         "(SwiGLU, GeGLU, ReGLU, dReLU)")
    ACT["fn"], ACT["thr"] = K.activation(c)
    from flashlm.converters.calibrate import layer_part      # the bundle rows or, if resident, the dense W_gate
    out = []
    for i in range(c.n_layers):                                 # dense mode: every layer resident
        gate, up, down = (np.ascontiguousarray(layer_part(model, i, p)) for p in ("gate", "up", "down"))
        out.append(LayerWeights(gate, up, down, np.linalg.norm(down, axis=1)))
    return out


@dataclass
class Method:
    name: str
    keep: float
    dip: float = 1.0         # DIP cache-aware boost of cached neurons' scores (1 = off)
    mass: float = 0.0        # > 0: per token, keep the fewest neurons holding this share of the score mass
    layer_keep: tuple[float, ...] | None = None   # per-layer keep fractions (calibrated, mean = keep)
    thresholds: tuple[float, ...] | None = None   # per-layer score thresholds (calibrated): count varies per token
    fallback: float = 0.0    # > 0: tokens whose sparse logit margin is below this are recomputed dense
    fallback_keep: float = 1.0   # ... or with this larger top-k share instead of every neuron
    comp: int = 0            # rank of the resident low-rank W_down that adds the dropped neurons back
    comp_fit: list | None = field(default=None, repr=False)   # calibration inputs per layer: fit it to them

    @property
    def per_prompt(self) -> bool:
        return self.name == "griffin"

    @property
    def label(self) -> str:
        return (self.name + (f"@{self.mass:g}" if self.mass else "") + (f"+dip{self.dip:g}" if self.dip != 1.0 else "")
                + (f"+comp{self.comp}" + ("fit" if self.comp_fit is not None else "") if self.comp else "")
                + (f"+fb{self.fallback:g}" + (f"@{self.fallback_keep:g}" if self.fallback_keep < 1 else "")
                   if self.fallback else ""))

    def layout(self) -> tuple[str, ...]:
        """Parts of a neuron that are read from flash when it is selected (the rest is resident)."""
        if self.name in ("cats", "gate-lowup", "gate-lowup-wina", "gate-stat"):
            return ("up", "down")
        if self.name.startswith("gateup"):
            return ("down",)
        return ("gate", "up", "down")

    def resident_parts(self) -> tuple[str, ...]:
        return tuple(p for p in ("gate", "up", "down") if p not in self.layout())


class Scorer:
    """Per-token scores [T, n_ff] for a method; larger = keep."""

    def __init__(self, weights: list[LayerWeights], predictors, stats):
        self.w, self.pred, self.stats = weights, predictors, stats

    def __call__(self, name, layer, h, g, u, a):
        w = self.w[layer]
        if name == "oracle":
            return np.abs(a)
        if name == "oracle-wina" or name.startswith("gateup"):
            return np.abs(a) * w.down_norm
        if name == "cats":
            return np.abs(silu(g))
        if name == "gate-stat":
            return np.abs(silu(g)) * self.stats[layer]
        p = self.pred[layer]
        if name in ("lowrank", "lowrank-wina"):
            s = np.abs(contribution(p.gate(h), p.up(h)))
            return s * w.down_norm if name == "lowrank-wina" else s
        if name in ("gate-lowup", "gate-lowup-wina"):
            s = np.abs(contribution(g, p.up(h)))
            return s * w.down_norm if name == "gate-lowup-wina" else s
        raise SystemExit(f"unknown method {name!r}")


class LRU:
    """One layer's neuron cache for the byte accounting: capacity neurons, least recently used out."""

    def __init__(self, n_ff: int, capacity: int):
        self.capacity = capacity
        self.cached = np.zeros(n_ff, bool)
        self.last = np.full(n_ff, -1, np.int64)
        self.t = 0

    def admit(self, sel: np.ndarray) -> int:
        """Mark sel used now; returns how many of them were not cached (= rows read)."""
        self.t += 1
        if self.capacity == 0:
            return len(sel)
        misses = int((~self.cached[sel]).sum())
        self.cached[sel] = True
        self.last[sel] = self.t
        over = int(self.cached.sum()) - self.capacity
        if over > 0:
            ids = np.flatnonzero(self.cached & (self.last < self.t))
            drop = ids[np.argsort(self.last[ids], kind="stable")[:over]]
            self.cached[drop] = False
        return misses


def mass_mask(s: np.ndarray, share: float) -> np.ndarray:
    """[T, n_ff] bool: per token the fewest top-scoring neurons whose scores sum to `share` of the
    token's total (a per-token adaptive threshold: peaked tokens keep few neurons, flat ones many)."""
    order = np.argsort(-s, axis=1)
    cum = np.cumsum(np.take_along_axis(s, order, axis=1), axis=1)
    k = (cum < share * cum[:, -1:]).sum(axis=1) + 1          # neurons up to and including the crossing
    mask = np.zeros(s.shape, bool)
    ranks = np.arange(s.shape[1])[None, :] < np.minimum(k, s.shape[1])[:, None]
    np.put_along_axis(mask, order, ranks, axis=1)
    return mask


def low_rank_down(down: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """W_down [n_ff, d] ~ P [n_ff, r] @ Q [r, d] (truncated SVD): what a small resident copy of W_down
    can add back for the neurons a token drops."""
    u, sv, vt = np.linalg.svd(down.astype(np.float64), full_matrices=False)
    return (u[:, :rank] * sv[:rank]).astype(np.float32), vt[:rank].astype(np.float32)


def fitted_down(h: np.ndarray, w: LayerWeights, rank: int, k: int, mass: float) -> tuple[np.ndarray, np.ndarray]:
    """Low-rank W_down fitted to what the selection drops on calibration inputs h [N, d]: with D the
    dropped activations (a with the kept neurons zeroed), the rank-r map closest to D @ W_down is
    W_down projected onto the top r right singular vectors of D @ W_down (reduced-rank regression of
    exact targets), so the resident rank goes to the output directions the dropped neurons move."""
    a = contribution(h @ w.gate.T, h @ w.up.T)
    s = np.abs(a) * w.down_norm
    if mass:
        keep = mass_mask(s, mass)
    else:
        keep = np.zeros(s.shape, bool)
        np.put_along_axis(keep, np.argpartition(-s, k - 1, axis=1)[:, :k], True, axis=1)
    _, _, vt = np.linalg.svd((a * ~keep) @ w.down, full_matrices=False)
    v = vt[:rank].T
    return (w.down @ v).astype(np.float32), np.ascontiguousarray(v.T).astype(np.float32)


def layer_keep_fractions(hs: list[np.ndarray], weights: list[LayerWeights], keep: float) -> tuple[float, ...]:
    """Per-layer keep fractions with mean `keep`: one score-mass share for all layers, found by
    bisection on calibration inputs hs (per layer [N, d]), each layer keeping what that share needs
    on average (layers whose contributions are spread out get more neurons)."""
    shares = []                  # per layer [N, n_ff]: cumulative score share of the top-j neurons
    for h, w in zip(hs, weights):
        s = -np.sort(-np.abs(contribution(h @ w.gate.T, h @ w.up.T)) * w.down_norm, axis=1)
        cum = np.cumsum(s, axis=1)
        shares.append(cum / cum[:, -1:])
    n_ff = weights[0].gate.shape[0]
    fractions = lambda m: [float(np.minimum((c < m).sum(axis=1) + 1, n_ff).mean()) / n_ff for c in shares]
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(fractions(mid)) < keep else (lo, mid)
    return tuple(round(f, 4) for f in fractions((lo + hi) / 2))


def _scores(h: np.ndarray, w: LayerWeights) -> np.ndarray:
    return np.abs(contribution(h @ w.gate.T, h @ w.up.T)) * w.down_norm


def error_keep_fractions(hs: list[np.ndarray], weights: list[LayerWeights], keep: float,
                         grid=tuple(np.arange(0.1, 1.0001, 0.05))) -> tuple[float, ...]:
    """Per-layer keep fractions with mean `keep` that equalize the layers' relative output error
    ||sum of the dropped neurons' a_i W_down[:, i]|| / ||layer output|| (mean over calibration inputs)
    under top-k by the exact score: unlike a score-mass share it sees the dropped terms cancelling."""
    curves = []
    for h, w in zip(hs, weights):
        a = contribution(h @ w.gate.T, h @ w.up.T)
        order = np.argsort(-np.abs(a) * w.down_norm, axis=1)
        full = np.linalg.norm(a @ w.down, axis=1) + 1e-30
        errs = []
        for f in grid:
            drop = np.zeros(a.shape, bool)
            np.put_along_axis(drop, order[:, int(round(f * a.shape[1])):], True, axis=1)
            errs.append(float((np.linalg.norm((a * drop) @ w.down, axis=1) / full).mean()))
        curves.append(np.maximum.accumulate(np.array(errs)[::-1])[::-1])   # non-increasing in f
    g = np.asarray(grid)
    # the smallest fraction whose error is <= e, interpolated linearly between grid points
    frac = lambda e: [float(np.interp(-e, -c, g)) if e < c[0] else float(g[0]) for c in curves]
    lo, hi = 0.0, max(c[0] for c in curves)
    for _ in range(40):                      # larger allowed error -> fewer neurons
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(frac(mid)) > keep else (lo, mid)
    return tuple(round(f, 4) for f in frac((lo + hi) / 2))


def layer_thresholds(hs: list[np.ndarray], weights: list[LayerWeights], fractions) -> tuple[float, ...]:
    """Per layer, the score above which `fractions[l]` of the calibration tokens' neurons lie: a token
    keeps every neuron scoring above its layer's threshold, so the count varies from token to token
    around the calibrated mean."""
    return tuple(float(np.quantile(_scores(h, w), 1.0 - f)) for h, w, f in zip(hs, weights, fractions))


class AnalysisFFN:
    """Stands in for model.ffn_backend: exact FFN math, then only the selected neurons are summed."""

    def __init__(self, weights: list[LayerWeights], scorer: Scorer, method: Method, cache: int, d_model: int):
        self.w, self.scorer, self.method = weights, scorer, method
        n_ff = weights[0].gate.shape[0]
        self.k = max(1, int(round(method.keep * n_ff)))
        self.layer_k = [max(1, int(round(f * n_ff))) for f in method.layer_keep] if method.layer_keep \
            else [self.k] * len(weights)
        self.comp = None
        if method.comp and method.comp_fit is not None:
            self.comp = [fitted_down(hc, lw, method.comp, k, method.mass)
                         for hc, lw, k in zip(method.comp_fit, weights, self.layer_k)]
        elif method.comp:
            self.comp = [low_rank_down(lw.down, method.comp) for lw in weights]
        self.cache_capacity = cache
        self.row_bytes = len(method.layout()) * d_model * F16
        self.dense_phase = True
        self.dense_rows = None   # [T] bool over the next forward's tokens: computed with more neurons (fallback)
        self.row = 0             # where the current chunk starts in dense_rows (the model runs chunks)
        self.bytes_read = self.neuron_tokens = self.decode_tokens = self.fallbacks = 0
        self.stats = type("S", (), {"tokens": 0})()
        self.reset()

    def reset(self) -> None:
        n_ff = self.w[0].gate.shape[0]
        self.caches = [LRU(n_ff, self.cache_capacity) for _ in self.w]
        self.prompt_stat = [np.zeros(n_ff) for _ in self.w]
        self.fixed = [None] * len(self.w)

    def fix_prompt_selection(self) -> int:
        """GRIFFIN: keep the top-k neurons of the prompt statistic; returns rows to read once (fill)."""
        self.fixed = [np.sort(np.argpartition(-s, self.k - 1)[:self.k]) for s in self.prompt_stat]
        return sum(len(f) for f in self.fixed) * self.row_bytes

    def __call__(self, layer, h, out):
        w = self.w[layer]
        g = h @ w.gate.T
        u = h @ w.up.T
        a = contribution(g, u)
        if self.dense_phase or self.method.name == "dense":
            if self.method.per_prompt:
                norm = np.linalg.norm(a, axis=1, keepdims=True)
                self.prompt_stat[layer] += ((a / np.maximum(norm, 1e-30)) ** 2).sum(axis=0)
            out[:] = a @ w.down
            if not self.dense_phase:     # the dense reference: every row of every layer, every token
                self.decode_tokens += len(h) if layer == 0 else 0
                self.bytes_read += a.size * self.row_bytes
                self.neuron_tokens += a.size
            return
        if self.method.per_prompt:
            sel = self.fixed[layer]
            out[:] = a[:, sel] @ w.down[sel]
            self.bytes_read += 0           # the set was read once when it was fixed
            self.neuron_tokens += len(sel) * len(h)
            return
        if layer == 0:
            self.decode_tokens += len(h)
            self.row += len(h)
        s = self.scorer(self.method.name, layer, h, g, u, a)
        cache = self.caches[layer]
        mask = np.zeros(s.shape, bool)
        if cache.capacity == 0:          # no cache state: every token independent, one vectorized top-k
            if self.method.mass:
                mask = mass_mask(s, self.method.mass)
            elif self.method.thresholds:
                mask = s > self.method.thresholds[layer]
                mask[np.arange(len(s)), np.argmax(s, axis=1)] = True     # at least one neuron
            else:
                k = self.layer_k[layer]
                np.put_along_axis(mask, np.argpartition(-s, k - 1, axis=1)[:, :k], True, axis=1)
            unsure = None if self.dense_rows is None else self.dense_rows[self.row - len(h):self.row]
            if unsure is not None and self.method.fallback_keep >= 1.0:
                mask[unsure] = True
            elif unsure is not None and unsure.any():    # the unsure tokens: a larger top-k (a superset)
                rows = np.flatnonzero(unsure)
                kk = max(1, int(round(self.method.fallback_keep * s.shape[1])))
                top = np.argpartition(-s[rows], kk - 1, axis=1)[:, :kk]
                mask[rows[:, None], top] = True
            kept = int(mask.sum())
            self.bytes_read += kept * self.row_bytes
            self.neuron_tokens += kept
            out[:] = (a * mask) @ w.down
            if self.comp is not None:    # the dropped neurons through the resident low-rank W_down
                p, q = self.comp[layer]
                out += ((a * ~mask) @ p) @ q
            return
        for t in range(len(h)):
            st = s[t] * np.where(cache.cached, self.method.dip, 1.0) if self.method.dip != 1.0 else s[t]
            k = self.layer_k[layer]
            sel = np.argpartition(-st, k - 1)[:k]
            mask[t, sel] = True
            self.bytes_read += cache.admit(sel) * self.row_bytes
        self.neuron_tokens += int(mask.sum())
        out[:] = (a * mask) @ w.down

    def close(self):
        pass


def _log_softmax_at(logits, targets):
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(axis=-1))


def margins_of(logits: np.ndarray) -> np.ndarray:
    """Per row: the largest logit minus the runner-up (how sure the greedy choice is)."""
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def perplexity(model: Model, ffn: AnalysisFFN, ids: list[int], ctx: int, prompt: int, fallback: float = 0.0) -> dict:
    """Windows of ctx tokens: the first `prompt` dense, the rest sparse and scored. fallback M > 0:
    positions whose sparse logits have a margin below M are recomputed with every neuron; in this
    batched check the decision comes from a first all-sparse pass and the second pass computes those
    positions dense (their KV too), as decoding would up to the decisions' dependence on each other."""
    nll, count, sparse_tokens, fill = 0.0, 0, 0, 0
    ffn.bytes_read, ffn.neuron_tokens = 0, 0
    for start in range(0, len(ids) - 1, ctx):
        seq = ids[start:start + ctx + 1]
        if len(seq) < prompt + 2:
            break
        model.reset()
        ffn.reset()
        ffn.dense_phase = True
        model.forward(seq[:prompt])
        if ffn.method.per_prompt:
            fill += ffn.fix_prompt_selection()
        ffn.dense_phase = False
        part = seq[prompt:-1]
        if fallback:
            before = ffn.bytes_read, ffn.neuron_tokens
            ffn.dense_rows = margins_of(model.forward(part, all_logits=True)) < fallback
            ffn.bytes_read, ffn.neuron_tokens = before
            ffn.row = 0
            model.reset(prompt)
        logits = model.forward(part, all_logits=True)
        ffn.dense_rows = None
        nll -= _log_softmax_at(logits, np.asarray(seq[prompt + 1:])).sum()
        count += len(part)
        sparse_tokens += len(part)
    n_layers = len(ffn.w)
    return {"perplexity": float(np.exp(nll / count)), "scored_tokens": count,
            "bytes_per_token": ffn.bytes_read / sparse_tokens,
            "fill_bytes_per_window": fill / max(1, len(range(0, len(ids) - 1, ctx))),
            "kept_fraction": ffn.neuron_tokens / (sparse_tokens * n_layers * ffn.w[0].gate.shape[0])}


def read_prompts(path: Path) -> list[str]:
    return [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


@dataclass
class Answer:
    text: str                # the first line of the greedy continuation (what the task check compares)
    ids: list[int]           # its tokens
    margins: list[float]     # per step: logit of the chosen token minus the runner-up's


def greedy(model: Model, ffn: AnalysisFFN, tokenizer, prompt: str, n: int, fallback: float = 0.0) -> Answer:
    """Greedy first line after `prompt` (dense), decoded sparse; fallback M > 0: a token whose sparse
    logits have a margin below M is computed again with every neuron (its reads are then the whole
    FFN, counted once; or its --fallback-keep top share) and that token's KV replaced."""
    model.reset()
    ffn.reset()
    ffn.dense_phase = True
    ids = tokenizer.encode(prompt)
    logits = model.forward(ids)[-1]
    if ffn.method.per_prompt:
        ffn.fix_prompt_selection()
    ffn.dense_phase = False
    out, margins = [], []
    for _ in range(n):
        t = int(np.argmax(logits))
        top2 = np.partition(logits, -2)[-2:]
        margins.append(float(top2[1] - top2[0]))
        if tokenizer.is_eos(t):
            break
        out.append(t)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if "\n" in text.strip(" "):
            break
        before = ffn.bytes_read, ffn.neuron_tokens, ffn.decode_tokens
        logits = model.forward([t])[-1]
        if fallback and margins_of(logits) < fallback:
            ffn.bytes_read, ffn.neuron_tokens, ffn.decode_tokens = before
            model.reset(model.pos - 1)
            ffn.dense_rows, ffn.row = np.ones(1, bool), 0
            logits = model.forward([t])[-1]
            ffn.dense_rows = None
            ffn.fallbacks += 1
    return Answer(tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip(), out, margins)


def divergence(got: Answer, ref: Answer) -> dict | None:
    """Where a sparse answer leaves dense's (None: the same answer): the first differing token and
    dense's own margin there (a near-tie if small: dense itself barely preferred its token)."""
    if got.text == ref.text:
        return None
    pos = next((i for i, (a, b) in enumerate(zip(got.ids, ref.ids)) if a != b), min(len(got.ids), len(ref.ids)))
    return {"position": pos, "dense_margin": ref.margins[pos] if pos < len(ref.margins) else None,
            "sparse_margin": got.margins[pos] if pos < len(got.margins) else None,
            "dense_tokens": len(ref.ids), "got": got.text, "dense": ref.text}


def calibration_stats(model: Model, weights: list[LayerWeights], tokenizer, n_tokens: int, cache: Path) -> list[np.ndarray]:
    """E|u_i| * ||W_down[:, i]|| per layer from text the model writes itself (never the held-out text)."""
    if cache.exists():
        z = np.load(cache)
        return [z[f"l{i}"] for i in range(len(weights))]
    from flashlm.converters.calibrate import generated_tokens, record_ffn_inputs
    seqs = generated_tokens(model, tokenizer, n_tokens, progress=False)
    hs = record_ffn_inputs(model, seqs, progress=False)
    stats = [np.abs(h @ w.up.T).mean(axis=0) * w.down_norm for h, w in zip(hs, weights)]
    np.savez(cache, **{f"l{i}": s for i, s in enumerate(stats)})
    return stats


def svg(rows: list[dict], dense_ppl: float, dense_bytes: float, path: Path, title: str) -> None:
    """Perplexity (relative to dense) against MB read per token, one polyline per selector."""
    W, H, pad = 640, 420, 56
    pts = [r for r in rows if r["method"] != "dense"]
    xmax = max([dense_bytes] + [r["bytes_per_token"] for r in pts]) / 1e6 * 1.05
    ys = [100 * (r["perplexity"] / dense_ppl - 1) for r in pts]
    ymin, ymax = min([0.0] + ys), min(max([5.0] + ys), 80.0)
    sx = lambda v: pad + v / xmax * (W - 2 * pad)
    sy = lambda v: H - pad - (min(v, ymax) - ymin) / (ymax - ymin) * (H - 2 * pad)
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#000000"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<text x="{W / 2}" y="16" text-anchor="middle">{title}</text>',
           f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 16}" text-anchor="middle">flash MB read per token (f16 rows)</text>',
           f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">perplexity vs dense, % (clipped at {ymax:g})</text>',
           f'<line x1="{pad}" y1="{sy(0):.1f}" x2="{W - pad}" y2="{sy(0):.1f}" stroke="#999" stroke-dasharray="4"/>',
           f'<line x1="{pad}" y1="{sy(3):.1f}" x2="{W - pad}" y2="{sy(3):.1f}" stroke="#d62728" stroke-dasharray="2"/>',
           f'<text x="{W - pad}" y="{sy(3) - 3:.1f}" text-anchor="end" fill="#d62728">+3%</text>',
           f'<circle cx="{sx(dense_bytes / 1e6):.1f}" cy="{sy(0):.1f}" r="4" fill="black"/>',
           f'<text x="{sx(dense_bytes / 1e6) - 6:.1f}" y="{sy(0) - 6:.1f}" text-anchor="end">dense (whole FFN)</text>']
    for v in np.linspace(0, xmax, 6):
        out.append(f'<text x="{sx(v):.1f}" y="{H - pad + 14}" text-anchor="middle">{v:.2f}</text>')
    for v in np.linspace(ymin, ymax, 6):
        out.append(f'<text x="{pad - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    labels = sorted({r["label"] for r in pts}, key=lambda s: [r["label"] for r in pts].index(s))
    for i, label in enumerate(labels):
        col = palette[i % len(palette)]
        line = sorted((r["bytes_per_token"] / 1e6, 100 * (r["perplexity"] / dense_ppl - 1)) for r in pts if r["label"] == label)
        out.append(f'<polyline points="{" ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in line)}" fill="none" '
                   f'stroke="{col}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.5" fill="{col}"/>' for a, b in line]
        out.append(f'<text x="{W - pad - 4}" y="{pad + 13 * i}" fill="{col}" text-anchor="end">{label}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model folder (calibrated: lowrank/gate-lowup need predictor.safetensors)")
    ap.add_argument("--text", default=str(HERE / "data" / "heldout.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128, help="dense tokens at the start of each window")
    ap.add_argument("--tokens", type=int, default=0, help="held-out tokens to use (0: all)")
    ap.add_argument("--keep", default="0.5", help="comma-separated fractions of neurons kept per token")
    ap.add_argument("--methods", default="oracle,lowrank,cats,gate-lowup-wina,griffin")
    ap.add_argument("--dip", default="1", help="comma-separated DIP boosts for cached neurons (1 = off)")
    ap.add_argument("--cache", type=float, default=0.0, help="LRU neuron cache per layer, fraction of n_ff")
    ap.add_argument("--prompts", default=None, help="prompt file for the greedy task check (tools/data/prompts-*.txt)")
    ap.add_argument("--gen", type=int, default=12, help="greedy tokens per task prompt")
    ap.add_argument("--calib-tokens", type=int, default=768)
    ap.add_argument("--calib-text", default=None,
                    help="calibration text for gateup-layer's per-layer fractions (default: self-generated)")
    ap.add_argument("--mass", default="0.9", help="comma-separated score-mass shares for gateup-mass")
    ap.add_argument("--comp", default="0", help="comma-separated ranks of the resident low-rank W_down "
                    "compensating dropped neurons (gateup-* methods; 0 = off)")
    ap.add_argument("--comp-fit", action="store_true", help="fit the compensating W_down to what the "
                    "selection drops on the calibration text (default: truncated SVD of W_down)")
    ap.add_argument("--fallback", default="0", help="comma-separated logit margins: a sparse token whose top "
                    "two logits are closer than this is recomputed with every neuron (0 = off)")
    ap.add_argument("--fallback-keep", type=float, default=1.0, help="the share of neurons (top-k) an unsure "
                    "token is recomputed with (1 = every neuron)")
    ap.add_argument("--no-ppl", action="store_true", help="task check only (no held-out perplexity)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--svg", default=None)
    ap.add_argument("--replot", default=None, help="comma-separated JSON files of earlier runs: table + plot only")
    args = ap.parse_args()

    if args.replot:                  # table and plot from saved runs, measuring nothing
        runs = [json.loads(Path(p).read_text()) for p in args.replot.split(",")]
        rows = [r for run in runs for r in run["rows"]]
        rows = [rows[0]] + [r for r in rows if r["method"] != "dense"]
        report(rows, runs[0]["meta"], args.svg, [None] if all("task_exact" in r for r in rows) else [])
        return 0
    # numba dense engine: the analysis widens the stored FFN rows (a one-graph onnxruntime model has none)
    model, tokenizer, _ = load(args.model, RuntimeConfig(ctx_len=max(args.ctx, 256), threads=args.threads,
                                                         dense_engine="numba"), warmup=False)
    folder = model.folder
    weights = layer_weights(model)
    n_ff, d = folder.config.n_ff, folder.config.d_model
    methods = args.methods.split(",")
    predictors = None
    if any(m.startswith(("lowrank", "gate-lowup")) for m in methods):
        from flashlm.runtime.predictor import load_predictors
        predictors = load_predictors(folder.path, folder.config)
    stats = calibration_stats(model, weights, tokenizer, args.calib_tokens,
                              folder.path / "frontier-calib-stats.npz") if "gate-stat" in methods else None
    scorer = Scorer(weights, predictors, stats)
    ids = tokenizer.encode(Path(args.text).read_text())
    if args.tokens:
        ids = ids[:args.tokens]
    cache = int(round(args.cache * n_ff))
    prompts = read_prompts(Path(args.prompts)) if args.prompts else []

    calib_hs = None
    if any(m.startswith(("gateup-layer", "gateup-err", "gateup-thr")) for m in methods) or args.comp_fit:
        from flashlm.converters.calibrate import generated_tokens, record_ffn_inputs
        if args.calib_text:
            cids = tokenizer.encode(Path(args.calib_text).read_text())[:args.calib_tokens]
            seqs = [cids[i:i + 512] for i in range(0, len(cids), 512)]
        else:
            seqs = generated_tokens(model, tokenizer, args.calib_tokens, progress=False)
        calib_hs = record_ffn_inputs(model, seqs, progress=False)
    runs = [Method("dense", 1.0)]
    keeps = [float(k) for k in args.keep.split(",")]
    comps = [int(c) for c in args.comp.split(",")]
    fit = calib_hs if args.comp_fit else None
    for name in methods:
        for comp in (comps if name.startswith("gateup") else [0]):
            if name == "gateup-mass":
                runs += [Method(name, 0.0, mass=float(m), comp=comp, comp_fit=fit) for m in args.mass.split(",")]
            elif name == "gateup-layer":
                runs += [Method(name, k, layer_keep=layer_keep_fractions(calib_hs, weights, k), comp=comp, comp_fit=fit)
                         for k in keeps]
            elif name in ("gateup-err", "gateup-thr", "gateup-err-thr", "gateup-layer-thr"):
                for k in keeps:
                    fr = (error_keep_fractions(calib_hs, weights, k) if "err" in name else
                          layer_keep_fractions(calib_hs, weights, k) if "layer" in name else (k,) * len(weights))
                    thr = layer_thresholds(calib_hs, weights, fr) if name.endswith("thr") else None
                    runs.append(Method(name, k, layer_keep=fr, thresholds=thr, comp=comp, comp_fit=fit))
            else:
                for keep in keeps:
                    for dip in ([1.0] if name == "griffin" else [float(g) for g in args.dip.split(",")]):
                        runs.append(Method(name, keep, dip, comp=comp, comp_fit=fit if comp else None))
    import dataclasses
    fallbacks = [float(f) for f in args.fallback.split(",") if float(f) > 0]
    base = [m for m in runs[1:] if not m.per_prompt]
    runs = ([runs[0]] + [dataclasses.replace(m, fallback=f, fallback_keep=args.fallback_keep) for f in fallbacks for m in base]
            + ([m for m in runs[1:]] if "0" in args.fallback.split(",") or not fallbacks else []))
    meta = {"model": str(folder.path), "ctx": args.ctx, "prompt_tokens": args.prompt, "cache_neurons": cache,
            "scored_tokens": None,
            "n_ff": n_ff, "dense_layer_bytes_per_token": n_ff * d * F16 * 3 * len(weights)}
    rows, dense_answers = [], None
    for m in runs:
        t0 = time.perf_counter()
        ffn = AnalysisFFN(weights, scorer, m, cache, d)
        model.ffn_backend = ffn
        r = perplexity(model, ffn, ids, args.ctx, args.prompt, m.fallback) if not args.no_ppl else \
            {"perplexity": float("nan"), "scored_tokens": 0, "bytes_per_token": float("nan"), "kept_fraction": float("nan")}
        if m.layer_keep:
            r["layer_keep"] = list(m.layer_keep)
        if prompts:                  # the share of neurons kept while decoding the answers
            ffn.bytes_read, ffn.neuron_tokens, ffn.decode_tokens = 0, 0, 0
        r.update(method=m.name, label=m.label + (f"+lru{args.cache:g}" if cache else ""), keep=m.keep, dip=m.dip, layout="|".join(m.layout()),
                 resident=",".join(m.resident_parts()) or "-",
                 dram_ffn_bytes=(n_ff * d * F16 * len(m.resident_parts()) +
                                 (n_ff * m.keep if m.per_prompt else cache) * ffn.row_bytes
                                 + m.comp * (n_ff + d) * F16) * len(weights))
        if prompts:
            answers = [greedy(model, ffn, tokenizer, p, args.gen, m.fallback) for p in prompts]
            if dense_answers is None:
                dense_answers = answers
                r["dense_margins"] = [a.margins for a in answers]
            r["task_exact"] = sum(a.text == b.text for a, b in zip(answers, dense_answers)) / len(prompts)
            r["task_kept_fraction"] = ffn.neuron_tokens / max(1, ffn.decode_tokens * len(weights) * n_ff)
            r["answers"] = [a.text for a in answers]
            r["fallback_tokens"] = ffn.fallbacks
            r["decoded_tokens"] = ffn.decode_tokens
            r["divergence"] = [divergence(a, b) for a, b in zip(answers, dense_answers)]
        r["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(r)
        meta["scored_tokens"] = rows[0]["scored_tokens"]
        if args.json:               # after every point: a long sweep that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"{m.label:18s} keep {m.keep:.2f} ppl {r['perplexity']:8.3f} "
              f"({100 * (r['perplexity'] / rows[0]['perplexity'] - 1):+6.1f}%) "
              f"MB/token {r['bytes_per_token'] / 1e6:6.2f} kept {r['kept_fraction']:.3f}"
              + (f" task {r['task_exact']:.2f} (kept {r['task_kept_fraction']:.3f})" if prompts else "") + f" [{r['seconds']} s]", file=sys.stderr)
        if prompts and m.name != "dense":
            print("    diverge at token (dense margin): " + ", ".join(
                f"{v['position']} ({v['dense_margin']:.2f})" if v["dense_margin"] is not None else f"{v['position']} (-)"
                for v in r["divergence"] if v), file=sys.stderr)
    report(rows, meta, args.svg, prompts)
    return 0


def report(rows: list[dict], meta: dict, svg_path, prompts) -> None:
    """The markdown table (stdout) and the frontier plot."""
    dense = rows[0]
    if svg_path:
        svg(rows, dense["perplexity"], meta["dense_layer_bytes_per_token"], Path(svg_path),
            f"{Path(meta['model']).name}: ctx {meta['ctx']}, {meta['prompt_tokens']} dense prompt tokens, "
            f"{dense['scored_tokens']} scored")
    print("| selector | keep | resident (FFN) | read per neuron | perplexity | vs dense | MB read/token | FFN DRAM MB |"
          + (" task = dense |" if prompts else ""))
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if prompts else ""))
    for r in rows:
        print(f"| {r['label']} | {r['keep']:.2f} | {r['resident']} | {r['layout']} | {r['perplexity']:.3f} | "
              f"{100 * (r['perplexity'] / dense['perplexity'] - 1):+.1f}% | {r['bytes_per_token'] / 1e6:.2f} | "
              f"{r['dram_ffn_bytes'] / 1e6:.1f} |" + (f" {100 * r['task_exact']:.0f}% |" if prompts else ""))


if __name__ == "__main__":
    sys.exit(main())
