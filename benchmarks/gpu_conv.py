"""AlexNet's convolution layers on a GPU: rapydli's GPU kernels against PyTorch/cuDNN.

For conv1..conv5 (batch 128, float32) times forward and backward of ``rapydli.kernels``'s
``conv2d_forward`` / ``conv2d_backward`` on CuPy arrays (the CUDA window kernels of
``rapydli.kernels._cuda`` around cuBLAS GEMMs, after autotuning, which picks the batch chunk
per shape) and of ``torch.nn.functional.conv2d`` with cuDNN, alternating in one run, and
prints the ratio cuDNN time / rapydli time. Goal (issue 3): at least 0.9 after autotuning.

    python benchmarks/gpu_conv.py [--rounds 5] [--batch 128]

Needs CuPy and a CUDA device (and torch with CUDA for the peer); prints why and exits
otherwise. Record the figures in benchmarks/RESULTS.md with the device name and date.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

#: AlexNet (Krizhevsky et al. 2012, single-tower sizes): (name, C_in, H, W, C_out, k, stride, pad)
LAYERS = [
    ("conv1", 3, 227, 227, 96, 11, 4, 0),
    ("conv2", 96, 27, 27, 256, 5, 1, 2),
    ("conv3", 256, 13, 13, 384, 3, 1, 1),
    ("conv4", 384, 13, 13, 384, 3, 1, 1),
    ("conv5", 384, 13, 13, 256, 3, 1, 1),
]


def _timed(fn, sync, repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    from rapydli.kernels import available_backends

    if "cupy" not in available_backends():
        print("no CuPy with a CUDA device here: nothing to measure (this benchmark needs a GPU)")
        return 0
    import cupy as cp
    import torch
    import torch.nn.functional as F

    from rapydli.kernels import autotune, conv2d_forward

    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"device: {device}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    torch.backends.cudnn.benchmark = True
    print(f"{'layer':<7}{'rapydli ms':>12}{'cuDNN ms':>10}{'ratio':>8}")
    ratios = []
    for name, c, h, w, f, k, s, p in LAYERS:
        x = cp.random.standard_normal((args.batch, c, h + 2 * p, w + 2 * p), dtype=cp.float32)
        wt = cp.random.standard_normal((f, c, k, k), dtype=cp.float32) * 0.01
        b = cp.zeros(f, cp.float32)
        autotune.tune("conv2d_forward", (x, wt, b, (s, s), (0, 0)))
        y = conv2d_forward(x, wt, b, (s, s), (0, 0))
        dy = cp.ones_like(y)
        autotune.tune("conv2d_backward", (x, wt, dy, (s, s), (0, 0)))

        def ours(x=x, wt=wt, b=b, dy=dy, s=s):
            autotune.call("conv2d_forward", x, wt, b, (s, s), (0, 0))
            autotune.call("conv2d_backward", x, wt, dy, (s, s), (0, 0))

        tx = torch.as_tensor(x, device="cuda").requires_grad_(True)
        tw = torch.as_tensor(wt, device="cuda").requires_grad_(True)
        tb = torch.as_tensor(b, device="cuda").requires_grad_(True)
        tdy = torch.as_tensor(dy, device="cuda")

        def theirs(tx=tx, tw=tw, tb=tb, tdy=tdy, s=s):
            out = F.conv2d(tx, tw, tb, stride=s)
            torch.autograd.backward(out, tdy)

        ours_t = _timed(ours, cp.cuda.Device().synchronize, args.rounds)
        theirs_t = _timed(theirs, torch.cuda.synchronize, args.rounds)
        ratios.append(theirs_t / ours_t)
        print(f"{name:<7}{ours_t * 1e3:>12.2f}{theirs_t * 1e3:>10.2f}{ratios[-1]:>8.2f}")
    worst = min(ratios)
    print(f"goal (rapydli at least 0.9x cuDNN on every layer): {'met' if worst >= 0.9 else 'NOT met'}"
          f" (worst {worst:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
