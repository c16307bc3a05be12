"""Lowering, counted: exact halo bytes, comm ops per preset, fusion, tile arithmetic, caching.

Structure is tested by counting ops and bytes in the tile graph (no cluster needed); only the
fused-versus-unfused numbers run on the in-process cluster fixture.
"""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapydli import (
    SGD,
    Activation,
    AvgPool2D,
    Conv2D,
    Dense,
    Flatten,
    LocallyConnected2D,
    MaxPool2D,
    Mesh,
    Placement,
    Sequential,
    Tiling,
    data_parallel,
    fit,
    hybrid,
    model_parallel,
    single,
    spatial_parallel,
    value_and_grad,
)
from rapydli.graph import ops
from rapydli.graph.comm import DIRECT_ALLREDUCE_MAX
from rapydli.graph.lower import MODES, lower
from rapydli.graph.tiles import split, tile_grid
from rapydli.graph.to_dask import StepPlan
from rapydli.scheduler.engine import Engine

OPTIMIZER = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)


def crossing_bytes_into(graph, prefix: str) -> list[int]:
    """``nbytes`` of every cross-worker edge whose consumer's key starts with ``prefix``."""
    return [size for _, v, size in graph.crossing_edges() if v.startswith(prefix)]


# --- (a) halo exchange moves exactly the border rows ---------------------------------------


def conv_stack(kernel: int, channels: int, rows: int, cols: int) -> Sequential:
    pad = (kernel - 1) // 2  # "same" convolutions
    return Sequential([Conv2D(channels, kernel, padding=pad, activation="relu"),
                       Conv2D(2, kernel, padding=pad), Flatten(), Dense(3)],
                      input_shape=(2, rows, cols))


def rows_override(n: int) -> Placement:
    return Placement(Mesh(model=n), "single",
                     (("0", Tiling(rows="model")), ("1", Tiling(rows="model"))))


