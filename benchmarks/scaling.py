"""Scaling over Dask worker processes (LocalCluster, 1 thread and 1 BLAS thread per worker).

- Data parallel: MLP 784-1024-1024-10 at batch 512 on 1 worker vs ``data_parallel(2)`` on 2.
- Model parallel: MLP 784-4096-4096-10 (batch 256 by default) on 1 worker vs
  ``model_parallel(2)`` on 2.

Each run is an ``Engine`` on a client from ``local_client(n, threads_per_worker=1)`` with
steps submitted ahead as ``rapydli.fit`` does (``MAX_IN_FLIGHT``); the 2-worker runs use both
exchanges (``direct``, the engine's default on a cluster, and ``graph``), and the direct one
also without shared memory between the workers (``direct-tcp``: every tile inside its message
over the cluster's TCP comms, as between machines); rounds alternate the
runs (one warm-up round first) and the table shows medians: samples/s, speedup = 2-worker /
1-worker throughput, efficiency = speedup / 2. The goals are checked on the default exchange.

Goals: speedup >= 1.7x (data parallel, MLP batch 512) and >= 1.5x (model parallel, 4096 wide).

The data-parallel case also measures what this machine allows without any exchange (row
``side by side``): two independent single-worker trainings at half the batch, one pinned to
each worker of the 2-worker cluster (``Engine(workers=[...])``), run at the same time from
two client threads. Their step (the slower of the two) is a 2-worker data-parallel step less
its gradient exchange: the same kernels on the same cores, the same cluster and scheduler,
each engine updating its own replica. Its speedup is the ceiling
the data-parallel goal meets on this machine (``--skip-ceiling`` leaves it out).
Two small MLPs (batch 64) follow, where a step is mostly exchanges: they show what each
exchange costs per step (no goal; ``--skip-small`` leaves them out).

Steps go into task graphs as ``fit`` puts them by default (``--steps-per-task auto``).

A second table says where the CPU went in the timed rounds of the large MLPs, per step
(psutil's per-thread CPU times): the client process (client and scheduler), each worker's
busiest thread (the one running the step tasks: kernels, and posting and taking tiles in a
direct exchange) and its other threads (event loop: messages, heartbeats, monitors), the
workers' nanny processes, and the other cluster's processes, idle meanwhile. On a 2-core
machine the total against ``2 x step time`` shows whether the cores were the limit.
How to read it: CPU figures are means over the timed rounds while step times are medians;
a thread that exits within a round is not counted; both clusters' schedulers live in the
client process, so the idle one's count under "client"; the two workers are listed by
process, not by mesh position.

Data-parallel rounds are 256 steps: four tasks of 64 steps, the most ``auto`` puts in one,
so that each round has more than one task, as a long ``fit`` has.

    python benchmarks/scaling.py [--rounds 5] [--steps 256] [--mp-steps 3] [--mp-batch 256]
"""
from __future__ import annotations

import argparse
import os
import threading

import _common as C


