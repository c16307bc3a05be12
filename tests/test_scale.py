"""What large models need: backward ops that apply their own update in place (weights consumed
by their update on the worker that owns them), weights drawn on their workers, and neighbouring
tiles bound to workers on the same node."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import rapydli as rd
from rapydli.graph.lower import lower
from rapydli.storage.datasets import synthetic


@dataclass(frozen=True)
class SelfUpdatingDense(rd.Dense):
    """A Dense layer whose backward applies plain SGD to its own tile, as a fused kernel would."""

    def backward_update(self, x, y, params, dy, need_dx, optimizer):
        dx, grads = self.backward(x, y, params, dy, need_dx)
        for name, grad in grads.items():
            params[name] -= optimizer.lr * grad  # in place: the resident tile itself
        return dx, params


def _nets():
    def net(cls):
        return rd.Sequential([rd.Flatten(), cls(24, activation="relu"), cls(10)],
                             input_shape=(1, 8, 8))
    return net(rd.Dense), net(SelfUpdatingDense)


def test_model_parallel_tiles_update_inside_their_backward_op():
    plain, fused = _nets()
    graph = lower(fused, rd.model_parallel(2), 16, "train", rd.SGD(lr=0.1))
    assert graph.ops(kind="update") == []
    assert {op.fn.__name__ for op in graph.ops(kind="backward") if op.layer != "0"} == {
        "backward_update_task"}
    reference = lower(plain, rd.model_parallel(2), 16, "train", rd.SGD(lr=0.1))
    assert len(reference.ops(kind="update")) == 8  # 2 layers x (weight, bias) x 2 tiles


def test_replicated_or_stateful_weights_keep_the_separate_update():
    _, fused = _nets()
    for placement, optimizer in ((rd.data_parallel(2), rd.SGD(lr=0.1)),
                                 (rd.model_parallel(2), rd.SGD(lr=0.1, momentum=0.9))):
        graph = lower(fused, placement, 16, "train", optimizer)
        assert graph.ops(kind="update"), (placement, optimizer)


def test_fused_updates_train_like_separate_ones(client):
    x, y = synthetic(96, seed=5)
    plain, fused = _nets()
    kwargs = dict(placement=rd.model_parallel(2), client=client, epochs=2, batch_size=16,
                  optimizer=rd.SGD(lr=0.1), dtype="float64", seed=3)
    a = rd.fit(plain, x, y, **kwargs)
    b = rd.fit(fused, x, y, **kwargs)
    for name, value in a.params.items():
        np.testing.assert_allclose(b.params[name], value, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-12)


def test_weights_drawn_on_their_workers_never_pass_through_the_client(client):
    """Engine.init_params: each tile is drawn by a task on the worker that holds it; the same
    seed gives the same tiles, at the layer's usual scale, and training runs from them."""
    from distributed import get_task_stream

    from rapydli.scheduler.engine import Engine

    _, fused = _nets()
    x, y = synthetic(32, seed=1)
    engine = Engine(fused, rd.model_parallel(2), rd.SGD(lr=0.1), client)
    engine.init_params(seed=7)
    engine.set_data("train", x, y)
    with get_task_stream(client) as stream:
        loss, _ = engine.value(engine.run("train", np.arange(16))["metrics"])
    assert np.isfinite(loss)
    draws = [t for t in stream.data if str(t["key"]).startswith("_draw_tile")]
    assert len(draws) == 8  # 2 layers x (weight, bias) x 2 tiles
    assert {t["worker"] for t in draws} == set(engine.workers)
    fresh = fused.init_region(7, "1.weight", ((0, 12), (0, 64)))
    np.testing.assert_array_equal(fresh, fused.init_region(7, "1.weight", ((0, 12), (0, 64))))
    assert not np.array_equal(fresh, fused.init_region(7, "1.weight", ((12, 24), (0, 64))))
    bound = np.sqrt(6 / 64)  # He-uniform for the relu layer's fan-in
    assert bound >= np.abs(fresh).max() > 0.8 * bound


def test_spatially_split_locally_connected_layers_train_with_fused_updates(client):
    """The memory-efficient path of the scale benchmark: no update op, same numbers."""
    rng = np.random.default_rng(0)
    x = rng.random((8, 2, 10, 10))
    y = rng.random((8, 3, 6, 6))
    net = rd.Sequential([rd.LocallyConnected2D(4, 3, activation="tanh"),
                         rd.LocallyConnected2D(3, 3)], input_shape=(2, 10, 10), loss="mse")
    graph = lower(net, rd.spatial_parallel(2), 8, "train", rd.SGD(lr=0.1))
    assert graph.ops(kind="update") == []
    kwargs = dict(epochs=2, batch_size=4, optimizer=rd.SGD(lr=0.1), dtype="float64", seed=1)
    single = rd.fit(net, x, y, **kwargs)
    split = rd.fit(net, x, y, placement=rd.spatial_parallel(2), client=client, **kwargs)
    for name, value in single.params.items():
        np.testing.assert_allclose(split.params[name], value, rtol=1e-10, atol=1e-12)


def test_neighbouring_mesh_workers_land_on_the_same_node():
    """bind_workers groups workers by host: consecutive mesh workers (neighbouring tiles,
    which exchange border rows) share a node where they can, whatever the address order."""
    from rapydli.scheduler.cluster import bind_workers

    class FakeClient:
        def scheduler_info(self, n_workers):
            addresses = ["tcp://10.0.0.2:9000", "tcp://10.0.0.1:10000", "tcp://10.0.0.2:800",
                         "tcp://10.0.0.1:9001"]
            return {"workers": {a: {} for a in addresses}}

    bound = bind_workers(FakeClient(), rd.Mesh(model=4))
    assert bound == ["tcp://10.0.0.1:9001", "tcp://10.0.0.1:10000", "tcp://10.0.0.2:800",
                     "tcp://10.0.0.2:9000"]
