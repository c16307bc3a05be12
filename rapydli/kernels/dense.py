"""Fully connected (dense) layer kernels, PyTorch/ONNX weight layout ``(O, I)``."""
from __future__ import annotations

from typing import Any

import numpy as np

from rapydli.kernels.backend import get_array_module, output_array

__all__ = ["dense_backward", "dense_backward_input", "dense_backward_params", "dense_forward"]

Array = Any


def dense_forward(x: Array, w: Array, b: Array | None) -> Array:
    """Affine map ``y = x @ w.T + b``.

    Parameters
    ----------
    x : array, shape (N, I)
        Input batch.
    w : array, shape (O, I)
        Weights (PyTorch/ONNX layout).
    b : array, shape (O,) or None
        Bias; ``None`` for no bias.

    Returns
    -------
    array, shape (N, O)
        Output, in ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> dense_forward(np.ones((2, 3)), np.ones((4, 3)), np.zeros(4)).shape
    (2, 4)
    """
    xp = get_array_module(x)
    y = xp.matmul(x, w.T)  # (N, O), a fresh array: the bias is added in place
    if b is not None:
        if y.dtype == b.dtype and b.ndim == 1:
            y += b
        else:
            y = y + b
    return y.astype(x.dtype, copy=False)


def dense_backward(
    x: Array, w: Array, dy: Array, need_dx: bool = True
) -> tuple[Array | None, Array, Array]:
    """Gradients of :func:`dense_forward`.

    Parameters
    ----------
    x : array, shape (N, I)
        Forward input.
    w : array, shape (O, I)
        Forward weights.
    dy : array, shape (N, O)
        Gradient of the loss with respect to the output.
    need_dx : bool, default True
        When False, ``dx`` is not computed and returned as None.

    Returns
    -------
    dx : array, shape (N, I) or None
    dw : array, shape (O, I)
    db : array, shape (O,)

    Examples
    --------
    >>> import numpy as np
    >>> dx, dw, db = dense_backward(np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 4)))
    >>> dx.shape, dw.shape, db.shape
    ((2, 3), (4, 3), (4,))
    """
    dx = dense_backward_input(dy, w, x.dtype) if need_dx else None
    dw, db = dense_backward_params(x, dy, w.dtype)
    return dx, dw, db


def dense_backward_input(dy: Array, w: Array, dtype) -> Array:
    """The input gradient ``dx = dy @ w``, shape (N, I), in ``dtype``: the part of
    :func:`dense_backward` that the layers below wait for."""
    return get_array_module(dy).matmul(dy, w).astype(dtype, copy=False)


def dense_backward_params(x: Array, dy: Array, dtype) -> tuple[Array, Array]:
    """The parameter gradients ``(dw, db)`` of :func:`dense_backward`, ``dw`` in ``dtype``:
    the part that only the weights' update waits for."""
    xp = get_array_module(x)
    out = None
    if xp is np and x.dtype == dy.dtype == np.dtype(dtype):  # where the caller wants it
        out = output_array((dy.shape[1], x.shape[1]), dtype)
    if out is None:
        dw = xp.matmul(dy.T, x).astype(dtype, copy=False)  # (O, I)
    else:
        dw = np.matmul(dy.T, x, out=out)
    db = dy.sum(axis=0).astype(dy.dtype, copy=False)  # (O,)
    return dw, db
