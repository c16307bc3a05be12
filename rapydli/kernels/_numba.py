"""Numba-compiled CPU kernels for NumPy float32/float64 arrays (private).

This module is imported lazily, on the first kernel call that can use it (see
:mod:`rapydli.kernels._dispatch`), so ``import rapydli`` never pays for Numba.
Every function is ``njit(parallel=True, fastmath=False, cache=True)``: it is
compiled once per dtype on first call and the machine code is cached under
``__pycache__`` for later processes (Dask workers included).

Conventions: inputs are already validated, C-contiguous and of one float
dtype; every function allocates and returns NEW arrays and never writes to
its inputs. Integer arguments are Python ints (int64), so one specialisation
per dtype is compiled. Parallel loops run over samples (or samples x
channels); reductions over the batch go through per-lane partial sums, never
through reassociation (``fastmath`` stays off), except in :func:`conv_dw_s1` (see
``_jit_reassoc``).
"""
from __future__ import annotations

import math
import os

# GNU OpenMP threads spin after each parallel region by default; on a machine with few cores
# they then steal the CPU from OpenBLAS's threads during the matmuls between our kernels (we
# measured 2-10x slower GEMMs). Sleep instead, unless the user chose otherwise; must be set
# before Numba's OpenMP pool starts, which happens on the first parallel call.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba
import numpy as np
from numba import prange

__all__ = [
    "act_backward",
    "act_forward",
    "avgpool_backward",
    "avgpool_forward",
    "bias_sum",
    "col2im",
    "conv_dw_direct",
    "conv_dw_s1",
    "conv_dx_direct",
    "conv_dx_s1",
    "conv_forward_direct",
    "conv_forward_s1",
    "im2col",
    "maxpool_backward",
    "maxpool_forward",
    "mse_kernel",
    "nop_to_onp",
    "onp_to_nop_bias",
    "sgd_kernel",
    "sgd_kernel_inplace",
    "softmax_ce_kernel",
]

_jit = numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)

#: activation codes understood by ``act_forward`` / ``act_backward``
ACT_CODES = {"relu": 0, "sigmoid": 1, "tanh": 2}


# ------------------------------------------------------------------ convolution, direct loops
@_jit
def conv_forward_direct(x, w, b, sh, sw, ho, wo):
    """``y[n, o] = b[o] + sum_{c,i,j} w[o,c,i,j] * x[n, c, i::sh, j::sw]``; ``b`` may be empty."""
    n_, c_, _, _ = x.shape
    o_, _, kh, kw = w.shape
    y = np.empty((n_, o_, ho, wo), x.dtype)
    has_bias = b.shape[0] > 0
    for idx in prange(n_ * o_):
        n = idx // o_
        o = idx - n * o_
        acc = y[n, o]
        bv = b[o] if has_bias else x.dtype.type(0)
        for r in range(ho):
            for t in range(wo):
                acc[r, t] = bv
        for c in range(c_):
            xc = x[n, c]
            for i in range(kh):
                for j in range(kw):
                    wv = w[o, c, i, j]
                    for r in range(ho):
                        xr = xc[r * sh + i]
                        ar = acc[r]
                        if sw == 1:
                            for t in range(wo):
                                ar[t] += wv * xr[t + j]
                        else:
                            for t in range(wo):
                                ar[t] += wv * xr[t * sw + j]
    return y


@_jit
def conv_dx_direct(dy, w, sh, sw, h, wd):
    """Input gradient ``(N, C, h, wd)``: scatter ``dy`` through the kernel (zero where uncovered)."""
    n_, o_, ho, wo = dy.shape
    _, c_, kh, kw = w.shape
    dx = np.empty((n_, c_, h, wd), dy.dtype)
    for idx in prange(n_ * c_):
        n = idx // c_
        c = idx - n * c_
        d = dx[n, c]
        for r in range(h):
            for t in range(wd):
                d[r, t] = 0
        for o in range(o_):
            g = dy[n, o]
            for i in range(kh):
                for j in range(kw):
                    wv = w[o, c, i, j]
                    for r in range(ho):
                        dr = d[r * sh + i]
                        gr = g[r]
                        if sw == 1:
                            for t in range(wo):
                                dr[t + j] += wv * gr[t]
                        else:
                            for t in range(wo):
                                dr[t * sw + j] += wv * gr[t]
    return dx


