"""Compile every CUDA kernel of ``rapydli.kernels._cuda`` to PTX with the real CUDA compiler.

Run as a script, in a process without ``NUMBA_ENABLE_CUDASIM`` (the simulator never compiles):
``python tests/cuda_ptx.py``. It records the argument types of each kernel launch that the GPU
wrappers make for float32 and float64 data (launches are recorded, not run: no GPU is needed),
compiles each (kernel, signature) with NVVM for compute capability 8.0, and prints one JSON
line per kernel: its name, its data dtype and the float64 PTX instructions in it. Exits with
77 where NVVM (libnvvm) is missing. Used by ``tests/test_cuda_ptx.py``.
"""
from __future__ import annotations

import json
import re
import sys

#: compute capability to compile for (supported by CUDA 12 and 13 compilers alike)
CC = (8, 0)
SKIP = 77


def signatures() -> dict:
    """``{(kernel name, argument types): kernel}`` of every launch the wrappers make."""
    import numba
    import numpy as np

    from rapydli.kernels import _cuda

    seen = {}

    def record(kernel, total, *args, out=()):
        seen.setdefault((kernel.py_func.__name__, tuple(numba.typeof(a) for a in args)), kernel)

    _cuda._launch = record
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        x = rng.normal(size=(2, 3, 7, 6)).astype(dt)
        w = rng.normal(size=(4, 3, 3, 2)).astype(dt)
        b = rng.normal(size=4).astype(dt)
        with np.errstate(all="ignore"):  # outputs of recorded launches are never written
            y = _cuda.conv2d_forward(x, w, b, (3, 2), (2, 1), (1, 1), 4, 7)
            _cuda.conv2d_backward(x, w, y, (3, 2), (2, 1), (1, 1), True)
            p = _cuda.maxpool2d_forward(x, (2, 2), (2, 2), 3, 3)
            _cuda.maxpool2d_backward(x, p, (2, 2), (2, 2))
            _cuda.avgpool2d_forward(x, (2, 2), (2, 2), 3, 3)
            _cuda.avgpool2d_backward(x.shape, p, (2, 2), (2, 2), dt)
            _cuda.sgd_update(b, b, b, 0.1, 0.9, 0.01, True)
            _cuda.sgd_update(b, b, None, 0.1, 0.0, 0.0, False)
    seen[("_probe_kernel", (numba.typeof(np.zeros(4, np.int32)),))] = _cuda._probe_kernel
    return seen


def main() -> int:
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        print("run without NUMBA_ENABLE_CUDASIM: the simulator compiles nothing", file=sys.stderr)
        return 2
    from numba.cuda.cudadrv import nvvm

    try:
        available = nvvm.is_available()
    except Exception:
        available = False
    if not available:
        print("libnvvm not found: no CUDA compiler here", file=sys.stderr)
        return SKIP
    import numba.cuda.dispatcher as dispatcher

    class Device:  # device functions ask the current device for its compute capability
        compute_capability = CC

    dispatcher.get_current_device = lambda: Device()  # no GPU: compile for CC instead
    for (name, sig), kernel in sorted(signatures().items(), key=lambda kv: str(kv[0])):
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC)
        dtypes = sorted({str(t.dtype) for t in sig if hasattr(t, "dtype") and
                         str(t.dtype).startswith("float")})
        print(json.dumps({"kernel": name, "entry": ".entry" in ptx, "dtypes": dtypes,
                          "f64": sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx)))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
