"""The direct exchange: one task per worker and step, tiles posted worker to worker.

Structure (task counts, run order, freedom from deadlock) is checked on plans alone; numbers
against the graph exchange and the single worker on the in-process cluster; failure paths
(a failed peer, a closed mailbox, a timeout, a killed worker) on real mailboxes.
"""
from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest
from distributed.client import FutureCancelledError

import rapydli as rd
from rapydli.graph.fuse import mail_order, mail_sends
from rapydli.graph.lower import lower
from rapydli.graph.to_dask import StepPlan
from rapydli.graph.unroll import unroll
from rapydli.scheduler.engine import Engine
from rapydli.scheduler.mailbox import (FAILED, Exchange, ExchangeError, Mailbox,
                                       close_mailboxes, start_mailboxes)

from test_equivalence import PLACEMENTS, assert_same_as_single, cnn, data, mlp

OPTIMIZER = rd.SGD(lr=0.1, momentum=0.9)


def _mlp():
    return rd.Sequential([rd.Dense(16, activation="relu"), rd.Dense(16, activation="tanh"),
                          rd.Dense(10)], input_shape=(12,))


# --- plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4])
def test_direct_plan_is_one_task_per_worker_plus_the_metrics(steps):
    graph = lower(_mlp(), rd.data_parallel(2), 32, "train", OPTIMIZER)
    graph = unroll(graph, steps) if steps > 1 else graph
    direct, fused = StepPlan(graph, direct=True), StepPlan(graph)
    names = sorted(t.name for t in direct.tasks.values())
    # a worker's ops in one task; its loss scalars travel to the metrics as one send task
    assert names[-2:] == ["w0", "w1"] and "metrics" in names and direct.n_tasks == 5
    assert fused.n_tasks > direct.n_tasks
    assert "exchange=direct" in repr(direct) and "exchange=graph" in repr(fused)
    # the gradients travel as mail: 3 weights + 3 biases, each way, per step
    assert len(direct.mail) == 2 * 6 * steps
    # no Dask dependency between the workers' tasks: the tiles go through the mailboxes
    for name in ("w0", "w1"):
        assert all(kind == "ph" for kind, _ in direct.tasks[name].externals)


def test_a_one_worker_plan_has_no_mail():
    graph = lower(_mlp(), None, 32, "train", OPTIMIZER)
    plan = StepPlan(graph, direct=True)
    assert not plan.mail and plan.n_tasks == StepPlan(graph).n_tasks


def test_the_earliest_posted_gradients_are_summed_first():
    """Among ops that read posted tiles, the one whose tiles left earliest runs first: the
    first layer's gradients, which the next step needs first and which leave first (see
    below), are summed and applied while the later layers' are still on their way; the order
    is the same however often it is computed."""
    graph = lower(_mlp(), rd.data_parallel(2), 32, "train", OPTIMIZER)
    mail = mail_sends(graph)
    order = mail_order(graph, mail)
    sums = [k.split(".")[0] for k in order if graph.op(k).kind == "reduce"
            and graph.op(k).worker == 0 and ".weight/" in k]
    assert sums == ["0", "1", "2"]
    assert mail_order(lower(_mlp(), rd.data_parallel(2), 32, "train", OPTIMIZER),
                      mail) == order


