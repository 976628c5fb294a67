"""The numba kernels: every hot loop of a forward pass lives here, over plain preallocated arrays.

Weights come either as float32 or as uint16 holding IEEE f16 bits (numba has no float16 type on CPU);
`f32()` widens either one in-register, so f16 weights are never converted in bulk per token.
Activations are [T, ...] so prefill (T tokens) and decode (T = 1) share one code path.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .runstate import BLAS_BLOCK_BYTES

JIT = dict(cache=True, fastmath=True, nogil=True)


@intrinsic
def f32(typingctx, x):
    """uint16 (f16 bits) -> float32 via LLVM fpext (one vcvtph2ps/fcvt); float32 passes through; int8
    -> float32 via sitofp (its scale is the caller's)."""
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(x), codegen
    if x == types.float32:
        def codegen(context, builder, sig, args):
            return args[0]
        return types.float32(x), codegen
    if isinstance(x, types.Integer) and x.bitwidth == 8 and x.signed:
        # int8 (the int8 predictors' weights, one f32 scale per row applied after the dot): sitofp
        def codegen(context, builder, sig, args):
            return builder.sitofp(args[0], ir.FloatType())
        return types.float32(x), codegen
    return None


# Helpers take pre-sliced 1-D views: indexing w[off + j] with a runtime offset makes numba emit a
# negative-index wraparound check per element, which blocks SIMD (measured 6x slower).
@njit(**JIT)
def _dot(w, x, n):
    # w[:n] . x[:n]
    acc = np.float32(0.0)
    for j in range(n):
        acc += f32(w[j]) * x[j]
    return acc


@njit(**JIT)
def _widen(w, n, out):
    for j in range(n):
        out[j] = f32(w[j])


@njit(**JIT)
def _matmul_block(x, w, scale, out, b):
    """Rows b*32 .. b*32+31 of out = x @ w.T, each dot times scale[row] unless scale is None (numba
    compiles the two cases apart, the None branch pruned: matmul's loop is as before)."""
    T, d = x.shape
    n = w.shape[0]
    if T == 1:
        for i in range(b * 32, min(n, b * 32 + 32)):
            y = _dot(w[i], x[0], d)
            if scale is not None:
                y *= scale[i]
            out[0, i] = y
    else:
        row = np.empty(d, np.float32)     # widened once, reused by all T tokens
        for i in range(b * 32, min(n, b * 32 + 32)):
            _widen(w[i], d, row)
            for t in range(T):
                y = _dot(row, x[t], d)
                if scale is not None:
                    y *= scale[i]
                out[t, i] = y


@njit(parallel=True, **JIT)
def matmul(x, w, out):
    """out[T, n] = x[T, d] @ w[n, d].T  (w f32 or f16 bits)."""
    for b in prange((w.shape[0] + 31) // 32):
        _matmul_block(x, w, None, out, b)


@njit(parallel=True, **JIT)
def matmul_scaled(x, w, scale, out):
    """out[T, n] = (x[T, d] @ w[n, d].T) * scale[n]: w int8, one f32 scale per row (the int8 predictors'
    low-rank maps, runtime/predictor.py); the scale multiplies each finished dot, so the inner loop is
    matmul's with the int8 widened in-register."""
    for b in prange((w.shape[0] + 31) // 32):
        _matmul_block(x, w, scale, out, b)


@njit(**JIT)
def widen_rows(w, lo, hi, out):
    """out[:hi-lo] = w[lo:hi] as float32 (f16 bits or f32 in), for BLAS on prompt-sized batches.

    Single-threaded on purpose: OpenBLAS threads spin after each call and starve a parallel region
    started right after (measured 10x slower)."""
    for i in range(hi - lo):
        _widen(w[lo + i], w.shape[1], out[i])


@njit(**JIT)
def gather_rows(w, ids, out):
    """out[t] = w[ids[t]] as float32 (f16 bits or f32 in): the embedding lookup, allocating nothing."""
    for t in range(ids.shape[0]):
        _widen(w[ids[t]], w.shape[1], out[t])


def matmul_batched(x, w, out, scratch=None):
    """out[T, n] = x @ w.T for prompt-sized T: widen blocks of w to f32, then BLAS (numpy) per block."""
    n, d = w.shape
    block = max(1, BLAS_BLOCK_BYTES // (4 * d))
    if scratch is None or scratch.shape[0] < block or scratch.shape[1] != d:
        scratch = np.empty((block, d), np.float32)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        if w.dtype == np.float32:
            out[:, lo:hi] = x @ w[lo:hi].T
        else:
            widen_rows(w, lo, hi, scratch)
            out[:, lo:hi] = x @ scratch[:hi - lo].T
    return scratch


@njit(**JIT)
def rmsnorm(x, w, eps, out):
    """out[T, d] = x / rms(x) * w."""
    T, d = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[t, j] * x[t, j]
        scale = np.float32(1.0) / np.sqrt(ss / d + np.float32(eps))
        for j in range(d):
            out[t, j] = x[t, j] * scale * w[j]


@njit(**JIT)
def layernorm(x, w, b, eps, out):
    """out[T, d] = (x - mean) / std * w + b."""
    T, d = x.shape
    for t in range(T):
        mean = np.float32(0.0)
        for j in range(d):
            mean += x[t, j]
        mean /= d
        var = np.float32(0.0)
        for j in range(d):
            var += (x[t, j] - mean) * (x[t, j] - mean)
        scale = np.float32(1.0) / np.sqrt(var / d + np.float32(eps))
        for j in range(d):
            out[t, j] = (x[t, j] - mean) * scale * w[j] + b[j]


@njit(**JIT)
def rope(x, cos, sin):
    """Rotate-half RoPE in place: x[T, heads, hd], cos/sin[T, hd/2] for each token's position."""
    T, H, hd = x.shape
    half = hd // 2
    for t in range(T):
        for h in range(H):
            for j in range(half):
                a = x[t, h, j]
                b = x[t, h, j + half]
                x[t, h, j] = a * cos[t, j] - b * sin[t, j]
                x[t, h, j + half] = b * cos[t, j] + a * sin[t, j]


@njit(**JIT)
def _attend(q, k_cache, v_cache, kv, first, n, scale, o):
    # o[:hd] = softmax(scale * q.k[p]) . v[p] over positions first..n-1 of kv head `kv`, in one pass
    # with a running maximum (online softmax): nothing is allocated.
    hd = q.shape[0]
    best = _dot(k_cache[first, kv], q, hd) * scale
    total = np.float32(1.0)
    for j in range(hd):
        o[j] = f32(v_cache[first, kv, j])
    for p in range(first + 1, n):
        s = _dot(k_cache[p, kv], q, hd) * scale
        if s > best:
            r = np.exp(best - s)
            total *= r
            for j in range(hd):
                o[j] *= r
            best = s
        e = np.exp(s - best)
        total += e
        for j in range(hd):
            o[j] += e * f32(v_cache[p, kv, j])
    inv = np.float32(1.0) / total
    for j in range(hd):
        o[j] *= inv


@njit(parallel=True, **JIT)
def attention(q, k_cache, v_cache, pos0, scale, window, out):
    """Causal GQA: q[T, H, hd] at positions pos0.., caches [ctx, Hkv, hd] (f32 or f16 bits) already hold
    them; out[T, H, hd].

    scores = scale * q.k; window > 0 limits a query at position p to keys p-window+1..p (sliding-window
    layers), window = 0 attends to every earlier position. One pass per (token, head) with a running
    maximum (online softmax): the output accumulates in out[t, h] and is rescaled when the maximum
    grows, so nothing is allocated per call."""
    T, H, hd = q.shape
    group = H // k_cache.shape[1]
    scale = np.float32(scale)
    for th in prange(T * H):
        t = th // H
        h = th % H
        kv = h // group
        n = pos0 + t + 1
        first = max(0, n - window) if window > 0 else 0
        _attend(q[t, h], k_cache, v_cache, kv, first, n, scale, out[t, h])


# FFN activations (the `act` argument of ffn_bundles): ReLU(up.h + b), or gated a = act(gate.h) * up.h
# (dReLU: relu(gate.h) * relu(up.h)). `thr` is the FATReLU threshold of the ReLU gates (reglu, drelu):
# the gate passes g only when g > thr (0: plain ReLU); the other activations ignore it.
ACT_RELU, ACT_SILU, ACT_GELU_TANH, ACT_RELU_GATE, ACT_DRELU = 0, 1, 2, 3, 4
ACTIVATION_OF_KIND = {"relu": ACT_RELU, "swiglu": ACT_SILU, "geglu": ACT_GELU_TANH, "reglu": ACT_RELU_GATE,
                      "drelu": ACT_DRELU}
GELU_C = 0.7978845608028654   # sqrt(2 / pi)


def activation(config) -> tuple[int, np.float32]:
    """(act, thr) of a ModelConfig's FFN: what ffn_bundles, contribution and activate_np take."""
    return ACTIVATION_OF_KIND[config.ffn_kind], np.float32(config.act_threshold)


@njit(**JIT)
def _activate(g, u, act, thr):
    """One gated neuron's activation a from its gate and up pre-activations g, u (f32)."""
    zero = np.float32(0.0)
    if act == ACT_SILU:
        return g / (np.float32(1.0) + np.exp(-g)) * u
    if act == ACT_RELU_GATE:
        return g * u if g > thr else zero
    if act == ACT_DRELU:
        return g * u if g > thr and u > zero else zero
    # tanh-approximated GELU, as gelu_pytorch_tanh
    return np.float32(0.5) * g * (np.float32(1.0) + np.tanh(np.float32(GELU_C) * (g + np.float32(0.044715) * g * g * g))) * u


def activate_np(g: np.ndarray, u: np.ndarray, act: int, thr=0.0) -> np.ndarray:
    """numpy twin of `_activate` for batched (BLAS) paths and predictors: a = act(g) * u elementwise."""
    zero = np.float32(0.0)
    if act == ACT_SILU:
        return g / (1.0 + np.exp(-g)) * u
    if act == ACT_RELU_GATE:
        return np.where(g > thr, g, zero) * u
    if act == ACT_DRELU:
        return np.where(g > thr, g, zero) * np.maximum(u, zero)
    return 0.5 * g * (1.0 + np.tanh(GELU_C * (g + 0.044715 * g * g * g))) * u


@njit(parallel=True, **JIT)
def ffn_bundles(h, rows, n_rows, neuron_of_row, up_bias, act, thr, in_off, gate_off, down_off, partial, out,
                keep):
    """FFN over the first n_rows bundle rows (one neuron each; order does not matter).

    h[T, d] normalized input; rows[N, stride] f32 or f16 bits; neuron_of_row[N] which neuron a row
    holds (indexes up_bias[n_ff]; empty up_bias = no bias); act, thr a gated activation (`_activate`:
    a = act(gate.h) * (up.h)), or ACT_RELU: a = relu(up.h + bias). A neuron with a = 0 adds nothing
    and is skipped (ReLU, ReGLU, dReLU sparsity). Each of the C = partial.shape[0] chunks of rows accumulates into its own
    contiguous buffer (threads never share memory), then out[T, d] = their sum.
    keep: int32 row indices (< n_rows) to compute instead of all n_rows (empty: all of them; see
    select_rows: a cached row whose neuron the predictor scores as surely inactive is skipped).
    """
    T, d = h.shape
    C = partial.shape[0]
    m = keep.size if keep.size else n_rows
    for c in prange(C):
        acc = partial[c]                          # this chunk's own buffer: nothing allocated per call
        acc[:T] = 0.0                       # the run state sizes partial for a prompt chunk
        for i in range(c * m // C, (c + 1) * m // C):
            r = keep[i] if keep.size else i
            w_in = rows[r, in_off:in_off + d]
            w_gate = rows[r, gate_off:gate_off + d]
            w_down = rows[r, down_off:down_off + d]
            for t in range(T):
                x = h[t]
                u = _dot(w_in, x, d)
                if act != ACT_RELU:
                    a = _activate(_dot(w_gate, x, d), u, act, thr)
                else:
                    if up_bias.size:
                        u += up_bias[neuron_of_row[r]]
                    a = max(u, np.float32(0.0))
                if a == 0.0:
                    continue                      # an inactive neuron adds nothing
                _axpy(a, w_down, acc[t], d)
    _sum_partials(partial, T, d, out)


@njit(parallel=True, **JIT)
def ffn_bundles_pregate(h, rows, n_rows, neuron_of_row, gate_pre, up_pre, act, thr, in_off, down_off, partial, out):
    """ffn_bundles for the gate-resident layouts: gate_pre[T, n_ff] holds gate.h for every neuron
    (from the resident W_gate), so a = _activate(gate_pre[t, neuron], up.h); rows hold up | down, or only
    down when up_pre[T, n_ff] (from a resident W_up; empty otherwise) holds up.h as well."""
    T, d = h.shape
    C = partial.shape[0]
    for c in prange(C):
        acc = partial[c]
        acc[:T] = 0.0                       # the run state sizes partial for a prompt chunk
        for r in range(c * n_rows // C, (c + 1) * n_rows // C):
            w_in = rows[r, in_off:in_off + d]
            w_down = rows[r, down_off:down_off + d]
            n = neuron_of_row[r]
            for t in range(T):
                u = up_pre[t, n] if up_pre.shape[0] else _dot(w_in, h[t], d)
                a = _activate(gate_pre[t, n], u, act, thr)
                if a != 0.0:
                    _axpy(a, w_down, acc[t], d)
    _sum_partials(partial, T, d, out)


@njit(**JIT)
def _sum_partials(partial, T, d, out):
    """out[t, j] = sum over threads c of partial[c, t, j], t < T, j < d: the FFN kernels' per-thread
    accumulators (partial may hold more rows, sized for a prompt chunk)."""
    C = partial.shape[0]
    for t in range(T):
        for j in range(d):
            s = np.float32(0.0)
            for c in range(C):
                s += partial[c, t, j]
            out[t, j] = s


@njit(**JIT)
def select_rows(scores, neuron_of_row, n_rows, threshold, out):
    """The rows r < n_rows whose neuron's score is above threshold, into out; returns their count.
    (The FFN kernels' `keep`: cached rows worth computing for one decode token.)"""
    k = 0
    for r in range(n_rows):
        if scores[neuron_of_row[r]] > threshold:
            out[k] = r
            k += 1
    return k


@njit(**JIT)
def _axpy(a, w, y, n):
    # y[:n] += a * w[:n]
    for j in range(n):
        y[j] += a * f32(w[j])


def set_threads(n: int | None) -> int:
    """Use n compute threads (None: all cores numba sees). Returns the count in use."""
    if n:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return numba.get_num_threads()


@intrinsic
def narrow(typingctx, x, like):
    """float32 -> the storage type of `like`: uint16 gets the IEEE f16 bits (LLVM fptrunc, round to
    nearest even), float32 passes through. The inverse of `f32`."""
    if x == types.float32 and isinstance(like, types.Integer) and like.bitwidth == 16:
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return like(x, like), codegen
    if x == types.float32 and like == types.float32:
        def codegen(context, builder, sig, args):
            return args[0]
        return types.float32(x, like), codegen
    return None


@njit(**JIT)
def _store(dst, src, n):
    # dst[:n] = src[:n], dst f32 or f16 bits
    for j in range(n):
        dst[j] = narrow(src[j], dst[0])


@njit(**JIT)
def store_kv(src, dst):
    """dst[T, Hkv, hd] = src (f32) in the KV cache's storage (f32, or f16 bits rounded to nearest even):
    the K/V of this step's tokens into their cache positions, with no temporary array."""
    for t in range(src.shape[0]):
        for h in range(src.shape[1]):
            _store(dst[t, h], src[t, h], src.shape[2])


@njit(**JIT)
def rope_kv_attention_serial(qkv, n_heads, cos, sin, k_cache, v_cache, pos0, scale, window, out):
    """rope_kv_attention on the calling thread only, for one decode token: its H heads are a few
    microseconds of work each, less than waking a parallel region's workers costs (measured, SmolLM2 q4
    decode with 2 threads: 18.9 vs 23.4 ms CPU per token under load)."""
    T = qkv.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    _rope_store(qkv, n_heads, cos, sin, k_cache, v_cache, pos0)
    group = n_heads // n_kv
    scale = np.float32(scale)
    for th in range(T * n_heads):
        t = th // n_heads
        h = th % n_heads
        n = pos0 + t + 1
        first = max(0, n - window) if window > 0 else 0
        _attend(qkv[t, h * hd:(h + 1) * hd], k_cache, v_cache, h // group, first, n, scale, out[t, h * hd:(h + 1) * hd])


@njit(**JIT)
def _rope_store(qkv, n_heads, cos, sin, k_cache, v_cache, pos0):
    # RoPE on q and k of qkv[T, (H + 2 Hkv) hd] in place, then k and v into the caches at pos0..
    T = qkv.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    H = n_heads
    half = hd // 2
    for t in range(T):
        for h in range(H + n_kv):
            base = h * hd
            if cos.shape[0]:
                for j in range(half):
                    a = qkv[t, base + j]
                    b = qkv[t, base + j + half]
                    qkv[t, base + j] = a * cos[t, j] - b * sin[t, j]
                    qkv[t, base + j + half] = b * cos[t, j] + a * sin[t, j]
        for h in range(n_kv):
            _store(k_cache[pos0 + t, h], qkv[t, (H + h) * hd:(H + h + 1) * hd], hd)
            _store(v_cache[pos0 + t, h], qkv[t, (H + n_kv + h) * hd:(H + n_kv + h + 1) * hd], hd)


@njit(parallel=True, **JIT)
def rope_kv_attention(qkv, n_heads, cos, sin, k_cache, v_cache, pos0, scale, window, out):
    """One layer's attention from its fused projection output, in one call.

    qkv[T, (H + 2 Hkv) hd] = q | k | v of T tokens at positions pos0..; RoPE (rotate-half, cos/sin
    [T, hd/2], empty = no RoPE) is applied to q and k in place, k and v are stored into the caches
    [ctx, Hkv, hd] (f32 or f16 bits), then out[T, H hd] = causal GQA attention of each token t over
    positions 0..pos0+t (window > 0: only the last `window` of them), scores scaled by `scale`.
    """
    T = qkv.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    H = n_heads
    _rope_store(qkv, n_heads, cos, sin, k_cache, v_cache, pos0)
    group = H // n_kv
    scale = np.float32(scale)
    for th in prange(T * H):
        t = th // H
        h = th % H
        kv = h // group
        n = pos0 + t + 1
        first = max(0, n - window) if window > 0 else 0
        _attend(qkv[t, h * hd:(h + 1) * hd], k_cache, v_cache, kv, first, n, scale, out[t, h * hd:(h + 1) * hd])


# --- decode-time neuron selection (predictors): write into preallocated buffers, allocate nothing ---
@njit(cache=True, nogil=True)
def neg_log_softmax_at(logits, target):
    """-log softmax(logits)[target] for one row, summed in f64 without temporaries (a [T, vocab] f64
    copy of Qwen2.5's logits was 78 MB per 64 tokens: more than a memory limit leaves)."""
    top = logits[0]
    for i in range(1, len(logits)):
        if logits[i] > top:
            top = logits[i]
    total = 0.0
    for i in range(len(logits)):
        total += math.exp(float(logits[i]) - float(top))
    return math.log(total) + float(top) - float(logits[target])


@njit(**JIT)
def contribution(gate, up, down_norm, act, thr, out):
    """out[j] = |_activate(gate[j], up[j])| * down_norm[j] (down_norm empty: 1): a gated neuron's estimated
    output contribution, for one token (the numba twin of predictor.gated_score)."""
    for j in range(out.shape[0]):
        a = abs(_activate(gate[j], up[j], act, thr))
        out[j] = a * down_norm[j] if down_norm.size else a


@njit(**JIT)
def select_above(scores, threshold, ids):
    """ids[:m] = the j with scores[j] > threshold, ascending; returns m."""
    m = 0
    for j in range(scores.shape[0]):
        if scores[j] > threshold:
            ids[m] = j
            m += 1
    return m


@njit(**JIT)
def kth_smallest(a, k):
    """The k-th smallest value of a (1 <= k <= len(a)); reorders a. Quickselect, Hoare partition around
    a median of three (no quadratic case on sorted input). The selectors and the cache's eviction share it."""
    target = k - 1
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        x, y, z = a[lo], a[mid], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return a[target]
    return a[target]


@njit(**JIT)
def select_top(scores, k, work, ids):
    """ids[:k] = the indices of the k largest scores, ascending (ties: the lowest indices); work is
    scratch of len(scores). Returns k."""
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return 0
    for j in range(n):
        work[j] = scores[j]
    kth = kth_smallest(work[:n], n - k + 1)   # the k-th largest
    above = 0
    for j in range(n):
        if scores[j] > kth:
            above += 1
    ties = k - above
    m = 0
    for j in range(n):
        s = scores[j]
        if s > kth:
            ids[m] = j
            m += 1
        elif s == kth and ties > 0:
            ids[m] = j
            m += 1
            ties -= 1
    return m


@njit(**JIT)
def select_top_above(scores, k, floor, work, ids):
    """select_top among the scores above `floor` only: ids[:m] = the m = min(k, #{scores > floor})
    largest, ascending (the ReLU-gated FFNs' selection: a neuron scored 0 is inactive). Returns m."""
    m = 0
    for j in range(scores.shape[0]):
        if scores[j] > floor:
            m += 1
    return select_top(scores, min(k, m), work, ids)
