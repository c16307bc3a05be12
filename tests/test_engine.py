"""The engine: weights resident where the placement puts them, plans reused, verbs agree."""
from __future__ import annotations

import numpy as np
import pytest
from distributed import wait

import rapydli as rd
from rapydli.scheduler.engine import Engine
from rapydli.storage.datasets import synthetic
from rapydli.storage.loader import epoch_rng


@pytest.fixture(scope="module")
def problem():
    x, y = synthetic(96, seed=3)
    net = rd.Sequential([rd.Conv2D(4, 3, padding=1, activation="relu"), rd.MaxPool2D(2),
                         rd.Flatten(), rd.Dense(12, activation="relu"), rd.Dense(10)],
                        input_shape=(1, 8, 8))
    return net, x, y


def test_weights_stay_on_their_workers(client, problem):
    net, x, y = problem
    engine = Engine(net, rd.hybrid(1, 2), rd.SGD(lr=0.1, momentum=0.9), client)
    engine.set_params(net.init(0))
    engine.set_data("train", x, y)
    for step in range(3):
        engine.value(engine.run("train", np.arange(step * 32, step * 32 + 32))["metrics"])
    assert len(engine.plans) == 1, "one plan per (batch, mode), built once and reused"
    wait([bound.value for bound in engine.resident.values()])
    dense = [k for k, info in engine.resident_info.items()
             if info[0] == "param" and info[1] == "3.weight"]
    assert len(dense) == 2  # the dense weight is cut over 2 workers, one shard each
    for key in engine.resident:
        info = engine.resident_info[key]
        worker = info[3] if info[0] == "param" else info[4]
        holders = client.who_has([engine.resident[key].value])
        (hold,) = holders.values()
        assert engine.workers[worker] in hold, f"{key} left its worker"
    shards = sorted(engine.resident_info[k][2] for k in dense)
    assert shards == [((0, 6), (0, 64)), ((6, 12), (0, 64))]


@pytest.mark.parametrize("placement", [rd.hybrid(1, 2), rd.data_parallel(3)],
                         ids=["hybrid12-graph", "dp3-direct"])
def test_step_graphs_name_their_programs_instead_of_carrying_them(client, problem, placement):
    """Each pinned task's (program, keep, drops) is sent to its worker once per plan; the
    step graphs Dask receives, logs and keeps carry its key."""
    import pickle

    net, x, y = problem
    exchange = "graph" if placement.mesh.size == 2 else "direct"
    engine = Engine(net, placement, rd.SGD(lr=0.1), client, exchange=exchange)
    engine.set_params(net.init(0))
    engine.set_data("train", x, y)
    for step in range(3):
        engine.value(engine.run("train", np.arange(step * 16, step * 16 + 16))["metrics"])
    plan = engine.plans[(16, "train", 1)]
    specs = engine._specs[(16, "train", 1)]
    pinned = {t.name: t for t in plan.tasks.values() if t.worker is not None}
    assert set(specs) == set(pinned) and len(engine._specs) == 1  # sent once, reused
    holders = client.who_has(list(specs.values()))
    for name, future in specs.items():
        assert list(holders[future.key]) == [engine.workers[pinned[name].worker]]
        assert future.result() == pinned[name].spec()
    task = pinned[max(pinned, key=lambda n: len(pinned[n].program))]
    assert len(pickle.dumps(specs[task.name].key)) < len(pickle.dumps(task.spec())) / 20
    engine.close()
    assert engine._specs == {}


