"""CUDA kernels (Numba) for the window ops of the GPU path (private).

CuPy gives the library calls (cuBLAS GEMMs, element-wise arithmetic, reductions); the ops with
no library call are written here with ``numba.cuda``: the window matrix of a convolution
(``im2col``) and its transpose (``col2im``), max and average pooling forward and backward,
and the SGD step fused into one pass (CuPy's arithmetic would take several, with temporaries).
A convolution is then ``im2col`` + one GEMM forward, two GEMMs + ``col2im`` backward.

Conventions: one thread per *output* element, grid-stride loops; gradients are gathered by
the input element that receives them (no atomics), so results are deterministic. Arrays are
CuPy arrays on the current device (kernels run on CuPy's current stream, no extra
synchronisation), or NumPy arrays, copied to the device with only the outputs copied back
(read-only inputs are fine) — the path CI's tests take under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), where the grid is kept small because every simulated thread is
a Python thread. Float32 data is computed in float32 (scalars are passed in the data's dtype).
Kernels are compiled once per signature and cached on disk (``cache=True``). Inputs are
validated by the public wrappers in :mod:`rapydli.kernels.conv`, :mod:`rapydli.kernels.pool`
and :mod:`rapydli.kernels.optim`; :func:`probe` runs a tiny kernel once before the GPU path
is trusted.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from numba import config as _numba_config
from numba import cuda
from numba.core.errors import NumbaPerformanceWarning

from rapydli.kernels.backend import get_array_module, is_cupy

__all__ = [
    "avgpool2d_backward",
    "avgpool2d_forward",
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "im2col",
    "maxpool2d_backward",
    "maxpool2d_forward",
    "sgd_update",
    "sgd_update_",
    "probe",
    "simulated",
]

Array = Any

#: threads per block
THREADS = 256
#: most blocks per launch (grid-stride loops cover the rest); a few under the simulator
_MAX_BLOCKS = 65535


# a small tensor is a small grid: low occupancy is expected there, not a mistake to warn about
warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU under-utili",
                        category=NumbaPerformanceWarning)


def simulated() -> bool:
    """Whether ``numba.cuda`` is the CPU simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(_numba_config.ENABLE_CUDASIM)


def _zero(a: Array):
    """A zero scalar of ``a``'s dtype: the accumulator's start, so it keeps that dtype."""
    return np.dtype(a.dtype).type(0)


def _area(a: Array, k: tuple[int, int]):
    """The window area ``kh*kw`` as a scalar of ``a``'s dtype: float32 data divides in float32."""
    return np.dtype(a.dtype).type(k[0] * k[1])


