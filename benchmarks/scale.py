"""Billions of parameters on one machine: a locally connected network trained model parallel.

Builds a network of two ``LocallyConnected2D`` layers (untied weights) with about ``--params``
parameters, splits it by image region over ``--workers`` worker processes (spatial model
parallelism: each worker holds only the weights of its own output rows, and only border rows
travel between neighbours), draws the weights on the workers (``Engine.init_params``), and runs
forward + backward + SGD update steps whose gradients are consumed by the update in place
(fused backward-update: no second copy of the weights). Prints parameters, the peak resident
memory of all workers together, bytes per parameter and step time.

    python benchmarks/scale.py --params 4e9 --workers 2 --steps 2

Goal (issue 5): at least 4 billion parameters on this 24 GiB machine at <= 6 bytes/parameter.
The peer in the same run is the weights themselves: 4 bytes per float32 parameter is the floor.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_line, pin_threads


def network_for(n_params: float, channels: int = 4, filters: int = 8, kernel: int = 12):
    """Two locally connected layers (``channels -> filters -> filters``) on a square image
    sized so that the parameter count is about ``n_params``."""
    import rapydli as rd

    # per output position: filters * in_channels * k^2 weights (+ filters biases)
    per_pos = filters * channels * kernel**2 + filters * filters * kernel**2 + 2 * filters
    side = int(math.sqrt(n_params / per_pos)) + 2 * (kernel - 1)
    net = rd.Sequential([rd.LocallyConnected2D(filters, kernel),
                         rd.LocallyConnected2D(filters, kernel)],
                        input_shape=(channels, side, side), loss="mse")
    return net


class PeakMemory:
    """Samples the summed resident memory of some processes until stopped; keeps the peak."""

    def __init__(self, pids, every: float = 0.05):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for proc in self.procs:
                try:
                    total += proc.memory_info().rss
                except Exception:  # a process that ended counts as nothing
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=2e8, help="about this many parameters")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (model axis)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    pin_threads(1)

    import dask
    import numpy as np
    from distributed import Client, LocalCluster

    import rapydli as rd
    from rapydli.scheduler.engine import Engine

    net = network_for(args.params)
    n_params = net.n_params
    placement = rd.spatial_parallel(args.workers)
    print(f"# {' '.join(sys.argv)}\n# {machine_line()}")
    print(f"network: {net.input_shape} -> {net.output_shape}, {n_params:,} parameters "
          f"({n_params * 4 / 2**30:.2f} GiB of float32 weights) on {args.workers} workers")
    with dask.config.set({"distributed.worker.memory.target": False,
                          "distributed.worker.memory.spill": False,
                          "distributed.worker.memory.pause": False,
                          "distributed.worker.memory.terminate": False}):
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               memory_limit=0, dashboard_address=None)
        client = Client(cluster)
    pids = list(client.run(os.getpid).values())
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, *net.input_shape), dtype=np.float32)
    y = rng.random((args.batch, *net.output_shape), dtype=np.float32)
    with PeakMemory(pids) as memory:
        start = time.perf_counter()
        engine = Engine(net, placement, rd.SGD(lr=1e-3), client)
        engine.init_params(seed=0)
        engine.set_data("train", x, y)
        first = engine.value(engine.run("train", np.arange(args.batch))["metrics"])
        setup = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss, _ = engine.value(engine.run("train", np.arange(args.batch))["metrics"])
            times.append(time.perf_counter() - t0)
    graph = engine.plan(args.batch, "train").graph
    n_updates = len(graph.ops(kind="update"))
    halo = sum(op.nbytes for op in graph.ops(kind="send"))
    print(f"setup (draw weights on workers, compile, first step): {setup:.1f} s; loss "
          f"{first[0]:.4g} -> {loss:.4g}")
    print(f"separate update ops: {n_updates} (0: every update fused into its backward op); "
          f"bytes sent between workers per step: {halo:,}")
    print(f"{'parameters':>15} {'peak RSS (all workers)':>24} {'bytes/param':>12} "
          f"{'step time (median)':>19}")
    print(f"{n_params:>15,} {memory.peak / 2**30:>20.2f} GiB {memory.peak / n_params:>12.2f} "
          f"{sorted(times)[len(times) // 2]:>17.2f} s")
    print(f"goal: >= 4e9 parameters at <= 6 bytes/param -> "
          f"{'met' if n_params >= 4e9 and memory.peak / n_params <= 6 else 'not met'} "
          f"at this size")
    client.close()
    cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
