"""Choice between the compiled kernels and the NumPy/CuPy reference kernels.

- CPU: the Numba-compiled path (:mod:`rapydli.kernels._numba`) is taken when every array
  argument is a NumPy ``float32`` or ``float64`` array, all of one dtype.
- GPU: the CUDA kernels (:mod:`rapydli.kernels._cuda`, ``numba.cuda``) are taken for CuPy
  arrays of one float dtype when ``numba.cuda`` finds a device and a probe kernel runs on it
  (once per process; where it cannot, a warning names why and CuPy's reference code serves).
- Anything else (integer or mixed dtypes, Numba or a CUDA device missing) runs the reference
  implementations (``*_reference``), written against the NumPy API that CuPy shares.

The environment variable ``RAPYDLI_KERNELS`` overrides the choice: ``numpy`` forces the
reference kernels; ``cuda`` sends every window op (convolution, pooling) through the CUDA
kernels, NumPy arrays included (copied to the device, the outputs copied back; under
``NUMBA_ENABLE_CUDASIM=1`` they run on the CUDA simulator, which is how CI tests them). The
variable is read on every call, so it can be changed at run time.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from rapydli.errors import ConfigError
from rapydli.kernels.backend import is_cupy

__all__ = ["ENV_VAR", "contiguous", "cuda_available", "fast", "gpu", "numba_available"]

#: environment variable: ``numpy`` forces the NumPy reference kernels
ENV_VAR = "RAPYDLI_KERNELS"

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_module: ModuleType | bool | None = None  # None: not tried yet; False: Numba unusable
_cuda_module: ModuleType | bool | None = None  # likewise for numba.cuda with a device


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


def _load_cuda() -> ModuleType | None:
    global _cuda_module
    if _cuda_module is None:
        try:
            from rapydli.kernels import _cuda
        except Exception:  # numba.cuda missing or broken: the reference kernels serve
            _cuda_module = False
            return None
        try:
            usable = _cuda.simulated() or _cuda.cuda.is_available()
            if usable:
                _cuda.probe()  # once per process: compile and run a tiny kernel
        except Exception as exc:  # e.g. a driver too old for the compiler's PTX
            warnings.warn(f"the CUDA kernels cannot run here ({type(exc).__name__}: {exc}); the "
                          f"GPU path uses the CuPy reference kernels instead", RuntimeWarning,
                          stacklevel=3)
            usable = False
        _cuda_module = _cuda if usable else False
    return _cuda_module or None


def cuda_available() -> bool:
    """Whether the CUDA kernels can run here: a device, or the CUDA simulator."""
    return _load_cuda() is not None


def _mode() -> str:
    return os.environ.get(ENV_VAR, "").strip().lower()


def _one_float_dtype(arrays: tuple, kind: type | None) -> bool:
    """All non-None ``arrays`` are of ``kind`` (any array type when None) and one float dtype."""
    dtype = None
    for a in arrays:
        if a is None:
            continue
        if kind is not None and not isinstance(a, kind):
            return False
        if dtype is None:
            dtype = a.dtype
            if dtype not in _FLOATS:
                return False
        elif a.dtype != dtype:
            return False
    return True


def fast(*arrays: Any) -> ModuleType | None:
    """The compiled-kernel module when ``arrays`` (None entries skipped) qualify, else None."""
    if _mode() in ("numpy", "cuda") or not _one_float_dtype(arrays, np.ndarray):
        return None
    return _load()


def gpu(*arrays: Any) -> ModuleType | None:
    """The CUDA-kernel module when ``arrays`` (None entries skipped) qualify, else None.

    They qualify when they are CuPy arrays of one float dtype and a device is present, or,
    with ``RAPYDLI_KERNELS=cuda``, arrays of any kind of one float dtype.
    """
    mode = _mode()
    if mode == "numpy" or (mode != "cuda" and not all(a is None or is_cupy(a) for a in arrays)):
        return None  # the common case, NumPy arrays, leaves at once
    if not _one_float_dtype(arrays, None):
        return None
    if mode == "cuda":
        module = _load_cuda()
        if module is None:
            raise ConfigError(f"{ENV_VAR}=cuda, but numba.cuda finds no usable CUDA device here; "
                               f"unset {ENV_VAR}, or set NUMBA_ENABLE_CUDASIM=1 to run the CUDA "
                               f"kernels on the simulator")
        on_device = [is_cupy(a) for a in arrays if a is not None]
        if any(on_device) and module.simulated():
            raise ConfigError("CuPy arrays cannot run on the CUDA simulator; unset "
                              "NUMBA_ENABLE_CUDASIM to run the CUDA kernels on the device")
        if any(on_device) and not all(on_device):
            return None  # NumPy and CuPy arrays mixed: the reference kernels name the mistake
        return module
    module = _load_cuda()
    # CuPy arrays live on a real device: never hand them to the simulator
    return None if module is None or module.simulated() else module


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when C-contiguous, else a C-contiguous copy."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
