"""2-D convolution kernels (NCHW, cross-correlation like PyTorch, zero padding).

NumPy float32/float64 inputs run Numba-compiled kernels (see
:mod:`rapydli.kernels._dispatch`; ``RAPYDLI_KERNELS=numpy`` turns them off):
direct convolution loops when the reduction per output (``C*kh*kw``) or the
number of filters is small, else im2col built by Numba plus one BLAS matmul.
CuPy inputs run the CUDA window kernels of :mod:`rapydli.kernels._cuda` around
cuBLAS GEMMs. The reference implementations (``*_reference``: im2col as a
strided view and one ``tensordot`` per direction) serve every other case.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rapydli.errors import ShapeError
from rapydli.kernels._windows import col2im, im2col, out_size, pad_hw, pair
from rapydli.kernels._dispatch import contiguous, fast, gpu
from rapydli.kernels.backend import get_array_module

__all__ = [
    "conv2d_backward",
    "conv2d_backward_reference",
    "conv2d_forward",
    "conv2d_forward_reference",
]

Array = Any


def _check(x: Array, w: Array, stride: Any, padding: Any) -> tuple[tuple[int, int], ...]:
    """Validate shapes; return ``(k, s, p)`` as pairs."""
    if w.ndim != 4 or x.ndim != 4 or x.shape[1] != w.shape[1]:
        raise ShapeError(
            f"conv2d expects x (N, C, H, W) and w (O, C, kh, kw) with the same C; "
            f"got x {tuple(x.shape)} and w {tuple(w.shape)}"
        )
    k = (int(w.shape[2]), int(w.shape[3]))
    s, p = pair(stride, "stride"), pair(padding, "padding", minimum=0)
    out_size(x.shape, k, s, p)
    return k, s, p


def conv2d_forward_reference(
    x: Array, w: Array, b: Array | None,
    stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
) -> Array:
    """NumPy/CuPy reference of :func:`conv2d_forward`."""
    xp = get_array_module(x)
    k, s, p = _check(x, w, stride, padding)
    cols = im2col(pad_hw(x, p), k, s)  # (N, C, Ho, Wo, kh, kw)
    y = xp.tensordot(cols, w, axes=([1, 4, 5], [1, 2, 3]))  # (N, Ho, Wo, O)
    if b is not None:
        y = y + b
    y = xp.ascontiguousarray(y.transpose(0, 3, 1, 2))  # (N, O, Ho, Wo)
    return y.astype(x.dtype, copy=False)


def conv2d_forward(
    x: Array, w: Array, b: Array | None,
    stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
) -> Array:
    """2-D convolution (cross-correlation) of an NCHW batch.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    w : array, shape (O, C, kh, kw)
    b : array, shape (O,) or None
    stride, padding : int or pair of int
        ``Ho = (H + 2*ph - kh) // sh + 1`` (floor), likewise ``Wo``.

    Returns
    -------
    array, shape (N, O, Ho, Wo), in ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> x, w = np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3))
    >>> conv2d_forward(x, w, None, stride=2, padding=1).shape
    (1, 3, 3, 3)
    """
    k, s, p = _check(x, w, stride, padding)
    if b is not None and tuple(b.shape) != (w.shape[0],):
        return conv2d_forward_reference(x, w, b, stride, padding)
    cu = gpu(x, w, b)
    if cu is not None:
        return cu.conv2d_forward(x, w, b, k, s, p, *out_size(x.shape, k, s, p))  # (N, O, Ho, Wo)
    nb = fast(x, w, b)
    if nb is None:
        return conv2d_forward_reference(x, w, b, stride, padding)
    ho, wo = out_size(x.shape, k, s, p)
    xpad = contiguous(pad_hw(x, p))  # (N, C, H+2ph, W+2pw)
    w = contiguous(w)
    bias = contiguous(b) if b is not None else np.empty(0, x.dtype)
    if _algo(x.shape[1], w.shape[0], k, s, w.size) == "gemm":
        cols = nb.im2col(xpad, k[0], k[1], s[0], s[1], ho, wo)  # (C*kh*kw, N*Ho*Wo)
        yt = w.reshape(w.shape[0], -1) @ cols  # (O, N*Ho*Wo)
        return nb.onp_to_nop_bias(yt, bias, x.shape[0], ho, wo)  # (N, O, Ho, Wo)
    if s == (1, 1):
        return nb.conv_forward_s1(xpad, w, bias, ho, wo)  # (N, O, Ho, Wo)
    return nb.conv_forward_direct(xpad, w, bias, s[0], s[1], ho, wo)  # (N, O, Ho, Wo)


def conv2d_backward_reference(
    x: Array, w: Array, dy: Array,
    stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
    need_dx: bool = True, need_dw: bool = True,
) -> tuple[Array | None, Array | None, Array | None]:
    """NumPy/CuPy reference of :func:`conv2d_backward`."""
    xp = get_array_module(x)
    k, s, p = _check(x, w, stride, padding)
    xpad = pad_hw(x, p)  # (N, C, H+2ph, W+2pw)
    cols = im2col(xpad, k, s)  # (N, C, Ho, Wo, kh, kw)
    _check_dy(x, w, dy, cols.shape[2:4])
    dw = db = dx = None
    if need_dw:
        dw = xp.tensordot(dy, cols, axes=([0, 2, 3], [0, 2, 3])).astype(w.dtype, copy=False)  # (O, C, kh, kw)
        db = dy.sum(axis=(0, 2, 3))  # (O,)
    if need_dx:
        dcols = xp.tensordot(dy, w, axes=([1], [0]))  # (N, Ho, Wo, C, kh, kw)
        dcols = dcols.transpose(0, 3, 1, 2, 4, 5)  # (N, C, Ho, Wo, kh, kw)
        dxpad = col2im(dcols, xpad.shape, s)  # (N, C, H+2ph, W+2pw)
        dx = dxpad[:, :, p[0] : p[0] + x.shape[2], p[1] : p[1] + x.shape[3]]  # (N, C, H, W)
        dx = xp.ascontiguousarray(dx).astype(x.dtype, copy=False)
    return dx, dw, db


def conv2d_backward(
    x: Array, w: Array, dy: Array,
    stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
    need_dx: bool = True, need_dw: bool = True,
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of :func:`conv2d_forward`.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    w : array, shape (O, C, kh, kw)
    dy : array, shape (N, O, Ho, Wo)
    stride, padding : int or pair of int
        As in the forward call.
    need_dx : bool, default True
        When False, ``dx`` is None (first layer of a network).
    need_dw : bool, default True
        When False, ``dw`` and ``db`` are None (the input gradient alone, see
        :meth:`rapydli.layers.Conv2D.backward_input`).

    Returns
    -------
    dx : array, shape (N, C, H, W) or None
        Zero on rows/columns no window covers.
    dw : array, shape (O, C, kh, kw), or None
    db : array, shape (O,), or None

    Examples
    --------
    >>> import numpy as np
    >>> x, w = np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3))
    >>> dx, dw, db = conv2d_backward(x, w, np.ones((1, 3, 2, 2)), stride=2)
    >>> dx.shape, dw.shape, db.shape
    ((1, 2, 5, 5), (3, 2, 3, 3), (3,))
    """
    k, s, p = _check(x, w, stride, padding)
    ho, wo = out_size(x.shape, k, s, p)
    _check_dy(x, w, dy, (ho, wo))
    cu = gpu(x, w, dy)
    if cu is not None:
        return cu.conv2d_backward(x, w, dy, k, s, p, need_dx, need_dw)
    nb = fast(x, w, dy)
    if nb is None:
        return conv2d_backward_reference(x, w, dy, stride, padding, need_dx, need_dw)
    n, c, h, wd = x.shape
    xpad = contiguous(pad_hw(x, p))  # (N, C, H+2ph, W+2pw)
    w, dy = contiguous(w), contiguous(dy)
    dx = dw = db = None
    algo = _algo(c, w.shape[0], k, s, w.size)
    if s == (1, 1) and algo == "direct":
        if need_dw:
            dw, db = nb.conv_dw_s1(xpad, dy, k[0], k[1])  # (O, C, kh, kw), (O,)
        if need_dx:
            dx = nb.conv_dx_s1(dy, w, xpad.shape[2], xpad.shape[3])  # (N, C, H+2ph, W+2pw)
    elif algo == "gemm":
        dyt = nb.nop_to_onp(dy) if need_dw or (need_dx and s != (1, 1)) else None  # (O, N*Ho*Wo)
        if need_dw:
            db = nb.bias_sum(dy)  # (O,)
            cols = nb.im2col(xpad, k[0], k[1], s[0], s[1], ho, wo)  # (C*kh*kw, N*Ho*Wo)
            dw = (dyt @ cols.T).reshape(w.shape)  # (O, C, kh, kw)
        if need_dx and s == (1, 1):
            dx = nb.conv_dx_s1(dy, w, xpad.shape[2], xpad.shape[3])  # (N, C, H+2ph, W+2pw)
        elif need_dx:
            dcols = w.reshape(w.shape[0], -1).T @ dyt  # (C*kh*kw, N*Ho*Wo)
            dx = nb.col2im(dcols, n, c, xpad.shape[2], xpad.shape[3], k[0], k[1], s[0], s[1], ho, wo)
    else:
        if need_dw:
            db = nb.bias_sum(dy)  # (O,)
            dw = nb.conv_dw_direct(xpad, dy, k[0], k[1], s[0], s[1])  # (O, C, kh, kw)
        if need_dx and s == (1, 1):
            dx = nb.conv_dx_s1(dy, w, xpad.shape[2], xpad.shape[3])  # (N, C, H+2ph, W+2pw)
        elif need_dx:
            dx = nb.conv_dx_direct(dy, w, s[0], s[1], xpad.shape[2], xpad.shape[3])
    if dx is not None and p != (0, 0):
        dx = np.ascontiguousarray(dx[:, :, p[0] : p[0] + h, p[1] : p[1] + wd])  # (N, C, H, W)
    return dx, dw, db