def test_weight_gradients_leave_lowest_layer_first_after_the_input_gradients():
    """In data parallel a layer's backward pass is two ops: the input gradient, which the
    layers below wait for, and the weight gradients, which only the sums wait for. Each worker
    runs the chain of input gradients first, then the weight gradients from the first layer up
    (the next step's forward pass needs them in that order), and posts each right after it
    is computed, so its transfer overlaps the weight gradients still to compute."""
    graph = lower(_mlp(), rd.data_parallel(2), 32, "train", OPTIMIZER)
    mail = mail_sends(graph)
    order = [k for k in mail_order(graph, mail) if graph.op(k).worker == 0]
    backward = [k for k in order if graph.op(k).phase == "backward"]
    fns = [graph.op(k).fn.__name__ for k in backward]
    assert fns == ["backward_input_task", "backward_input_task", "backward_task",
                   "backward_params_task", "backward_params_task"]
    assert [graph.op(k).layer for k in backward] == ["2", "1", "0", "1", "2"]
    for k in mail:  # each send right after what it sends (only other sends in between)
        op = graph.op(k)
        if op.worker != 0:
            continue
        producer = order.index(op.inputs[0].key)
        assert all(j in mail for j in order[producer + 1:order.index(k)])
    # every weight gradient leaves before the first sum waits for a peer's
    first_sum = min(order.index(k) for k in order if graph.op(k).kind == "reduce")
    assert all(order.index(k) < first_sum for k in order if k in mail)


@pytest.mark.parametrize("placement", [rd.data_parallel(2), rd.model_parallel(2)],
                         ids=["dp2", "mp2"])
def test_an_unrolled_task_loads_each_batch_when_the_one_before_is_in_use(placement):
    """Loads wait for nothing, so a worker about to wait for a tile would load every step of
    its task at once and hold all the batches; each load comes after the first reader of the
    worker's previous load instead, so a worker holds about two steps' batches."""
    steps = 6
    graph = unroll(lower(_mlp(), placement, 32, "train", OPTIMIZER), steps)
    order = mail_order(graph, mail_sends(graph))
    for worker in (0, 1):
        mine = [k for k in order if graph.op(k).worker == worker]
        loads = [k for k in mine if graph.op(k).kind == "load"]
        assert len(loads) >= steps  # inputs (and targets, where the loss is)
        for before, load in itertools.pairwise(loads):
            first_reader = min(mine.index(r) for r in graph.successors(before))
            assert mine.index(load) > first_reader, (before, load)


def _runs_to_the_end(graph, order: list[str], mail: set[str]) -> bool:
    """Play the workers' programs as the direct exchange runs them: each worker runs its next
    op once every input exists, a mail input only once its send ran on the other worker."""
    programs: dict = {}
    for key in order:
        programs.setdefault(graph.op(key).worker, []).append(key)
    done = {k for k in graph.nodes if graph.op(k).kind == "placeholder"}
    position = {w: 0 for w in programs}
    progress = True
    while progress:
        progress = False
        for w, program in programs.items():
            while position[w] < len(program):
                key = program[position[w]]
                if not all(p in done for p in graph.predecessors(key)):
                    break  # blocked, as a take waits for a tile
                done.add(key)
                position[w] += 1
                progress = True
    return all(position[w] == len(p) for w, p in programs.items())


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
@pytest.mark.parametrize("net", [cnn, mlp])
def test_every_placement_runs_to_the_end_without_deadlock(name, net):
    network = net()
    for mode, steps in [("train", 1), ("train", 3), ("grad", 1), ("eval", 1)]:
        graph = lower(network, PLACEMENTS[name](net.__name__), 6, mode, OPTIMIZER, "float64")
        graph = unroll(graph, steps) if steps > 1 else graph
        mail = mail_sends(graph)
        assert _runs_to_the_end(graph, mail_order(graph, mail), mail), (name, mode, steps)


def test_the_shared_order_matters():
    """The check above can fail: workers that order their ops independently can wait on
    each other forever (here: each takes its peer's gradients before sending its own)."""
    graph = lower(_mlp(), rd.data_parallel(2), 32, "train", OPTIMIZER)
    mail = mail_sends(graph)
    order = mail_order(graph, mail)
    readers = {k for k in order if any(p in mail for p in graph.predecessors(k))}
    selfish = ([k for k in order if k not in mail and k not in readers] +
               [k for k in order if k in readers] + [k for k in order if k in mail])
    assert not _runs_to_the_end(graph, selfish, mail)


