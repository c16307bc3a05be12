"""Choice between the Numba-compiled kernels and the NumPy reference kernels.

The compiled path (:mod:`rapydli.kernels._numba`) is taken when every array
argument is a NumPy ``float32`` or ``float64`` array, all of one dtype, and the
environment variable ``RAPYDLI_KERNELS`` is not ``numpy``; anything else (CuPy
arrays, integer or mixed dtypes, Numba missing) runs the NumPy reference
implementations of :mod:`rapydli.kernels.reference`. The variable is read on
every call, so it can be changed at run time.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["ENV_VAR", "contiguous", "fast", "numba_available"]

#: environment variable: ``numpy`` forces the NumPy reference kernels
ENV_VAR = "RAPYDLI_KERNELS"

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_module: ModuleType | bool | None = None  # None: not tried yet; False: Numba unusable


def _load() -> ModuleType | None:
    global _module
    if _module is None:
        try:
            from rapydli.kernels import _numba
        except ImportError:  # numba not installed: the reference kernels serve every call
            _module = False
        else:
            _module = _numba
    return _module or None


def numba_available() -> bool:
    """Whether the compiled kernels can be used in this process (ignores ``RAPYDLI_KERNELS``)."""
    return _load() is not None


def fast(*arrays: Any) -> ModuleType | None:
    """The compiled-kernel module when ``arrays`` (None entries skipped) qualify, else None."""
    if os.environ.get(ENV_VAR, "").strip().lower() == "numpy":
        return None
    dtype = None
    for a in arrays:
        if a is None:
            continue
        if not isinstance(a, np.ndarray):
            return None
        if dtype is None:
            dtype = a.dtype
            if dtype not in _FLOATS:
                return None
        elif a.dtype != dtype:
            return None
    return _load()


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when C-contiguous, else a C-contiguous copy."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
