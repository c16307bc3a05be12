"""Loss kernels: each returns ``(loss, dpred, n_correct)`` for one (micro-)batch.

``scale`` lets the caller turn the batch sum into a mean over the global batch
(``scale = 1 / global_batch``) so that partial losses from tiles simply add.

NumPy float32/float64 inputs run one fused Numba pass (see
:mod:`rapydli.kernels._dispatch`; ``RAPYDLI_KERNELS=numpy`` turns it off); the
``*_reference`` functions are the NumPy/CuPy implementations.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rapydli.errors import DataError, ShapeError
from rapydli.kernels._dispatch import contiguous, fast
from rapydli.kernels.backend import get_array_module

__all__ = [
    "LOSSES",
    "mse",
    "mse_reference",
    "softmax_cross_entropy",
    "softmax_cross_entropy_reference",
]

Array = Any

LOSSES: tuple[str, ...] = ("softmax_cross_entropy", "mse")


def softmax_cross_entropy(logits: Array, labels: Array, scale: float) -> tuple[float, Array, int]:
    """Softmax cross-entropy with integer labels, computed stably (log-sum-exp).

    Parameters
    ----------
    logits : array, shape (N, K), float
    labels : array, shape (N,), int in ``[0, K)``
    scale : float
        Multiplies both the loss and its gradient.

    Returns
    -------
    loss : float
        ``scale * sum_i -log softmax(logits_i)[labels_i]``.
    dlogits : array, shape (N, K), in ``logits``' dtype
        ``scale * (softmax(logits) - onehot(labels))``.
    n_correct : int
        Number of rows whose argmax equals the label.

    Examples
    --------
    >>> import numpy as np
    >>> loss, d, n = softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]), 0.5)
    >>> round(loss, 6), n
    (1.386294, 1)
    """
    _check_ce(logits, labels)
    nb = fast(logits)
    if nb is None or not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        return softmax_cross_entropy_reference(logits, labels, scale)
    labels = labels if labels.dtype == np.int64 else labels.astype(np.int64)
    loss, dlogits, n_correct = nb.softmax_ce_kernel(contiguous(logits), contiguous(labels), float(scale))
    return float(loss), dlogits, int(n_correct)


def _check_ce(logits: Array, labels: Array) -> None:
    if logits.ndim != 2 or tuple(labels.shape) != (logits.shape[0],):
        raise ShapeError(f"expected logits (N, K) and labels (N,); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    n, k = logits.shape
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise DataError(f"labels must lie in [0, {k}); got range "
                        f"[{int(labels.min())}, {int(labels.max())}]")


def softmax_cross_entropy_reference(logits: Array, labels: Array, scale: float) -> tuple[float, Array, int]:
    """NumPy/CuPy reference of :func:`softmax_cross_entropy`."""
    xp = get_array_module(logits)
    _check_ce(logits, labels)
    n = logits.shape[0]
    rows = xp.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)  # (N, K), max is 0
    lse = xp.log(xp.exp(z).sum(axis=1, keepdims=True))  # (N, 1)
    logp = z - lse  # (N, K)
    loss = -float(logp[rows, labels].sum(dtype=xp.float64)) * scale
    grad = xp.exp(logp)  # (N, K), softmax
    grad[rows, labels] -= 1
    dlogits = (grad * scale).astype(logits.dtype, copy=False)
    n_correct = int((logits.argmax(axis=1) == labels).sum())
    return loss, dlogits, n_correct


def mse(pred: Array, target: Array, scale: float) -> tuple[float, Array, int]:
    """Scaled sum of squared errors.

    Parameters
    ----------
    pred, target : array, same shape
    scale : float

    Returns
    -------
    loss : float
        ``scale * sum((pred - target) ** 2)``.
    dpred : array, in ``pred``'s dtype
        ``2 * scale * (pred - target)``.
    n_correct : int
        For 2-D ``pred`` with more than one column, the number of rows where
        ``argmax(pred) == argmax(target)``; otherwise 0.

    Examples
    --------
    >>> import numpy as np
    >>> mse(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]), 1.0)[0]
    1.0
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ShapeError(f"pred and target shapes differ: {tuple(pred.shape)} vs "
                         f"{tuple(target.shape)}")
    nb = fast(pred, target)
    if nb is None:
        return mse_reference(pred, target, scale)
    loss, dpred = nb.mse_kernel(contiguous(pred).reshape(-1), contiguous(target).reshape(-1), float(scale))
    n_correct = 0
    if pred.ndim == 2 and pred.shape[1] > 1:
        n_correct = int((pred.argmax(axis=1) == target.argmax(axis=1)).sum())
    return float(loss), dpred.reshape(pred.shape), n_correct


def mse_reference(pred: Array, target: Array, scale: float) -> tuple[float, Array, int]:
    """NumPy/CuPy reference of :func:`mse`."""
    xp = get_array_module(pred)
    if tuple(pred.shape) != tuple(target.shape):
        raise ShapeError(f"pred and target shapes differ: {tuple(pred.shape)} vs "
                         f"{tuple(target.shape)}")
    diff = pred - target
    loss = float((diff * diff).sum(dtype=xp.float64)) * scale
    dpred = (diff * (2 * scale)).astype(pred.dtype, copy=False)
    n_correct = 0
    if pred.ndim == 2 and pred.shape[1] > 1:
        n_correct = int((pred.argmax(axis=1) == target.argmax(axis=1)).sum())
    return loss, dpred, n_correct