def test_engines_pinned_to_chosen_workers_stay_there(client, problem):
    """Engine(workers=[...]) binds mesh workers to the named addresses: two single-worker
    engines on two different workers keep their weights there and compute what an
    in-process engine computes."""
    from rapydli.scheduler.cluster import bind_workers

    net, x, y = problem
    default = bind_workers(client, rd.Mesh(data=1))
    addresses = [a for a in client.scheduler_info()["workers"] if a not in default]
    results = []
    for address in addresses[:2]:  # neither is where the engine would go unpinned
        engine = Engine(net, None, rd.SGD(lr=0.1, momentum=0.9), client, workers=[address])
        assert engine.workers == [address]
        engine.set_params(net.init(0))
        engine.set_data("train", x, y)
        engine.value(engine.run("train", np.arange(32))["metrics"])
        bounds = [bound.value for bound in engine.resident.values()]
        wait(bounds)
        assert all(holders == (address,) for holders in
                   map(tuple, client.who_has(bounds).values())), "a tile left its worker"
        results.append(engine.get_params())
        engine.close()
    local = Engine(net, None, rd.SGD(lr=0.1, momentum=0.9))
    local.set_params(net.init(0))
    local.set_data("train", x, y)
    local.value(local.run("train", np.arange(32))["metrics"])
    for params in results:
        for name, value in local.get_params().items():
            np.testing.assert_allclose(params[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("workers, message", [
    (["tcp://10.9.9.9:1"], "not in the cluster"),
    ([], "needs 1 distinct worker"),
])
def test_pinning_to_unknown_or_too_few_workers_is_refused(client, problem, workers, message):
    net, _, _ = problem
    with pytest.raises(rd.PlacementError, match=message):
        Engine(net, None, rd.SGD(lr=0.1), client, workers=workers)


def test_pinning_without_a_client_is_refused(problem):
    net, _, _ = problem
    with pytest.raises(rd.PlacementError, match="needs a client"):
        Engine(net, None, rd.SGD(lr=0.1), None, workers=["tcp://127.0.0.1:1"])


def test_fit_learns_and_matches_single_worker(client, problem):
    net, x, y = problem
    kwargs = dict(optimizer=rd.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=24, seed=1)
    single = rd.fit(net, x, y, **kwargs)
    hybrid = rd.fit(net, x, y, placement=rd.hybrid(1, 3), client=client, **kwargs)
    assert hybrid["loss"][-1] < hybrid["loss"][0]
    np.testing.assert_allclose(hybrid["loss"], single["loss"], rtol=1e-4)
    for key, value in single.params.items():
        np.testing.assert_allclose(hybrid.params[key], value, rtol=1e-4, atol=1e-5)


def test_predict_and_evaluate_agree_across_placements(client, problem):
    net, x, y = problem
    params = net.init(5)
    logits = rd.predict(net, params, x, batch_size=40)
    split = rd.predict(net, params, x, placement=rd.model_parallel(3), client=client,
                       batch_size=40)
    np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-6)
    loss, acc = rd.evaluate(net, params, x, y, placement=rd.data_parallel(2), client=client)
    assert acc == pytest.approx(np.mean(logits.argmax(1) == y))
    shifted = logits - logits.max(1, keepdims=True)
    ref = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(y)), y])
    assert loss == pytest.approx(ref, rel=1e-5)


def test_engine_phases_are_enforced(problem):
    net = problem[0]
    engine = Engine(net)
    with pytest.raises(RuntimeError, match="set_params"):
        engine.run("grad", np.arange(4))
    engine.set_params(net.init(0))
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.set_params(net.init(0))


@pytest.mark.parametrize("placement", [None, rd.hybrid(1, 2), rd.data_parallel(3)],
                         ids=["single", "hybrid12", "dp3"])
def test_unrolled_steps_equal_separate_steps(client, problem, placement):
    """``steps_per_task=k`` runs k steps as one graph; the numbers do not change."""
    net, x, y = problem
    kwargs = dict(optimizer=rd.SGD(lr=0.1, momentum=0.9), epochs=2, batch_size=20, seed=2,
                  placement=placement, client=client if placement else None)
    one = rd.fit(net, x, y, steps_per_task=1, **kwargs)
    three = rd.fit(net, x, y, steps_per_task=3, **kwargs)
    assert one["loss"] == three["loss"] and one["train_accuracy"] == three["train_accuracy"]
    for key, value in one.params.items():
        np.testing.assert_array_equal(three.params[key], value)
    for key, value in one.opt_state.items():
        np.testing.assert_array_equal(three.opt_state[key], value)


