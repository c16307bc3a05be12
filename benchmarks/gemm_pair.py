"""The data-parallel ceiling of bare GEMMs: do two processes multiply twice as fast as one?

Runs the four GEMMs of the MLP 784-1024-1024-10's training step at batch 512 (the forward
products of the two hidden layers and the two backward products of the second) in one
process, 1 BLAS thread, and the same GEMMs at half the batch in two processes at once, each
with 1 BLAS thread, started together. speedup = full batch alone / the slower of the two
halves. No Dask, no exchange: this is what the cores allow, the peer of the data-parallel rows
of ``scaling.py``.

    python benchmarks/gemm_pair.py [--rounds 5] [--reps 20]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import _common as C


def gemms(batch: int, reps: int, barrier=None, queue=None) -> float:
    """Seconds per repetition of the four GEMMs at ``batch`` (float32)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((batch, 784), np.float32)
    w1 = rng.random((784, 1024), np.float32)
    w2 = rng.random((1024, 1024), np.float32)
    h = x @ w1  # warm-up
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    for _ in range(reps):
        h = x @ w1  # (batch, 1024)
        o = h @ w2  # (batch, 1024)
        _ = h.T @ o  # dW2 shape (1024, 1024)
        _ = o @ w2.T  # dH (batch, 1024)
    seconds = (time.perf_counter() - start) / reps
    if queue is not None:
        queue.put(seconds)
    return seconds


def pair(batch: int, reps: int) -> float:
    """Seconds per repetition of the slower of two processes running ``gemms`` together."""
    barrier, queue = mp.Barrier(2), mp.Queue()
    procs = [mp.Process(target=gemms, args=(batch, reps, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    seconds = max(queue.get(), queue.get())
    for p in procs:
        p.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20, help="GEMM repetitions a measurement")
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    C.pin_threads(1)  # the child processes inherit 1 BLAS thread
    print(C.machine_line())
    full, half, both = [], [], []
    for _ in range(args.rounds):  # alternating
        full.append(gemms(args.batch, args.reps))
        half.append(gemms(args.batch // 2, args.reps))
        both.append(pair(args.batch // 2, args.reps))
    full, half, both = C.median(full), C.median(half), C.median(both)
    print(f"\n{args.rounds} rounds (medians), 1 BLAS thread per process")
    print(C.table(["run", "batch", "processes", "ms", "speedup"], [
        ["full batch alone", args.batch, 1, f"{full * 1e3:.1f}", ""],
        ["half batch alone", args.batch // 2, 1, f"{half * 1e3:.1f}", f"{full / half:.2f}x"],
        ["half batch, two at once", f"2x{args.batch // 2}", 2, f"{both * 1e3:.1f}",
         f"{full / both:.2f}x"],
    ], ["<", ">", ">", ">", ">"]))
    print(f"bare GEMMs on two processes run {full / both:.2f}x one process's full batch "
          f"(the data-parallel goal is 1.7x)")


if __name__ == "__main__":
    main()
