"""numba kernels over quantized bundle rows (lane-major GGUF blocks, see runtime/qbundle.py).

Rows arrive as two views of the same memory: `q` uint8 [N, stride] for the quants and `s`
[N, stride / itemsize] (uint16 holding f16 bits, or float32) for the scales. `fmt` is
QFormat.array() ([bits, has_min, scale itemsize]); `starts` [3] the byte offsets inside a row of the
up (in), gate and down parts. Inputs come permuted (qbundle.permute_input: element b*32+j at
j*nb+b), which puts every quant next to the input it multiplies: each loop below runs over the nb
blocks with contiguous quants, inputs and scales, and vectorizes.

A 4-bit byte is split in f32 (hi = floor(v / 16), lo = v - 16 hi): integer nibble ops make numba
widen to int64 and the int64 -> f32 conversion does not vectorize (measured 5x slower).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .kernels import ACT_RELU, JIT, _activate, f32

QB = 32
SIXTEENTH = np.float32(0.0625)


@njit(**JIT)
def _scales(s, start, nb, qbytes, item, has_min, d, m):
    """d[:nb] (and m[:nb]) = the part's scales (mins) widened to f32."""
    i = (start + qbytes) // item
    ds = s[i:i + nb]
    for b in range(nb):
        d[b] = f32(ds[b])
    if has_min:
        ms = s[i + nb:i + 2 * nb]
        for b in range(nb):
            m[b] = f32(ms[b])


@njit(**JIT)
def _dot_part(qr, sr, fmt, start, xp, nb, d, m):
    # dot(dequant(part at byte `start`), x) with xp the permuted input; d, m scratch [nb]
    bits, has_min, item = fmt[0], fmt[1] != 0, fmt[2]
    acc = np.float32(0.0)
    if bits == 4:
        _scales(sr, start, nb, 16 * nb, item, has_min, d, m)
        for j in range(16):
            qj = qr[start + j * nb:start + (j + 1) * nb]
            xl = xp[j * nb:(j + 1) * nb]
            xh = xp[(16 + j) * nb:(17 + j) * nb]
            if has_min:
                for b in range(nb):
                    v = np.float32(qj[b])
                    hi = np.floor(v * SIXTEENTH)
                    acc += d[b] * ((v - np.float32(16.0) * hi) * xl[b] + hi * xh[b]) + m[b] * (xl[b] + xh[b])
            else:
                for b in range(nb):
                    v = np.float32(qj[b])
                    hi = np.floor(v * SIXTEENTH)
                    acc += d[b] * ((v - np.float32(16.0) * hi - np.float32(8.0)) * xl[b]
                                   + (hi - np.float32(8.0)) * xh[b])
    else:
        _scales(sr, start, nb, 32 * nb, item, False, d, m)
        for j in range(32):
            qj = qr[start + j * nb:start + (j + 1) * nb].view(np.int8)
            xj = xp[j * nb:(j + 1) * nb]
            for b in range(nb):
                acc += d[b] * (np.float32(qj[b]) * xj[b])
    return acc


@njit(**JIT)
def _axpy_part(a, qr, sr, fmt, start, yp, nb, d, m):
    # yp += a * dequant(part at byte `start`), in the permuted order; d, m scratch [nb]
    bits, has_min, item = fmt[0], fmt[1] != 0, fmt[2]
    if bits == 4:
        _scales(sr, start, nb, 16 * nb, item, has_min, d, m)
        for b in range(nb):
            d[b] *= a
            m[b] = m[b] * a if has_min else np.float32(-8.0) * d[b]
        for j in range(16):
            qj = qr[start + j * nb:start + (j + 1) * nb]
            yl = yp[j * nb:(j + 1) * nb]
            yh = yp[(16 + j) * nb:(17 + j) * nb]
            for b in range(nb):
                v = np.float32(qj[b])
                hi = np.floor(v * SIXTEENTH)
                yl[b] += d[b] * (v - np.float32(16.0) * hi) + m[b]
                yh[b] += d[b] * hi + m[b]
    else:
        _scales(sr, start, nb, 32 * nb, item, False, d, m)
        for j in range(32):
            qj = qr[start + j * nb:start + (j + 1) * nb].view(np.int8)
            yj = yp[j * nb:(j + 1) * nb]
            for b in range(nb):
                yj[b] += (a * d[b]) * np.float32(qj[b])