def measure(label, net, batch, steps, rounds, engines, samples, sizes, pair=None, pids=()):
    """Median seconds per step of each engine, rounds alternating between them; ``sizes``
    holds each engine's steps per task (or its ``TaskSize``). ``pair``: ``(key, engines,
    sizes)`` of two 1-worker engines timed side by side at half the batch, as one more
    entry ``key``. Also returns, per key, the CPU seconds per step of every thread of
    ``pids`` over the timed rounds (``{(pid, tid): seconds}``)."""
    keys = [*engines, *([pair[0]] if pair else [])]
    times = {k: [] for k in keys}
    cpu = {k: {} for k in keys}
    for r in range(rounds + 1):
        indices = C.batches(samples, batch, steps, start=r * steps)
        for key in keys:
            before = cpu_times(pids)
            if pair and key == pair[0]:
                half = C.batches(samples, batch // 2, steps, start=r * steps)
                seconds = side_by_side(pair[1], half, pair[2])
            else:
                seconds = C.run_steps(engines[key], indices, steps_per_task=sizes[key])
            if r:
                times[key].append(seconds / steps)
                for thread, spent in cpu_times(pids).items():
                    used = (spent - before.get(thread, 0.0)) / (steps * rounds)
                    cpu[key][thread] = cpu[key].get(thread, 0.0) + used
    return {k: C.median(v) for k, v in times.items()}, cpu


def cpu_times(pids) -> dict:
    """CPU seconds (user + system) so far of every thread of the processes ``pids``."""
    import psutil

    out = {}
    for pid in pids:
        try:
            for thread in psutil.Process(pid).threads():
                out[(pid, thread.id)] = thread.user_time + thread.system_time
        except psutil.Error:  # a process gone: nothing to count
            pass
    return out


def cpu_row(name, cpu, step, client_pid, run_pids, idle_pids, nanny_pids) -> list:
    """One row of the CPU table: ms per step by role (see the module docstring); ``run_pids``
    are the workers of the run's cluster, ``idle_pids`` the other one's workers and nannies,
    ``nanny_pids`` the nannies of ``run_pids``."""
    def ms(x):
        return f"{x * 1e3:.0f}"

    def of(pids):
        return [sorted((v for (p, _), v in cpu.items() if p == pid), reverse=True) or [0.0]
                for pid in pids]

    client = sum(v for (pid, _), v in cpu.items() if pid == client_pid)
    workers = of(run_pids)
    idle = sum(sum(threads) for threads in of(idle_pids))
    nannies = sum(sum(threads) for threads in of(nanny_pids))
    return [name, ms(client), " + ".join(ms(t[0]) for t in workers),
            " + ".join(ms(sum(t[1:])) for t in workers), ms(nannies), ms(idle),
            ms(sum(cpu.values())), ms(2 * step)]


def nanny_of(pid: int) -> list:
    """The nanny process of worker process ``pid`` (its parent), unless that is this process."""
    import psutil

    parent = psutil.Process(pid).ppid()
    return [] if parent == os.getpid() else [parent]


def side_by_side(engines, indices, sizes) -> float:
    """Seconds until every engine has run ``indices``, all started together, one client
    thread each (the slowest one decides, as the slowest worker does in data parallel)."""
    seconds = [0.0] * len(engines)
    errors: list[BaseException] = []
    start = threading.Barrier(len(engines))

    def run(i):
        try:
            start.wait()
            seconds[i] = C.run_steps(engines[i], indices, steps_per_task=sizes[i])
        except BaseException as error:  # re-raised below: no figure from a failed run
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--steps", type=int, default=256,
                        help="pipelined steps a run, data parallel")
    parser.add_argument("--batch", type=int, default=512, help="data-parallel batch")
    parser.add_argument("--mp-steps", type=int, default=3, help="pipelined steps a run, model parallel")
    parser.add_argument("--mp-batch", type=int, default=256, help="model-parallel batch")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--skip-mp", action="store_true", help="data parallel only")
    parser.add_argument("--skip-small", action="store_true", help="no small-MLP rows")
    parser.add_argument("--skip-ceiling", action="store_true",
                        help="no side-by-side row (the data-parallel ceiling without exchange)")
    parser.add_argument("--exchanges", default="direct,direct-tcp,graph",
                        help="2-worker exchanges to run, comma-separated (the first is checked); "
                             "direct-tcp: the direct exchange without shared memory")
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
    c2_workers = sorted(c2.scheduler_info()["workers"])
    worker_pids = {"1": list(c1.run(os.getpid).values()), "2": list(c2.run(os.getpid).values())}
    nanny_pids = {k: [n for p in v for n in nanny_of(p)] for k, v in worker_pids.items()}
    pids = [os.getpid(), *worker_pids["1"], *worker_pids["2"], *nanny_pids["1"],
            *nanny_pids["2"]]
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
    rows, goals, ceilings, cpu_rows = [], [], [], []
    try:
        for label, net, batch, steps, placement, goal in cases:
            engines = {("1", "-"): C.make_engine(net, None, c1, n_samples=args.samples)}
            for exchange in exchanges:
                engines[("2", exchange)] = C.make_engine(
                    net, placement, c2, n_samples=args.samples,
                    exchange=exchange.removesuffix("-tcp"),
                    shared_memory=not exchange.endswith("-tcp"))
            sizes = {n: TaskSize(spt, distributed=True) for n in engines}
            pair = None
            if not args.skip_ceiling and label == "data parallel" and goal:
                pair = (("2", "none"), [C.make_engine(net, None, c2, n_samples=args.samples,
                                                      workers=[w]) for w in c2_workers],
                        [TaskSize(spt, distributed=True) for _ in range(2)])
            t, cpu = measure(label, net, batch, steps, args.rounds, engines, args.samples, sizes,
                             pair, pids if goal else ())
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
            if pair:
                k = pair[2][0].steps
                speedup = t[("1", "-")] / t[pair[0]]
                rows.append([label, widths, f"2x{batch // 2}", "2", "side by side",
                             f"{2 * pair[1][0].plan(batch // 2, 'train', k).n_tasks / k:.2f} "
                             f"({k})", f"{t[pair[0]] * 1e3:.0f}", f"{batch / t[pair[0]]:,.0f}",
                             f"{speedup:.2f}x", f"{speedup / 2:.0%}", "(ceiling)"])
                ceilings.append((label, speedup))
            if goal:
                goals.append((f"{label}, {exchanges[0]} exchange", goal,
                              t[("1", "-")] / t[("2", exchanges[0])]))
                for key in t:
                    name = f"{label}, {key[0]} worker{'s' if key[0] == '2' else ''}" + (
                        "" if key[1] == "-" else f", {'side by side' if key[1] == 'none' else key[1]}")
                    other = "2" if key[0] == "1" else "1"
                    cpu_rows.append(cpu_row(name, cpu[key], t[key], os.getpid(),
                                            worker_pids[key[0]],
                                            worker_pids[other] + nanny_pids[other],
                                            nanny_pids[key[0]]))
            for engine in [*engines.values(), *(pair[1] if pair else [])]:
                engine.close()
    finally:
        C.close_client(c1)
        C.close_client(c2)
    print(f"\n{args.rounds} rounds (medians), steps pipelined (MAX_IN_FLIGHT), 1 thread per worker")
    print(f"steps per task: {args.steps_per_task} (in brackets: the size the last round used)")
    print(C.table(["placement", "MLP", "batch", "workers", "exchange", "tasks/step", "step ms",
                   "samples/s", "speedup", "efficiency", "goal"], rows,
                  ["<", "<", ">", ">", "<", ">", ">", ">", ">", ">", ">"]))
    print("\nCPU per step (ms) in the timed rounds (means; step times above are medians): "
          "client process (client + both schedulers), each worker's busiest thread (step "
          "tasks) and its other threads (event loop), the workers' nannies, the idle "
          "cluster's workers and nannies")
    print(C.table(["run", "client", "worker task threads", "worker other threads", "nannies",
                   "idle cluster", "total", "2 cores x step"], cpu_rows,
                  ["<", ">", ">", ">", ">", ">", ">", ">"]))
    for label, goal, speedup in goals:
        print(C.goal_line(f"{label} speedup >= {goal}x", speedup >= goal))
    for label, speedup in ceilings:
        print(f"ceiling ({label}): two independent half-batch trainings side by side run "
              f"{speedup:.2f}x the 1-worker throughput on this machine, with no exchange at all")


if __name__ == "__main__":
    main()