@_jit
def conv_dw_direct(x, dy, kh, kw, sh, sw):
    """Weight gradient ``(O, C, kh, kw)``; per-lane partial sums flushed to float64 per sample."""
    n_, c_, _, _ = x.shape
    _, o_, ho, wo = dy.shape
    dw = np.empty((o_, c_, kh, kw), x.dtype)
    for idx in prange(o_ * c_):
        o = idx // c_
        c = idx - o * c_
        tmp = np.empty((kh, kw, wo), x.dtype)
        tot = np.zeros((kh, kw), np.float64)
        for n in range(n_):
            tmp[:] = 0
            g = dy[n, o]
            xc = x[n, c]
            for r in range(ho):
                gr = g[r]
                for i in range(kh):
                    xr = xc[r * sh + i]
                    for j in range(kw):
                        tr = tmp[i, j]
                        if sw == 1:
                            for t in range(wo):
                                tr[t] += gr[t] * xr[t + j]
                        else:
                            for t in range(wo):
                                tr[t] += gr[t] * xr[t * sw + j]
            for i in range(kh):
                for j in range(kw):
                    s = 0.0
                    for t in range(wo):
                        s += tmp[i, j, t]
                    tot[i, j] += s
        for i in range(kh):
            for j in range(kw):
                dw[o, c, i, j] = tot[i, j]
    return dw


@_jit
def bias_sum(dy):
    """``dy.sum(axis=(0, 2, 3))`` of an NCHW array, accumulated in float64."""
    n_, o_, ho, wo = dy.shape
    db = np.empty(o_, dy.dtype)
    for o in prange(o_):
        tot = 0.0
        for n in range(n_):
            g = dy[n, o]
            s = 0.0
            for r in range(ho):
                for t in range(wo):
                    s += g[r, t]
            tot += s
        db[o] = tot
    return db


# ------------------------------------------------------------------ convolution, stride 1, wide rows
@_jit
def conv_forward_s1(x, w, b, ho, wo):
    """Stride-1 :func:`conv_forward_direct` computed on "wide rows"; parallel over (n, o).

    The output plane is accumulated on a grid as wide as the input (row stride ``W``): output
    ``(r, t)`` sits at ``p = r*W + t`` and tap ``(i, j)`` reads ``x_flat[p + i*W + j]``, so a tap
    is ONE contiguous, vectorisable loop over ``p < L = (Ho-1)*W + Wo`` instead of ``Ho`` short
    loops of ``Wo``; the ``W - Wo`` junk columns of each row are dropped at the end. Five taps
    of a kernel row share one pass (one load/store of the accumulator per five multiply-adds).
    Accumulates in the input dtype, like :func:`conv_forward_direct`.
    """
    n_, c_, h, wd = x.shape
    o_, _, kh, kw = w.shape
    y = np.empty((n_, o_, ho, wo), x.dtype)
    has_bias = b.shape[0] > 0
    span = (ho - 1) * wd + wo
    for idx in prange(n_ * o_):
        n = idx // o_
        o = idx - n * o_
        acc = np.empty(span, x.dtype)
        bv = b[o] if has_bias else x.dtype.type(0)
        for p in range(span):
            acc[p] = bv
        for c in range(c_):
            xf = x[n, c].reshape(h * wd)
            for i in range(kh):
                base = i * wd
                j = 0
                while j + 5 <= kw:
                    w0 = w[o, c, i, j]
                    w1 = w[o, c, i, j + 1]
                    w2 = w[o, c, i, j + 2]
                    w3 = w[o, c, i, j + 3]
                    w4 = w[o, c, i, j + 4]
                    s0 = xf[base + j:]
                    for p in range(span):
                        acc[p] += (w0 * s0[p] + w1 * s0[p + 1] + w2 * s0[p + 2]
                                   + w3 * s0[p + 3] + w4 * s0[p + 4])
                    j += 5
                while j < kw:
                    w0 = w[o, c, i, j]
                    s0 = xf[base + j:]
                    for p in range(span):
                        acc[p] += w0 * s0[p]
                    j += 1
        yo = y[n, o]
        for r in range(ho):
            for t in range(wo):
                yo[r, t] = acc[r * wd + t]
    return y


