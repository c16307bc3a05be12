"""The CUDA kernels compile with the real CUDA compiler, not only run on the simulator.

The simulator runs the kernels' Python; NVVM compiles their typed form, which rejects what
Python allows. ``tests/cuda_ptx.py`` compiles every launch the GPU wrappers make (recorded,
not run: no GPU needed) and reports the float64 instructions of each. Skips where libnvvm
is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda")

SCRIPT = Path(__file__).with_name("cuda_ptx.py")
KERNELS = {"_im2col_kernel", "_col2im_kernel", "_maxpool_kernel", "_avgpool_kernel",
           "_pool_back_kernel", "_sgd_kernel", "_probe_kernel"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode == 77:
        pytest.skip(done.stderr.strip() or "no CUDA compiler here")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_to_ptx_for_both_float_dtypes(compiled):
    assert {r["kernel"] for r in compiled} == KERNELS
    assert all(r["entry"] for r in compiled)  # a kernel entry point in each
    for kernel in KERNELS - {"_probe_kernel"}:
        assert {tuple(r["dtypes"]) for r in compiled if r["kernel"] == kernel} == \
            {("float32",), ("float64",)}, kernel


def test_float32_kernels_do_no_float64_arithmetic(compiled):
    # float64 runs at 1/64 of the float32 rate on many GPUs: a float32 kernel must not
    # promote (a Python float scalar or an int divisor would)
    f32 = [r for r in compiled if r["dtypes"] == ["float32"]]
    assert len(f32) == len(KERNELS) - 1
    assert {r["kernel"]: r["f64"] for r in f32 if r["f64"]} == {}