#: largest weight (O*C*kh*kw) whose stride-1 convolution skips im2col + GEMM: the forward pass
#: runs ``conv_forward_s1`` and the gradient ``conv_dw_s1`` (direct products, no window matrix);
#: LeNet-5's conv2 has 2,400 (forward 1.0 ms direct against 1.3-2.5 ms im2col + GEMM, batch 256)
_DIRECT_S1_MAX = 4096

#: override of the algorithm choice ("direct" or "gemm"), for benchmarks and tests; None: automatic
FORCE_ALGO: str | None = None


def _algo(c: int, o: int, k: tuple[int, int], s: tuple[int, int], w_size: int) -> str:
    """``'direct'`` or ``'gemm'`` (im2col + BLAS) for the compiled path, forward and backward,
    by shape: direct for few inputs per window or few outputs, and for small stride-1 weights
    (:data:`_DIRECT_S1_MAX`)."""
    if FORCE_ALGO is not None:
        return FORCE_ALGO
    small = c * k[0] * k[1] <= 32 or o <= 4 or (s == (1, 1) and w_size <= _DIRECT_S1_MAX)
    return "direct" if small else "gemm"


def _check_dy(x: Array, w: Array, dy: Array, hw: tuple[int, int]) -> None:
    expected = (x.shape[0], w.shape[0]) + tuple(hw)
    if tuple(dy.shape) != expected:
        raise ShapeError(f"dy has shape {tuple(dy.shape)}; expected {expected}")