def _worker_task_states(client) -> int:
    """Tasks the busiest worker still keeps in its state (released ones included), once the
    releases in flight have arrived (two equal readings)."""
    import time

    last = None
    for _ in range(50):
        now = max(client.run(lambda dask_worker: len(dask_worker.state.tasks)).values())
        if now == last:
            break
        last = now
        time.sleep(0.02)
    return now


@pytest.mark.parametrize("placement,exchange", [(None, "auto"), (rd.hybrid(1, 2), "graph"),
                                               (rd.data_parallel(3), "direct")],
                         ids=["single", "hybrid12-graph", "dp3-direct"])
def test_rerooting_lets_workers_forget_old_steps_and_keeps_the_numbers(
        client, problem, monkeypatch, placement, exchange):
    """Every step reads the step before: without re-rooting, the workers keep a task state
    for every step run; with it, a bounded number. The numbers do not change."""
    from rapydli.scheduler import engine as engine_module

    net, x, y = problem
    kwargs = dict(optimizer=rd.SGD(lr=0.1, momentum=0.9), epochs=4, batch_size=8, seed=2,
                  placement=placement, client=client, steps_per_task=1, exchange=exchange)
    growth = []
    for every in (10**6, 12):  # never, then every 12 tasks (1-4 steps)
        monkeypatch.setattr(engine_module, "REROOT_TASKS", every)
        states: list[int] = []
        history = rd.fit(net, x, y, on_epoch=lambda row, states=states: states.append(
            _worker_task_states(client)), **kwargs)
        growth.append(states[-1] - states[0])  # over the last 3 epochs
        if every > 100:
            kept = history
    steps = len(x) // 8  # per epoch
    assert growth[0] >= 2 * steps  # about a task state kept per step run, or more
    assert growth[1] < steps  # what the last re-root has not let go yet, at most
    assert history["loss"] == kept["loss"]
    for key, value in kept.params.items():
        np.testing.assert_array_equal(history.params[key], value)
    for key, value in kept.opt_state.items():
        np.testing.assert_array_equal(history.opt_state[key], value)


def test_auto_task_size_follows_the_measured_step_time(monkeypatch):
    from rapydli import trainer

    clock = [0.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])

    def sizes(per_step: float, distributed: bool = True) -> list[int]:
        size, seen = trainer.TaskSize("auto", distributed), []
        for _ in range(8):
            clock[0] += per_step * size.steps
            size.arrived(size.steps)
            seen.append(size.steps)
        return seen

    assert sizes(0.1)[-1] == 16  # 2 s / 0.1 s per step: 16 steps (a power of two)
    assert sizes(3.0) == [1] * 8  # steps longer than a task: one each
    assert sizes(1e-5)[-1] == trainer.MAX_STEPS_PER_TASK
    assert sizes(0.03, distributed=False) == [1] * 8  # in-process: nothing to amortise
    assert trainer.TaskSize(5, True).steps == 5
    for bad in (0, -2, 1.5, "fast"):
        with pytest.raises(ValueError, match="steps_per_task"):
            trainer.TaskSize(bad, True)


