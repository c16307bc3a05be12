"""One shared gradient checker (central differences, float64) for kernels, layers and networks.

``check_grad`` compares analytic gradients with finite differences along a few
random directions (cheap, covers every coordinate at once) and at a handful of
individual coordinates (localises an error). ``numerical_grad`` gives the full
finite-difference gradient of small arrays.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["check_grad", "numerical_grad"]

ScalarFn = Callable[..., float]
_N_COORDS = 5  #: individual coordinates checked per argument (besides the largest gradient)


def _as64(args: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Copy ``args``; the checked ones become float64 (finite differences need it)."""
    out = dict(args)
    for name in names:
        out[name] = np.array(args[name], dtype=np.float64)
    return out


def _call(f: ScalarFn, args: dict) -> float:
    """``float(f(**args))``, asserting that ``f`` left its array arguments unchanged."""
    before = {n: a.copy() for n, a in args.items() if isinstance(a, np.ndarray)}
    value = float(f(**args))
    for n, a in before.items():
        assert np.array_equal(a, args[n], equal_nan=True), f"f modified argument {n!r} in place"
    return value


def _central(f: ScalarFn, args: dict, name: str, d: np.ndarray, eps: float) -> tuple[float, float]:
    """``(f(x + eps d) - f(x - eps d)) / (2 eps)`` and the rounding-noise floor of that quotient."""
    x = args[name]
    f_plus = _call(f, {**args, name: x + eps * d})
    f_minus = _call(f, {**args, name: x - eps * d})
    noise = 16 * np.finfo(np.float64).eps * max(abs(f_plus), abs(f_minus), 1.0) / (2 * eps)
    return (f_plus - f_minus) / (2 * eps), noise


def numerical_grad(
    f: ScalarFn, args: Mapping[str, np.ndarray], name: str, eps: float = 1e-6
) -> np.ndarray:
    """Full central-difference gradient of scalar ``f(**args)`` with respect to ``args[name]``.

    One pair of evaluations per element: use for small arrays only.

    Examples
    --------
    >>> g = numerical_grad(lambda x: float((x ** 2).sum()), {"x": np.array([1.0, -2.0])}, "x")
    >>> np.round(g, 6)
    array([ 2., -4.])
    """
    full = _as64(args, [name])
    grad = np.zeros_like(full[name])  # same shape as the argument
    for i in np.ndindex(grad.shape):
        d = np.zeros_like(grad)
        d[i] = 1.0
        grad[i] = _central(f, full, name, d, eps)[0]
    return grad


def _compare(what: str, num: float, ana: float, noise: float, rtol: float, atol: float) -> None:
    tol = atol + rtol * max(abs(num), abs(ana)) + noise
    if not abs(num - ana) <= tol:  # also catches NaN
        raise AssertionError(
            f"gradient mismatch for {what}: analytic {ana!r}, numerical {num!r}, "
            f"difference {abs(num - ana):.3e} > tolerance {tol:.3e}"
        )


def _coords(g: np.ndarray, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """A few random coordinates plus the one with the largest analytic gradient."""
    picks = rng.choice(g.size, size=min(_N_COORDS, g.size), replace=False)
    flat = {int(np.argmax(np.abs(g))), *map(int, picks)}
    return [np.unravel_index(i, g.shape) for i in sorted(flat)]


def check_grad(
    f: ScalarFn,
    args: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    *,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    n_dirs: int = 3,
    seed: int = 0,
) -> None:
    """Assert that ``grads`` are the gradients of scalar ``f(**args)``.

    For each name in ``grads``: ``n_dirs`` random directions ``d`` compare
    ``(f(x + eps d) - f(x - eps d)) / (2 eps)`` with ``sum(grad * d)``; then a
    few coordinates are compared one by one. Arithmetic is float64. The
    tolerance is ``atol + rtol * max(|num|, |ana|)`` plus the rounding noise of
    the difference quotient (``~eps_machine * |f| / eps``). Also asserts that
    ``f`` did not modify ``args`` in place.

    Raises
    ------
    AssertionError
        On a shape mismatch, a gradient mismatch or a mutated argument.

    Examples
    --------
    >>> f = lambda x, y: float((x * y).sum())
    >>> x, y = np.array([1.0, 2.0]), np.array([3.0, -1.0])
    >>> check_grad(f, {"x": x, "y": y}, {"x": y, "y": x})
    """
    names = list(grads)
    missing = [n for n in names if n not in args]
    assert not missing, f"grads names {missing} are not arguments of f; arguments: {list(args)}"
    full = _as64(args, names)
    rng = np.random.default_rng(seed)
    for name in names:
        g = np.asarray(grads[name], dtype=np.float64)
        assert g.shape == full[name].shape, (
            f"gradient of {name!r} has shape {g.shape}; expected {full[name].shape}")
        for k in range(n_dirs):
            d = rng.standard_normal(g.shape)  # same shape as the argument
            num, noise = _central(f, full, name, d, eps)
            _compare(f"{name!r} along random direction {k}", num, float((g * d).sum()),
                     noise, rtol, atol)
        for idx in _coords(g, rng):
            d = np.zeros_like(g)
            d[idx] = 1.0
            num, noise = _central(f, full, name, d, eps)
            _compare(f"{name!r} at index {tuple(map(int, idx))}", num, float(g[idx]),
                     noise, rtol, atol)