@njit(parallel=True, **JIT)
def ffn_qbundles(hp, q, s, n_rows, neuron_of_row, up_bias, act, thr, fmt, starts, partial, out, keep):
    """FFN over the first n_rows quantized bundle rows (any order): the quantized kernels.ffn_bundles.

    hp[T, d] the permuted normalized input; q, s the two views of the rows; up_bias[n_ff] indexed by
    neuron_of_row (empty: none); act, thr as kernels.ffn_bundles: a gated activation
    a = act(gate.h) * (up.h), or ACT_RELU a = relu(up.h + bias).
    Each of the partial.shape[0] chunks of rows accumulates into its own buffer (permuted order);
    out[T, d] gets their sum in the natural order. keep: the row indices to compute (empty: all n_rows),
    as kernels.ffn_bundles.
    """
    T, d = hp.shape
    nb = d // QB
    C = partial.shape[0]
    m = keep.size if keep.size else n_rows
    for c in prange(C):
        acc = np.zeros((T, d), np.float32)
        ds = np.empty(nb, np.float32)
        ms = np.empty(nb, np.float32)
        for i in range(c * m // C, (c + 1) * m // C):
            r = keep[i] if keep.size else i
            qr, sr = q[r], s[r]
            for t in range(T):
                x = hp[t]
                u = _dot_part(qr, sr, fmt, starts[0], x, nb, ds, ms)
                if act != ACT_RELU:
                    a = _activate(_dot_part(qr, sr, fmt, starts[1], x, nb, ds, ms), u, act, thr)
                else:
                    if up_bias.size:
                        u += up_bias[neuron_of_row[r]]
                    a = max(u, np.float32(0.0))
                if a == 0.0:
                    continue                      # an inactive neuron adds nothing
                _axpy_part(a, qr, sr, fmt, starts[2], acc[t], nb, ds, ms)
        partial[c, :T] = acc
    for t in range(T):
        for j in range(QB):
            for b in range(nb):
                acc_j = np.float32(0.0)
                for c in range(C):
                    acc_j += partial[c, t, j * nb + b]
                out[t, b * QB + j] = acc_j


@njit(**JIT)
def _dequant_part(qr, sr, fmt, start, nb, out, d, m):
    # out[:nb*32] = the part's values in the permuted order
    bits, has_min, item = fmt[0], fmt[1] != 0, fmt[2]
    if bits == 4:
        _scales(sr, start, nb, 16 * nb, item, has_min, d, m)
        if not has_min:
            for b in range(nb):
                m[b] = np.float32(-8.0) * d[b]
        for j in range(16):
            qj = qr[start + j * nb:start + (j + 1) * nb]
            ol = out[j * nb:(j + 1) * nb]
            oh = out[(16 + j) * nb:(17 + j) * nb]
            for b in range(nb):
                v = np.float32(qj[b])
                hi = np.floor(v * SIXTEENTH)
                ol[b] = d[b] * (v - np.float32(16.0) * hi) + m[b]
                oh[b] = d[b] * hi + m[b]
    else:
        _scales(sr, start, nb, 32 * nb, item, False, d, m)
        for j in range(32):
            qj = qr[start + j * nb:start + (j + 1) * nb].view(np.int8)
            oj = out[j * nb:(j + 1) * nb]
            for b in range(nb):
                oj[b] = d[b] * np.float32(qj[b])


@njit(**JIT)
def dequant_rows(q, s, lo, hi, fmt, part_starts, d, out):
    """out[i, p*d:(p+1)*d] = the part at byte part_starts[p] of row lo+i as f32 in the permuted order.

    Single-threaded like kernels.widen_rows: it runs next to BLAS for prompt-sized batches."""
    nb = d // QB
    ds = np.empty(nb, np.float32)
    ms = np.empty(nb, np.float32)
    for i in range(hi - lo):
        for p in range(part_starts.shape[0]):
            _dequant_part(q[lo + i], s[lo + i], fmt, part_starts[p], nb, out[i, p * d:(p + 1) * d], ds, ms)


@intrinsic
def _f16_bits(typingctx, x):
    """float32 -> f16 bits (uint16) via LLVM fptrunc: round to nearest even, as numpy's astype."""
    if x == types.float32:
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return types.uint16(x), codegen
    return None


@njit(parallel=True, **JIT)
def widen_rows_f16(q, s, src, n, fmt, part_starts, d, out):
    """out[k, p*d:(p+1)*d] = the part at byte part_starts[p] of row src[k] as f16 bits (permuted order), k < n: the
    widen-on-admission alternative. kernels.ffn_bundles over such rows takes the permuted input and
    returns the permuted output (element order does not change a dot product). Measured against
    computing on the quantized rows by tools/bench_qbundles.py."""
    nb = d // QB
    for k in prange(n):
        tmp = np.empty(d, np.float32)
        ds = np.empty(nb, np.float32)
        ms = np.empty(nb, np.float32)
        r = src[k]
        for p in range(part_starts.shape[0]):
            _dequant_part(q[r], s[r], fmt, part_starts[p], nb, tmp, ds, ms)
            o = out[k, p * d:(p + 1) * d]
            for j in range(d):
                o[j] = _f16_bits(tmp[j])
