"""Kernels of locally connected networks: untied-weight convolution, L2 pooling and local
contrast normalisation (NCHW, no padding: an input arrives with the halo it needs).

Locally connected weights are *position-major*: ``weight (Ho, Wo, F, C, kh, kw)`` and
``bias (Ho, Wo, F)``, so the filter bank of one output position is one contiguous
``(F, C*kh*kw)`` block that the kernels stream once per batch, and the weights of output rows
``[r0, r1)`` are the slice ``weight[r0:r1]``. :func:`locally_connected_backward_update` applies
SGD position by position in place and never holds more than one position's gradient.

NumPy float32/float64 inputs run Numba-compiled loops (see :mod:`rapydli.kernels._dispatch`;
``RAPYDLI_KERNELS=numpy`` turns them off); the ``*_reference`` functions are the NumPy/CuPy
implementations. The compiled loops are plain functions of this module (``_nb_*``), compiled
on first use, so ``import rapydli`` never loads Numba. Every kernel except
:func:`locally_connected_backward_update` returns new arrays and leaves its inputs unchanged.

Examples
--------
>>> import numpy as np
>>> x, w = np.ones((1, 2, 4, 4)), np.ones((2, 2, 3, 2, 3, 3))  # out 2x2, 3 filters
>>> locally_connected_forward(x, w, None).shape
(1, 3, 2, 2)
"""
from __future__ import annotations

import math
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np

from rapydli.errors import ConfigError, ShapeError
from rapydli.kernels._dispatch import contiguous, fast
from rapydli.kernels._windows import col2im, im2col, out_size, pair
from rapydli.kernels.backend import get_array_module

__all__ = [
    "CONTRAST_FLOOR",
    "L2POOL_EPS",
    "gaussian_window",
    "l2pool2d_backward",
    "l2pool2d_backward_reference",
    "l2pool2d_forward",
    "l2pool2d_forward_reference",
    "local_contrast_norm_backward",
    "local_contrast_norm_backward_reference",
    "local_contrast_norm_forward",
    "local_contrast_norm_forward_reference",
    "locally_connected_backward",
    "locally_connected_backward_reference",
    "locally_connected_backward_update",
    "locally_connected_backward_update_reference",
    "locally_connected_forward",
    "locally_connected_forward_reference",
]

Array = Any

#: added to the sum of squares of an L2-pooling window: keeps ``x / y`` finite where x is 0
L2POOL_EPS = 1e-12
#: default constant ``c`` of local contrast normalisation, ``y = v / sqrt(c**2 + sigma**2)``
CONTRAST_FLOOR = 0.1


# ======================================================================= locally connected


