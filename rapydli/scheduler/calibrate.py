"""Calibration: measure this machine as a :class:`~rapydli.scheduler.cluster_spec.ClusterSpec`.

:func:`calibrate_local` times one device (:func:`measure_device`), step-like work on every
worker at once (:func:`step_rate`) and Dask's own costs (graphs of tiny tasks pinned to
workers; messages posted to a direct exchange's mailbox), and returns a one-node cluster that
:func:`rapydli.scheduler.cost.simulate` can use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np

from rapydli.errors import PlacementError
from rapydli.scheduler.cluster_spec import ClusterSpec, Device, Link, Overhead


def _mean_seconds(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls after a warm-up: a mean, not a median,
    so that time lost to other processes counts as it does in a step."""

    fn()  # warm-up: first-call compilation, page faults
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _family_efficiency(layer, in_shape: tuple, flops: float, repeats: int) -> float:
    """Achieved share of ``flops`` of one layer's forward + backward, counted as the graph does."""
    rng = np.random.default_rng(0)
    params = layer.init_params(rng, in_shape[1:], np.float32)
    x = rng.random(in_shape, dtype=np.float32)
    y = layer.forward(x, params)
    dy = np.ones_like(y)
    seconds = (_mean_seconds(lambda: layer.forward(x, params), repeats)
               + _mean_seconds(lambda: layer.backward(x, y, params, dy, True), repeats))
    return min(1.0, 3 * layer.flops(y.shape, in_shape[1:]) / seconds / flops)


def measure_device(repeats: int = 5) -> dict:
    """This process's single-device numbers: float32 matmul FLOP/s at MLP sizes, memory
    bandwidth of ``a + b`` on 4 MB arrays into a new array (ops allocate their outputs), per-op
    dispatch seconds and kernel-family efficiencies.

    Run it where the work runs (a Dask worker with 1 thread: :func:`calibrate_local` does).
    """
    from rapydli.graph.ops import identity_task, run_fused
    from rapydli.layers import Conv2D, Dense, MaxPool2D

    rng = np.random.default_rng(0)
    rates = []
    for m, k, n in ((128, 784, 1024), (256, 1024, 1024), (256, 1024, 4096)):
        a, b = rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)
        rates.append(2 * m * k * n / _mean_seconds(lambda: a @ b, repeats))  # noqa: B023
    flops = float(np.median(rates))
    tile = np.ones(1 << 20, np.float32)  # 4 MB, a weight tile; each sum into a new array,
    bandwidth = 3 * tile.nbytes / _mean_seconds(lambda: tile + tile, repeats)  # as ops do
    program = tuple((i, identity_task, (((i - 1) if i else 0, ()),), {}, ()) for i in range(1, 201))
    per_op = _mean_seconds(lambda: run_fused(program, (200,), 0), repeats) / 200
    families = {"Dense": (Dense(512, activation="relu", name="d"), (256, 512)),
                "Conv2D": (Conv2D(16, 3, activation="relu", name="c"), (32, 8, 18, 18)),
                "MaxPool2D": (MaxPool2D(2, name="p"), (32, 16, 16, 16))}
    efficiency = {name: round(_family_efficiency(layer, shape, flops, repeats), 4)
                  for name, (layer, shape) in families.items()}
    return {"flops": flops, "memory_bandwidth": bandwidth, "per_op": per_op,
            "kernel_efficiency": efficiency}


def _noop(*args):
    return None


