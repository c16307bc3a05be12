"""Element-wise activation kernels; backward passes use the forward OUTPUT ``y``.

NumPy float32/float64 inputs run one fused Numba pass per call (see
:mod:`rapydli.kernels._dispatch`; ``RAPYDLI_KERNELS=numpy`` turns it off); the
``*_reference`` functions are the NumPy/CuPy implementations.
"""
from __future__ import annotations

from typing import Any

from rapydli.errors import ConfigError
from rapydli.kernels._dispatch import contiguous, fast
from rapydli.kernels.backend import get_array_module

__all__ = [
    "ACTIVATIONS",
    "activation_backward",
    "activation_backward_reference",
    "activation_forward",
    "activation_forward_reference",
]

Array = Any

ACTIVATIONS: tuple[str, ...] = ("relu", "sigmoid", "tanh")
_IDENTITY = (None, "linear")
_CODES = {"relu": 0, "sigmoid": 1, "tanh": 2}  # as in rapydli.kernels._numba


def _check_kind(kind: str | None) -> None:
    if kind not in ACTIVATIONS and kind not in _IDENTITY:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ConfigError(f"unknown activation {kind!r}; expected one of {names} or None")


def _sigmoid(x: Array) -> Array:
    """Overflow-free logistic function: only ever exponentiates ``-|x|``."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1], never overflows
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def activation_forward(kind: str | None, x: Array) -> Array:
    """Apply an activation.

    Parameters
    ----------
    kind : {'relu', 'sigmoid', 'tanh', 'linear', None}
        ``None`` and ``'linear'`` are the identity (a copy is returned).
    x : array
        Any shape.

    Returns
    -------
    array, same shape and dtype as ``x``.

    Raises
    ------
    ConfigError
        For an unknown ``kind``.

    Examples
    --------
    >>> import numpy as np
    >>> activation_forward("relu", np.array([-1.0, 2.0]))
    array([0., 2.])
    """
    _check_kind(kind)
    nb = fast(x) if kind in _CODES else None
    if nb is None:
        return activation_forward_reference(kind, x)
    if kind == "sigmoid" and x.dtype.char == "f":  # float32
        return nb.sigmoid_f32(contiguous(x).reshape(-1)).reshape(x.shape)
    return nb.act_forward(contiguous(x).reshape(-1), _CODES[kind]).reshape(x.shape)


def activation_forward_reference(kind: str | None, x: Array) -> Array:
    """NumPy/CuPy reference of :func:`activation_forward`."""
    _check_kind(kind)
    xp = get_array_module(x)
    if kind == "relu":
        y = xp.maximum(x, 0)
    elif kind == "sigmoid":
        y = _sigmoid(x)
    elif kind == "tanh":
        y = xp.tanh(x)
    else:
        y = x.copy()
    return y.astype(x.dtype, copy=False)


def activation_backward(kind: str | None, y: Array, dy: Array) -> Array:
    """Gradient of an activation, expressed through its output ``y``.

    Parameters
    ----------
    kind : {'relu', 'sigmoid', 'tanh', 'linear', None}
    y : array
        Forward output.
    dy : array
        Gradient of the loss with respect to ``y``.

    Returns
    -------
    array
        ``relu``: ``dy * (y > 0)``; ``sigmoid``: ``dy * y * (1 - y)``;
        ``tanh``: ``dy * (1 - y * y)``; identity: a copy of ``dy``.

    Examples
    --------
    >>> import numpy as np
    >>> activation_backward("tanh", np.array([0.0, 0.5]), np.array([1.0, 1.0]))
    array([1.  , 0.75])
    """
    _check_kind(kind)
    nb = fast(y, dy) if kind in _CODES and y.shape == dy.shape else None
    if nb is None:
        return activation_backward_reference(kind, y, dy)
    return nb.act_backward(contiguous(y).reshape(-1), contiguous(dy).reshape(-1),
                           _CODES[kind]).reshape(dy.shape)


def activation_backward_reference(kind: str | None, y: Array, dy: Array) -> Array:
    """NumPy/CuPy reference of :func:`activation_backward`."""
    _check_kind(kind)
    if kind == "relu":
        dx = dy * (y > 0)
    elif kind == "sigmoid":
        dx = dy * y * (1 - y)
    elif kind == "tanh":
        dx = dy * (1 - y * y)
    else:
        dx = dy.copy()
    return dx.astype(dy.dtype, copy=False)