def test_auto_task_size_unrolls_and_keeps_the_numbers(client, problem, monkeypatch):
    """With "auto", the steps of a run go into graphs of growing size; the numbers equal
    those of one step per graph, bit for bit."""
    from rapydli import trainer

    net, x, y = problem
    monkeypatch.setattr(trainer, "TASK_SECONDS", 60.0)  # every measured step is short
    seen: list[int] = []
    arrived = trainer.TaskSize.arrived
    monkeypatch.setattr(trainer.TaskSize, "arrived",
                        lambda self, steps: (seen.append(steps), arrived(self, steps)))
    kwargs = dict(optimizer=rd.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=8, seed=2,
                  placement=rd.hybrid(1, 2), client=client)
    auto = rd.fit(net, x, y, steps_per_task="auto", **kwargs)
    assert max(seen) >= 4 and sum(seen) == 3 * (len(x) // 8)
    one = rd.fit(net, x, y, steps_per_task=1, **kwargs)
    assert auto["loss"] == one["loss"]
    for key, value in one.params.items():
        np.testing.assert_array_equal(auto.params[key], value)


def test_unrolled_plan_is_one_task_on_one_worker(problem):
    net = problem[0]
    engine = Engine(net, None, rd.SGD(lr=0.1))
    plan = engine.plan(16, "train", steps=4)
    compute = [t for t in plan.tasks.values() if t.worker is not None and
               not all(plan.graph.op(k).kind == "send" for k in t.ops)]
    assert len(compute) == 1 and len(compute[0].ops) > 4 * len(net.layers)


@pytest.mark.parametrize("direct_max", [1, 4], ids=["tree", "direct"])
def test_both_all_reduce_strategies_train_alike(client, problem, monkeypatch, direct_max):
    """Tree reduction + broadcast and the direct exchange give the single-worker weights, and
    every replica of a weight holds the same bits."""
    import rapydli.graph.comm as comm

    monkeypatch.setattr(comm, "DIRECT_ALLREDUCE_MAX", direct_max)
    net, x, y = problem
    kwargs = dict(optimizer=rd.SGD(lr=0.1, momentum=0.9), epochs=1, batch_size=24, seed=4)
    single = rd.fit(net, x, y, **kwargs)
    engine = Engine(net, rd.data_parallel(3), kwargs["optimizer"], client)
    engine.set_params(net.init(4))
    engine.set_data("train", x, y)
    order = epoch_rng(4, 1).permutation(len(x))  # the order fit gives epoch 1
    for i in range(0, len(x), 24):
        engine.run("train", order[i:i + 24])
    replicas: dict = {}
    for key, info in engine.resident_info.items():
        if info[0] == "param":
            replicas.setdefault(info[1], []).append(engine.value(engine.resident[key]))
    for name, values in replicas.items():
        assert len(values) == 3
        for value in values[1:]:
            np.testing.assert_array_equal(value, values[0])
        np.testing.assert_allclose(values[0], single.params[name], rtol=1e-4, atol=1e-5)


def test_eval_every_evaluates_on_schedule_and_after_the_last_epoch(problem):
    net, x, y = problem
    history = rd.fit(net, x[:60], y[:60], optimizer=rd.SGD(lr=0.1), epochs=3, batch_size=30,
                     validation_data=(x[60:], y[60:]), eval_every=2)
    assert ["test_accuracy" in row for row in history.epochs] == [False, True, True]


def test_in_process_engine_runs_a_multi_worker_plan(problem):
    """Without a client every mesh worker is this process: the same numbers, no cluster."""
    net, x, y = problem
    params = net.init(1, np.float64)
    loss, grads = rd.value_and_grad(net, params, x[:7], y[:7])
    engine = Engine(net, rd.hybrid(2, 2), None, None, "float64")
    engine.set_params(params)
    engine.set_data("b", x[:7], y[:7])
    out = engine.run("grad", np.arange(7), "b")
    assert engine.value(out["metrics"])[0] == pytest.approx(loss, rel=1e-12)
    for name, tiles in out["grads"].items():
        for region, bound in tiles:
            np.testing.assert_allclose(engine.value(bound), grads[name][tuple(
                slice(a, b) for a, b in region)], rtol=1e-9, atol=1e-12)


def test_aligned_copies_only_misaligned_arrays():
    from rapydli.graph.ops import ALIGNMENT, aligned

    raw = np.frombuffer(bytearray(4 * 65 + 1), dtype=np.uint8)[1:].view(np.float32)  # offset 1
    raw[:] = np.arange(65)
    assert raw.ctypes.data % ALIGNMENT
    fixed = aligned(raw)
    assert fixed.ctypes.data % ALIGNMENT == 0 and np.array_equal(fixed, raw)
    ok = np.arange(8.0)
    assert aligned(ok) is ok, "aligned arrays pass through (updates in place reach them)"
    assert aligned(3.5) == 3.5


def test_arrays_sent_over_tcp_reach_the_kernels_aligned(problem):
    """Scattered weights and data, and activations sent between workers, arrive as views into
    the received frames at odd addresses (float32 products on them run 1.5-3x slower); the
    engine settles them in aligned memory, and the numbers are those of the in-process run."""
    from distributed import Client, LocalCluster

    from rapydli.graph.ops import ALIGNMENT, pick

    net, x, y = problem
    index = [np.arange(s * 32, s * 32 + 32) for s in range(3)]
    ref = Engine(net, rd.single(), rd.SGD(lr=0.1, momentum=0.9))
    ref.set_params(net.init(0))
    ref.set_data("train", x, y)
    for i in index:
        ref.run("train", i)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"}) \
            as cluster, Client(cluster) as tcp:
        probe = tcp.scatter(np.ones(100, np.float32), hash=False)
        assert tcp.submit(lambda a: a.ctypes.data % ALIGNMENT, probe).result(), \
            "expected Dask to deliver a scattered array misaligned (else this test shows nothing)"
        engine = Engine(net, rd.hybrid(1, 2), rd.SGD(lr=0.1, momentum=0.9), tcp)
        engine.set_params(net.init(0))
        engine.set_data("train", x, y)
        for i in index:
            engine.run("train", i)
        bounds = [*engine.resident.values(), *engine.data.values()]
        offsets = tcp.gather([tcp.submit(lambda a, path: pick(a, path).ctypes.data % ALIGNMENT,
                                         b.value, b.path, pure=False) for b in bounds])
        assert len(offsets) > 10 and not any(offsets)
        got, want = engine.get_params(), ref.get_params()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_a_fused_task_lets_go_of_each_value_after_its_last_reader():
    """An unrolled task of k steps holds one step's tiles at a time, not all k steps': each
    value is released once the last op reading it ran (an output nothing reads, right away),
    while what the task returns is kept."""
    import weakref

    from rapydli.graph.ops import run_fused

    alive: dict[str, weakref.ref] = {}

    def make(tag):
        def fn(*inputs):
            out = np.full(4, float(len(inputs)))
            alive[tag] = weakref.ref(out)
            return out
        return fn

    seen = []

    def look(*inputs):
        seen.append(sorted(t for t, ref in alive.items() if ref() is not None))
        return np.zeros(1)

    program = (("a", make("a"), ((0, ()),), {}, ()),
               ("b", make("b"), (("a", ()),), {}, ()),
               ("c", look, (("b", ()),), {}, ()),  # a's last reader was b
               ("d", make("d"), (), {}, ()),  # nothing reads d
               ("e", make("e"), (("b", ()),), {}, ()),
               ("f", look, (), {}, ()))
    out = run_fused(program, ("e", "f"), np.ones(2))
    assert seen == [["b"], ["e"]]  # b went after e read it; e is kept: it is returned
    assert set(out) == {"e", "f"} and alive["e"]() is not None


@pytest.mark.parametrize("placement,exchange", [(rd.data_parallel(2), "direct"),
                                                (rd.data_parallel(3), "graph")],
                         ids=["dp2-direct", "dp3-graph"])
def test_gradient_sums_fuse_into_their_updates_with_the_same_bits(
        client, problem, monkeypatch, placement, exchange):
    """Each worker's task runs a weight's gradient sum and its update as one op (the
    optimizer adds as it reads), and trains bit for bit as with the two ops apart."""
    from rapydli.graph import ops, to_dask

    net, x, y = problem
    kwargs = dict(optimizer=rd.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), epochs=2,
                  batch_size=8, seed=2, placement=placement, client=client, steps_per_task=2,
                  exchange=exchange)
    fused = rd.fit(net, x, y, **kwargs)
    engine = Engine(net, placement, rd.SGD(lr=0.1, momentum=0.9), client, exchange=exchange)
    try:
        fns = {fn for t in engine.plan(8, "train", 2).tasks.values()
               for _, fn, _, _, _ in t.program}
    finally:
        engine.close()
    assert ops.sum_update_task in fns and ops.update_task not in fns
    monkeypatch.setattr(to_dask, "_sums_into_updates", lambda graph, program, keep: tuple(program))
    apart = rd.fit(net, x, y, **kwargs)
    assert fused["loss"] == apart["loss"]
    for key, value in apart.params.items():
        np.testing.assert_array_equal(fused.params[key], value)
