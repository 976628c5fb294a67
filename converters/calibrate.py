"""`flashlm calibrate`: train the per-layer sparsity predictors from the model's own activations.

1. Run the dense model over calibration tokens (a user text file, or text the model generates itself
   from varied prompts) and record every layer's normalized FFN input h.
2. Per layer, compute the targets from the layer's own bundle rows: the projections up.h (+ b) and,
   for SwiGLU, gate.h. Both are linear in h, so a low-rank linear map can estimate them well; the
   SwiGLU score is then the estimated contribution |silu(gate) * up| (regressing the contribution
   itself, a nonlinear function, captured far less of it: measured 0.75 vs more on SmolLM2).
3. Reduce each projection to rank r along the top r directions of its outputs on the recorded
   inputs (the exact weights are known, so nothing is regressed), for ranks 16..128, and keep the
   smallest rank within a point of the best held-out quality. Deeper layers may need more rank.
4. Set the rule: ReLU -> the threshold that keeps `recall` of the truly active neurons on the training
   tokens; SwiGLU -> keep the top `keep` fraction by predicted contribution, with one of three
   selectors for the whole model (runtime/predictor.py): "lowrank" (gate and up estimated), "gate"
   (W_gate resident, up estimated) or "exact" (W_gate and W_up resident); `selector="auto"` takes the
   cheapest in DRAM whose held-out output recall (share of the true top-k's sum |a_i|*||W_down[:, i]||)
   reaches `output_recall`.
5. Record, per layer, activation frequency (hot-neuron order) and how many neurons a sliding window of
   k tokens holds (cache sizing), and write predictor.safetensors + its entry in the manifest.
6. ReLU: the pipeline guesses layer l's neurons early from layer l-1's FFN input (runtime/ffn.py);
   a guess threshold, below the rule's, keeps GUESS_RECALL of what the true input selects; a compute
   threshold, also below it, keeps COMPUTE_RECALL of the active neurons among the rows already cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flashlm.runtime.config import RuntimeConfig
from flashlm.runtime.loader import load
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import resident_part_name
from flashlm.runtime.predictor import PREDICTOR_FILE, dequantize_rows_int8, gated_score, quantize_rows_int8
from flashlm.runtime.safetensors_file import plan_file

log = logging.getLogger("flashlm")

RANKS = (16, 32, 64, 128)
GUESS_RECALL = 0.9      # share of a layer's rows to read that its pipeline guess (on the previous layer's input) keeps
GUESS_WINDOW = 2        # ... the rows to read: selected, and not selected by the GUESS_WINDOW tokens before
COMPUTE_RECALL = 0.999  # share of the truly active neurons a cached row's score must not rule out (compute_rule)
WINDOWS = (1, 2, 4, 8)
# How the low-rank maps A, B are stored: f16 (f32 where f16 would lose too much) or int8 with one f32
# scale per row (half the DRAM; runtime/kernels.matmul_scaled). auto: int8 for folders whose FFN rows are
# quantized, whose budgets are small enough that the predictors' share matters (the 7B-class synthetic
# model in q4_0 at 50%: 98 of 952 MiB in f16); f16 otherwise.
PREDICTOR_DTYPES = ("auto", "f16", "int8")
PROMPTS = [
    "The history of the Roman Empire", "How to bake bread at home:", "def quicksort(arr):",
    "Photosynthesis is the process", "Dear hiring manager,", "The weather today in London",
    "A short story about a robot who", "The key ideas of quantum mechanics are", "Ingredients: 2 cups of flour",
    "In 1969, astronauts", "The stock market fell sharply", "Write a poem about the sea.",
    "Explain how a car engine works.", "The best way to learn a language is", "Chapter 1\n\nIt was a cold morning",
    "import numpy as np\n", "Q: What is the capital of Japan?\nA:", "The rules of chess are simple:",
    "Climate change affects", "My favourite recipe for soup",
]


def generated_tokens(model: Model, tokenizer, n_tokens: int, *, seed: int = 0, progress: bool = True) -> list[list[int]]:
    """Text the model writes itself from varied prompts (temperature 0.8), as token id sequences."""
    from flashlm.runtime.sampling import Sampler, SamplingParams
    sampler = Sampler(SamplingParams(temperature=0.8, top_p=0.95, seed=seed))
    per_prompt = max(32, n_tokens // len(PROMPTS))
    seqs, total = [], 0
    with tqdm(total=n_tokens, desc="Generating calibration text", unit="tok", disable=not progress,
              file=sys.stderr) as bar:
        for prompt in PROMPTS:
            model.reset()
            ids = tokenizer.encode(prompt)
            logits = model.forward(ids)[-1]
            for _ in range(per_prompt):
                t = sampler(logits, ids)
                ids.append(t)
                if tokenizer.is_eos(t) or model.pos >= model.ctx_len:
                    break
                logits = model.forward([t])[-1]
            seqs.append(ids)
            total += len(ids)
            bar.update(len(ids))
            if total >= n_tokens:
                break
    return seqs


def record_ffn_inputs(model: Model, seqs: list[list[int]], *, progress: bool = True) -> list[np.ndarray]:
    """Run every sequence through the dense model; returns per layer h [N, d] (f32)."""
    rec: list[list[np.ndarray]] = [[] for _ in range(model.config.n_layers)]
    model.on_ffn_input = lambda layer, h: rec[layer].append(h.copy())
    try:
        for ids in tqdm(seqs, desc="Recording activations", disable=not progress, file=sys.stderr):
            model.reset()
            model.forward(ids)                      # in run-state chunks of PREFILL_CHUNK tokens
    finally:
        model.on_ffn_input = None
        model.reset()
    return [np.concatenate(r) for r in rec]


def layer_part(model: Model, layer: int, part: str) -> np.ndarray:
    """f32 [n_ff, d]: one part of the layer's FFN, from the dense-mode bundle rows or, for a part the
    layout keeps resident (the gate-resident variant's W_gate), from the dense weights."""
    layout = model.folder.bundles
    if part in layout.resident:
        name = resident_part_name(layer, part)
        return model.folder.dense[name].storage.decode(model.w[name])
    return layout.decode_part(model.ffn_backend.layer_rows[layer], part)      # calibration runs dense


def layer_projections(model: Model, layer: int) -> dict[str, np.ndarray]:
    """{"up": w [d+1, n_ff], "gate": ... (SwiGLU)}: the layer's projections as one linear map of [h, 1].

    The predictor targets are exactly linear in h with these known weights, so nothing needs to be
    regressed (with fewer calibration tokens than d a regression would overfit); calibration data only
    decides which low-rank directions of the map matter for real inputs.
    """
    c = model.config
    bias = model.w.get(f"layers.{layer}.ffn.up.bias")
    up_b = bias if bias is not None and c.ffn_kind == "relu" else np.zeros(c.n_ff, np.float32)
    out = {"up": np.vstack([layer_part(model, layer, "up").T, up_b[None, :]])}
    if c.gated:
        out["gate"] = np.vstack([layer_part(model, layer, "gate").T, np.zeros((1, c.n_ff), np.float32)])
    return out


def _with_one(h: np.ndarray) -> np.ndarray:
    return np.concatenate([h, np.ones((len(h), 1), np.float32)], axis=1)


def _combine(est: dict, c) -> np.ndarray:
    """What the rule ranks: the pre-activation (ReLU) or the contribution |act(gate) * up| (gated)."""
    return est["up"] if "gate" not in est else gated_score(est["gate"], est["up"], c.ffn_kind, c.act_threshold)


def fit_directions(h: np.ndarray, w: np.ndarray, max_rank: int, y: np.ndarray | None = None) -> np.ndarray:
    """The top `max_rank` directions v [n_ff, r] of the map's outputs Y = [h, 1] @ w on real inputs
    (`y`: Y, if the caller has it).

    Truncating w to w @ v[:, :r] @ v[:, :r].T is the rank-r map closest to w on these inputs (the
    reduced-rank regression of the exact targets), so every rank shares one decomposition: v are Y's
    top right singular vectors, v = Y.T u / s from the top eigenvectors u of the smaller of two Gram
    matrices, so neither an [N, n_ff] nor a [d+1, n_ff] SVD is ever taken (Qwen2.5-1.5B's shapes:
    16 s for the SVD, 2 s this way):
    - fewer tokens than d + 1: Y Y.T [N, N];
    - else M M.T [d+1, d+1] with M = L.T w, L the Cholesky factor of the input covariance X.T X
      (M.T M = Y.T Y), whose cost does not grow with the number of tokens.
    """
    x = _with_one(h)
    if len(x) < x.shape[1]:
        m = y if y is not None else x @ w
    else:
        x = x.astype(np.float64)
        cov = x.T @ x
        cov[np.diag_indices_from(cov)] += 1e-9 * max(np.trace(cov) / len(cov), 1e-30)   # rank-deficient inputs
        m = np.linalg.cholesky(cov).T.astype(np.float32) @ w.astype(np.float32)
    _, u = np.linalg.eigh((m @ m.T).astype(np.float64))      # ascending
    u = u[:, ::-1][:, :max_rank].astype(np.float32)
    # v = M.T u / s; the QR (its R's diagonal made positive) only restores orthonormality lost to f32 and
    # gives directions below float precision (s ~ 0, no signal) a well-defined unit vector
    q, r = np.linalg.qr((m.T @ u).astype(np.float64))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def truncate(w: np.ndarray, v: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictor factors of rank r: A [r, d], B [n_ff, r], c [n_ff]."""
    vr = v[:, :rank]
    return (w[:-1] @ vr).T.astype(np.float32), vr.astype(np.float32), (w[-1] @ vr @ vr.T).astype(np.float32)


def rank_scores(x: np.ndarray, w: np.ndarray, v: np.ndarray, ranks):
    """(r, scores [N, n_ff]) of the rank-r truncations of w for each r in `ranks` (ascending), from one
    projection: s_r = (x @ w @ v_r) @ v_r.T, which (h @ A.T) @ B.T + c of truncate(w, v, r) equals with x = [h, 1], grown rank
    block by rank block, so all ranks together cost what the largest alone would. Each yielded array is
    the caller's (a fresh copy)."""
    p = x @ (w @ v[:, :max(ranks)].astype(np.float32))
    s = np.zeros((len(x), w.shape[1]), np.float32)
    lo = 0
    for r in ranks:
        s += p[:, lo:r] @ v[:, lo:r].T.astype(np.float32)
        lo = r
        yield r, s.copy()


def _topk_mask(s: np.ndarray, k: int, nonzero: bool = False) -> np.ndarray:
    """Per token, the k largest scores; nonzero (ReLU-gated FFNs): only those above zero, as the
    runtime selects (runtime/predictor.py: a neuron scored zero is never read)."""
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    m = np.zeros(s.shape, bool)
    np.put_along_axis(m, idx, True, axis=1)
    return m & (s > 0) if nonzero else m


def evaluate(kind: str, s_train, y_train, s_test, y_test, *, recall: float, keep: int, nonzero: bool = False) -> dict:
    """Rule parameters from the training tokens, quality on the held-out tokens."""
    if kind == "relu":
        active = y_train > 0
        threshold = float(np.quantile(s_train[active], 1 - recall)) if active.any() else 0.0
        pred, true = s_test > threshold, y_test > 0
        return {"rule": "threshold", "threshold": threshold,
                "recall": float((pred & true).sum() / max(true.sum(), 1)),
                "predicted_fraction": float(pred.mean()), "true_fraction": float(true.mean())}
    pred, true = _topk_mask(s_test, keep, nonzero), _topk_mask(y_test, keep, nonzero)
    return {"rule": "topk", "keep": keep,
            "recall": float((pred & true).sum() / max(true.sum(), 1)),
            "contribution_recall": float((y_test * pred).sum() / max((y_test * true).sum(), 1e-30)),
            "predicted_fraction": float(pred.mean()) if nonzero else keep / y_test.shape[1]}


def predictor_dtype_of(folder, choice: str) -> str:
    """The storage of the low-rank maps for `choice` (PREDICTOR_DTYPES) in this folder: "f16" or "int8"."""
    if choice not in PREDICTOR_DTYPES:
        raise ValueError(f"predictor dtype must be one of {PREDICTOR_DTYPES}, not {choice!r}")
    if choice != "auto":
        return choice
    return "int8" if folder.bundles.storage.block_elems > 1 else "f16"


def as_stored(factors: tuple, pdtype: str) -> tuple:
    """(A, B, c) as the runtime will multiply by them: int8 maps dequantized (q * scale), so the rule's
    threshold and the window statistics are set on the scores the runtime computes; f16 maps as they are
    (f16 keeps them within 1e-3 of f32, _half_if_safe)."""
    if pdtype != "int8":
        return factors
    a, b, c = factors
    return dequantize_rows_int8(*quantize_rows_int8(a)), dequantize_rows_int8(*quantize_rows_int8(b)), c


def low_rank_scores(h: np.ndarray, factors: tuple) -> np.ndarray:
    """(h @ A.T) @ B.T + c: the map's estimates for recorded inputs h [N, d]."""
    a, b, c = factors
    return (h @ a.T) @ b.T + c


def _half_if_safe(t: np.ndarray) -> np.ndarray:
    """f16 halves the predictor's DRAM; keep f32 where values would overflow or lose too much."""
    if np.abs(t).max() < 6e4:
        half = t.astype(np.float16)
        if np.abs(half.astype(np.float32) - t).max() <= 1e-3 * max(np.abs(t).max(), 1e-6):
            return half
    return t


def window_stats(active_by_token: np.ndarray, windows=WINDOWS) -> dict:
    """active_by_token [N, n_ff] bool in token order: neurons a window of k tokens holds, and what it misses."""
    n_tok, n_ff = active_by_token.shape
    out = {}
    union = np.zeros((max(n_tok - 1, 0), n_ff), bool)     # union[t - 1]: tokens t-k..t-1, for each t >= 1
    for k in range(1, max(windows) + 1):
        if k >= n_tok:
            break
        union[k - 1:] |= active_by_token[:n_tok - k]          # token t - k joins the window of token t
        if k not in windows:
            continue
        u, nxt = union[k - 1:], active_by_token[k:]           # tokens t = k..N-1
        held = u.sum(axis=1)
        missed = (nxt & ~u).sum(axis=1) / np.maximum(nxt.sum(axis=1), 1)
        out[str(k)] = {"mean_held": float(held.mean()) / n_ff, "max_held": int(held.max()),
                       "miss_fraction": float(missed.mean())}
    return out


SELECTORS = ("auto", "lowrank", "gate", "exact")
SELECTOR_COST = ("lowrank", "gate", "exact")     # cheapest first: low-rank maps, + W_gate, + W_up in DRAM


def down_norms(model: Model, layer: int) -> np.ndarray:
    """||W_down[:, i]|| per neuron: how much a unit of neuron i's activation moves the output."""
    return np.linalg.norm(layer_part(model, layer, "down"), axis=1).astype(np.float32)


def part_rows(model: Model, layer: int, part: str) -> np.ndarray:
    """The layer's W_gate or W_up [n_ff, d] for a resident copy: f16 when that is lossless (f16
    bundles always are), else f32."""
    return _half_if_safe(layer_part(model, layer, part))


def resident_copies(model: Model, layer: int, parts) -> dict[str, np.ndarray]:
    """The predictor's own copies of W_gate / W_up ("gate_rows", "up_rows"); none of a part the bundle
    layout already keeps in the dense weights (the runtime hands that tensor to the rule)."""
    return {f"{p}_rows": part_rows(model, layer, p) for p in parts if p not in model.folder.bundles.resident}


def _output_recall(scores: np.ndarray, mass: np.ndarray, keep: int, nonzero: bool = False) -> float:
    """Share of the true top-`keep` output mass sum |a_i| * ||W_down[:, i]|| (`mass`, per token and
    neuron) that the scores keep.

    The one quality measure both SwiGLU selectors are compared by (it weighs each neuron by what it
    adds to the layer's output, unlike set overlap)."""
    best = (mass * _topk_mask(mass, keep, nonzero)).sum()
    return float((mass * _topk_mask(scores, keep, nonzero)).sum() / best) if best > 0 else 1.0


def _layer_output(layer, factors, q, predicted, truth, hot, extra: dict, pdtype: str = "f16"):
    """(tensors, manifest entry, report entry) of one layer's predictor."""
    q["windows"] = window_stats(predicted)
    q["hot_top5pct_share"] = float(truth[:, hot[:max(1, truth.shape[1] // 20)]].sum() / max(truth.sum(), 1))
    q["predictor_dtype"] = pdtype
    p = f"layers.{layer}.predictor."
    t = {}
    for name, (a, b, cc) in factors.items():
        if pdtype == "int8":
            t[p + name + ".A"], t[p + name + ".A_scale"] = quantize_rows_int8(a)
            t[p + name + ".B"], t[p + name + ".B_scale"] = quantize_rows_int8(b)
        else:
            t[p + name + ".A"], t[p + name + ".B"] = _half_if_safe(a), _half_if_safe(b)
        t[p + name + ".c"] = cc
    t[p + "hot"] = hot
    t.update({p + k: v for k, v in extra.items()})
    return t, {k: q[k] for k in ("rule", "threshold", "keep", "rank", "guess_threshold", "compute_threshold")
               if k in q}, q


def _gate_fit(model, layer, h, test, exact, y, dn, directions, rank_list, k_keep, truth, hot, pdtype="f16"):
    """Rule "gate": exact silu(gate.h) from resident W_gate rows, low-rank up, scores weighted by
    ||W_down[:, i]||. The up rank is chosen as for "topk": smallest within a point of the best."""
    w_up, v_up = directions["up"]
    mass = y[test] * dn
    c = model.config

    def quality(r, s_up):
        s = gated_score(exact["gate"], s_up, c.ffn_kind, c.act_threshold) * dn
        pred, true = _topk_mask(s[test], k_keep, c.relu_gated), _topk_mask(y[test], k_keep, c.relu_gated)
        return {"rule": "gate", "keep": k_keep, "rank": r,
                "recall": float((pred & true).sum() / true.sum()),
                "contribution_recall": float((y[test] * pred).sum() / (y[test] * true).sum()),
                "output_recall": _output_recall(s[test], mass, k_keep, c.relu_gated),
                "predicted_fraction": k_keep / y.shape[1]}, s

    fits = [(r, *quality(r, s_up)) for r, s_up in rank_scores(_with_one(h), w_up, v_up, rank_list)]
    top = max(q["output_recall"] for _, q, _ in fits)
    r, q, s = next(x for x in fits if x[1]["output_recall"] >= top - 0.01)
    up = truncate(w_up, v_up, r)
    if pdtype == "int8":         # the report and window statistics of the scores the int8 map gives
        unquantized = {k: q[k] for k in ("recall", "contribution_recall", "output_recall")}
        q, s = quality(r, low_rank_scores(h, as_stored(up, pdtype)))
        q["unquantized"] = unquantized
    return _layer_output(layer, {"up": up}, q, _topk_mask(s, k_keep, c.relu_gated), truth, hot,
                         {**resident_copies(model, layer, ("gate",)), "down_norm": dn}, pdtype)


def _exact_fit(model, layer, test, y, dn, k_keep, truth, hot):
    """Rule "exact": W_gate and W_up resident, the true top-k by |a_i| * ||W_down[:, i]||."""
    s = y * dn
    nz = model.config.relu_gated
    pred, true = _topk_mask(s[test], k_keep, nz), _topk_mask(y[test], k_keep, nz)
    q = {"rule": "exact", "keep": k_keep, "rank": 0,
         "recall": float((pred & true).sum() / true.sum()),
         "contribution_recall": float((y[test] * pred).sum() / (y[test] * true).sum()),
         "output_recall": _output_recall(s[test], s[test], k_keep, nz),
         "predicted_fraction": k_keep / y.shape[1]}
    return _layer_output(layer, {}, q, _topk_mask(s, k_keep, nz), truth, hot,
                         {**resident_copies(model, layer, ("gate", "up")), "down_norm": dn})


def guess_rule(s_prev: np.ndarray, selected: np.ndarray, threshold: float, test: np.ndarray) -> dict:
    """The "threshold" rule's early guess: the threshold on this layer's scores of the previous layer's
    inputs (`s_prev`, the same tokens, in order) that keeps GUESS_RECALL of the rows the true inputs make
    the runtime read, never above the rule's own: the neurons selected (`selected`) that the previous
    GUESS_WINDOW tokens did not select (the neuron cache holds those; the guess's misses are among the
    others, which are also the harder to guess: on the 7B-class synthetic model a threshold set on all
    selected neurons recalled 90% of them in calibration but 84% of the rows read at run time). Set on
    the training tokens, measured on the held-out ones (recall of those rows, and the guessed fraction
    of all neurons, at the rule's threshold and at the guess's)."""
    new = selected.copy()
    for j in range(1, GUESS_WINDOW + 1):
        new[j:] &= ~selected[:-j]
    train = ~test
    t = float(np.quantile(s_prev[train][new[train]], 1 - GUESS_RECALL)) if new[train].any() else threshold
    t = min(t, threshold)
    sel = new[test]
    out = {"guess_threshold": t}
    for name, th in (("plain", threshold), ("guess", t)):
        g = s_prev[test] > th
        out[f"guess_recall_{name}"] = float((g & sel).sum() / max(sel.sum(), 1))
        out[f"guess_fraction_{name}"] = float(g.mean())
    return out


def compute_rule(scores: np.ndarray, y: np.ndarray, threshold: float, test: np.ndarray) -> dict:
    """The "threshold" rule's compute threshold: a row already in the neuron cache is computed for a
    decode token only if its score is above it (runtime/ffn.py FlashFFN._cached_rows_to_compute). Set on
    the training tokens to keep COMPUTE_RECALL of the truly active neurons (y > 0), never above the rule's
    threshold; measured on the held-out ones: the recall it keeps and the share of all neurons it computes
    (the window's cached rows are a subset: what a token computes is at most that share of them)."""
    active, train = y > 0, ~test
    t = float(np.quantile(scores[train][active[train]], 1 - COMPUTE_RECALL)) if active[train].any() else threshold
    t = min(t, threshold)
    above = scores[test] > t
    return {"compute_threshold": t,
            "compute_recall": float((above & active[test]).sum() / max(active[test].sum(), 1)),
            "compute_fraction": float(above.mean())}


def _fit_layer(model: Model, layer: int, h: np.ndarray, test: np.ndarray, ranks, k_keep: int, recall: float,
               h_prev: np.ndarray | None = None, pdtype: str = "f16") -> dict:
    """{selector: (tensors, manifest entry, report entry)} of one layer. The exact projections of the
    recorded inputs are computed once and every candidate (each rank, each selector) is scored against
    them; all ranks of one map come from one projection (rank_scores)."""
    c = model.config
    maps = layer_projections(model, layer)
    x = _with_one(h)
    exact = {name: x @ w for name, w in maps.items()}
    y = _combine(exact, c)
    max_rank = min(max(ranks), c.d_model, c.n_ff, int((~test).sum()))
    rank_list = sorted({min(r, max_rank) for r in ranks})
    directions = {name: (w, fit_directions(h[~test], w, max_rank, exact[name][~test])) for name, w in maps.items()}
    fits = []
    for per_map in zip(*(rank_scores(x, w, v, rank_list) for w, v in directions.values())):
        r = per_map[0][0]
        s_all = _combine({name: est for name, (_, est) in zip(directions, per_map)}, c)
        q = evaluate(c.ffn_kind, s_all[~test], y[~test], s_all[test], y[test], recall=recall, keep=k_keep,
                     nonzero=c.relu_gated)
        q["rank"] = r
        fits.append((r, q, s_all))
    # The smallest rank within a point of the best held-out quality (more rank costs DRAM and time).
    # ReLU thresholds fix recall, so quality there is how few neurons must be read to reach it.
    if c.ffn_kind == "relu":
        least = min(q["predicted_fraction"] for _, q, _ in fits)
        r, q, s_all = next(f for f in fits if f[1]["predicted_fraction"] <= least + 0.01)
    else:
        top = max(q["contribution_recall"] for _, q, _ in fits)
        r, q, s_all = next(f for f in fits if f[1]["contribution_recall"] >= top - 0.01)
    del fits
    factors = {name: truncate(w, v, r) for name, (w, v) in directions.items()}
    stored = {name: as_stored(f, pdtype) for name, f in factors.items()}
    if pdtype == "int8":
        # The rule (threshold), its held-out figures and the window statistics come from the scores the
        # runtime computes with the int8 maps; the f32 maps' figures at their own threshold stay beside them.
        unquantized = {k: q[k] for k in ("threshold", "recall", "predicted_fraction", "contribution_recall") if k in q}
        s_all = _combine({name: low_rank_scores(h, f) for name, f in stored.items()}, c)
        q = evaluate(c.ffn_kind, s_all[~test], y[~test], s_all[test], y[test], recall=recall, keep=k_keep,
                     nonzero=c.relu_gated)
        q.update(rank=r, unquantized=unquantized)
    truth = (y > 0) if c.ffn_kind == "relu" else _topk_mask(y, k_keep, c.relu_gated)
    hot = np.argsort(-truth.mean(axis=0), kind="stable").astype(np.int32)
    predicted = (s_all > q["threshold"]) if c.ffn_kind == "relu" else _topk_mask(s_all, k_keep, c.relu_gated)
    if c.ffn_kind == "relu":
        q.update(compute_rule(s_all, y, q["threshold"], test))
    if c.ffn_kind == "relu" and h_prev is not None:     # the pipeline guesses this layer from h_prev
        q.update(guess_rule(low_rank_scores(h_prev, stored["up"]), predicted, q["threshold"], test))
    layer_fits = {"lowrank": _layer_output(layer, factors, q, predicted, truth, hot, {}, pdtype)}
    if c.gated:
        dn = down_norms(model, layer)
        q["output_recall"] = _output_recall(s_all[test], y[test] * dn, k_keep, c.relu_gated)
        del s_all, predicted
        layer_fits["gate"] = _gate_fit(model, layer, h, test, exact, y, dn, directions, rank_list, k_keep, truth, hot,
                                       pdtype)
        layer_fits["exact"] = _exact_fit(model, layer, test, y, dn, k_keep, truth, hot)
    return layer_fits


def _selector_quality(candidates: list[dict]) -> dict:
    """Mean held-out output recall of each candidate selector over the layers."""
    names = [n for n in candidates[0] if all("output_recall" in lf[n][2] for lf in candidates)]
    return {n: round(float(np.mean([lf[n][2]["output_recall"] for lf in candidates])), 4) for n in names}


def _choose_selector(c, candidates: list[dict], selector: str, goal: float) -> str:
    """One selector for the whole model. auto: the cheapest in DRAM (lowrank < gate < exact) whose mean
    held-out output recall reaches `goal`; "exact" reaches 1 by definition, so it is the fallback.
    Measured on SmolLM2 at keep 50%: output recall -> perplexity cost is the guide for the goal
    (docs/BENCHMARKS.md)."""
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, not {selector!r}")
    if not c.gated:
        if selector != "auto" and selector != "lowrank":
            raise ValueError(f"the {selector} selector needs a gated FFN; this model's FFN is {c.ffn_kind}")
        return "lowrank"
    if selector != "auto":
        return selector
    q = _selector_quality(candidates)
    return next(n for n in SELECTOR_COST if q[n] >= goal or n == SELECTOR_COST[-1])


def calibrate(path, *, text_file=None, random_tokens: bool = False, n_tokens: int = 2048, keep: float = 0.5, recall: float = 0.99,
              selector: str = "auto", output_recall: float = 0.97, ranks=RANKS, holdout: float = 0.2, threads: int | None = None, seed: int = 0,
              progress: bool = True, predictor_dtype: str = "auto") -> dict:
    """Train and store predictors for the model folder at `path`; returns the calibration report.
    predictor_dtype (PREDICTOR_DTYPES): how the low-rank maps are stored."""
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise ValueError(f"predictor dtype must be one of {PREDICTOR_DTYPES}, not {predictor_dtype!r}")
    blas = blas_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(limits=blas, user_api="blas")
    except ImportError:              # a venv from before it was a dependency: correct, only slower under load
        log.warning("threadpoolctl is not installed: BLAS keeps its own thread count (pip install threadpoolctl)")
        limit, blas = contextlib.nullcontext(), None
    with limit:
        report = _calibrate(path, text_file, random_tokens, n_tokens, keep, recall, selector, output_recall, ranks,
                            holdout, threads, seed, progress, blas, predictor_dtype)
    return report


def blas_threads(threads: int | None) -> int:
    """OpenBLAS threads for calibration's matrix products: `threads` if given; else one when the cores
    are oversubscribed (load average at or above the core count), all cores otherwise. BLAS threads
    wait for each other at every call, and a thread that lost its time slice stalls them all: measured
    at load ~11 on 2 cores, a [32, 1536] x [1536, 300] f32 product took 25-200 ms with 2 threads and
    4 ms with 1 (the recording prefill of Qwen2.5-1.5B ran at 9 s/token with 2)."""
    if threads is not None:
        return threads
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores else cores


def _calibrate(path, text_file, random_tokens, n_tokens, keep, recall, selector, output_recall, ranks, holdout,
               threads, seed, progress, blas, predictor_dtype) -> dict:
    t0 = time.perf_counter()
    phases = {}                                          # seconds per phase, for the report
    if not random_tokens and not text_file:
        # Self-generated text: decoded with the folder's fastest engine (onnxruntime for quantized dense
        # weights: measured 9x numba's decode speed on Qwen2.5-1.5B), recorded below with numba.
        gen, tokenizer, _ = load(path, RuntimeConfig(ctx_len=1024, threads=threads), warmup=False)
        try:
            seqs = generated_tokens(gen, tokenizer, n_tokens, seed=seed, progress=progress)
        finally:
            gen.close()
        del gen
        phases["generate"] = round(time.perf_counter() - t0, 1)
    # numba runs quantized dense weights too: FFN inputs must pass through Model.ffn (the recording hook),
    # which onnxruntime's whole-layer sessions of a quantized dense-mode model bypass.
    model, tokenizer, _ = load(path, RuntimeConfig(ctx_len=1024, threads=threads, dense_engine="numba"), warmup=False)
    folder, c = model.folder, model.config
    pdtype = predictor_dtype_of(folder, predictor_dtype)
    if random_tokens:
        # For synthetic models, whose "language" is uniformly random token ids.
        ids = np.random.default_rng(seed).integers(0, c.vocab_size, n_tokens).tolist()
        seqs = [ids[i:i + 512] for i in range(0, len(ids), 512)]
        source = "random token ids"
    elif text_file:
        ids = tokenizer.encode(Path(text_file).read_text())[:n_tokens]
        seqs = [ids[i:i + 512] for i in range(0, len(ids), 512)]
        source = str(text_file)
    else:
        source = "self-generated"
    t1 = time.perf_counter()
    hs = record_ffn_inputs(model, seqs, progress=progress)
    t2 = time.perf_counter()
    phases["record"] = round(t2 - t1, 1)
    n = len(hs[0])
    rng = np.random.default_rng(seed)
    test = np.zeros(n, bool)
    test[rng.choice(n, int(n * holdout), replace=False)] = True
    k_keep = max(1, int(round(keep * c.n_ff)))
    tensors, layer_meta, report_layers, candidates = {}, [], [], []
    for layer in tqdm(range(c.n_layers), desc="Fitting predictors", disable=not progress, file=sys.stderr):
        candidates.append(_fit_layer(model, layer, hs[layer], test, ranks, k_keep, recall,
                                     hs[layer - 1] if layer else None, pdtype))
        if layer:
            hs[layer - 1] = None                         # no longer needed (the next layer guesses from hs[layer])
    phases["fit"] = round(time.perf_counter() - t2, 1)
    choice = _choose_selector(c, candidates, selector, output_recall)
    for layer, layer_fits in enumerate(candidates):
        t, meta, q = layer_fits[choice]
        tensors.update(t)
        layer_meta.append(meta)
        report_layers.append(q)
        log.info("layer %d: %s rank %d recall %.3f predicted %.2f", layer, q["rule"], q["rank"], q["recall"],
                 q["predicted_fraction"])
    report = {"tokens": n, "holdout": holdout, "source": source, "keep": keep, "recall_goal": recall,
              "selector": choice, "selector_quality": _selector_quality(candidates), "predictor_dtype": pdtype,
              "blas_threads": blas, "seconds": round(time.perf_counter() - t0, 1), "phase_seconds": phases,
              "layers": report_layers}
    model.close()
    _write_predictors(folder, tensors, layer_meta, report)
    return report


def _write_predictors(folder, tensors: dict, layer_meta: list, report: dict) -> None:
    """predictor.safetensors and the manifest entry, each replaced atomically."""
    names = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
             np.dtype(np.int8): "I8"}
    plan = [(name, names[t.dtype], list(t.shape)) for name, t in tensors.items()]
    header, offsets = plan_file(plan, align=64, metadata={"layers": json.dumps(layer_meta),
                                                          "report": json.dumps(report)})
    path = folder.file(PREDICTOR_FILE)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(header)
        for name, t in tensors.items():
            f.seek(offsets[name])
            f.write(np.ascontiguousarray(t).tobytes())
    data = tmp.read_bytes()
    os.replace(tmp, path)
    manifest = dict(folder.manifest)
    manifest["files"] = dict(manifest["files"])
    manifest["files"][PREDICTOR_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mtmp = folder.file("manifest.json.partial")
    mtmp.write_text(json.dumps(manifest, indent=1))
    os.replace(mtmp, folder.file("manifest.json"))