HALO_CASES = [  # kernel, workers, image rows, placement
    pytest.param(3, 2, 8, spatial_parallel, id="k3-w2-even"),
    pytest.param(3, 2, 7, spatial_parallel, id="k3-w2-uneven"),
    pytest.param(3, 2, 7, rows_override, id="k3-w2-override"),
    pytest.param(5, 2, 8, spatial_parallel, id="k5-w2"),
    pytest.param(3, 3, 7, spatial_parallel, id="k3-w3"),
    pytest.param(5, 3, 9, spatial_parallel, id="k5-w3"),
    pytest.param(5, 3, 11, rows_override, id="k5-w3-override"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel,workers,rows,make", HALO_CASES)
def test_halo_bytes_are_exactly_the_border_rows(kernel, workers, rows, make, dtype):
    channels, cols, batch = 3, 5, 4
    net = conv_stack(kernel, channels, rows, cols)
    graph = lower(net, make(workers), batch, "grad", dtype=dtype)
    itemsize = np.dtype(dtype).itemsize
    border = kernel // 2  # rows a stride-1 "same" conv reads from each neighbour
    one_way = border * cols * channels * batch * itemsize
    whole_map = batch * channels * rows * cols * itemsize
    n_boundaries = workers - 1

    forward = crossing_bytes_into(graph, "1/in/")
    assert sorted(forward) == [one_way] * (2 * n_boundaries), forward
    backward = crossing_bytes_into(graph, "0/dy/")
    assert sorted(backward) == [one_way] * (2 * n_boundaries), backward
    for size in forward + backward:
        assert size < whole_map / workers  # a halo, never a whole map nor a whole tile
    assert not crossing_bytes_into(graph, "0/in/")  # the first layer loads its own rows


def test_spatial_split_tiles_the_rows():
    graph = lower(conv_stack(3, 3, 7, 5), spatial_parallel(2), 4, "grad")
    fwd = sorted((op.worker, op.shape) for op in graph.ops(kind="forward") if op.layer == "0")
    assert fwd == [(0, (4, 3, 4, 5)), (1, (4, 3, 3, 5))]  # 7 rows -> 4 + 3


# --- (b) every preset and mode lowers to a valid graph ---------------------------------------


def cnn() -> Sequential:
    return Sequential([
        Conv2D(3, 3, padding=1, activation="relu"), MaxPool2D(2, stride=1), Activation("tanh"),
        Conv2D(4, 2, stride=2), AvgPool2D(2, stride=1), Activation("sigmoid"), Flatten(),
        Dense(6, activation="relu"), Activation("relu"), Dense(10),
    ], input_shape=(2, 7, 6))


PRESETS = {"single": single(), "dp2": data_parallel(2), "dp3": data_parallel(3),
           "mp2": model_parallel(2), "mp3": model_parallel(3), "sp2": spatial_parallel(2),
           "sp3": spatial_parallel(3), "hy12": hybrid(1, 2), "hy22": hybrid(2, 2),
           "hy13": hybrid(1, 3),
           "mixed": hybrid(1, 2).with_tiling("0", Tiling(rows="model"))
                                .with_tiling("7", Tiling(batch="model"))}


@pytest.mark.parametrize("batch", [5, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_and_mode_validates(preset, mode, batch):
    graph = lower(cnn(), PRESETS[preset], batch, mode, OPTIMIZER)
    graph.validate()
    phases = {op.phase for op in graph.ops()}
    assert ("backward" in phases) == (mode in ("train", "grad"))
    assert ("update" in phases) == (mode == "train")
    assert StepPlan(graph).n_tasks <= StepPlan(graph, fused=False).n_tasks


# --- (c) counting ops and sends -----------------------------------------------------------


def mlp() -> Sequential:
    return Sequential([Dense(8, activation="relu"), Dense(3)], input_shape=(5,))


def test_data_parallel_convolutions_split_their_backward_pass():
    """A convolution whose weight gradients are summed across workers computes its input
    gradient and its weight gradients in two ops, as a dense layer does (the first layer,
    which needs no input gradient, keeps one)."""
    cnn = Sequential([Conv2D(4, 3, activation="relu"), Conv2D(4, 3, activation="relu"),
                      Flatten(), Dense(3)], input_shape=(1, 8, 8))
    graph = lower(cnn, data_parallel(2), 4, "train", OPTIMIZER)
    fns = {(op.layer, op.fn.__name__) for op in graph.ops(phase="backward")}
    assert ("1", "backward_input_task") in fns and ("1", "backward_params_task") in fns
    assert ("0", "backward_task") in fns and ("0", "backward_params_task") not in fns
    single_graph = lower(cnn, single(), 4, "train", OPTIMIZER)  # nothing summed: one op
    assert {op.fn.__name__ for op in single_graph.ops(phase="backward")} == {"backward_task"}


@pytest.mark.parametrize("n", [2, 3, 6])
def test_data_parallel_op_counts(n):
    graph = lower(mlp(), data_parallel(n), 6, "train", OPTIMIZER)
    n_layers, n_param_tiles = 2, 4  # one (whole) tile each of 0.weight, 0.bias, 1.weight, 1.bias
    assert len(graph.ops(kind="forward")) == n_layers * n
    assert len(graph.ops(kind="loss")) == n
    assert graph.count("forward") == (n_layers + 1) * n  # the loss tiles are forward ops too
    # the second layer's backward is two ops (input gradient, then weight gradients: see
    # test_exchange); the first layer's computes no input gradient
    assert graph.count("backward") == (n_layers + 1) * n
    assert len([op for op in graph.ops(phase="backward")
                if op.fn is ops.backward_params_task]) == n
    assert graph.count("update") == n_param_tiles * n  # every replica applies the update
    grad_sends = {u for u, _, _ in graph.crossing_edges() if "/grad/" in u}
    assert all(graph.op(u).kind == "send" for u in grad_sends)
    if n <= DIRECT_ALLREDUCE_MAX:
        # direct exchange: every worker sends its partial to every other replica, one hop
        assert len(grad_sends) == n_param_tiles * n * (n - 1)
        assert all(re.search(r"/w\d+to\d+$", u) for u in grad_sends)
    else:
        # tree reduction: n - 1 sends per weight tile, then a broadcast to n - 1 replicas
        reduce_sends = [u for u in grad_sends if "/d" in u]
        broadcasts = [u for u in grad_sends if re.search(r"/to\d+$", u)]
        assert len(reduce_sends) == n_param_tiles * (n - 1)
        assert len(broadcasts) == n_param_tiles * (n - 1)


def test_data_parallel_grad_mode_sends_one_per_weight_tile():
    graph = lower(mlp(), data_parallel(2), 6, "grad")
    sends = [(u, size) for u, _, size in graph.crossing_edges() if "/grad/" in u]
    sizes = {name: math.prod(shape) * 4 for name, shape in mlp().param_shapes().items()}
    assert sorted(size for _, size in sends) == sorted(sizes.values())
    for name in sizes:
        assert sum(u.startswith(f"{name}/grad/") for u, _ in sends) == 1, name
    # no activations move in data parallelism: every other layer input is local
    assert all("/grad/" in u or u.startswith("loss/") for u, _, _ in graph.crossing_edges())


def test_model_parallel_all_gathers_before_second_dense():
    batch, itemsize = 6, 4
    graph = lower(mlp(), model_parallel(2), batch, "eval")
    gather = [(u, v, size) for u, v, size in graph.crossing_edges() if v.startswith("1/in/")]
    assert len(gather) == 2  # each worker receives the other's half of layer 0's features
    assert all(graph.op(u).kind == "send" for u, _, _ in gather)
    assert sorted(size for _, _, size in gather) == [batch * 4 * itemsize] * 2  # 8 features / 2
    assert not crossing_bytes_into(graph, "0/in/")
    assert len([op for op in graph.ops(kind="send") if op.key.startswith("1/in/")]) == 2


# --- (d) fusion: same numbers, far fewer tasks ------------------------------------------------


def cnn5() -> Sequential:
    return Sequential([Conv2D(4, 3, padding=1, activation="relu"), MaxPool2D(2),
                       Conv2D(4, 3, padding=1, activation="relu"), Flatten(), Dense(10)],
                      input_shape=(1, 8, 8))


def test_fused_and_unfused_compute_the_same_numbers(client):
    net = cnn5()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 1, 8, 8)), rng.integers(0, 10, 6)
    params = net.init(0, "float64")
    placement = hybrid(1, 2)
    loss_f, grads_f = value_and_grad(net, params, x, y, placement, client, fused=True)
    loss_u, grads_u = value_and_grad(net, params, x, y, placement, client, fused=False)
    assert loss_f == loss_u
    for name in params:
        np.testing.assert_array_equal(grads_f[name], grads_u[name], err_msg=name)
    kw = {"placement": placement, "client": client, "optimizer": OPTIMIZER, "epochs": 1,
          "batch_size": 2, "params": params, "dtype": "float64"}
    fused, unfused = fit(net, x, y, fused=True, **kw), fit(net, x, y, fused=False, **kw)
    for name in params:
        np.testing.assert_array_equal(fused.params[name], unfused.params[name], err_msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_fused_plan_has_far_fewer_tasks(mode):
    graph = lower(cnn5(), hybrid(1, 2), 6, mode, OPTIMIZER)
    fused, unfused = StepPlan(graph, fused=True), StepPlan(graph, fused=False)
    assert unfused.n_tasks == graph.number_of_nodes() - len(graph.ops(kind="placeholder"))
    assert fused.n_tasks < unfused.n_tasks / (3 if mode == "train" else 2)
    # compute ops are fused away; sends and outputs stay apart (sends between two tasks merged)
    solo = len(graph.ops(kind="send")) + len(graph.ops(kind="output"))
    compute = [t for t in fused.tasks.values()
               if not all(graph.op(k).kind in ("send", "output") for k in t.ops)]
    assert len(compute) < (unfused.n_tasks - solo) / 3
    assert sorted(k for t in fused.tasks.values() for k in t.ops) == \
        sorted(k for t in unfused.tasks.values() for k in t.ops)


# --- (e) tile arithmetic, property-tested --------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 200), parts=st.integers(1, 24))
def test_split_is_contiguous_covering_and_balanced(n, parts):
    pieces = split(n, parts)
    assert len(pieces) == parts
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))  # contiguous, in order
    sizes = [stop - start for start, stop in pieces]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the longer pieces come first


@st.composite
def grids(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=rank, max_size=rank)))
    mesh = {"data": draw(st.integers(1, 4)), "model": draw(st.integers(1, 4))}
    cuts = [[] for _ in range(rank)]
    for axis in draw(st.permutations(list(mesh))):
        target = draw(st.integers(-1, rank - 1))  # -1: this mesh axis cuts nothing
        if target >= 0:
            cuts[target].append(axis)
    return shape, [tuple(c) for c in cuts], mesh


