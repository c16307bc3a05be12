"""Runtime overhead of rapydli on the MLP 784-1024-1024-10 at batch 256: tasks per step and the
fraction of step time spent outside the kernels.

Tasks per step come from the step plans (``Engine.plan(256, "train").n_tasks``, fused and with
``fused=False``). Step time is measured with steps submitted ahead as ``rapydli.fit`` does
(``MAX_IN_FLIGHT``), on

  (a) the in-process Engine (client=None), T BLAS threads in this process;
  (b) a LocalCluster with 1 worker process (2 threads, 2 BLAS threads), one step per task;
  (b2) the same, with the steps per task sized as ``fit``'s default ``"auto"`` does
      (``rapydli.trainer.TaskSize``: about half a second of work per task);
  (c) a LocalCluster with 2 worker processes (1 thread each), ``data_parallel(2)``.

Kernel time is measured two ways. *Replayed*: every op call of one training step is captured
(in-process Engine) and the same functions are called again on copies of the same arrays,
directly, without Dask, in this process; for (c) the busier worker's share at 1 BLAS thread.
*In worker*: the op calls are timed inside the workers during the timed steps
(``rapydli.graph.ops.time_ops``), where they share the cores with the scheduler and client.
Fraction outside kernels = 1 - kernel time / step time; the goal is judged on the replayed
figure (what the kernels cost with the machine to themselves). Rounds alternate the runs and
the kernel replays so that machine noise hits all of them alike.

Goal: under 10% outside kernels for the MLP at batch 256 (run (b2), as fit trains it).

    python benchmarks/overhead.py [--rounds 5] [--steps 8] [--auto-steps 64] [--threads 2]
"""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import _common as C


def kernel_profile(records, times):
    """Seconds per worker and per op kind (``forward``, ``backward``, ...) of replayed ops."""
    per_worker: dict = defaultdict(float)
    per_kind: Counter = Counter()
    for key, worker, fn, _, _ in records:
        per_worker[worker] += times[key]
        per_kind[fn.__name__] += times[key]
    return per_worker, per_kind


def replay(records, repeats, blas):
    """Per-op median seconds, run with ``blas`` BLAS threads (threadpoolctl) when given."""
    if blas is None:
        return C.replay_ops(records, repeats)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(blas):
        return C.replay_ops(records, repeats)


def capture(engine, index, blas):
    """Records of one in-process step and the seconds of each op inside it."""
    if blas is None:
        records = C.capture_ops(engine, index)
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(blas):
            records = C.capture_ops(engine, index)
    return records, dict(C.capture_ops.seconds)