def _launch(kernel, total: int, *args, out: tuple[int, ...] = ()) -> None:
    """Run ``kernel`` over ``total`` outputs; ``out`` names the positions of the arrays it writes.

    CuPy arrays are used in place, on CuPy's current stream. NumPy arrays are copied to the
    device (a contiguous copy first where they are strided) and only those at ``out`` are copied
    back, so read-only or strided inputs are never written to.
    """
    if total == 0:
        return
    blocks = min((total + THREADS - 1) // THREADS, 2 if simulated() else _MAX_BLOCKS)
    threads = 32 if simulated() else THREADS
    if any(is_cupy(a) for a in args):
        import cupy

        stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
        # same stream as CuPy's kernels: ordered after them without waiting on the host
        args = tuple(cuda.as_cuda_array(a, sync=False) if is_cupy(a) else a for a in args)
        kernel[blocks, threads, stream](*args)
        return
    dev = [cuda.to_device(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
           for a in args]
    kernel[blocks, threads](*dev)
    for i in out:  # arrays this module allocated (or the caller's C-contiguous w, v): writable
        dev[i].copy_to_host(args[i])


@cuda.jit
def _probe_kernel(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = i + 1


def probe() -> None:
    """Compile and run a tiny kernel: raises where the driver, the toolkit or the compiler cannot
    (a device can be visible while its driver is too old for the compiler's PTX)."""
    a = cuda.device_array(4, np.int32)
    _probe_kernel[1, 32](a)
    got = a.copy_to_host().tolist()
    if got != [1, 2, 3, 4]:
        raise RuntimeError(f"a probe kernel wrote {got} instead of [1, 2, 3, 4]")


# ------------------------------------------------------------------ shared device functions
@cuda.jit(device=True)
def _unravel(idx, c_, h, w):
    """``(n, c, row, col)`` of flat index ``idx`` in a C-contiguous (N, c_, h, w) array."""
    col = idx % w
    idx //= w
    row = idx % h
    idx //= h
    return idx // c_, idx % c_, row, col


@cuda.jit(device=True)
def _source(pos, tap, stride, size):
    """The output index whose window puts tap ``tap`` on input ``pos`` (one axis), or -1."""
    d = pos - tap
    if d < 0 or d % stride != 0 or d // stride >= size:
        return -1
    return d // stride


# ------------------------------------------------------------------ convolution windows
@cuda.jit(cache=True)
def _im2col_kernel(x, cols, kh, kw, sh, sw, ho, wo):
    width = cols.shape[1]  # (C*kh*kw, N*Ho*Wo)
    start = cuda.grid(1)
    for idx in range(start, cols.size, cuda.gridsize(1)):
        row = idx // width
        c, ij = row // (kh * kw), row % (kh * kw)
        n, _, r, t = _unravel(idx - row * width, 1, ho, wo)
        cols[row, idx - row * width] = x[n, c, r * sh + ij // kw, t * sw + ij % kw]


@cuda.jit(cache=True)
def _col2im_kernel(dcols, dx, kh, kw, sh, sw, ho, wo, zero):
    c_, h, wd = dx.shape[1:]
    start = cuda.grid(1)
    for idx in range(start, dx.size, cuda.gridsize(1)):
        n, c, y, xx = _unravel(idx, c_, h, wd)
        acc = zero
        for i in range(kh):
            r = _source(y, i, sh, ho)
            if r < 0:
                continue
            for j in range(kw):
                t = _source(xx, j, sw, wo)
                if t >= 0:
                    acc += dcols[(c * kh + i) * kw + j, (n * ho + r) * wo + t]
        dx[n, c, y, xx] = acc


def im2col(xpad: Array, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int) -> Array:
    """Windows of ``xpad`` (N, C, H, W) as a ``(C*kh*kw, N*Ho*Wo)`` matrix (rows c, i, j)."""
    xp = get_array_module(xpad)
    n_, c_ = xpad.shape[:2]
    cols = xp.empty((c_ * kh * kw, n_ * ho * wo), xpad.dtype)
    _launch(_im2col_kernel, cols.size, xpad, cols, kh, kw, sh, sw, ho, wo, out=(1,))
    return cols


def col2im(dcols: Array, shape: tuple[int, int, int, int], kh: int, kw: int, sh: int, sw: int,
           ho: int, wo: int) -> Array:
    """Sum window gradients ``(C*kh*kw, N*Ho*Wo)`` onto a zero grid of ``shape`` (N, C, H, W)."""
    xp = get_array_module(dcols)
    dx = xp.empty(shape, dcols.dtype)
    _launch(_col2im_kernel, dx.size, dcols, dx, kh, kw, sh, sw, ho, wo, _zero(dx), out=(1,))
    return dx


def _pad(x: Array, p: tuple[int, int]) -> Array:
    if p == (0, 0):
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))  # (N, C, H+2ph, W+2pw)


def conv2d_forward(x: Array, w: Array, b: Array | None, k: tuple[int, int], s: tuple[int, int],
                   p: tuple[int, int], ho: int, wo: int) -> Array:
    """``im2col`` + one GEMM; returns (N, O, Ho, Wo)."""
    xp = get_array_module(x)
    xpad = xp.ascontiguousarray(_pad(x, p))  # (N, C, H+2ph, W+2pw)
    cols = im2col(xpad, k[0], k[1], s[0], s[1], ho, wo)  # (C*kh*kw, N*Ho*Wo)
    o_ = w.shape[0]
    yt = w.reshape(o_, -1) @ cols  # (O, N*Ho*Wo)
    y = yt.reshape(o_, x.shape[0], ho, wo).transpose(1, 0, 2, 3)  # (N, O, Ho, Wo) view
    if b is not None:
        y = y + b.reshape(1, o_, 1, 1)
    return xp.ascontiguousarray(y)


def conv2d_backward(x: Array, w: Array, dy: Array, k: tuple[int, int], s: tuple[int, int],
                    p: tuple[int, int], need_dx: bool, need_dw: bool = True
                    ) -> tuple[Array | None, Array | None, Array | None]:
    """Two GEMMs and ``col2im``; returns ``(dx or None, dw or None, db or None)``."""
    xp = get_array_module(x)
    h, wd = x.shape[2:]
    o_, ho, wo = dy.shape[1:]
    xpad = xp.ascontiguousarray(_pad(x, p))  # (N, C, H+2ph, W+2pw)
    dyt = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(o_, -1)  # (O, N*Ho*Wo)
    dx = dw = db = None
    if need_dw:
        cols = im2col(xpad, k[0], k[1], s[0], s[1], ho, wo)  # (C*kh*kw, N*Ho*Wo)
        dw = (dyt @ cols.T).reshape(w.shape)  # (O, C, kh, kw)
        db = dyt.sum(axis=1)  # (O,)
    if need_dx:
        dcols = w.reshape(o_, -1).T @ dyt  # (C*kh*kw, N*Ho*Wo)
        dxpad = col2im(dcols, xpad.shape, k[0], k[1], s[0], s[1], ho, wo)  # (N, C, Hp, Wp)
        dx = dxpad if p == (0, 0) else xp.ascontiguousarray(
            dxpad[:, :, p[0]:p[0] + h, p[1]:p[1] + wd])  # (N, C, H, W)
    return dx, dw, db


# ------------------------------------------------------------------ pooling
@cuda.jit(cache=True)
def _maxpool_kernel(x, y, arg, kh, kw, sh, sw):
    c_, ho, wo = y.shape[1:]
    start = cuda.grid(1)
    for idx in range(start, y.size, cuda.gridsize(1)):
        n, c, r, t = _unravel(idx, c_, ho, wo)
        best = x[n, c, r * sh, t * sw]
        where = 0
        for i in range(kh):
            for j in range(kw):
                v = x[n, c, r * sh + i, t * sw + j]
                if v > best or (v != v and best == best):  # first maximum; first NaN wins
                    best = v
                    where = i * kw + j
        y[n, c, r, t] = best
        arg[n, c, r, t] = where


@cuda.jit(cache=True)
def _avgpool_kernel(x, y, kh, kw, sh, sw, area):
    c_, ho, wo = y.shape[1:]
    start = cuda.grid(1)
    for idx in range(start, y.size, cuda.gridsize(1)):
        n, c, r, t = _unravel(idx, c_, ho, wo)
        acc = area - area  # zero of the data's dtype
        for i in range(kh):
            for j in range(kw):
                acc += x[n, c, r * sh + i, t * sw + j]
        y[n, c, r, t] = acc / area


@cuda.jit(cache=True)
def _pool_back_kernel(arg, dy, dx, kh, kw, sh, sw, area, average):
    """Gather each input's gradient: from every window (average) or the windows it is the max of."""
    c_, h, wd = dx.shape[1:]
    ho, wo = dy.shape[2], dy.shape[3]
    start = cuda.grid(1)
    for idx in range(start, dx.size, cuda.gridsize(1)):
        n, c, y, xx = _unravel(idx, c_, h, wd)
        acc = area - area  # zero of the data's dtype
        for i in range(kh):
            r = _source(y, i, sh, ho)
            if r < 0:
                continue
            for j in range(kw):
                t = _source(xx, j, sw, wo)
                if t >= 0 and (average or arg[n, c, r, t] == i * kw + j):
                    acc += dy[n, c, r, t]
        dx[n, c, y, xx] = acc / area if average else acc


def maxpool2d_forward(x: Array, k: tuple[int, int], s: tuple[int, int], ho: int, wo: int) -> Array:
    """Window maxima (N, C, Ho, Wo); NaN propagates."""
    y, _ = _maxpool(x, k, s, ho, wo)
    return y


def _maxpool(x: Array, k, s, ho: int, wo: int) -> tuple[Array, Array]:
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    y = xp.empty(x.shape[:2] + (ho, wo), x.dtype)  # (N, C, Ho, Wo)
    arg = xp.empty(y.shape, np.int32)  # window offset i*kw + j of each maximum
    _launch(_maxpool_kernel, y.size, x, y, arg, k[0], k[1], s[0], s[1], out=(1, 2))
    return y, arg


def maxpool2d_backward(x: Array, dy: Array, k: tuple[int, int], s: tuple[int, int]) -> Array:
    """Route ``dy`` to the first maximum (row-major) of each window; returns (N, C, H, W)."""
    xp = get_array_module(x)
    _, arg = _maxpool(x, k, s, dy.shape[2], dy.shape[3])
    dx = xp.empty(x.shape, x.dtype)
    dy = xp.ascontiguousarray(dy).astype(x.dtype, copy=False)
    _launch(_pool_back_kernel, dx.size, arg, dy, dx, k[0], k[1], s[0], s[1], _area(dx, k), False,
            out=(2,))
    return dx


def avgpool2d_forward(x: Array, k: tuple[int, int], s: tuple[int, int], ho: int, wo: int) -> Array:
    """Window means (N, C, Ho, Wo)."""
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    y = xp.empty(x.shape[:2] + (ho, wo), x.dtype)
    _launch(_avgpool_kernel, y.size, x, y, k[0], k[1], s[0], s[1], _area(y, k), out=(1,))
    return y


def avgpool2d_backward(x_shape: tuple[int, ...], dy: Array, k: tuple[int, int], s: tuple[int, int],
                       dtype: Any) -> Array:
    """``dy / (kh*kw)`` spread over each window; zero where no window covers the input."""
    xp = get_array_module(dy)
    dy = xp.ascontiguousarray(dy).astype(dtype, copy=False)
    dx = xp.empty(tuple(x_shape), dy.dtype)
    no_arg = xp.zeros((1, 1, 1, 1), np.int32)  # read only by max pooling
    _launch(_pool_back_kernel, dx.size, no_arg, dy, dx, k[0], k[1], s[0], s[1], _area(dx, k), True,
            out=(2,))
    return dx


# ------------------------------------------------------------------ optimiser
@cuda.jit(cache=True)
def _sgd_kernel(w, g, v, lr, momentum, weight_decay, nesterov):
    start = cuda.grid(1)
    for i in range(start, w.size, cuda.gridsize(1)):
        g2 = g[i] + weight_decay * w[i] if weight_decay != 0.0 else g[i]
        if momentum != 0.0:
            v[i] = momentum * v[i] + g2  # rounded to v's dtype here, as on the CPU
            step = g2 + momentum * v[i] if nesterov else v[i]
        else:
            step = g2
        w[i] = w[i] - lr * step


def sgd_update_(w: Array, g: Array, v: Array | None, lr: float, momentum: float,
                weight_decay: float, nesterov: bool) -> tuple[Array, Array | None]:
    """One SGD step written into the C-contiguous ``w`` and ``v`` (zeros on the first step)."""
    xp = get_array_module(w)
    # without momentum v is never read; a separate dummy, since NumPy arguments are copied to
    # the device and back one by one (an alias of w would be written back over it)
    flat_v = xp.empty(1, w.dtype) if v is None else v.reshape(-1)
    scalar = np.dtype(w.dtype).type  # float32 weights step in float32, as NumPy's reference does
    _launch(_sgd_kernel, w.size, w.reshape(-1), xp.ascontiguousarray(g).reshape(-1), flat_v,
            scalar(lr), scalar(momentum), scalar(weight_decay), bool(nesterov), out=(0, 2))
    return w, v


def sgd_update(w: Array, g: Array, v: Array | None, lr: float, momentum: float,
               weight_decay: float, nesterov: bool) -> tuple[Array, Array | None]:
    """The step of :func:`sgd_update_` into new arrays; ``v`` None reads as zeros."""
    xp = get_array_module(w)
    w_new = xp.array(w, order="C", copy=True)
    v_new = None
    if momentum:
        v_new = xp.zeros_like(w_new) if v is None else xp.array(v, dtype=w.dtype, order="C", copy=True)
    return sgd_update_(w_new, g, v_new, lr, momentum, weight_decay, nesterov)