@_jit
def conv_dx_s1(dy, w, h, wd):
    """Stride-1 :func:`conv_dx_direct` on wide rows (``h, wd``: padded input size); parallel over n.

    ``dy[n, o]`` is first laid out on rows as wide as the input (row stride ``wd``, zero in the
    ``wd - Wo = kw - 1`` junk columns) after ``kw - 1`` leading zeros. Kernel row ``i`` then
    adds to ``dx_flat[i*wd + u]``, ``u < Ho*wd``, the gather ``sum_j w[o, c, i, j] *
    dyw[u - j]``: one contiguous loop per kernel row, five taps per pass, written straight into
    ``dx`` (no junk columns on the output side: a column that wraps lands on a junk zero).
    Accumulates in the input dtype, like :func:`conv_dx_direct`.
    """
    n_, o_, ho, wo = dy.shape
    _, c_, kh, kw = w.shape
    dx = np.empty((n_, c_, h, wd), dy.dtype)
    m = kw - 1
    span = ho * wd
    for n in prange(n_):
        dyw = np.zeros((o_, m + span), dy.dtype)
        for o in range(o_):
            g = dy[n, o]
            row = dyw[o]
            for r in range(ho):
                for t in range(wo):
                    row[m + r * wd + t] = g[r, t]
        for c in range(c_):
            acc = dx[n, c].reshape(h * wd)
            for q in range(h * wd):
                acc[q] = 0
            for o in range(o_):
                row = dyw[o]
                for i in range(kh):
                    a = acc[i * wd:]
                    j = 0
                    while j + 5 <= kw:
                        w0 = w[o, c, i, j]
                        w1 = w[o, c, i, j + 1]
                        w2 = w[o, c, i, j + 2]
                        w3 = w[o, c, i, j + 3]
                        w4 = w[o, c, i, j + 4]
                        s0 = row[m - j - 4:]
                        for u in range(span):
                            a[u] += (w0 * s0[u + 4] + w1 * s0[u + 3] + w2 * s0[u + 2]
                                     + w3 * s0[u + 1] + w4 * s0[u])
                        j += 5
                    while j < kw:
                        w0 = w[o, c, i, j]
                        s0 = row[m - j:]
                        for u in range(span):
                            a[u] += w0 * s0[u]
                        j += 1
    return dx


# Reductions that must vectorise (a dot product along one contiguous loop) need LLVM to
# reorder the additions; only ``reassoc`` is enabled (no contraction, no finite-math
# assumptions), and only for the kernels below. The order is fixed at compile time, so results
# stay deterministic and independent of the thread count.
_jit_reassoc = numba.njit(parallel=True, fastmath={"reassoc"}, cache=True, nogil=True)