@settings(max_examples=300, deadline=None)
@given(grids())
def test_tile_grid_tiles_are_disjoint_and_cover(grid):
    shape, cuts, mesh = grid
    tiles = tile_grid(shape, cuts, mesh)
    count = np.zeros(shape, dtype=int)
    for _, region in tiles:
        assert all(0 <= a < b <= n for (a, b), n in zip(region, shape)), region  # non-empty
        count[tuple(slice(a, b) for a, b in region)] += 1
    assert (count == 1).all()  # disjoint and covering
    coords = [tuple(sorted(c.items())) for c, _ in tiles]
    assert len(set(coords)) == len(coords)  # one tile per mesh coordinate at most
    used = [m for c in cuts for m in c]
    n_parts = [math.prod(mesh[m] for m in c) for c in cuts]
    expected = math.prod(min(parts, n) for parts, n in zip(n_parts, shape))
    assert len(tiles) == expected
    assert len(tiles) <= math.prod(mesh[m] for m in used)


def test_tile_grid_mixed_radix_order():
    tiles = tile_grid((8,), [("data", "model")], {"data": 2, "model": 2})
    assert [(c["data"], c["model"], r) for c, r in tiles] == [
        (0, 0, ((0, 2),)), (0, 1, ((2, 4),)), (1, 0, ((4, 6),)), (1, 1, ((6, 8),))]