def _lc_check(x: Array, w: Array, stride: Any, bias: Array | None = None
              ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate shapes; return ``(kernel, stride)`` as pairs."""
    if x.ndim != 4 or w.ndim != 6 or x.shape[1] != w.shape[3]:
        raise ShapeError(
            "locally connected kernels expect x (N, C, H, W) and weight (Ho, Wo, F, C, kh, kw) "
            f"with the same C; got x {tuple(x.shape)} and weight {tuple(w.shape)}")
    k, s = (int(w.shape[4]), int(w.shape[5])), pair(stride, "stride")
    if out_size(x.shape, k, s) != tuple(w.shape[:2]):
        raise ShapeError(
            f"weight {tuple(w.shape)} has {tuple(w.shape[:2])} output positions; x "
            f"{tuple(x.shape)} with kernel {k} and stride {s} gives {out_size(x.shape, k, s)}")
    if bias is not None and tuple(bias.shape) != tuple(w.shape[:3]):
        raise ShapeError(f"bias has shape {tuple(bias.shape)}; expected (Ho, Wo, F) = "
                         f"{tuple(w.shape[:3])}")
    return k, s


def _lc_check_dz(x: Array, w: Array, dz: Array) -> None:
    expected = (x.shape[0], w.shape[2], *w.shape[:2])  # (N, F, Ho, Wo)
    if tuple(dz.shape) != expected:
        raise ShapeError(f"dz has shape {tuple(dz.shape)}; expected {expected}")


def locally_connected_forward(x: Array, weight: Array, bias: Array | None,
                              stride: int | tuple[int, int] = (1, 1)) -> Array:
    """``y[n, f, r, s] = bias[r, s, f] + sum_{c,i,j} weight[r, s, f, c, i, j] *
    x[n, c, r*sh + i, s*sw + j]``: a convolution without padding whose weights are untied.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    weight : array, shape (Ho, Wo, F, C, kh, kw)
    bias : array, shape (Ho, Wo, F), or None
    stride : int or pair of int; ``Ho = (H - kh) // sh + 1``, likewise ``Wo``

    Returns
    -------
    array, shape (N, F, Ho, Wo), in ``x``'s dtype.
    """
    k, s = _lc_check(x, weight, stride, bias)
    nb = _compiled(x, weight, bias)
    if nb is None:
        return locally_connected_forward_reference(x, weight, bias, stride)
    w4 = contiguous(weight).reshape(*weight.shape[:3], -1)  # (Ho, Wo, F, C*kh*kw)
    b = contiguous(bias) if bias is not None else np.empty((0, 0, 0), x.dtype)
    return nb.lc_forward(contiguous(x), w4, b, k[0], k[1], s[0], s[1])  # (N, F, Ho, Wo)


def locally_connected_forward_reference(x: Array, weight: Array, bias: Array | None,
                                        stride: int | tuple[int, int] = (1, 1)) -> Array:
    """NumPy/CuPy reference of :func:`locally_connected_forward`."""
    xp = get_array_module(x)
    k, s = _lc_check(x, weight, stride, bias)
    cols = im2col(x, k, s)  # (N, C, Ho, Wo, kh, kw)
    y = xp.einsum("nchwij,hwfcij->nfhw", cols, weight)  # (N, F, Ho, Wo)
    if bias is not None:
        y = y + bias.transpose(2, 0, 1)  # (F, Ho, Wo) broadcast over the batch
    return xp.ascontiguousarray(y).astype(x.dtype, copy=False)


def locally_connected_backward(
    x: Array, weight: Array, dz: Array, stride: int | tuple[int, int] = (1, 1),
    need_dx: bool = True,
) -> tuple[Array | None, Array, Array]:
    """Gradients of :func:`locally_connected_forward` given ``dz = dL/dy``.

    Returns
    -------
    dx : array (N, C, H, W), zero where no window reads x; None unless ``need_dx``
    dweight : array (Ho, Wo, F, C, kh, kw)
    dbias : array (Ho, Wo, F)
    """
    k, s = _lc_check(x, weight, stride)
    _lc_check_dz(x, weight, dz)
    nb = _compiled(x, weight, dz)
    if nb is None:
        return locally_connected_backward_reference(x, weight, dz, stride, need_dx)
    dw = np.empty(weight.shape, x.dtype)  # (Ho, Wo, F, C, kh, kw)
    db = np.empty(weight.shape[:3], x.dtype)  # (Ho, Wo, F)
    dx = np.zeros(x.shape, x.dtype) if need_dx else np.empty((0, 0, 0, 0), x.dtype)
    _lc_backward_rows(nb, x, contiguous(weight), None, dz, dw, db, dx, k, s, 0.0, need_dx)
    return (dx if need_dx else None), dw, db


def locally_connected_backward_reference(
    x: Array, weight: Array, dz: Array, stride: int | tuple[int, int] = (1, 1),
    need_dx: bool = True,
) -> tuple[Array | None, Array, Array]:
    """NumPy/CuPy reference of :func:`locally_connected_backward`."""
    xp = get_array_module(x)
    k, s = _lc_check(x, weight, stride)
    _lc_check_dz(x, weight, dz)
    cols = im2col(x, k, s)  # (N, C, Ho, Wo, kh, kw)
    dw = xp.einsum("nfhw,nchwij->hwfcij", dz, cols).astype(x.dtype, copy=False)
    db = xp.ascontiguousarray(dz.sum(axis=0).transpose(1, 2, 0))  # (Ho, Wo, F)
    dx = None
    if need_dx:
        dcols = xp.einsum("nfhw,hwfcij->nchwij", dz, weight)  # (N, C, Ho, Wo, kh, kw)
        dx = col2im(dcols, tuple(x.shape), s).astype(x.dtype, copy=False)  # (N, C, H, W)
    return dx, dw, db


def locally_connected_backward_update(
    x: Array, weight: Array, bias: Array | None, dz: Array, lr: float, need_dx: bool,
    stride: int | tuple[int, int] = (1, 1),
) -> Array | None:
    """Backward and plain SGD step fused: ``dx`` from the OLD weights, then, position by
    position, ``weight -= lr * dweight`` and ``bias -= lr * dbias`` IN PLACE.

    The full ``dweight`` is never materialised (the compiled path holds one position's
    ``(C*kh*kw,)`` gradient row per thread; the reference, one output row), so a layer trains
    in about the memory of its weights. No momentum and no weight decay.

    Parameters
    ----------
    x : array (N, C, H, W)
    weight : array (Ho, Wo, F, C, kh, kw), updated in place
    bias : array (Ho, Wo, F) updated in place, or None
    dz : array (N, F, Ho, Wo), the gradient of the pre-activation output
    lr : float
    need_dx : bool
    stride : int or pair of int

    Returns
    -------
    dx : array (N, C, H, W), or None unless ``need_dx``.

    Examples
    --------
    >>> w, x = np.ones((1, 1, 1, 1, 2, 2)), np.ones((1, 1, 2, 2))
    >>> dx = locally_connected_backward_update(x, w, None, np.ones((1, 1, 1, 1)), 0.5, True)
    >>> dx[0, 0].tolist(), w.ravel().tolist()
    ([[1.0, 1.0], [1.0, 1.0]], [0.5, 0.5, 0.5, 0.5])
    """
    k, s = _lc_check(x, weight, stride, bias)
    _lc_check_dz(x, weight, dz)
    writable = isinstance(weight, np.ndarray) and weight.flags.c_contiguous and (
        bias is None or bias.flags.c_contiguous)
    nb = _compiled(x, weight, bias, dz) if writable else None
    if nb is None:
        return locally_connected_backward_update_reference(x, weight, bias, dz, lr, need_dx, s)
    dx = np.zeros(x.shape, x.dtype) if need_dx else np.empty((0, 0, 0, 0), x.dtype)
    no_dw, no_db = np.empty((0, 0, 0, 0), x.dtype), np.empty((0, 0, 0), x.dtype)
    _lc_backward_rows(nb, x, weight, bias, dz, no_dw, no_db, dx, k, s, lr, need_dx)
    return dx if need_dx else None


def locally_connected_backward_update_reference(
    x: Array, weight: Array, bias: Array | None, dz: Array, lr: float, need_dx: bool,
    stride: int | tuple[int, int] = (1, 1),
) -> Array | None:
    """NumPy/CuPy reference of :func:`locally_connected_backward_update`, one output row of
    weights at a time."""
    xp = get_array_module(x)
    k, s = _lc_check(x, weight, stride, bias)
    _lc_check_dz(x, weight, dz)
    cols = im2col(x, k, s)  # (N, C, Ho, Wo, kh, kw)
    dx = xp.zeros(x.shape, x.dtype) if need_dx else None
    wo = weight.shape[1]
    for r in range(weight.shape[0]):
        dz_r, cols_r = dz[:, :, r], cols[:, :, r]  # (N, F, Wo), (N, C, Wo, kh, kw)
        if need_dx:  # before this row's weights change
            dcols = xp.einsum("nfw,wfcij->ncwij", dz_r, weight[r])  # (N, C, Wo, kh, kw)
            for i in range(k[0]):
                for j in range(k[1]):
                    dx[:, :, r * s[0] + i, j:j + s[1] * wo:s[1]] += dcols[..., i, j]
        weight[r] -= lr * xp.einsum("nfw,ncwij->wfcij", dz_r, cols_r).astype(weight.dtype)
        if bias is not None:
            bias[r] -= lr * dz_r.sum(axis=0).T.astype(bias.dtype)  # (Wo, F)
    return dx


def _lc_backward_rows(nb, x, w, b, dz, dw, db, dx, k, s, lr, need_dx) -> None:
    """Run the compiled backward over all output rows, in phases of rows whose input windows
    do not overlap, so parallel rows never add into the same rows of ``dx``."""
    step = -(-k[0] // s[0]) if need_dx else 1
    w4 = w.reshape(*w.shape[:3], -1)  # (Ho, Wo, F, C*kh*kw), a view
    dw4 = dw.reshape(*dw.shape[:3], -1) if dw.size else dw
    b = b if b is not None else np.empty((0, 0, 0), x.dtype)
    update = dw.size == 0
    x, dz = contiguous(x), contiguous(dz)
    for r0 in range(step):
        nb.lc_backward_rows(x, w4, b, dz, dw4, db, dx, k[0], k[1], s[0], s[1],
                            x.dtype.type(lr), r0, step, update, need_dx)


# ======================================================================= L2 pooling


def l2pool2d_forward(x: Array, size: int | tuple[int, int], stride: int | tuple[int, int]
                     ) -> Array:
    """``y = sqrt(sum over the window of x**2 + L2POOL_EPS)``, windows ``stride`` apart.

    Returns an array (N, C, (H - kh) // sh + 1, (W - kw) // sw + 1) in ``x``'s dtype.

    >>> l2pool2d_forward(np.full((1, 1, 2, 2), 2.0), 2, 2).round(6).ravel().tolist()
    [4.0]
    """
    k, s = pair(size, "size"), pair(stride, "stride")
    ho, wo = out_size(x.shape, k, s)
    nb = _compiled(x)
    if nb is None:
        return l2pool2d_forward_reference(x, size, stride)
    return nb.l2pool_forward(contiguous(x), k[0], k[1], s[0], s[1], ho, wo, L2POOL_EPS)


def l2pool2d_forward_reference(x: Array, size: int | tuple[int, int],
                               stride: int | tuple[int, int]) -> Array:
    """NumPy/CuPy reference of :func:`l2pool2d_forward`."""
    xp = get_array_module(x)
    k, s = pair(size, "size"), pair(stride, "stride")
    out_size(x.shape, k, s)
    cols = im2col(x, k, s)  # (N, C, Ho, Wo, kh, kw)
    return xp.sqrt((cols * cols).sum(axis=(4, 5)) + L2POOL_EPS).astype(x.dtype, copy=False)


def l2pool2d_backward(x: Array, y: Array, dy: Array, size: int | tuple[int, int],
                      stride: int | tuple[int, int]) -> Array:
    """``dx = sum over the windows holding x of dy * x / y``; ``y`` is the forward output."""
    k, s = pair(size, "size"), pair(stride, "stride")
    ho, wo = out_size(x.shape, k, s)
    if tuple(dy.shape) != tuple(y.shape) or tuple(y.shape) != (*x.shape[:2], ho, wo):
        raise ShapeError(f"y {tuple(y.shape)} and dy {tuple(dy.shape)} must both have shape "
                         f"{(*x.shape[:2], ho, wo)}")
    nb = _compiled(x, y, dy)
    if nb is None:
        return l2pool2d_backward_reference(x, y, dy, size, stride)
    return nb.l2pool_backward(contiguous(x), contiguous(y), contiguous(dy), k[0], k[1], s[0], s[1])


def l2pool2d_backward_reference(x: Array, y: Array, dy: Array, size: int | tuple[int, int],
                                stride: int | tuple[int, int]) -> Array:
    """NumPy/CuPy reference of :func:`l2pool2d_backward`."""
    k, s = pair(size, "size"), pair(stride, "stride")
    cols = im2col(x, k, s)  # (N, C, Ho, Wo, kh, kw)
    dcols = (dy / y)[..., None, None] * cols  # (N, C, Ho, Wo, kh, kw)
    return col2im(dcols, tuple(x.shape), s).astype(x.dtype, copy=False)  # (N, C, H, W)


# ======================================================================= local contrast norm


def gaussian_window(size: int, sigma: float | None = None) -> np.ndarray:
    """The 1-D Gaussian of ``size`` taps (odd), ``sigma`` default ``size / 4``, summing to 1;
    the 2-D window is its outer product with itself.

    >>> gaussian_window(3, 1.0).round(4).tolist()
    [0.2741, 0.4519, 0.2741]
    """
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ConfigError(f"LocalContrastNorm: size must be an odd positive int; received {size!r}")
    sigma = size / 4 if sigma is None else float(sigma)
    taps = np.arange(size) - size // 2
    g = np.exp(-(taps * taps) / (2 * sigma * sigma))
    return g / g.sum()


def _lcn_check(x: Array, size: int) -> int:
    halo = 2 * (size // 2)
    if x.ndim != 4 or min(x.shape[2:]) <= 2 * halo:
        raise ShapeError(f"local contrast normalisation with size {size} needs an NCHW input "
                         f"with more than {2 * halo} rows and cols (a halo of {halo} each side); "
                         f"got shape {tuple(x.shape)}")
    return size // 2


def _window_reference(a: Array, g: np.ndarray) -> Array:
    """Valid 2-D correlation of ``a`` (N, H, W) with ``outer(g, g)``."""
    xp = get_array_module(a)
    g2 = xp.asarray(np.outer(g, g), dtype=a.dtype)  # (size, size)
    win = xp.lib.stride_tricks.sliding_window_view(a, g2.shape, axis=(1, 2))
    return xp.einsum("nhwij,ij->nhw", win, g2)  # (N, H-size+1, W-size+1)


def _window_t_reference(d: Array, g: np.ndarray) -> Array:
    """Transpose of :func:`_window_reference`: (N, h, w) -> (N, h+size-1, w+size-1)."""
    xp = get_array_module(d)
    n, h, w = d.shape
    out = xp.zeros((n, h + len(g) - 1, w + len(g) - 1), d.dtype)
    for i, gi in enumerate(g):
        for j, gj in enumerate(g):
            out[:, i:i + h, j:j + w] += d * d.dtype.type(gi * gj)
    return out


def _lcn_parts(x, g, c, window):
    """``(v, d)``: ``v = x - local mean`` on the input less ``size//2`` each side, and the
    divisor ``d = sqrt(c**2 + local variance)`` on the input less ``2*(size//2)`` each side."""
    p = len(g) // 2
    h, w = x.shape[2] - 2 * p, x.shape[3] - 2 * p
    m = window(x.mean(axis=1), g)  # (N, H-2p, W-2p); window and channels: weights sum to 1
    v = x[:, :, p:p + h, p:p + w] - m[:, None]  # (N, C, H-2p, W-2p)
    d = get_array_module(x).sqrt(c * c + window((v * v).mean(axis=1), g))  # (N, H-4p, W-4p)
    return v, d


def _lcn_forward(x, size, sigma, c, window):
    p = _lcn_check(x, size)
    v, d = _lcn_parts(x, gaussian_window(size, sigma), c, window)
    ho, wo = d.shape[1:]
    return (v[:, :, p:p + ho, p:p + wo] / d[:, None]).astype(x.dtype, copy=False)


def _lcn_backward(x, dy, size, sigma, c, window, window_t):
    p = _lcn_check(x, size)
    g = gaussian_window(size, sigma)
    v, d = _lcn_parts(x, g, c, window)
    n_c, (ho, wo) = x.shape[1], d.shape[1:]
    if tuple(dy.shape) != (*x.shape[:2], ho, wo):
        raise ShapeError(f"dy has shape {tuple(dy.shape)}; expected {(*x.shape[:2], ho, wo)}")
    inner = (slice(None), slice(None), slice(p, p + ho), slice(p, p + wo))
    dvar = -(dy * v[inner]).sum(axis=1) / (2 * d * d * d)  # (N, Ho, Wo): dL/d(local variance)
    dv = v * (2 / n_c * window_t(dvar, g))[:, None]  # (N, C, H-2p, W-2p)
    dv[inner] += dy / d[:, None]
    dmean = window_t(-dv.sum(axis=1), g) / n_c  # (N, H, W): through the local mean
    dx = get_array_module(x).zeros(x.shape, x.dtype) + dmean[:, None]  # (N, C, H, W)
    dx[:, :, p:p + v.shape[2], p:p + v.shape[3]] += dv
    return dx.astype(x.dtype, copy=False)


def local_contrast_norm_forward(x: Array, size: int = 9, sigma: float | None = None,
                                c: float = CONTRAST_FLOOR) -> Array:
    """Local contrast normalisation (Jarrett et al. 2009) with a fixed divisive constant.

    With ``G`` the ``size x size`` Gaussian (:func:`gaussian_window`) divided by the number of
    channels (so it sums to 1 over window and channels): ``v = x - sum_c G * x`` (the same
    local mean for every channel), ``y = v / sqrt(c**2 + sum_c G * v**2)``. Windows are
    *valid*: ``x`` (N, C, H, W) holds a halo of ``size // 2`` for each of the two passes, so
    ``y`` is (N, C, H - 4p, W - 4p) with ``p = size // 2``.

    >>> local_contrast_norm_forward(np.ones((1, 2, 9, 9)), 3).shape
    (1, 2, 5, 5)
    """
    nb = _compiled(x)
    if nb is None:
        return local_contrast_norm_forward_reference(x, size, sigma, c)
    return _lcn_forward(x, size, sigma, c, _separable(nb, x.dtype))


def local_contrast_norm_forward_reference(x: Array, size: int = 9, sigma: float | None = None,
                                          c: float = CONTRAST_FLOOR) -> Array:
    """NumPy/CuPy reference of :func:`local_contrast_norm_forward` (2-D windows)."""
    return _lcn_forward(x, size, sigma, c, _window_reference)


def local_contrast_norm_backward(x: Array, dy: Array, size: int = 9, sigma: float | None = None,
                                 c: float = CONTRAST_FLOOR) -> Array:
    """Gradient (N, C, H, W) of :func:`local_contrast_norm_forward` given ``dy``."""
    nb = _compiled(x, dy)
    if nb is None:
        return local_contrast_norm_backward_reference(x, dy, size, sigma, c)
    return _lcn_backward(x, dy, size, sigma, c, _separable(nb, x.dtype),
                         _separable(nb, x.dtype, transpose=True))


def local_contrast_norm_backward_reference(x: Array, dy: Array, size: int = 9,
                                           sigma: float | None = None,
                                           c: float = CONTRAST_FLOOR) -> Array:
    """NumPy/CuPy reference of :func:`local_contrast_norm_backward` (2-D windows)."""
    return _lcn_backward(x, dy, size, sigma, c, _window_reference, _window_t_reference)


def _separable(nb, dtype, transpose: bool = False):
    """The compiled separable Gaussian window (or its transpose) as ``window(a, g)``."""
    kernel = nb.gauss_window_t if transpose else nb.gauss_window
    return lambda a, g: kernel(contiguous(a), g.astype(dtype))


# ======================================================================= compiled loops
# Plain Python until :func:`_compiled` compiles them; ``prange`` is bound to ``numba.prange``
# first, so their outer loops run in parallel. Inputs are C-contiguous and of one dtype.

prange = range
_LOCK = threading.Lock()
_KERNELS = SimpleNamespace()  #: the compiled kernels by name without ``_nb_``, once built


def _compiled(*arrays: Array) -> SimpleNamespace | None:
    """The compiled kernels when ``arrays`` (None skipped) qualify for Numba, else None."""
    if fast(*arrays) is None:
        return None
    with _LOCK:
        if not vars(_KERNELS):
            import numba

            globals()["prange"] = numba.prange
            jit = numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
            for fn in (_nb_lc_forward, _nb_lc_backward_rows, _nb_l2pool_forward,
                       _nb_l2pool_backward, _nb_gauss_window, _nb_gauss_window_t):
                setattr(_KERNELS, fn.__name__.removeprefix("_nb_"), jit(fn))
    return _KERNELS


def _nb_lc_forward(x, w, b, kh, kw, sh, sw):
    """``x`` (N, C, H, W), ``w`` (Ho, Wo, F, K), ``b`` (Ho, Wo, F) or empty; rows in parallel."""
    n_, c_ = x.shape[0], x.shape[1]
    ho, wo, f_, k_ = w.shape
    y = np.empty((n_, f_, ho, wo), x.dtype)
    zero = x.dtype.type(0)
    for r in prange(ho):
        patch = np.empty((n_, k_), x.dtype)  # one window per sample
        for s in range(wo):
            for n in range(n_):
                k = 0
                for c in range(c_):
                    for i in range(kh):
                        for j in range(kw):
                            patch[n, k] = x[n, c, r * sh + i, s * sw + j]
                            k += 1
            for n in range(n_):
                for f in range(f_):
                    acc = b[r, s, f] if b.shape[0] > 0 else zero
                    for k in range(k_):
                        acc += w[r, s, f, k] * patch[n, k]
                    y[n, f, r, s] = acc
    return y


def _nb_lc_backward_rows(x, w, b, dz, dw, db, dx, kh, kw, sh, sw, lr, r0, step, update, need_dx):
    """Output rows ``r0, r0 + step, ...`` in parallel: adds into ``dx`` (old weights) when
    ``need_dx``; then writes ``dw``, ``db``, or with ``update`` subtracts ``lr`` times them
    from ``w`` and ``b`` (if not empty) position by position."""
    n_, c_ = x.shape[0], x.shape[1]
    ho, wo, f_, k_ = w.shape
    zero = x.dtype.type(0)
    for q in prange((ho - r0 + step - 1) // step):
        r = r0 + q * step
        patch = np.empty((n_, k_), x.dtype)
        grad = np.empty(k_, x.dtype)  # one filter's weight gradient at one position
        for s in range(wo):
            for n in range(n_):
                k = 0
                for c in range(c_):
                    for i in range(kh):
                        for j in range(kw):
                            patch[n, k] = x[n, c, r * sh + i, s * sw + j]
                            k += 1
            if need_dx:
                for n in range(n_):
                    for k in range(k_):
                        grad[k] = zero
                    for f in range(f_):
                        d = dz[n, f, r, s]
                        for k in range(k_):
                            grad[k] += d * w[r, s, f, k]
                    k = 0
                    for c in range(c_):
                        for i in range(kh):
                            for j in range(kw):
                                dx[n, c, r * sh + i, s * sw + j] += grad[k]
                                k += 1
            for f in range(f_):
                gb = zero
                for k in range(k_):
                    grad[k] = zero
                for n in range(n_):
                    d = dz[n, f, r, s]
                    gb += d
                    for k in range(k_):
                        grad[k] += d * patch[n, k]
                if update:
                    for k in range(k_):
                        w[r, s, f, k] -= lr * grad[k]
                    if b.shape[0] > 0:
                        b[r, s, f] -= lr * gb
                else:
                    for k in range(k_):
                        dw[r, s, f, k] = grad[k]
                    db[r, s, f] = gb


def _nb_l2pool_forward(x, kh, kw, sh, sw, ho, wo, eps):
    n_, c_ = x.shape[0], x.shape[1]
    y = np.empty((n_, c_, ho, wo), x.dtype)
    for idx in prange(n_ * c_):
        n, c = idx // c_, idx % c_
        for r in range(ho):
            for t in range(wo):
                acc = x.dtype.type(0)
                for i in range(kh):
                    for j in range(kw):
                        v = x[n, c, r * sh + i, t * sw + j]
                        acc += v * v
                y[n, c, r, t] = math.sqrt(acc + eps)
    return y


def _nb_l2pool_backward(x, y, dy, kh, kw, sh, sw):
    n_, c_ = x.shape[0], x.shape[1]
    ho, wo = y.shape[2], y.shape[3]
    dx = np.zeros(x.shape, x.dtype)
    for idx in prange(n_ * c_):
        n, c = idx // c_, idx % c_
        for r in range(ho):
            for t in range(wo):
                g = dy[n, c, r, t] / y[n, c, r, t]
                for i in range(kh):
                    for j in range(kw):
                        dx[n, c, r * sh + i, t * sw + j] += g * x[n, c, r * sh + i, t * sw + j]
    return dx


def _nb_gauss_window(a, g):
    """Valid correlation of ``a`` (N, H, W) with ``outer(g, g)``: a pass along rows, then
    along columns; samples in parallel."""
    n_, h, w = a.shape
    k = g.shape[0]
    ho, wo = h - k + 1, w - k + 1
    out = np.zeros((n_, ho, wo), a.dtype)
    for n in prange(n_):
        t = np.zeros((h, wo), a.dtype)
        for r in range(h):
            for j in range(k):
                for s in range(wo):
                    t[r, s] += g[j] * a[n, r, s + j]
        for r in range(ho):
            for i in range(k):
                for s in range(wo):
                    out[n, r, s] += g[i] * t[r + i, s]
    return out


def _nb_gauss_window_t(d, g):
    """Transpose of :func:`_nb_gauss_window`: (N, h, w) -> (N, h + k - 1, w + k - 1)."""
    n_, h, w = d.shape
    k = g.shape[0]
    out = np.zeros((n_, h + k - 1, w + k - 1), d.dtype)
    for n in prange(n_):
        t = np.zeros((h + k - 1, w), d.dtype)
        for r in range(h):
            for i in range(k):
                for s in range(w):
                    t[r + i, s] += g[i] * d[n, r, s]
        for r in range(h + k - 1):
            for j in range(k):
                for s in range(w):
                    out[n, r, s + j] += g[j] * t[r, s]
    return out