@_jit_reassoc
def conv_dw_s1(x, dy, kh, kw):
    """Stride-1 weight and bias gradients ``(dw (O, C, kh, kw), db (O,))``; parallel over samples.

    ``dw[o, c, i, j] = sum_{n, p} dyw[n, o, p] * x_flat[n, c, p + i*W + j]``, ``p < L = (Ho-1)*W
    + Wo``, with ``dyw`` the wide-row layout of ``dy`` (row stride ``W``, zero in the junk
    columns) as in :func:`conv_forward_s1`: one contiguous dot-product loop per (sample, kernel
    row), with ten scalar accumulators (five taps of the kernel row x two output channels, so
    each loaded ``x`` feeds two multiply-adds), vectorised over ``p`` (see ``_jit_reassoc``).
    Accumulates in the input dtype within one sample, then in float64: samples are split into
    fixed blocks of about 8 (not one per thread), each with its own float64 partial sums,
    reduced in block order at the end.
    """
    n_, c_, h, wd = x.shape
    _, o_, ho, wo = dy.shape
    span = (ho - 1) * wd + wo
    span = (span + 15) // 16 * 16  # whole vectors; dy is zero-padded, x copied with a zero tail
    xl = (kh - 1) * wd + kw + 4 + span
    nch = (n_ + 7) // 8
    part = np.zeros((nch, o_, c_, kh, kw), np.float64)
    partb = np.zeros((nch, o_), np.float64)
    zero = x.dtype.type(0)
    for ch in prange(nch):
        n0 = ch * n_ // nch
        n1 = (ch + 1) * n_ // nch
        gw = np.zeros(o_ * span, x.dtype)
        xf = np.zeros(max(xl, h * wd), x.dtype)
        for n in range(n0, n1):
            for o in range(o_):
                sb = 0.0
                for r in range(ho):
                    for t in range(wo):
                        v = dy[n, o, r, t]
                        gw[o * span + r * wd + t] = v
                        sb += v
                partb[ch, o] += sb
            for c in range(c_):
                xc = x[n, c]
                for r in range(h):
                    for t in range(wd):
                        xf[r * wd + t] = xc[r, t]
                for o in range(0, o_, 2):
                    two = o + 1 < o_
                    g = gw[o * span:]
                    gb = gw[(o + 1) * span:] if two else g
                    for i in range(kh):
                        j = 0
                        while j + 5 <= kw:
                            s0 = xf[i * wd + j:]
                            a0 = zero
                            a1 = zero
                            a2 = zero
                            a3 = zero
                            a4 = zero
                            b0 = zero
                            b1 = zero
                            b2 = zero
                            b3 = zero
                            b4 = zero
                            for p in range(span):
                                gv = g[p]
                                hv = gb[p]
                                x0 = s0[p]
                                x1 = s0[p + 1]
                                x2 = s0[p + 2]
                                x3 = s0[p + 3]
                                x4 = s0[p + 4]
                                a0 += gv * x0
                                a1 += gv * x1
                                a2 += gv * x2
                                a3 += gv * x3
                                a4 += gv * x4
                                b0 += hv * x0
                                b1 += hv * x1
                                b2 += hv * x2
                                b3 += hv * x3
                                b4 += hv * x4
                            part[ch, o, c, i, j] += a0
                            part[ch, o, c, i, j + 1] += a1
                            part[ch, o, c, i, j + 2] += a2
                            part[ch, o, c, i, j + 3] += a3
                            part[ch, o, c, i, j + 4] += a4
                            if two:
                                part[ch, o + 1, c, i, j] += b0
                                part[ch, o + 1, c, i, j + 1] += b1
                                part[ch, o + 1, c, i, j + 2] += b2
                                part[ch, o + 1, c, i, j + 3] += b3
                                part[ch, o + 1, c, i, j + 4] += b4
                            j += 5
                        while j < kw:
                            s0 = xf[i * wd + j:]
                            a0 = zero
                            b0 = zero
                            for p in range(span):
                                a0 += g[p] * s0[p]
                                b0 += gb[p] * s0[p]
                            part[ch, o, c, i, j] += a0
                            if two:
                                part[ch, o + 1, c, i, j] += b0
                            j += 1
    dw = np.empty((o_, c_, kh, kw), x.dtype)
    db = np.empty(o_, x.dtype)
    for o in range(o_):
        sb = 0.0
        for ch in range(nch):
            sb += partb[ch, o]
        db[o] = sb
        for c in range(c_):
            for i in range(kh):
                for j in range(kw):
                    s = 0.0
                    for ch in range(nch):
                        s += part[ch, o, c, i, j]
                    dw[o, c, i, j] = s
    return dw, db

# ------------------------------------------------------------------ convolution, im2col + BLAS
# The window matrix is laid out (C*kh*kw, N*Ho*Wo): its rows are written and read along the
# output columns, so every inner loop is a contiguous (for stride 1) copy or accumulation.
@_jit
def im2col(x, kh, kw, sh, sw, ho, wo):
    """Windows as a ``(C*kh*kw, N*Ho*Wo)`` matrix (rows: c, i, j; columns: n, r, t)."""
    n_, c_, _, _ = x.shape
    p_ = ho * wo
    cols = np.empty((c_ * kh * kw, n_ * p_), x.dtype)
    for n in prange(n_):
        base = n * p_
        for c in range(c_):
            xc = x[n, c]
            for i in range(kh):
                for j in range(kw):
                    row = cols[(c * kh + i) * kw + j]
                    for r in range(ho):
                        xr = xc[r * sh + i]
                        dst = base + r * wo
                        if sw == 1:
                            for t in range(wo):
                                row[dst + t] = xr[t + j]
                        else:
                            for t in range(wo):
                                row[dst + t] = xr[t * sw + j]
    return cols


