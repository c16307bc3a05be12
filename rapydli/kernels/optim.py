"""Optimiser update kernels (pure: they return new weights and state).

NumPy float32/float64 inputs run one fused Numba pass, CuPy inputs one fused CUDA pass (see
:mod:`rapydli.kernels._dispatch`; ``RAPYDLI_KERNELS=numpy`` turns both off);
:func:`sgd_update_reference` is the NumPy/CuPy implementation.
"""
from __future__ import annotations

from typing import Any

from rapydli.errors import ShapeError
from rapydli.kernels._dispatch import contiguous, fast, gpu
from rapydli.kernels.backend import get_array_module

__all__ = ["sgd_update", "sgd_update_", "sgd_update_reference"]

Array = Any


def _check_gradient(w: Array, g: Array) -> None:
    if tuple(g.shape) != tuple(w.shape):
        raise ShapeError(f"gradient shape {tuple(g.shape)} differs from weight shape "
                         f"{tuple(w.shape)}")


def sgd_update(
    w: Array, g: Array, v: Array | None, lr: float, momentum: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False,
) -> tuple[Array, Array | None]:
    """One SGD step with PyTorch semantics (no dampening).

    ``g2 = g + weight_decay * w``; ``v_new = momentum * v + g2``;
    ``step = g2 + momentum * v_new`` if ``nesterov`` else ``v_new``;
    ``w_new = w - lr * step``.

    Parameters
    ----------
    w, g : array, same shape
        Weights and their gradient.
    v : array or None
        Momentum buffer; None is read as zeros (first step). May be None when
        ``momentum == 0``.
    lr, momentum, weight_decay : float
    nesterov : bool

    Returns
    -------
    w_new : array, in ``w``'s dtype
    v_new : array or None
        None when ``momentum == 0``.

    Examples
    --------
    >>> import numpy as np
    >>> w, v = sgd_update(np.array([1.0]), np.array([0.5]), None, lr=0.1, momentum=0.9)
    >>> w, v
    (array([0.95]), array([0.5]))
    """
    _check_gradient(w, g)
    same = v is None or tuple(v.shape) == tuple(w.shape)
    cu = gpu(w, g, v) if same else None
    if cu is not None:
        return cu.sgd_update(w, g, v, lr, momentum, weight_decay, nesterov)
    nb = fast(w, g, v) if same else None
    if nb is None:
        return sgd_update_reference(w, g, v, lr, momentum, weight_decay, nesterov)
    flat_w = contiguous(w).reshape(-1)
    flat_v = flat_w if v is None else contiguous(v).reshape(-1)
    w_new, v_new = nb.sgd_kernel(flat_w, contiguous(g).reshape(-1), flat_v, v is not None, float(lr),
                                 float(momentum), float(weight_decay), bool(nesterov))
    return w_new.reshape(w.shape), (v_new.reshape(w.shape) if momentum else None)


def sgd_update_(
    w: Array, g: Array, v: Array | None, lr: float, momentum: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False, g_add: Array | None = None,
) -> tuple[Array, Array | None]:
    """:func:`sgd_update` written into ``w`` and ``v`` (the caller owns them); returns them.

    The one kernel that writes into its inputs: the engine uses it for weights it owns and
    that no op reads after their update (``TileGraph.validate`` checks that). ``v`` None
    with momentum gets a new buffer. ``g_add``: a second gradient; the step is that of
    ``g + g_add`` (a sum of two workers' gradients), with the same bits as summing first,
    but the Numba kernel adds them as it reads them instead of writing the sum out.

    >>> import numpy as np
    >>> w = np.array([1.0]); w2, v = sgd_update_(w, np.array([0.5]), None, 0.1, 0.9)
    >>> w2 is w, w, v
    (True, array([0.95]), array([0.5]))
    """
    _check_gradient(w, g)  # before any kernel reads g by w's size
    if g_add is not None:
        _check_gradient(w, g_add)
    if v is not None and tuple(v.shape) != tuple(w.shape):
        raise ShapeError(f"momentum buffer shape {tuple(v.shape)} differs from weight shape "
                         f"{tuple(w.shape)}")
    if momentum and v is None:
        v = get_array_module(w).zeros_like(w)
    owned = w.flags.c_contiguous and (v is None or v.flags.c_contiguous)
    cu = gpu(w, g, v) if owned else None
    nb = fast(w, g, v, g_add) if owned and cu is None else None
    if nb is None and g_add is not None:
        g, g_add = g + g_add, None
    if cu is not None:
        return cu.sgd_update_(w, g, v, lr, momentum, weight_decay, nesterov)
    if nb is None:
        new_w, new_v = sgd_update_reference(w, g, v, lr, momentum, weight_decay, nesterov)
        w[...] = new_w
        if momentum:
            v[...] = new_v
        return w, v
    flat_v = w.reshape(-1) if v is None else v.reshape(-1)
    flat_g = contiguous(g).reshape(-1)
    add = g_add is not None
    nb.sgd_kernel_inplace(w.reshape(-1), flat_g, contiguous(g_add).reshape(-1) if add else flat_g,
                          add, flat_v, float(lr), float(momentum), float(weight_decay),
                          bool(nesterov))
    return w, v


def sgd_update_reference(
    w: Array, g: Array, v: Array | None, lr: float, momentum: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False,
) -> tuple[Array, Array | None]:
    """NumPy/CuPy reference of :func:`sgd_update`."""
    xp = get_array_module(w)
    _check_gradient(w, g)
    g2 = g + weight_decay * w if weight_decay else g
    if momentum:
        v_new = g2 if v is None else momentum * v + g2
        v_new = xp.array(v_new, dtype=w.dtype, copy=True)
        step = g2 + momentum * v_new if nesterov else v_new
    else:
        v_new, step = None, g2
    w_new = (w - lr * step).astype(w.dtype, copy=False)
    return w_new, v_new
