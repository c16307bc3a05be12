"""Settling a process's heap: frozen when it grew, at most once per interval, given back after
training; workers settle through the engine's plugin, the client's process through fit."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import rapydli as rd
from rapydli.scheduler import heap


@pytest.fixture
def fresh(monkeypatch):
    """No earlier check, a low threshold; whatever a test froze is given back after it."""
    assert gc.get_freeze_count() == 0, "something froze this process before the test"
    monkeypatch.setattr(heap, "_last_check", None)
    monkeypatch.setattr(heap, "MAX_OBJECTS", 1000)
    yield
    gc.unfreeze()


def test_settle_freezes_a_grown_heap_and_skips_a_small_one(fresh, monkeypatch):
    assert heap.settle()
    frozen = gc.get_freeze_count()
    assert frozen > 1000 and len(gc.get_objects(generation=2)) < 1000
    monkeypatch.setattr(heap, "_last_check", None)
    assert not heap.settle()  # nothing grew: no collection, no freeze
    assert gc.get_freeze_count() <= frozen  # frozen objects still go when nothing holds them


def test_settle_checks_at_most_once_per_interval(fresh, monkeypatch):
    assert heap.settle()
    keep = [[i] for i in range(5000)]  # the heap grows past the threshold ...
    gc.collect()
    assert not heap.settle()  # ... but the last check was just now
    assert _tracked(keep[0])
    monkeypatch.setattr(heap, "_last_check", heap._last_check - heap.CHECK_SECONDS)
    assert heap.settle()
    assert not _tracked(keep[0])  # frozen: no collection walks it


def _tracked(obj) -> bool:
    """Whether ``obj`` is in a generation the collector walks (not frozen)."""
    return any(o is obj for o in gc.get_objects())


def test_settle_does_not_freeze_garbage(fresh):
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle only the collector frees
    cycle = weakref.ref(a)
    alive = [Node() for _ in range(10)]
    del a, b
    heap.settle(force=True)
    # the cycle was collected before the freeze (a frozen object would still be alive and, like
    # a collected one, missing from gc.get_objects()); the live objects were frozen
    assert cycle() is None
    assert not _tracked(alive[0])


def test_settled_gives_the_frozen_objects_back(fresh):
    with heap.settled():
        heap.settle(force=True)
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_settled_leaves_what_was_frozen_before(fresh):
    keep = [1]
    gc.freeze()
    with heap.settled():
        pass
    assert not _tracked(keep)


def test_the_plugin_settles_other_processes_only(fresh, monkeypatch):
    plugin = heap.SettleHeap()
    plugin.transition("k", "executing", "memory")
    assert gc.get_freeze_count() == 0  # the client's own process: left to fit
    monkeypatch.setattr(plugin, "client_pid", -1)
    plugin.transition("k", "ready", "executing")
    assert gc.get_freeze_count() == 0  # settles after a task, not before
    plugin.transition("k", "executing", "memory")
    assert gc.get_freeze_count() > 0


def test_fit_gives_back_what_it_froze(fresh, client):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    net = rd.Sequential([rd.Dense(2)], input_shape=(4,))
    rd.fit(net, x, y, epochs=1, batch_size=32, client=client)
    assert gc.get_freeze_count() == 0


@pytest.mark.slow
def test_worker_processes_settle_their_heaps(process_client):
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    net = rd.Sequential([rd.Dense(16, activation="relu"), rd.Dense(2)], input_shape=(8,))
    process_client.run(lambda: setattr(heap, "_last_check", None))
    rd.fit(net, x, y, epochs=2, batch_size=32, client=process_client,
           placement=rd.data_parallel(2))
    frozen = process_client.run(gc.get_freeze_count)
    assert len(frozen) == 2 and all(n > heap.MAX_OBJECTS for n in frozen.values())


def test_the_environment_turns_settling_off(fresh, monkeypatch):
    class Client:
        def __init__(self):
            self.plugins = []

        def register_plugin(self, plugin):
            self.plugins.append(plugin)

    monkeypatch.setenv(heap.ENV_VAR, "0")
    assert not heap.settle() and gc.get_freeze_count() == 0  # the heap is past 1000 objects
    heap.register(off := Client())
    assert off.plugins == []
    monkeypatch.setenv(heap.ENV_VAR, "1")
    heap.register(on := Client())
    assert [type(p) for p in on.plugins] == [heap.SettleHeap]
    assert heap.settle() and gc.get_freeze_count() > 0