@_jit
def col2im(dcols, n_, c_, h, wd, kh, kw, sh, sw, ho, wo):
    """Sum window gradients ``(C*kh*kw, N*Ho*Wo)`` back onto a zero ``(N, C, h, wd)``."""
    p_ = ho * wo
    dx = np.empty((n_, c_, h, wd), dcols.dtype)
    for n in prange(n_):
        base = n * p_
        for c in range(c_):
            dc = dx[n, c]
            for r in range(h):
                for t in range(wd):
                    dc[r, t] = 0
            for i in range(kh):
                for j in range(kw):
                    row = dcols[(c * kh + i) * kw + j]
                    for r in range(ho):
                        dr = dc[r * sh + i]
                        src = base + r * wo
                        if sw == 1:
                            for t in range(wo):
                                dr[t + j] += row[src + t]
                        else:
                            for t in range(wo):
                                dr[t * sw + j] += row[src + t]
    return dx


@_jit
def onp_to_nop_bias(yt, b, n_, ho, wo):
    """``(O, N*Ho*Wo)`` GEMM output -> ``(N, O, Ho, Wo)``, adding ``b`` (may be empty)."""
    o_ = yt.shape[0]
    p_ = ho * wo
    y = np.empty((n_, o_, ho, wo), yt.dtype)
    has_bias = b.shape[0] > 0
    for n in prange(n_):
        yn = y[n].reshape((o_, p_))
        for o in range(o_):
            src = yt[o, n * p_:(n + 1) * p_]
            dst = yn[o]
            bv = b[o] if has_bias else yt.dtype.type(0)
            for p in range(p_):
                dst[p] = src[p] + bv
    return y


@_jit
def nop_to_onp(dy):
    """``(N, O, Ho, Wo)`` -> ``(O, N*Ho*Wo)`` (the GEMM layout of the output gradient)."""
    n_, o_, ho, wo = dy.shape
    p_ = ho * wo
    out = np.empty((o_, n_ * p_), dy.dtype)
    for n in prange(n_):
        g = dy[n].reshape((o_, p_))
        for o in range(o_):
            dst = out[o, n * p_:(n + 1) * p_]
            src = g[o]
            for p in range(p_):
                dst[p] = src[p]
    return out


# ------------------------------------------------------------------ pooling
@_jit
def maxpool_forward(x, kh, kw, sh, sw, ho, wo):
    """Window maxima; NaN propagates (as ``np.max``). Inner loops run along an output row."""
    n_, c_, _, _ = x.shape
    y = np.empty((n_, c_, ho, wo), x.dtype)
    for idx in prange(n_ * c_):
        n = idx // c_
        c = idx - n * c_
        xc = x[n, c]
        yc = y[n, c]
        for r in range(ho):
            m = yc[r]
            x0 = xc[r * sh]
            for t in range(wo):
                m[t] = x0[t * sw]
            for i in range(kh):
                xr = xc[r * sh + i]
                for j in range(kw):
                    for t in range(wo):
                        v = xr[t * sw + j]
                        mt = m[t]
                        m[t] = v if (v > mt or v != v) else mt
    return y


@numba.njit(inline="always", cache=True, nogil=True)
def _route_to_max(xc, dc, g, kh, kw, sh, sw, nan_aware):
    """Add ``g[r, t]`` into ``dc`` at the first maximum (row-major) of each window of the
    plane ``xc``; returns whether a NaN was seen.

    With ``nan_aware`` False a NaN never wins a comparison; the caller redoes a plane that held
    one with ``nan_aware`` True, where the first NaN of a window wins (as in
    :func:`maxpool_forward`). Keeping that test out of the common pass lets the window scan
    compile to selects instead of branches (2.6x faster on LeNet-5's first pooling layer).
    """
    ho, wo = g.shape
    nan = False
    for r in range(ho):
        r0 = r * sh
        for t in range(wo):
            t0 = t * sw
            bi = 0
            bj = 0
            bt = xc[r0, t0]
            for i in range(kh):
                for j in range(kw):
                    v = xc[r0 + i, t0 + j]
                    if nan_aware:
                        take = v > bt or (v != v and bt == bt)  # first max; first NaN wins
                    else:
                        nan |= v != v
                        take = v > bt
                    if take:
                        bt = v
                        bi = i
                        bj = j
            dc[r0 + bi, t0 + bj] += g[r, t]
    return nan


