"""Array-module dispatch: the same kernel code runs on NumPy or CuPy arrays.

CuPy is optional; it is imported lazily and only when it is installed.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["available_backends", "get_array_module", "is_cupy"]


def _cupy() -> ModuleType | None:
    """Return the cupy module when it is importable, else None."""
    try:
        return importlib.import_module("cupy")
    except ImportError:  # not installed, or its CUDA libraries are missing
        return None


def is_cupy(x: Any) -> bool:
    """Whether ``x`` is a CuPy object (told by its type's module: CuPy is never imported)."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(x: Any) -> ModuleType:
    """Return the array module (``numpy`` or ``cupy``) that owns ``x``.

    Parameters
    ----------
    x : array_like
        A NumPy array, a CuPy array or anything NumPy accepts.

    Returns
    -------
    module
        ``cupy`` for CuPy arrays, ``numpy`` otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> get_array_module(np.zeros(3)).__name__
    'numpy'
    """
    if is_cupy(x):
        cp = _cupy()
        if cp is not None:
            return cp.get_array_module(x)
    return np


def available_backends() -> tuple[str, ...]:
    """Names of the array backends usable in this process.

    Returns
    -------
    tuple of str
        Always contains ``'numpy'``; contains ``'cupy'`` when CuPy imports and
        a CUDA device is available.

    Examples
    --------
    >>> 'numpy' in available_backends()
    True
    """
    names = ["numpy"]
    cp = _cupy()
    if cp is not None and cp.cuda.is_available():  # is_available() swallows driver errors
        names.append("cupy")
    return tuple(names)


#: per thread: where kernels that can write their large outputs into given memory get it
_outputs = threading.local()


@contextlib.contextmanager
def outputs_from(allocate):
    """Inside, kernels that support it take their large outputs from ``allocate(shape,
    dtype)``, an empty C-contiguous NumPy array or None (then they allocate as usual): the
    direct exchange hands out shared memory for the gradients it is about to post, so that
    posting them copies nothing. ``allocate`` None: as usual."""
    before = getattr(_outputs, "allocate", None)
    _outputs.allocate = allocate
    try:
        yield
    finally:
        _outputs.allocate = before


def output_array(shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """An array for a kernel's output from :func:`outputs_from`'s ``allocate``, or None."""
    allocate = getattr(_outputs, "allocate", None)
    return None if allocate is None else allocate(shape, np.dtype(dtype))
