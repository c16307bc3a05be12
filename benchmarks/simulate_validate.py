"""Cluster simulator vs this machine: predicted and measured training step times.

Cases (float32, SGD with momentum 0.9, synthetic data), as ``benchmarks/scaling.py`` runs them:
LocalCluster worker processes with 1 thread and 1 BLAS thread each,

- MLP 784-1024-1024-10 at batch 256: ``single`` on 1 worker, ``data_parallel(2)`` and
  ``model_parallel(2)`` on 2 workers;
- LeNet-5 (1x28x28) at batch 64: the same three placements.

Measured: an ``Engine`` per case; one step at a time (submit, wait for its metrics), the median
over rounds that alternate between the cases (one warm-up round first). This is what the
simulator predicts: the makespan of one step. The pipelined time (steps submitted ahead, up to 4
in flight, as ``rapydli.fit`` does) is shown for reference.

Predicted: :func:`rapydli.scheduler.cost.simulate` on ``examples/clusters/this_machine.yaml``,
or with ``--calibrate`` on :func:`~rapydli.scheduler.cost.calibrate_local` run on the 2-worker
cluster at the start of every round, so that calibration and measurement see the same load on
this shared machine; the prediction uses the median of each calibrated number over the timed
rounds (its YAML is printed; ``--write FILE`` saves it). Each case is predicted with the
exchange its engine uses (``--exchange``; the engine's default is ``direct`` on 2 workers); a 1-worker
plan sends nothing between workers, so both exchanges are one plan, simulated as ``graph``. The
table's ``exchange`` column says which model each row used.

Goal: predicted / measured within 30% (0.7 to 1.3) for every 1- and 2-worker case.

    python benchmarks/simulate_validate.py [--rounds 5] [--steps 4] [--calibrate] [--write F]
                                           [--exchange auto|direct|graph]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import _common as C

IN_FLIGHT = 4  # steps submitted ahead in the pipelined runs, as rapydli.fit does

HEADER = """\
# This machine as `rapydli simulate` sees it: {n} Dask worker processes with 1 thread each
# (LocalCluster) on one node, talking Dask TCP over localhost. Measured {date} by
#   python benchmarks/simulate_validate.py {args}
# which runs rapydli.scheduler.cost.calibrate_local() at the start of each of {rounds} rounds
# and keeps the median of every number ({load}):
# - device.flops: float32 matmul (128x784x1024, 256x1024x1024, 256x1024x4096) on one worker,
#   1 BLAS thread; kernel_efficiency: each layer type's forward + backward at a reference
#   shape, as a share of that rate; memory_bandwidth: 4 MB `a + b` into a new array;
# - node.flops: device.flops x (step-like dense work done by both workers at once / by one
#   alone): the two workers share this VM's cores and cache with the scheduler and the client;
# - overhead.per_step: a one-task graph's round trip from the client; per_task: the extra
#   time per independent task; dispatch: the extra time per dependent task (tasks holding
#   their worker 5 ms, one chain per worker at once); links: the extra time per task when
#   consecutive tasks alternate workers (latency) and when they pass on 4 MB (bandwidth);
#   per_op: one no-op tile op inside a fused task; per_message: a task posting 200 64-byte
#   tiles to a peer's mailbox, per tile; mail_latency: half a round trip of a 64-byte tile
#   between tasks on the two workers, each taking from its own mailbox.
# This is a shared 2-core VM: the numbers move with its load (re-run to refresh them).
"""


def one_at_a_time(engine, indices) -> float:
    """Median seconds of single steps: submit one, wait for its metrics, submit the next."""
    times = []
    for index in indices:
        start = time.perf_counter()
        engine.value(engine.run("train", index)["metrics"])
        times.append(time.perf_counter() - start)
    return C.median(times)


def pipelined(engine, indices) -> float:
    """Seconds per step with up to :data:`IN_FLIGHT` steps in flight."""
    pending = []
    start = time.perf_counter()
    for index in indices:
        pending.append(engine.run("train", index)["metrics"])
        if len(pending) > IN_FLIGHT:
            engine.value(pending.pop(0))
    for bound in pending:
        engine.value(bound)
    return (time.perf_counter() - start) / len(indices)


def cases(rd):
    """``(network name, network, batch, [(placement label, placement, n workers)])``."""
    three = [("single", None, 1), ("data_parallel(2)", rd.data_parallel(2), 2),
             ("model_parallel(2)", rd.model_parallel(2), 2)]
    return [("MLP 784-1024-1024-10", C.mlp(), 256, three),
            ("LeNet-5 1x28x28", C.lenet(), 64, three)]


def median_cluster(specs):
    """One ``ClusterSpec`` holding the median of every number of ``specs``."""
    import dataclasses

    from rapydli.scheduler.cost import Link, Overhead

    def med(get):
        return float(C.median([get(s) for s in specs]))

    first = specs[0]
    families = [dict(s.device.kernel_efficiency) for s in specs]
    device = dataclasses.replace(
        first.device, flops=med(lambda s: s.device.flops),
        memory_bandwidth=med(lambda s: s.device.memory_bandwidth),
        kernel_efficiency=tuple((k, round(float(C.median([f[k] for f in families])), 4))
                                for k, _ in first.device.kernel_efficiency))
    link = Link(med(lambda s: s.intra_node.bandwidth), med(lambda s: s.intra_node.latency))
    overhead = Overhead(**{f.name: med(lambda s: getattr(s.overhead, f.name))  # noqa: B023
                           for f in dataclasses.fields(Overhead)})
    return dataclasses.replace(first, device=device, intra_node=link, inter_node=link,
                               overhead=overhead, node_flops=med(lambda s: s.node_flops))


def measure(runs, rounds: int, steps: int, samples: int, calibrate=None) -> tuple[dict, list]:
    """Median one-at-a-time and pipelined seconds per step of each run, rounds interleaved;
    and the clusters ``calibrate()`` measured at the start of each timed round."""
    seq = {k: [] for k in runs}
    pipe = {k: [] for k in runs}
    specs = []
    for r in range(rounds + 1):
        if calibrate is not None and r:
            specs.append(calibrate())
        for key, (engine, batch) in runs.items():
            indices = C.batches(samples, batch, 2 * steps, start=r * 2 * steps)
            one = one_at_a_time(engine, indices[:steps])
            ahead = pipelined(engine, indices[steps:])
            if r:
                seq[key].append(one)
                pipe[key].append(ahead)
    return {k: (C.median(seq[k]), C.median(pipe[k])) for k in runs}, specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--steps", type=int, default=4, help="steps a round, each way")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--cluster", default="examples/clusters/this_machine.yaml")
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate_local() on the 2-worker cluster first and predict with it")
    parser.add_argument("--write", metavar="FILE", help="save the calibrated cluster YAML here")
    parser.add_argument("--exchange", default="auto", choices=("auto", "direct", "graph"),
                        help="the engines' exchange (auto: the engine's default)")
    args = parser.parse_args()
    C.pin_threads(1)  # workers inherit 1 BLAS thread; the client process stays light

    import rapydli as rd
    from rapydli.scheduler.cost import (calibrate_local, dump_cluster, format_prediction,
                                        load_cluster, simulate)

    print(C.machine_line())
    clients = {1: C.cluster_client(1, 1), 2: C.cluster_client(2, 1)}
    optimizer = rd.SGD(lr=0.01, momentum=0.9)
    try:
        runs, labels = {}, {}
        for name, net, batch, placements in cases(rd):
            for label, placement, n in placements:
                engine = C.make_engine(net, placement, clients[n], n_samples=args.samples,
                                       exchange=args.exchange)
                runs[(name, label)] = (engine, batch)
                labels[(name, label)] = (net, placement, batch, n,
                                         engine.plan(batch, "train").n_tasks, engine.exchange)
        calibrate = (lambda: calibrate_local(client=clients[2], repeats=3)) if args.calibrate \
            else None
        measured, specs = measure(runs, args.rounds, args.steps, args.samples, calibrate)
        for engine, _ in runs.values():
            engine.close()
    finally:
        for client in clients.values():
            C.close_client(client)
    if args.calibrate:
        cluster = median_cluster(specs)
        text = dump_cluster(cluster)
        print(f"calibrated (median of {len(specs)} rounds):\n{text}")
        if args.write:
            import datetime

            load = "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
            with open(args.write, "w") as f:
                f.write(HEADER.format(n=cluster.n_devices, rounds=len(specs), load=load,
                                      date=datetime.date.today().isoformat(),
                                      args=" ".join(sys.argv[1:])) + text)
    else:
        cluster = load_cluster(args.cluster)
    predicted = {key: simulate(net, placement, batch, cluster, optimizer, exchange=exchange)
                 for key, (net, placement, batch, _, _, exchange) in labels.items()}
    report(predicted, measured, labels, args)
    print(f"\n{format_prediction(predicted[('MLP 784-1024-1024-10', 'data_parallel(2)')])}")


def report(predicted, measured, labels, args) -> None:
    rows, ok = [], True
    for key, p in predicted.items():
        seq, pipe = measured[key]
        ratio = p.step_time / seq
        ok &= 0.7 <= ratio <= 1.3
        _, _, batch, n, tasks, _ = labels[key]
        if p.n_tasks != tasks:  # the simulator replays another plan than the engine runs
            tasks = f"{tasks} (sim {p.n_tasks})"
        rows.append([key[0], key[1], batch, n, p.exchange, tasks, f"{p.step_time * 1e3:.1f}",
                     f"{p.compute_time * 1e3:.1f}", f"{p.exposed_comm * 1e3:.1f}",
                     f"{seq * 1e3:.1f}", f"{ratio:.2f}", f"{pipe * 1e3:.1f}",
                     f"{p.step_time / pipe:.2f}"])
    source = ("calibrate_local() each round of this run (medians)" if args.calibrate
              else args.cluster)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ncluster: {source}; {args.rounds} rounds (medians), {args.steps} steps a round; "
          f"load average at the end {load}")
    print(C.table(["network", "placement", "batch", "workers", "exchange", "tasks/step",
                   "predicted ms", "compute ms", "exposed comm ms", "measured ms", "pred/meas",
                   "pipelined ms", "pred/pipelined"], rows,
                  ["<", "<", ">", ">", "<", ">", ">", ">", ">", ">", ">", ">", ">"]))
    print(C.goal_line("predicted within 30% of measured one-at-a-time step, every case", ok))


if __name__ == "__main__":
    main()
