"""Scaling over Dask worker processes (LocalCluster, 1 thread and 1 BLAS thread per worker).

- Data parallel: MLP 784-1024-1024-10 at batch 512 on 1 worker vs ``data_parallel(2)`` on 2.
- Model parallel: MLP 784-4096-4096-10 (batch 256 by default) on 1 worker vs
  ``model_parallel(2)`` on 2.

Each run is an ``Engine`` on a client from ``local_client(n, threads_per_worker=1)`` with
steps submitted ahead as ``rapydli.fit`` does (``MAX_IN_FLIGHT``); the 2-worker runs use both
exchanges (``direct``, the engine's default on a cluster, and ``graph``); rounds alternate the
runs (one warm-up round first) and the table shows medians: samples/s, speedup = 2-worker /
1-worker throughput, efficiency = speedup / 2. The goals are checked on the default exchange.

Goals: speedup >= 1.7x (data parallel, MLP batch 512) and >= 1.5x (model parallel, 4096 wide).
Two small MLPs (batch 64) follow, where a step is mostly exchanges: they show what each
exchange costs per step (no goal; ``--skip-small`` leaves them out).

Steps go into task graphs as ``fit`` puts them by default (``--steps-per-task auto``).

    python benchmarks/scaling.py [--rounds 5] [--steps 24] [--mp-steps 3] [--mp-batch 256]
"""
from __future__ import annotations

import argparse

import _common as C


def measure(label, net, batch, steps, rounds, engines, samples, sizes):
    """Median seconds per step of each engine, rounds alternating between them; ``sizes``
    holds each engine's steps per task (or its ``TaskSize``)."""
    times = {k: [] for k in engines}
    for r in range(rounds + 1):
        indices = C.batches(samples, batch, steps, start=r * steps)
        for key, engine in engines.items():
            seconds = C.run_steps(engine, indices, steps_per_task=sizes[key])
            if r:
                times[key].append(seconds / steps)
    return {k: C.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--steps", type=int, default=24, help="pipelined steps a run, data parallel")
    parser.add_argument("--batch", type=int, default=512, help="data-parallel batch")
    parser.add_argument("--mp-steps", type=int, default=3, help="pipelined steps a run, model parallel")
    parser.add_argument("--mp-batch", type=int, default=256, help="model-parallel batch")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--skip-mp", action="store_true", help="data parallel only")
    parser.add_argument("--skip-small", action="store_true", help="no small-MLP rows")
    parser.add_argument("--exchanges", default="direct,graph",
                        help="2-worker exchanges to run, comma-separated (the first is checked)")
    parser.add_argument("--steps-per-task", default="auto",
                        help="steps unrolled per task: a number, or 'auto' (fit's default)")
    args = parser.parse_args()
    C.pin_threads(1)  # workers inherit 1 BLAS thread; the client process stays light

    import rapydli as rd
    from rapydli.trainer import TaskSize

    spt = args.steps_per_task if args.steps_per_task == "auto" else int(args.steps_per_task)
    exchanges = args.exchanges.split(",")

    print(C.machine_line())
    c1 = C.cluster_client(1, 1)
    c2 = C.cluster_client(2, 1)
    print(f"worker thread pools: 1-worker cluster {C.worker_blas_threads(c1)}; "
          f"2-worker cluster {C.worker_blas_threads(c2)}")
    cases = [("data parallel", C.mlp(), args.batch, args.steps, rd.data_parallel(2), 1.7)]
    if not args.skip_mp:
        cases.append(("model parallel", C.mlp((784, 4096, 4096, 10)), args.mp_batch,
                      args.mp_steps, rd.model_parallel(2), 1.5))
    if not args.skip_small:
        cases += [("data parallel", C.mlp((784, 128, 10)), 64, 48, rd.data_parallel(2), None),
                  ("model parallel", C.mlp((784, 128, 128, 10)), 64, 48, rd.model_parallel(2),
                   None)]
    rows, goals = [], []
    try:
        for label, net, batch, steps, placement, goal in cases:
            engines = {("1", "-"): C.make_engine(net, None, c1, n_samples=args.samples)}
            for exchange in exchanges:
                engines[("2", exchange)] = C.make_engine(net, placement, c2,
                                                         n_samples=args.samples,
                                                         exchange=exchange)
            sizes = {n: TaskSize(spt, distributed=True) for n in engines}
            t = measure(label, net, batch, steps, args.rounds, engines, args.samples, sizes)
            widths = "-".join(str(w) for w in (net.input_shape[0], *(
                layer.units for layer in net.layers)))
            for (n, exchange), engine in engines.items():
                k = sizes[(n, exchange)].steps
                speedup = t[("1", "-")] / t[(n, exchange)]
                two = n == "2"
                rows.append([label, widths, batch, n, exchange,
                             f"{engine.plan(batch, 'train', k).n_tasks / k:.2f} ({k})",
                             f"{t[(n, exchange)] * 1e3:.0f}", f"{batch / t[(n, exchange)]:,.0f}",
                             f"{speedup:.2f}x" if two else "", f"{speedup / 2:.0%}" if two
                             else "", f">= {goal}x" if goal and two and exchange == exchanges[0]
                             else ""])
            if goal:
                goals.append((f"{label}, {exchanges[0]} exchange", goal,
                              t[("1", "-")] / t[("2", exchanges[0])]))
            for engine in engines.values():
                engine.close()
    finally:
        C.close_client(c1)
        C.close_client(c2)
    print(f"\n{args.rounds} rounds (medians), steps pipelined (MAX_IN_FLIGHT), 1 thread per worker")
    print(f"steps per task: {args.steps_per_task} (in brackets: the size the last round used)")
    print(C.table(["placement", "MLP", "batch", "workers", "exchange", "tasks/step", "step ms",
                   "samples/s", "speedup", "efficiency", "goal"], rows,
                  ["<", "<", ">", ">", "<", ">", ">", ">", ">", ">", ">"]))
    for label, goal, speedup in goals:
        print(C.goal_line(f"{label} speedup >= {goal}x", speedup >= goal))


if __name__ == "__main__":
    main()