# --- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["dp2", "mp3", "sp2", "mixed3"])
def test_direct_and_graph_exchanges_train_bitwise_alike(client, placement):
    net = cnn()
    x, y = data(net, 12, "float64")
    params = {}
    for exchange in ("direct", "graph"):
        engine = Engine(net, PLACEMENTS[placement]("cnn"), OPTIMIZER, client, "float64",
                        exchange=exchange)
        assert engine.exchange == exchange
        engine.set_params(net.init(0))
        engine.set_data("train", x, y)
        for step in range(3):
            engine.run("train", np.arange(step * 4, step * 4 + 4))
        params[exchange] = engine.get_params()
        engine.close()
    for name, value in params["graph"].items():
        np.testing.assert_array_equal(params["direct"][name], value, err_msg=name)
    single = Engine(net, None, OPTIMIZER, None, "float64")
    single.set_params(net.init(0))
    single.set_data("train", x, y)
    for step in range(3):
        single.run("train", np.arange(step * 4, step * 4 + 4))
    assert_same_as_single(params["direct"], single.get_params(), "float64")


@pytest.mark.parametrize("placement", ["dp2", "dp3", "hy31", "mixed3"])
def test_sharded_updates_train_bitwise_like_whole_ones(client, placement):
    """Weights of 64 KiB or more: the direct exchange updates them sharded across their
    replicas (blocks of rows), the graph exchange whole on every replica; same bits."""
    net = rd.Sequential([rd.Dense(128, activation="relu"), rd.Dense(96, activation="tanh"),
                         rd.Dense(10)], input_shape=(80,))  # 80 and 96 KiB in float64
    x, y = data(net, 24, "float64")
    params, states = {}, {}
    for exchange in ("direct", "graph"):
        engine = Engine(net, PLACEMENTS[placement](net), OPTIMIZER, client, "float64",
                        exchange=exchange)
        placed = engine.plan(12, "train").graph.ops(kind="place")
        assert bool(placed) == (exchange == "direct")
        engine.set_params(net.init(0))
        engine.set_data("train", x, y)
        for step in range(3):
            engine.run("train", np.arange(step * 8, step * 8 + 12) % 24)
        params[exchange], states[exchange] = engine.get_params(), engine.get_opt_state()
        engine.close()
    for name, value in [*params["graph"].items(), *states["graph"].items()]:
        got = params["direct"].get(name, states["direct"].get(name))
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_exchange_is_chosen_and_checked(client):
    net = _mlp()
    assert Engine(net, rd.data_parallel(2), OPTIMIZER, client).exchange == "direct"
    assert Engine(net, None, OPTIMIZER, client).exchange == "graph"  # nothing to exchange
    assert Engine(net, rd.data_parallel(2), OPTIMIZER, None).exchange == "graph"
    assert Engine(net, rd.data_parallel(2), OPTIMIZER, client, fused=False).exchange == "graph"
    with pytest.raises(ValueError, match="needs a Dask client"):
        Engine(net, rd.data_parallel(2), OPTIMIZER, None, exchange="direct")
    with pytest.raises(ValueError, match="expected one of"):
        Engine(net, rd.data_parallel(2), OPTIMIZER, client, exchange="mpi")


# --- failures ---------------------------------------------------------------------------------


@pytest.fixture
def boxes(client):
    workers = sorted(client.scheduler_info()["workers"])[:2]
    futures, boxes = start_mailboxes(client, workers, f"t{time.monotonic_ns()}")
    yield workers, futures, boxes
    close_mailboxes(futures)


def _take(exchange: Exchange, key: str):
    return exchange.take(key)


def _post(exchange: Exchange, key: str, value):
    exchange.post(key, value, (0,))
    exchange.finish()


def _fail(exchange: Exchange):
    exchange.fail(ValueError("bad tile"))


def test_a_posted_tile_arrives_aligned(client, boxes):
    workers, _, boxes = boxes
    value = np.arange(1000, dtype=np.float32)[1:]  # a view at an odd offset
    taken = client.submit(_take, Exchange("s", 0, boxes), "k", workers=[workers[0]])
    client.submit(_post, Exchange("s", 1, boxes), "k", value, workers=[workers[1]]).result()
    got = taken.result(timeout=30)
    np.testing.assert_array_equal(got, value)