# --- (f) plans are cached and deterministic ------------------------------------------------


def test_engine_caches_step_plans():
    engine = Engine(cnn5(), None, OPTIMIZER)
    plan = engine.plan(4, "train")
    assert engine.plan(4, "train") is plan
    assert engine.plan(4, "eval") is not plan
    assert engine.plan(5, "train") is not plan
    assert len(engine.plans) == 3


def test_lowering_is_deterministic():
    a = lower(cnn(), hybrid(1, 2), 5, "train", OPTIMIZER)
    b = lower(cnn(), hybrid(1, 2), 5, "train", OPTIMIZER)
    assert list(a.nodes) == list(b.nodes)
    assert list(a.edges(data="nbytes")) == list(b.edges(data="nbytes"))


@pytest.mark.parametrize("placement", [data_parallel(2), hybrid(1, 2), model_parallel(3)],
                         ids=["dp2", "hy12", "mp3"])
def test_unrolled_graphs_keep_the_invariants(placement):
    """k unrolled steps: still acyclic, sends at every worker crossing, and no op reads a weight
    after its in-place update (step k+1 reads what step k's update wrote)."""
    from rapydli.graph.unroll import unroll

    graph = unroll(lower(cnn5(), placement, 6, "train", OPTIMIZER), 3)
    graph.validate()
    updates = graph.ops(kind="update")
    assert len(updates) == 3 * len(lower(cnn5(), placement, 6, "train", OPTIMIZER)
                                   .ops(kind="update"))
    second = [op for op in updates if op.key.startswith("s1/")]
    assert all(op.inputs[0].key.startswith("s0/") for op in second)  # chained, not re-read


def test_validate_catches_a_read_after_an_in_place_update():
    from rapydli.graph.ops import Ref, TileOp, identity_task

    graph = lower(mlp(), data_parallel(2), 6, "train", OPTIMIZER)
    update = graph.ops(kind="update")[0]
    weight = update.inputs[0].key
    # an op on the same worker that reads the weight but does not come before its update
    graph.add_op(TileOp("late-reader", "forward", "forward", update.worker, identity_task,
                        (Ref(weight),)))
    with pytest.raises(AssertionError, match="in-place update"):
        graph.validate()