def critical(records, times):
    """Kernel seconds of the busiest worker (ops without a worker count for every worker)."""
    per_worker, _ = kernel_profile(records, times)
    shared = per_worker.pop(None, 0.0)
    return max(per_worker.values(), default=0.0) + shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads of this process")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--steps", type=int, default=8, help="pipelined steps per run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--replays", type=int, default=3, help="replays of the kernels a round")
    parser.add_argument("--auto-steps", type=int, default=64,
                        help="pipelined steps per round of the (b2) run ('auto' task size)")
    args = parser.parse_args()
    C.pin_threads(args.threads)

    import rapydli as rd

    print(C.machine_line())
    net = C.mlp()
    b = args.batch

    # --- tasks per step ------------------------------------------------------------------
    rows = []
    for label, placement in (("1 worker", None), ("data_parallel(2)", rd.data_parallel(2)),
                             ("model_parallel(2)", rd.model_parallel(2))):
        counts = []
        for fused in (True, False):
            if placement is None:
                engine = C.make_engine(net, fused=fused, n_samples=args.samples)
            else:
                engine = C.in_process_engine(net, placement, fused=fused, n_samples=args.samples)
            counts.append(engine.plan(b, "train").n_tasks)
            ops = engine.plan(b, "train").graph
            n_ops = sum(op.kind != "placeholder" for op in ops.ops())
        rows.append([label, counts[0], counts[1], n_ops])
    print(f"\nMLP 784-1024-1024-10, batch {b}, mode train: Dask tasks per step")
    print(C.table(["placement", "tasks fused", "tasks unfused", "tile ops"], rows))

    # --- runs -------------------------------------------------------------------------------
    from rapydli.graph.ops import time_ops
    from rapydli.trainer import TaskSize

    inproc = C.make_engine(net, n_samples=args.samples)
    dp_local = C.in_process_engine(net, rd.data_parallel(2), n_samples=args.samples)
    c1 = C.cluster_client(1, 2)
    c2 = C.cluster_client(2, 1)
    print(f"worker thread pools: (b) {C.worker_blas_threads(c1)}; (c) {C.worker_blas_threads(c2)}")
    auto = TaskSize("auto", distributed=True)  # sized as fit's default does, kept across rounds
    # run: (engine, client, steps per task, data parallel?)
    runs = {
        "(a) in-process, sync scheduler": (inproc, None, 1, False),
        "(b) LocalCluster 1 worker x 2 threads, 1 step per task": (
            C.make_engine(net, client=c1, n_samples=args.samples), c1, 1, False),
        "(b2) as (b), steps per task 'auto' (fit's default)": (
            C.make_engine(net, client=c1, n_samples=args.samples), c1, auto, False),
        "(c) LocalCluster 2 workers x 1 thread, data_parallel(2)": (
            C.make_engine(net, rd.data_parallel(2), c2, n_samples=args.samples), c2, 1, True),
    }
    step_t = {k: [] for k in runs}
    worker_t = {k: [] for k in runs}
    kern_t: dict[str, list] = {"single": [], "dp2": []}
    kinds: Counter = Counter()
    rec_single = C.capture_ops(inproc, C.batches(args.samples, b, 1)[0])
    rec_dp = C.capture_ops(dp_local, C.batches(args.samples, b, 1)[0])
    try:
        for r in range(args.rounds + 1):
            for key, (engine, client, spt, _) in runs.items():
                n = args.auto_steps if spt is auto else args.steps
                indices = C.batches(args.samples, b, n, start=r * n)
                if client:
                    client.run(time_ops)
                else:
                    time_ops()
                seconds = C.run_steps(engine, indices, steps_per_task=spt)
                sums = client.run(time_ops, False).values() if client else [time_ops(False)]
                if r:
                    step_t[key].append(seconds / n)
                    worker_t[key].append(max(sum(s.values()) for s in sums) / n)
            t_single = replay(rec_single, args.replays, None)
            t_dp = replay(rec_dp, args.replays, 1)
            if r:
                kern_t["single"].append(sum(t_single.values()))
                kern_t["dp2"].append(critical(rec_dp, t_dp))
                kinds.update(kernel_profile(rec_single, t_single)[1])
    finally:
        for engine, *_ in runs.values():
            engine.close()
        C.close_client(c1)
        C.close_client(c2)

    k = {name: C.median(ts) for name, ts in kern_t.items()}
    rows, fractions = [], {}
    for key, (engine, _, spt, dp) in runs.items():
        step, in_worker = C.median(step_t[key]), C.median(worker_t[key])
        replayed = k["dp2" if dp else "single"]
        fractions[key] = 1 - replayed / step
        tasks = (f"{engine.plan(b, 'train').n_tasks:.2f}" if spt == 1 else
                 f"{engine.plan(b, 'train', spt.steps).n_tasks / spt.steps:.2f} "
                 f"({spt.steps} steps/task)")
        rows.append([key, tasks, f"{step * 1e3:.1f}", f"{replayed * 1e3:.1f}",
                     f"{in_worker * 1e3:.1f}", f"{b / step:,.0f}", f"{fractions[key]:.0%}",
                     f"{1 - in_worker / step:.0%}"])
    print(f"\nstep time vs kernel time, batch {b}, {args.rounds} rounds (medians) of "
          f"{args.steps} pipelined steps ({args.auto_steps} for 'auto')")
    print(C.table(["run", "tasks/step", "step ms", "kernel ms (replayed)",
                   "kernel ms (in worker)", "samples/s", "outside kernels (replayed)",
                   "outside kernels (in worker)"], rows))
    print("kernel ms (replayed): the step's op calls made again directly, one after another, "
          "on fresh copies of their inputs in this process (nothing else running). (in "
          "worker): the same op calls timed inside the worker processes during the timed "
          "steps (rapydli.graph.ops.time_ops); there they share the cores with the scheduler "
          "and client. For (c), the busier worker's share at 1 BLAS thread.")
    total = sum(kinds.values())
    print("\nkernel time of one single-worker step by op function (replayed, share of total):")
    print(C.table(["op function", "ms / step", "share"],
                  [[name, f"{t / args.rounds * 1e3:.2f}", f"{t / total:.0%}"]
                   for name, t in kinds.most_common()]))
    goal_run = "(b2) as (b), steps per task 'auto' (fit's default)"
    print(C.goal_line("under 10% of step time outside kernels (replayed) for the MLP at batch "
                      "256 trained as fit does on a 1-worker LocalCluster, run (b2)",
                      fractions[goal_run] < 0.10))


if __name__ == "__main__":
    main()