def test_a_failed_peer_stops_the_waiting_worker_at_once(client, boxes):
    workers, _, boxes = boxes
    taken = client.submit(_take, Exchange("s", 0, boxes), "k", workers=[workers[0]])
    client.submit(_fail, Exchange("s", 1, boxes), workers=[workers[1]]).result()
    with pytest.raises(ValueError, match="bad tile") as raised:  # the cause, noted
        taken.result(timeout=30)
    assert "raised on mesh worker 1" in " ".join(getattr(raised.value, "__notes__", ()))


def test_closing_the_mailboxes_wakes_a_waiting_take(client, boxes):
    workers, futures, boxes = boxes
    taken = client.submit(_take, Exchange("s", 0, boxes), "k", workers=[workers[0]])
    time.sleep(0.3)
    assert not taken.done()
    close_mailboxes(futures)
    with pytest.raises(ExchangeError, match="closed"):
        taken.result(timeout=30)


def test_a_tile_that_never_comes_times_out_with_advice():
    box = Mailbox(f"alone-{time.monotonic_ns()}")
    start = time.monotonic()
    with pytest.raises(ExchangeError, match="did not arrive in 0 s; the worker sending it"):
        box.take(("s", "k"), timeout=0.2)
    assert time.monotonic() - start < 5
    box.close()


def test_a_peer_task_failing_mid_step_fails_the_step(client):
    """A kernel error on one worker reaches the user from the step, not after a timeout."""
    net = _mlp()
    engine = Engine(net, rd.data_parallel(2), OPTIMIZER, client)
    engine.set_params(net.init(0))
    x = np.zeros((8, 12), np.float32)
    engine.set_data("train", x, np.zeros(8, np.int64))
    index = np.arange(8)
    index[5] = 10_000  # a row of worker 1's half that does not exist
    start = time.monotonic()
    with pytest.raises(IndexError, match="out of bounds"):
        engine.value(engine.run("train", index)["metrics"])
    # worker 0 heard of it and stopped waiting for worker 1's gradients: it is free now
    client.submit(int, 1, workers=[engine.workers[0]], pure=False).result(timeout=20)
    assert time.monotonic() - start < 30
    # neither mailbox (in this process: the cluster's workers are threads) keeps the failed
    # step's tiles: the failing task dropped its own, the notice dropped its peer's
    boxes = [b for name, b in Mailbox._here.items() if engine._token in name]
    assert len(boxes) == 2 and not [k for b in boxes for k in b.items if k[1] != FAILED]
    engine.close()


def _hold(event_name: str):
    """Occupy a worker's only thread for up to a minute (or until the event is set on this
    worker's scheduler: the client is named, for with two clusters in one process the
    default one may be the other's)."""
    from distributed import Event, get_client

    Event(event_name, client=get_client()).wait(60)


@pytest.mark.slow
def test_a_worker_killed_while_its_peer_waits_releases_the_peer(process_client):
    """Worker 1 is busy, so worker 0's step task waits for its tiles; worker 1 is killed. The
    step fails, and closing the engine frees worker 0 at once (no 600 s wait)."""
    client = process_client
    net = _mlp()
    engine = Engine(net, rd.data_parallel(2), OPTIMIZER, client)
    engine.set_params(net.init(0))
    engine.set_data("train", np.zeros((8, 12), np.float32), np.zeros(8, np.int64))
    engine.value(engine.run("train", np.arange(8))["metrics"])
    w0, w1 = engine.workers
    busy = client.submit(_hold, "rapydli-test-hold", workers=[w1], pure=False)
    metrics = engine.run("train", np.arange(8))["metrics"]
    time.sleep(1.0)
    pid = client.run(os.getpid, workers=[w1])[w1]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(FutureCancelledError):  # what the trainer's recovery catches
        engine.value(metrics)
    del busy
    engine.close()
    start = time.monotonic()
    client.submit(int, 1, workers=[w0], pure=False).result(timeout=30)
    assert time.monotonic() - start < 20