def wide_mlp() -> Sequential:  # 0.weight: 300 x 64 float32 = 75 KiB, over SHARD_MIN_BYTES
    return Sequential([Dense(300, activation="relu"), Dense(10)], input_shape=(64,))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_data_parallel_replicas_update_blocks_of_rows_of_large_weights(n):
    """A sharded update: each replica sums and updates one block of rows of a large weight and
    keeps the optimizer state of those rows only; it receives the others' rows of their
    gradients, then their updated rows of weights. Small weights, and shard_updates=False,
    keep one whole update per replica. Either way no op reads a weight after it changed."""
    from rapydli.graph.comm import row_shards
    from rapydli.graph.lower import SHARD_MIN_BYTES

    graph = lower(wide_mlp(), data_parallel(n), 12, "train", OPTIMIZER)
    graph.validate()
    assert 300 * 64 * 4 >= SHARD_MIN_BYTES > 300 * 4
    blocks = row_shards(((0, 300), (0, 64)), n)
    sizes = [b[0][1] - b[0][0] for b in blocks]
    assert blocks[0][0][0] == 0 and blocks[-1][0][1] == 300 and max(sizes) - min(sizes) <= 1
    assert all(a[0][1] == b[0][0] and a[1:] == b[1:] == ((0, 64),)
               for a, b in itertools.pairwise(blocks))
    updates = {op.key: op for op in graph.ops(kind="update") if op.key.startswith("0.weight")}
    assert sorted(updates) == sorted(f"0.weight/update/{b[0][0]}:{b[0][1]}x0:64/w{w}"
                                     for w, b in enumerate(blocks))
    states = {(info[3], info[4]) for info in graph.graph["placeholders"].values()
              if info[:3] == ("state", "0.weight", "velocity")}
    assert states == {(b, w) for w, b in enumerate(blocks)}  # worker w: block w's state only
    for name in ("0.bias", "1.weight", "1.bias"):  # small: each replica updates all of it
        assert len([op for op in graph.ops(kind="update") if op.key.startswith(name)]) == n
    sends = {u: size for u, _, size in graph.crossing_edges() if u.startswith("0.weight/")}
    grads = [size for u, size in sends.items() if "/grad/" in u]
    rows = [size for u, size in sends.items() if "/rows/" in u]
    assert len(grads) == len(rows) == n * (n - 1)
    # (n - 1) whole weights each way, against n (n - 1) whole gradients sent to every replica
    assert sum(grads) == sum(rows) == (n - 1) * 300 * 64 * 4
    assert [op.worker for op in graph.ops(kind="place")] == list(range(n))
    from rapydli.graph.unroll import unroll

    unroll(graph, 3).validate()  # step k+1 reads the weight step k's blocks were put into
    whole = lower(wide_mlp(), data_parallel(n), 12, "train", OPTIMIZER, shard_updates=False)
    whole.validate()
    assert not whole.ops(kind="place") and len(whole.ops(kind="update")) == 4 * n


def test_validate_catches_a_read_of_another_replica_after_a_sharded_update():
    """Replicas on one machine share the weight a sharded update writes rows of: a read by any
    replica that may come after one of those updates is caught."""
    from rapydli.graph.ops import Ref, TileOp, identity_task

    graph = lower(wide_mlp(), data_parallel(2), 6, "train", OPTIMIZER)
    graph.validate()
    assert graph.op("0.weight/update/0:150x0:64/w0").worker == 0
    other = "$param:0.weight:((0, 300), (0, 64))@1"  # worker 1's copy, not the one updated
    graph.add_op(TileOp("late-reader", "forward", "forward", 1, identity_task, (Ref(other),)))
    with pytest.raises(AssertionError, match="sharded update"):
        graph.validate()


def test_tasks_split_after_big_activation_sends_but_not_after_gradients_to_sum():
    """Model-parallel activations of >= SPLIT_BYTES end their task (the neighbour starts
    sooner); data-parallel gradients under REDUCE_SPLIT_BYTES travel after the task instead."""
    from rapydli.graph import fuse as fusion

    def worker_tasks(net, placement, batch, **kw):  # as the graph exchange lowers them
        graph = lower(net, placement, batch, "train", SGD(lr=0.1, momentum=0.9),
                      shard_updates=False)
        stage = fusion.stages(graph, **kw)
        return {(graph.op(k).worker, s) for k, s in stage.items()
                if graph.op(k).kind not in fusion.SOLO and graph.op(k).worker is not None}

    # the weight gradients of the locally connected layer go to the sums, from the op whose
    # input gradient the layer below reads: one task before and one after them per worker,
    # unless they pass the threshold. (Dense and Conv2D layers compute their weight gradients
    # in an op of their own that nothing else reads: no reason to split.)
    cnn = Sequential([Conv2D(8, 3, activation="relu"),
                      LocallyConnected2D(8, 3, activation="relu"), Flatten(), Dense(10)],
                     input_shape=(1, 12, 12))
    assert len(worker_tasks(cnn, data_parallel(2), 8)) == 2 * 2
    assert len(worker_tasks(cnn, data_parallel(2), 8, reduce_split_bytes=1 << 10)) > 2 * 2
    wide = Sequential([Dense(4096, activation="relu"), Dense(4096, activation="relu"),
                       Dense(10)], input_shape=(784,))
    split_at_1mb = worker_tasks(wide, model_parallel(2), 256)
    never = worker_tasks(wide, model_parallel(2), 256, split_bytes=1 << 40)
    assert len(split_at_1mb) > len(never)