def _make(nbytes: int):
    return np.ones(nbytes // 4, np.float32)


def _relay(value, hold: float = 0.0):
    if hold:
        time.sleep(hold)
    return value


def _graph_seconds(client, tasks: list[tuple]) -> float:
    """Seconds for ``client.get`` of the last of ``tasks``: ``(fn, input task indices, literal
    args, worker)``, one graph layer per task pinned to its worker as the engine's plans do."""
    import uuid

    from dask._task_spec import Task, TaskRef
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    tag = uuid.uuid4().hex[:8]
    keys = [f"calib-{tag}-{i}" for i in range(len(tasks))]
    layers, deps = {}, {}
    for key, (fn, inputs, args, worker) in zip(keys, tasks):
        refs = [TaskRef(keys[i]) for i in inputs]
        layers[key] = MaterializedLayer({key: Task(key, fn, *refs, *args)}, annotations={
            "workers": [worker], "allow_other_workers": False})
        deps[key] = {keys[i] for i in inputs}
    start = time.perf_counter()
    client.get(HighLevelGraph(layers, deps), keys[-1])
    return time.perf_counter() - start


def _chains(workers: list[str], n: int, alternate: bool, nbytes: int = 0,
            hold: float = 0.0) -> list[tuple]:
    """One chain of ``n`` dependent tasks per worker, all at once, as a multi-worker step keeps
    every worker busy: chain ``c`` starts on ``workers[c]`` and stays there or, with
    ``alternate``, moves to the next worker each task; each task holds its worker ``hold``
    seconds and passes on ``nbytes``. A last task joins the chains (``None`` travels to the
    client)."""
    tasks: list[tuple] = []
    for c in range(len(workers)):
        first = len(tasks)
        tasks.append((_make, (), (nbytes,), workers[c]))
        for i in range(1, n):
            where = workers[(c + i) % len(workers)] if alternate else workers[c]
            tasks.append((_relay, (first + i - 1,), (hold,), where))
    ends = tuple(range(n - 1, len(tasks), n))
    return tasks + [(_noop, ends, (), workers[0])]


def _fan_in(worker: str, n: int) -> list[tuple]:
    """``n - 1`` independent tasks on one worker and one that reads them all."""
    return [(_noop, (), (i,), worker) for i in range(n - 1)] + [(_noop, tuple(range(n - 1)), (),
                                                                   worker)]


def _measure_dask(client, workers: list[str], repeats: int, n: int = 21,
                  payload: int = 4 << 20, hold: float = 0.005) -> dict:
    """Dask's costs from chains of tasks (medians over ``repeats`` interleaved rounds).

    Chain tasks hold their worker ``hold`` seconds, as step tasks compute for milliseconds:
    Dask batches messages to a worker (every 5 ms), so back-to-back empty tasks would also
    time that batching, which tasks of a real step mostly miss.
    """
    one = workers[:1]
    graphs = {"one": _chains(one, 1, False), "fan": _fan_in(one[0], n),
              "same": _chains(workers, n, False, 0, hold),
              "alt": _chains(workers, n, True, 0, hold),
              "same_p": _chains(workers, n, False, payload, hold),
              "alt_p": _chains(workers, n, True, payload, hold)}
    runs: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(repeats + 1):
        for name, tasks in graphs.items():
            runs[name].append(_graph_seconds(client, tasks))
    t = {k: float(np.median(v[1:])) for k, v in runs.items()}  # first round: warm-up
    hops = n - 1
    # fan: n - 1 tasks more than "one"; same: n - 1 dispatches, tasks and holds more
    per_task = max(0.0, (t["fan"] - t["one"]) / hops)
    dispatch = max(0.0, (t["same"] - t["one"]) / hops - per_task - hold)
    latency = max(0.0, (t["alt"] - t["same"]) / hops)
    moving = ((t["alt_p"] - t["same_p"]) - (t["alt"] - t["same"])) / hops
    return {"per_task": per_task, "dispatch": dispatch, "latency": latency,
            "bandwidth": payload / max(moving, 1e-6)}


def _post_seconds(boxes: tuple, step: str, n: int, nbytes: int) -> float:
    """In a task of mesh worker 0: post ``n`` tiles of ``nbytes`` to mailbox ``boxes[1]``, one
    message each as the engine posts a run of sends (by doorbell where the two share a
    machine, as the engine's do), and wait until all were delivered; seconds per message."""
    from rapydli.scheduler.mailbox import Exchange

    tile = np.ones(nbytes // 4, np.float32)
    exchange = Exchange(step, 0, boxes)
    start = time.perf_counter()
    for i in range(n):
        exchange.post(f"t{i}", tile, (1,))
        exchange.flush()
    exchange.finish()
    return (time.perf_counter() - start) / n


@contextlib.contextmanager
def _mailboxes(client, workers: list[str]):
    """Mailboxes on ``workers`` for the duration (their ``boxes``), closed afterwards."""
    import uuid

    from rapydli.scheduler.mailbox import close_mailboxes, start_mailboxes

    futures, boxes = start_mailboxes(client, workers, f"calib-{uuid.uuid4().hex[:8]}")
    try:
        yield boxes
    finally:
        close_mailboxes(futures)


def _measure_message(client, workers: list[str], repeats: int, n: int = 200,
                     nbytes: int = 64) -> float:
    """``per_message``: the sender's seconds per small message of the direct exchange, from a
    task on ``workers[0]`` posting to a :class:`~rapydli.scheduler.mailbox.Mailbox` on
    ``workers[1]`` (median over ``repeats`` runs after a warm-up)."""
    runs = []
    with _mailboxes(client, workers[:2]) as boxes:
        for r in range(repeats + 1):
            posts = client.submit(_post_seconds, boxes, f"calib-{r}", n, nbytes, pure=False,
                                  workers=workers[:1])
            takes = client.submit(_take_all, boxes, f"calib-{r}", n, pure=False,
                                  workers=workers[1:2])  # so that no message waits unread
            runs.append(posts.result())
            takes.result()
    return float(np.median(runs[1:]))  # first run: warm-up (the actor proxy, imports)


def _take_all(boxes: tuple, step: str, n: int) -> None:
    """In a task of mesh worker 1: take the ``n`` tiles :func:`_post_seconds` posts."""
    from rapydli.scheduler.mailbox import Exchange

    exchange = Exchange(step, 1, boxes, timeout=60.0)
    for i in range(n):
        exchange.take(f"t{i}")


def _ping(boxes: tuple, me: int, n: int) -> float:
    """In a task on mesh worker ``me`` (0 or 1): ``n`` round trips of a 64-byte tile through
    the mailboxes ``boxes``, worker 0 posting first; seconds per round trip."""
    from rapydli.scheduler.mailbox import Exchange

    tile = np.ones(16, np.float32)
    start = time.perf_counter()
    for i in range(n):
        exchange = Exchange(f"ping-{i}", me, boxes, timeout=30.0)
        try:
            if me == 0:
                exchange.post("ping", tile, (1,))
                exchange.take("pong")
            else:
                exchange.take("ping")
                exchange.post("pong", tile, (0,))
            exchange.finish()
        except Exception as error:  # the peer must not wait for a ping that will not come
            exchange.fail(error)
            raise
    return (time.perf_counter() - start) / n


def _measure_mail_latency(client, workers: list[str], repeats: int, n: int = 50) -> float:
    """``mail_latency``: half a round trip of a small tile between tasks on ``workers[0]`` and
    ``workers[1]``, each taking from its own mailbox what the other posted (median over
    ``repeats`` runs after a warm-up)."""
    with _mailboxes(client, workers[:2]) as boxes:
        runs = [max(client.gather([client.submit(_ping, boxes, me, n, pure=False,
                                                 workers=[workers[me]]) for me in (0, 1)]))
                for _ in range(repeats + 1)]
    return float(np.median(runs[1:])) / 2


def step_rate(seconds: float = 1.5, n_layers: int = 6) -> float:
    """FLOP/s of step-like work for ``seconds``: forward and backward of ``n_layers`` distinct
    1024-unit ReLU dense layers in turn at batch 128, on a fresh copy of the input each time.
    Their weights (4 MB each, 24 MB in all) are a training step's working set: larger than a
    core's share of a shared last-level cache, so workers computing at once contend for it and
    for memory, as they do in steps."""

    from rapydli.layers import Dense

    rng = np.random.default_rng(0)
    layer = Dense(1024, activation="relu", name="d")
    weights = [layer.init_params(rng, (1024,), np.float32) for _ in range(n_layers)]
    x = rng.random((128, 1024), dtype=np.float32)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() < start + seconds or calls < n_layers:
        params = weights[calls % n_layers]
        y = layer.forward(x.copy(), params)
        layer.backward(x, y, params, np.ones_like(y), True)
        calls += 1
    return 3 * layer.flops((128, 1024), (1024,)) * calls / (time.perf_counter() - start)


def calibrate_local(n_workers: int = 2, repeats: int = 7, client=None) -> ClusterSpec:
    """Measure this machine as a :class:`ClusterSpec`: ``n_workers`` Dask worker processes
    with 1 thread each (``local_client``), one node, Dask TCP on localhost between them.

    Device numbers come from :func:`measure_device` on one worker alone; ``node_flops`` scales
    that device's rate by how much step-like work (:func:`step_rate`) all workers get done at
    once relative to one worker alone (the workers share the cores, the memory and the caches
    with each other, the scheduler, the client and whatever else runs here). Dask's costs come
    from graphs of tiny tasks (one graph layer per task, pinned to workers as the engine pins
    them): ``per_task`` is the extra time per independent task on one worker; ``dispatch``
    (the extra time per dependent task beyond ``per_task``), link ``latency`` (the extra time
    per task when consecutive tasks alternate workers) and link ``bandwidth`` (from tasks that
    pass on 4 MB) are measured with one chain per worker running at once, as a multi-worker
    step keeps every worker busy, each task holding its worker 5 ms as step tasks compute for
    milliseconds. ``per_message`` is a task's wall time posting 200 messages of 64 B, one at a
    time, to a mailbox on another worker, per message (:func:`_measure_message`); ``mail_latency``
    is half a round trip of a small tile between tasks on two workers, each taking from its
    own mailbox (:func:`_measure_mail_latency`).
    ``per_step`` is what steps of a network too small to compute take through the engine,
    one at a time, beyond the simulator's makespan of them (:func:`_per_step`).
    Memory is each worker's Dask memory limit.
    Takes about half a minute.
    """
    from rapydli.scheduler.cluster import local_client, worker_info

    own = client is None
    if own:
        client = local_client(n_workers, threads_per_worker=1)
        client.wait_for_workers(n_workers)
    try:
        info = worker_info(client)
        workers = sorted(info)
        if len(workers) < 2:
            raise PlacementError(f"calibrate_local: expected a client with at least 2 workers "
                                 f"to time transfers; received {len(workers)}")
        device = client.submit(measure_device, repeats, pure=False, workers=workers[:1]).result()
        alone = client.submit(step_rate, pure=False, workers=workers[:1]).result()
        together = client.gather([client.submit(step_rate, pure=False, workers=[w])
                                  for w in workers])  # every worker at once, as steps run
        dask_costs = _measure_dask(client, workers, repeats)
        per_message = _measure_message(client, workers, repeats)
        mail_latency = _measure_mail_latency(client, workers, repeats)
        memory = float(info[workers[0]].get("memory_limit") or 0) or 1e9
        link = Link(dask_costs["bandwidth"], dask_costs["latency"])
        spec = ClusterSpec(
            "this-machine", 1, len(workers),
            Device(device["flops"], memory, device["memory_bandwidth"],
                   tuple(sorted(device["kernel_efficiency"].items())), "cpu"), link, link,
            Overhead(device["per_op"], dask_costs["per_task"], dask_costs["dispatch"], 0.0,
                     per_message, mail_latency),
            node_flops=device["flops"] * min(len(workers), sum(together) / alone))
        per_step = _per_step(client, spec, repeats)
    finally:
        if own:
            cluster = client.cluster
            client.close()
            cluster.close()
    return dataclasses.replace(spec, overhead=dataclasses.replace(spec.overhead,
                                                                  per_step=per_step))


def _per_step(client, spec: ClusterSpec, repeats: int) -> float:
    """What a step costs beyond its tasks: the engine's own graph submission and the metrics'
    trip to the client, measured end to end on a network too small to compute (steps one at
    a time through :class:`~rapydli.scheduler.engine.Engine`, as the engine submits them),
    less what the simulator puts in its makespan (its tasks, dispatches and transfers)."""
    from rapydli.layers import Dense
    from rapydli.network import Sequential
    from rapydli.optim import SGD
    from rapydli.scheduler.cost import simulate
    from rapydli.scheduler.engine import Engine

    net = Sequential([Dense(2)], input_shape=(4,))
    rng = np.random.default_rng(0)
    engine = Engine(net, None, SGD(lr=0.01), client)
    try:
        engine.set_params(net.init(0))
        engine.set_data("train", rng.random((16, 4), dtype=np.float32), rng.integers(0, 2, 16))
        times = []
        for _ in range(2 * repeats + 1):
            start = time.perf_counter()
            engine.value(engine.run("train", np.arange(8))["metrics"])
            times.append(time.perf_counter() - start)
    finally:
        engine.close()
    modelled = simulate(net, None, 8, spec).step_time  # per_step is 0 in spec
    return max(0.0, float(np.median(times[1:])) - modelled)