@_jit
def maxpool_backward(x, dy, kh, kw, sh, sw):
    """Route ``dy`` to the first maximum (row-major) of each window; windows may overlap.

    The argmax is recomputed here (the interface passes no indices), one window at a time,
    straight into the zeroed plane of ``dx``; see :func:`_route_to_max` for NaN.
    """
    n_, c_, _, _ = x.shape
    dx = np.empty_like(x)
    for idx in prange(n_ * c_):
        n = idx // c_
        c = idx - n * c_
        dc = dx[n, c]
        dc[:] = 0
        if _route_to_max(x[n, c], dc, dy[n, c], kh, kw, sh, sw, False):
            dc[:] = 0
            _route_to_max(x[n, c], dc, dy[n, c], kh, kw, sh, sw, True)
    return dx


@_jit
def avgpool_forward(x, kh, kw, sh, sw, ho, wo):
    n_, c_, _, _ = x.shape
    y = np.empty((n_, c_, ho, wo), x.dtype)
    inv = 1.0 / (kh * kw)
    for idx in prange(n_ * c_):
        n = idx // c_
        c = idx - n * c_
        xc = x[n, c]
        yc = y[n, c]
        for r in range(ho):
            for t in range(wo):
                s = 0.0
                for i in range(kh):
                    for j in range(kw):
                        s += xc[r * sh + i, t * sw + j]
                yc[r, t] = s * inv
    return y


@_jit
def avgpool_backward(dy, h, wd, kh, kw, sh, sw, out):
    """Spread ``dy / (kh*kw)`` over each window into the fresh zero array ``out`` and return it."""
    n_, c_, ho, wo = dy.shape
    inv = 1.0 / (kh * kw)
    for idx in prange(n_ * c_):
        n = idx // c_
        c = idx - n * c_
        dc = out[n, c]
        g = dy[n, c]
        for r in range(ho):
            for t in range(wo):
                share = g[r, t] * inv
                for i in range(kh):
                    for j in range(kw):
                        dc[r * sh + i, t * sw + j] += share
    return out


# ------------------------------------------------------------------ element-wise
@_jit
def act_forward(x, code):
    """relu (0), sigmoid (1, overflow-free) or tanh (2) of a flat array."""
    y = np.empty_like(x)
    n = x.shape[0]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    if code == 0:
        for i in prange(n):
            v = x[i]
            y[i] = v if v > zero else zero
    elif code == 1:
        for i in prange(n):
            v = x[i]
            e = np.exp(-abs(v))
            y[i] = one / (one + e) if v >= zero else e / (one + e)
    else:
        for i in prange(n):
            y[i] = np.tanh(x[i])
    return y


#: 2**k in float32 for k = -127 .. 128; the last is inf, so exp overflows to it and sigmoid to 0
with np.errstate(over="ignore"):
    _POW2_F32 = np.ldexp(1.0, np.arange(-127, 129)).astype(np.float32)


@numba.njit(parallel=True, fastmath={"contract", "afn", "reassoc", "nsz", "arcp"}, cache=True,
            nogil=True)
def _sigmoid_f32(x, pow2):
    y = np.empty_like(x)
    one = np.float32(1.0)
    for i in prange(x.shape[0]):
        # exp(v), v = -x: v = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two for accuracy),
        # exp(r) by Cephes' degree-7 polynomial, 2**k from the table: no call, so it vectorises
        v = min(max(-x[i], np.float32(-87.5)), np.float32(89.0))
        k = np.floor(v * np.float32(1.44269504) + np.float32(0.5))
        r = v - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        y[i] = one / (one + (p * r * r + r + one) * pow2[np.int32(k) + 127])
    return y


