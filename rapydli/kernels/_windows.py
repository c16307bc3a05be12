"""Private helpers shared by the convolution and pooling kernels (NCHW).

``im2col`` is a strided *view* (no copy); ``col2im`` scatters window
gradients back onto the input grid, looping only over the ``kh * kw`` kernel
offsets (every step is vectorised over batch, channels and output positions).
"""
from __future__ import annotations

from typing import Any

from rapydli.errors import ConfigError, ShapeError
from rapydli.kernels.backend import get_array_module

Array = Any


def pair(value: int | tuple[int, int] | list[int], name: str, minimum: int = 1) -> tuple[int, int]:
    """Normalise an int or a pair of ints to ``(a, b)``, checking ``>= minimum``.

    Examples
    --------
    >>> pair(2, "stride"), pair((3, 1), "size")
    ((2, 2), (3, 1))
    """
    items = (value, value) if isinstance(value, int) else tuple(value)
    if len(items) != 2 or not all(isinstance(v, int) for v in items):
        raise ConfigError(f"{name} must be an int or a pair of ints; got {value!r}")
    if min(items) < minimum:
        raise ConfigError(f"{name} must be >= {minimum}; got {value!r}")
    return int(items[0]), int(items[1])


def out_size(x_shape: tuple[int, ...], k: tuple[int, int], s: tuple[int, int],
             p: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Output ``(Ho, Wo)`` of a window op in floor mode, raising ShapeError if empty."""
    if len(x_shape) != 4:
        raise ShapeError(f"expected a 4-D NCHW input; got shape {tuple(x_shape)}")
    h, w = x_shape[2] + 2 * p[0], x_shape[3] + 2 * p[1]
    if h < k[0] or w < k[1]:
        raise ShapeError(
            f"window {k} larger than the padded input {(h, w)} (input shape {tuple(x_shape)}, "
            f"padding {p}); use a smaller kernel or more padding"
        )
    return (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1


def pad_hw(x: Array, p: tuple[int, int]) -> Array:
    """Zero-pad the two spatial axes of an NCHW array (returns ``x`` when ``p == (0, 0)``)."""
    if p == (0, 0):
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))  # (N, C, H+2ph, W+2pw)


def im2col(x: Array, k: tuple[int, int], s: tuple[int, int]) -> Array:
    """Read-only strided view of all windows, shape ``(N, C, Ho, Wo, kh, kw)``."""
    xp = get_array_module(x)
    win = xp.lib.stride_tricks.sliding_window_view(x, k, axis=(2, 3))  # (N, C, H-kh+1, W-kw+1, kh, kw)
    return win[:, :, :: s[0], :: s[1]]  # (N, C, Ho, Wo, kh, kw)


def col2im(cols: Array, shape: tuple[int, ...], s: tuple[int, int]) -> Array:
    """Sum window values ``cols`` (N, C, Ho, Wo, kh, kw) back onto a zero grid of ``shape``.

    Positions not covered by any window (floor mode) stay zero; overlapping
    windows accumulate.
    """
    xp = get_array_module(cols)
    _, _, ho, wo, kh, kw = cols.shape
    out = xp.zeros(shape, dtype=cols.dtype)  # (N, C, H, W)
    for i in range(kh):  # loop over kernel offsets only, never over samples
        for j in range(kw):
            out[:, :, i : i + s[0] * ho : s[0], j : j + s[1] * wo : s[1]] += cols[..., i, j]
    return out
