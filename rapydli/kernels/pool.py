"""2-D max and average pooling kernels (NCHW, no padding, floor mode).

NumPy float32/float64 inputs run Numba-compiled loops, CuPy inputs the CUDA
kernels of :mod:`rapydli.kernels._cuda` (see :mod:`rapydli.kernels._dispatch`;
``RAPYDLI_KERNELS=numpy`` turns both off); the ``*_reference`` functions are the
NumPy/CuPy implementations.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rapydli.errors import ShapeError
from rapydli.kernels._windows import col2im, im2col, out_size, pair
from rapydli.kernels._dispatch import contiguous, fast, gpu
from rapydli.kernels.backend import get_array_module

__all__ = [
    "avgpool2d_backward",
    "avgpool2d_backward_reference",
    "avgpool2d_forward",
    "avgpool2d_forward_reference",
    "maxpool2d_backward",
    "maxpool2d_backward_reference",
    "maxpool2d_forward",
    "maxpool2d_forward_reference",
]

Array = Any


def _pairs(size: Any, stride: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    return pair(size, "size"), pair(stride, "stride")


def _check_dy(dy: Array, x_shape: tuple[int, ...], ho: int, wo: int) -> None:
    expected = tuple(x_shape[:2]) + (ho, wo)
    if tuple(dy.shape) != expected:
        raise ShapeError(f"dy has shape {tuple(dy.shape)}; expected {expected}")


def maxpool2d_forward(x: Array, size: int | tuple[int, int], stride: int | tuple[int, int]) -> Array:
    """Max over each ``size`` window, windows ``stride`` apart.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    size, stride : int or pair of int

    Returns
    -------
    array, shape (N, C, (H - kh) // sh + 1, (W - kw) // sw + 1)

    Examples
    --------
    >>> import numpy as np
    >>> maxpool2d_forward(np.arange(16.0).reshape(1, 1, 4, 4), 2, 2)[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    """
    k, s = _pairs(size, stride)
    ho, wo = out_size(x.shape, k, s)
    cu = gpu(x)
    if cu is not None:
        return cu.maxpool2d_forward(x, k, s, ho, wo)  # (N, C, Ho, Wo)
    nb = fast(x)
    if nb is None:
        return maxpool2d_forward_reference(x, size, stride)
    return nb.maxpool_forward(contiguous(x), k[0], k[1], s[0], s[1], ho, wo)  # (N, C, Ho, Wo)


def maxpool2d_forward_reference(
    x: Array, size: int | tuple[int, int], stride: int | tuple[int, int]
) -> Array:
    """NumPy/CuPy reference of :func:`maxpool2d_forward`."""
    k, s = _pairs(size, stride)
    out_size(x.shape, k, s)
    return im2col(x, k, s).max(axis=(4, 5))  # (N, C, Ho, Wo)


def maxpool2d_backward(
    x: Array, y: Array, dy: Array, size: int | tuple[int, int], stride: int | tuple[int, int]
) -> Array:
    """Route ``dy`` to the maximum of each window of ``x``.

    On ties the first maximum in row-major window order gets the gradient;
    overlapping windows accumulate. ``y`` (the forward output) is accepted
    for interface symmetry and is not needed.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    y, dy : array, shape (N, C, Ho, Wo)
    size, stride : int or pair of int

    Returns
    -------
    array, shape (N, C, H, W), in ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> maxpool2d_backward(x, None, np.ones((1, 1, 2, 2)), 2, 2)[0, 0, 1]
    array([0., 1., 0., 1.])
    """
    k, s = _pairs(size, stride)
    ho, wo = out_size(x.shape, k, s)
    _check_dy(dy, x.shape, ho, wo)
    cu = gpu(x, dy)
    if cu is not None:
        return cu.maxpool2d_backward(x, dy, k, s)  # (N, C, H, W)
    nb = fast(x, dy)
    if nb is None:
        return maxpool2d_backward_reference(x, y, dy, size, stride)
    return nb.maxpool_backward(contiguous(x), contiguous(dy), k[0], k[1], s[0], s[1])  # (N, C, H, W)


def maxpool2d_backward_reference(
    x: Array, y: Array, dy: Array, size: int | tuple[int, int], stride: int | tuple[int, int]
) -> Array:
    """NumPy/CuPy reference of :func:`maxpool2d_backward`."""
    xp = get_array_module(x)
    k, s = _pairs(size, stride)
    ho, wo = out_size(x.shape, k, s)
    _check_dy(dy, x.shape, ho, wo)
    cols = im2col(x, k, s)  # (N, C, Ho, Wo, kh, kw)
    first = cols.reshape(cols.shape[:4] + (k[0] * k[1],)).argmax(axis=-1)  # (N, C, Ho, Wo)
    rows = xp.arange(ho).reshape(ho, 1) * s[0] + first // k[1]  # (N, C, Ho, Wo)
    cols_ = xp.arange(wo) * s[1] + first % k[1]  # (N, C, Ho, Wo)
    n, c, h, w = x.shape
    plane = xp.arange(n * c).reshape(n, c, 1, 1) * (h * w)  # (N, C, 1, 1)
    flat = (plane + rows * w + cols_).ravel()  # (N*C*Ho*Wo,)
    dx = xp.bincount(flat, weights=dy.ravel(), minlength=n * c * h * w)  # (N*C*H*W,)
    return dx.reshape(x.shape).astype(x.dtype, copy=False)  # (N, C, H, W)


def avgpool2d_forward(x: Array, size: int | tuple[int, int], stride: int | tuple[int, int]) -> Array:
    """Mean over each ``size`` window, windows ``stride`` apart.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    size, stride : int or pair of int

    Returns
    -------
    array, shape (N, C, (H - kh) // sh + 1, (W - kw) // sw + 1), in ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> avgpool2d_forward(np.arange(16.0).reshape(1, 1, 4, 4), 2, 2)[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    k, s = _pairs(size, stride)
    ho, wo = out_size(x.shape, k, s)
    cu = gpu(x)
    if cu is not None:
        return cu.avgpool2d_forward(x, k, s, ho, wo)  # (N, C, Ho, Wo)
    nb = fast(x)
    if nb is None:
        return avgpool2d_forward_reference(x, size, stride)
    return nb.avgpool_forward(contiguous(x), k[0], k[1], s[0], s[1], ho, wo)  # (N, C, Ho, Wo)


def avgpool2d_forward_reference(
    x: Array, size: int | tuple[int, int], stride: int | tuple[int, int]
) -> Array:
    """NumPy/CuPy reference of :func:`avgpool2d_forward`."""
    k, s = _pairs(size, stride)
    out_size(x.shape, k, s)
    return im2col(x, k, s).mean(axis=(4, 5)).astype(x.dtype, copy=False)  # (N, C, Ho, Wo)


def avgpool2d_backward(
    x_shape: tuple[int, ...], dy: Array, size: int | tuple[int, int],
    stride: int | tuple[int, int], dtype: Any,
) -> Array:
    """Spread ``dy`` evenly over each window; overlapping windows accumulate.

    Parameters
    ----------
    x_shape : tuple of int
        Forward input shape ``(N, C, H, W)``.
    dy : array, shape (N, C, Ho, Wo)
    size, stride : int or pair of int
    dtype : dtype
        dtype of the returned gradient.

    Returns
    -------
    array, shape ``x_shape``; zero where no window covers the input.

    Examples
    --------
    >>> import numpy as np
    >>> avgpool2d_backward((1, 1, 2, 3), np.ones((1, 1, 1, 1)), 2, 2, np.float64)[0, 0]
    array([[0.25, 0.25, 0.  ],
           [0.25, 0.25, 0.  ]])
    """
    k, s = _pairs(size, stride)
    x_shape = tuple(int(d) for d in x_shape)
    _check_dy(dy, x_shape, *out_size(x_shape, k, s))
    cu = gpu(dy) if np.dtype(dtype) == dy.dtype else None
    if cu is not None:
        return cu.avgpool2d_backward(x_shape, dy, k, s, dy.dtype)  # (N, C, H, W)
    dt = np.dtype(dtype) if isinstance(dy, np.ndarray) else None
    nb = fast(dy) if dt == dy.dtype else None
    if nb is None:
        return avgpool2d_backward_reference(x_shape, dy, size, stride, dtype)
    out = np.zeros(x_shape, dtype=dt)  # (N, C, H, W)
    return nb.avgpool_backward(contiguous(dy), x_shape[2], x_shape[3], k[0], k[1], s[0], s[1], out)


def avgpool2d_backward_reference(
    x_shape: tuple[int, ...], dy: Array, size: int | tuple[int, int],
    stride: int | tuple[int, int], dtype: Any,
) -> Array:
    """NumPy/CuPy reference of :func:`avgpool2d_backward`."""
    xp = get_array_module(dy)
    k, s = _pairs(size, stride)
    x_shape = tuple(int(d) for d in x_shape)
    _check_dy(dy, x_shape, *out_size(x_shape, k, s))
    share = (dy / (k[0] * k[1])).astype(dtype, copy=False)  # (N, C, Ho, Wo)
    cols = xp.broadcast_to(share[..., None, None], share.shape + k)  # (N, C, Ho, Wo, kh, kw)
    return col2im(cols, x_shape, s)  # (N, C, H, W)