def test_fit_passes_the_exchange_to_its_engine(client):
    net = _mlp()
    x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
    y = np.arange(64) % 10
    runs = {ex: rd.fit(net, x, y, placement=rd.data_parallel(2), client=client, epochs=2,
                       batch_size=16, exchange=ex, steps_per_task=2)
            for ex in ("graph", "direct")}
    for name, value in runs["graph"].params.items():
        np.testing.assert_array_equal(runs["direct"].params[name], value, err_msg=name)
    with pytest.raises(ValueError, match="exchange: expected one of"):
        rd.fit(net, x, y, placement=rd.data_parallel(2), client=client, exchange="p2p")


def test_graphs_in_flight_together_run_in_one_order_on_every_worker(client):
    """Evaluation submits all its batches at once, and nothing orders those graphs for Dask:
    without the engine chaining each worker's tasks in submission order, one worker may run
    batch 2 while its peer runs batch 1, each waiting for the other's tiles."""
    from distributed import wait

    net = cnn()
    x, y = data(net, 48, "float64")
    results = {}
    for exchange in ("direct", "graph"):
        engine = Engine(net, PLACEMENTS["hy12"]("cnn"), OPTIMIZER, client, "float64",
                        exchange=exchange)
        engine.set_params(net.init(0))
        engine.set_data("test", x, y)
        bounds = [engine.run("eval", np.arange(i, i + 6), "test")["metrics"]
                  for i in range(0, 48, 6)]
        wait([b.value for b in bounds], timeout=60)  # TimeoutError: some never finished
        results[exchange] = [engine.value(b) for b in bounds]
        engine.close()
    assert results["direct"] == results["graph"]


def test_engines_sharing_workers_wait_on_no_cycle(client):
    """Two engines on the same workers, their steps in flight together: every worker runs
    the direct tasks of both in one order (the engines share one chain per worker), so
    neither engine's task holds a worker while waiting for a tile its peer sends only after
    the other engine's task there."""
    from distributed import wait

    net = cnn()
    x, y = data(net, 48, "float64")
    engines = []
    for placement in ("hy12", "mp3"):
        engine = Engine(net, PLACEMENTS[placement]("cnn"), OPTIMIZER, client, "float64")
        assert engine.exchange == "direct"
        engine.set_params(net.init(0))
        engine.set_data("test", x, y)
        engines.append(engine)
    try:
        bounds = [(e, e.run("eval", np.arange(i, i + 6), "test")["metrics"])
                  for i in range(0, 48, 6) for e in (engines if i % 12 else engines[::-1])]
        wait([b.value for _, b in bounds], timeout=60)  # TimeoutError: some never finished
        first = [e.value(b) for e, b in bounds if e is engines[0]]
        second = [e.value(b) for e, b in bounds if e is engines[1]]
    finally:  # a stuck take must not hold the shared cluster's threads for later tests
        for engine in engines:
            engine.close()
    # the same network and weights, placed otherwise: (loss, n_correct) per batch agree
    np.testing.assert_allclose(np.asarray(first, float), np.asarray(second, float), rtol=1e-9)
    from rapydli.scheduler import engine as engine_module

    assert not any(token == e._token for token, _ in engine_module._LAST_DIRECT.values()
                   for e in engines), "a closed engine's task is still held for the next one"