def sigmoid_f32(x):
    """Logistic function of a flat float32 array, within 4e-7 relative of the exact one
    (0 below -88, 1 above 87); twice as fast as :func:`act_forward`'s, whose ``exp`` is a
    libm call per element."""
    return _sigmoid_f32(x, _POW2_F32)


@_jit
def act_backward(y, dy, code):
    """Activation gradient through the forward output ``y`` (flat arrays)."""
    dx = np.empty_like(dy)
    n = dy.shape[0]
    zero = dy.dtype.type(0)
    one = dy.dtype.type(1)
    if code == 0:
        for i in prange(n):
            dx[i] = dy[i] if y[i] > zero else zero
    elif code == 1:
        for i in prange(n):
            v = y[i]
            dx[i] = dy[i] * v * (one - v)
    else:
        for i in prange(n):
            v = y[i]
            dx[i] = dy[i] * (one - v * v)
    return dx


@_jit
def sgd_kernel(w, g, v, has_v, lr, momentum, weight_decay, nesterov):
    """Fused SGD step on flat arrays: returns ``(w_new, v_new)`` (v_new is empty without momentum)."""
    n = w.shape[0]
    w_new = np.empty_like(w)
    use_m = momentum != 0.0
    v_new = np.empty(n if use_m else 0, w.dtype)
    for i in prange(n):
        g2 = g[i] + weight_decay * w[i] if weight_decay != 0.0 else g[i]
        if use_m:
            vn = momentum * v[i] + g2 if has_v else g2
            vn = w.dtype.type(vn)
            v_new[i] = vn
            step = g2 + momentum * vn if nesterov else vn
        else:
            step = g2
        w_new[i] = w[i] - lr * step
    return w_new, v_new


@_jit
def sgd_kernel_inplace(w, g, g_add, add, v, lr, momentum, weight_decay, nesterov):
    """The step of :func:`sgd_kernel` written into ``w`` and ``v`` (``v`` holds zeros or the
    previous velocity; unused without momentum). With ``add`` the gradient is ``g + g_add``,
    summed in ``w``'s dtype as it is read (the bits of summing first, without the array)."""
    n = w.shape[0]
    use_m = momentum != 0.0
    for i in prange(n):
        gi = g[i] + g_add[i] if add else g[i]
        g2 = gi + weight_decay * w[i] if weight_decay != 0.0 else gi
        if use_m:
            vn = w.dtype.type(momentum * v[i] + g2)
            v[i] = vn
            step = g2 + momentum * vn if nesterov else vn
        else:
            step = g2
        w[i] = w[i] - lr * step


# ------------------------------------------------------------------ losses
@_jit
def softmax_ce_kernel(logits, labels, scale):
    """``(loss, dlogits, n_correct)``; one pass per row, parallel over rows."""
    n, k = logits.shape
    d = np.empty_like(logits)
    row_loss = np.empty(n, np.float64)
    row_ok = np.empty(n, np.int64)
    for r in prange(n):
        z = logits[r]
        m = z[0]
        am = 0
        for q in range(1, k):
            if z[q] > m:
                m = z[q]
                am = q
        s = 0.0
        for q in range(k):
            e = np.exp(z[q] - m)
            d[r, q] = e
            s += e
        lab = labels[r]
        lse = math.log(s)
        row_loss[r] = lse - (z[lab] - m)
        inv = 1.0 / s
        for q in range(k):
            d[r, q] = d[r, q] * inv * scale
        d[r, lab] -= scale
        row_ok[r] = 1 if am == lab else 0
    loss = 0.0
    ok = 0
    for r in range(n):
        loss += row_loss[r]
        ok += row_ok[r]
    return loss * scale, d, ok


@_jit
def mse_kernel(pred, target, scale):
    """``(sum((pred - target)**2) * scale, 2 * scale * (pred - target))`` of flat arrays."""
    n = pred.shape[0]
    d = np.empty_like(pred)
    two = 2.0 * scale
    nb = (n + 4095) // 4096
    part = np.zeros(nb, np.float64)
    for b in prange(nb):
        s = 0.0
        for i in range(b * 4096, min(n, (b + 1) * 4096)):
            diff = pred[i] - target[i]
            s += diff * diff
            d[i] = diff * two
        part[b] = s
    return part.sum() * scale, d