def test_a_failed_step_leaves_no_tiles_behind():
    """Tiles of a step that failed are dropped, also those still arriving (only the failure
    notices stay); other steps' tiles are kept."""
    import asyncio

    box = Mailbox(f"purge-{time.monotonic_ns()}")
    tile = np.ones(4, np.float32)
    asyncio.run(box.put([(("s1", "a"), tile), (("s2", "a"), tile)]))
    asyncio.run(box.put([(("s1", FAILED), "mesh worker 1 failed: boom")]))
    asyncio.run(box.put([(("s1", "b"), tile)]))  # late, after the failure
    assert set(box.items) == {("s1", FAILED), ("s2", "a")}
    with pytest.raises(ExchangeError, match="boom"):
        box.take(("s1", "b"), timeout=1)
    box.forget("s2")  # this worker's own task failed on s2
    assert set(box.items) == {("s1", FAILED)}
    with pytest.raises(ExchangeError, match="step s2 failed on this worker"):
        box.take(("s2", "b"), timeout=1)
    box.close()


def test_a_waiting_peer_raises_the_first_failure_with_its_cause():
    """A failed task posts its own error: a peer waiting for its tiles raises that error (so
    the step fails with its cause, whichever worker's failure the user hears of first), and
    a later notice (the engine's, once it sees the task failed) does not replace it."""
    import asyncio

    from rapydli.scheduler.mailbox import _notice

    cause = _notice(IndexError("index 10000 is out of bounds"), 1)
    assert isinstance(cause, IndexError) and "raised on mesh worker 1" in cause.__notes__[0]
    assert _notice(cause, 0) is cause  # passed on by the peer that raised it, unchanged
    assert _notice(ExchangeError("lost"), 0) == "mesh worker 0 failed: ExchangeError: lost"
    box = Mailbox(f"cause-{time.monotonic_ns()}")
    asyncio.run(box.put([(("s", FAILED), cause)]))
    asyncio.run(box.put([(("s", FAILED), "mesh worker 1's task error before it could post")]))
    with pytest.raises(IndexError, match="out of bounds"):
        box.take(("s", "k"), timeout=1)
    box.close()


def test_a_cancelled_task_of_another_engine_does_not_fail_the_next_step(client):
    """The shared chain skips a task that was cancelled (or failed): another engine's step
    waits for it no longer, instead of failing with it."""
    from rapydli.scheduler import engine as engine_module

    net = _mlp()
    x, y = np.zeros((8, 12), np.float32), np.zeros(8, np.int64)
    first, second = (Engine(net, rd.data_parallel(2), OPTIMIZER, client) for _ in range(2))
    for engine in (first, second):
        engine.set_params(net.init(0))
        engine.set_data("train", x, y)
    first.value(first.run("train", np.arange(8))["metrics"])
    held = [f for token, f in engine_module._LAST_DIRECT.values() if token == first._token]
    assert len(held) == 2  # one per worker of the mesh
    client.cancel(held)
    metrics = second.value(second.run("train", np.arange(8))["metrics"])
    assert np.all(np.isfinite(np.asarray(metrics, dtype=float)))
    first.close()
    second.close()


def test_a_task_cancelled_before_it_ran_releases_its_waiting_peer(client):
    """A direct task that never runs (cancelled, or its previous task failed) cannot tell its
    peers itself: the engine does, from the client, so the peer's take fails at once instead
    of waiting out the take timeout."""
    from distributed import Event

    from rapydli.scheduler import engine as engine_module

    net = _mlp()
    engine = Engine(net, rd.data_parallel(2), OPTIMIZER, client)
    engine.set_params(net.init(0))
    engine.set_data("train", np.zeros((8, 12), np.float32), np.zeros(8, np.int64))
    engine.value(engine.run("train", np.arange(8))["metrics"])  # mailboxes started
    event = Event(f"hold-{time.monotonic_ns()}", client=client)
    held = client.submit(_hold, event.name, workers=[engine.workers[1]], pure=False)
    try:
        engine.run("train", np.arange(8))
        chain = engine_module._LAST_DIRECT
        first = chain[(client.id, engine.workers[0])][1]
        second = chain[(client.id, engine.workers[1])][1]
        client.cancel([second])  # queued behind the held task: it never runs
        with pytest.raises(ExchangeError, match="cancelled before it could post"):
            first.result(timeout=30)
    finally:
        event.set()
        held.result(timeout=30)
        engine.close()
