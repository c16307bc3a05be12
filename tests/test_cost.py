"""The cluster simulator: cluster YAML, hand-computable step times, memory, search, overlap."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import rapydli as rd
from rapydli.errors import ConfigError, PlacementError
from rapydli.graph.fuse import fuse
from rapydli.graph.lower import TileGraph, lower
from rapydli.graph.ops import Ref, TileOp
from rapydli.graph.report import summarize
from rapydli.graph.to_dask import StepPlan
from rapydli.scheduler.cost import (ClusterSpec, Device, Link, Overhead, dump_cluster,
                                    format_prediction, format_ranking, load_cluster,
                                    parse_cluster, quantity, search, simulate, simulate_graph)
from rapydli.scheduler.replay import posting_time, receiving_time, shared_memory
from rapydli.scheduler.shared import MIN_BYTES

EXAMPLES = Path(__file__).parent.parent / "examples"


def cluster(devices=2, nodes=1, flops=1e3, memory=1e9, bandwidth=1e3, latency=0.0,
            inter=None, **overhead) -> ClusterSpec:
    """``nodes`` x ``devices`` devices of ``flops`` FLOP/s, no memory-bandwidth bound."""
    link = Link(bandwidth, latency)
    return ClusterSpec("test", nodes, devices, Device(flops, memory), link, inter or link,
                       Overhead(**overhead))


def tiny():
    """Dense 4 -> 3: forward 2*8*3*4 = 192 FLOPs at batch 8; 15 parameters."""
    return rd.Sequential([rd.Dense(3)], input_shape=(4,))


RAW = {"name": "c", "nodes": 2, "devices_per_node": 4,
       "device": {"peak_flops": "10 TFLOP/s", "efficiency": 0.5, "memory": "16 GiB",
                  "memory_bandwidth": "900 GB/s", "kernel_efficiency": {"Conv2D": 0.5}},
       "links": {"intra_node": {"bandwidth": "25 GB/s", "latency": "5 us"},
                 "inter_node": {"bandwidth": "56 Gb/s", "latency": "1 us"}},
       "overhead": {"per_task": "0.3 ms", "dispatch": 0.004}}


# ----------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("value, kind, expected", [
    ("56 Gb/s", "bandwidth", 7e9), ("12 GB/s", "bandwidth", 12e9), (1e9, "bandwidth", 1e9),
    ("16 GiB", "bytes", 16 * 2 ** 30), ("16 GB", "bytes", 16e9), ("1 us", "time", 1e-6),
    ("2.5ms", "time", 2.5e-3), ("10 TFLOP/s", "flops", 1e13), ("50 GFLOPS", "flops", 5e10)])
def test_quantities_with_units(value, kind, expected):
    assert quantity(value, kind, "x") == pytest.approx(expected)


def test_parse_cluster_fields():
    spec = parse_cluster(RAW)
    assert (spec.n_devices, spec.node_of(3), spec.node_of(4)) == (8, 0, 1)
    assert spec.device.flops == pytest.approx(5e12)  # peak x efficiency
    assert spec.device.rate("Conv2D") == pytest.approx(2.5e12)
    assert spec.device.rate("Dense") == pytest.approx(5e12)
    assert spec.link(0, 3).bandwidth == 25e9 and spec.link(0, 4).bandwidth == 7e9
    assert spec.overhead == Overhead(per_task=3e-4, dispatch=0.004)
    again = parse_cluster(yaml_round_trip(spec))
    assert again.device.memory == pytest.approx(spec.device.memory, rel=1e-5)
    assert dump_cluster(again) == dump_cluster(spec)


def yaml_round_trip(spec):
    import yaml

    return yaml.safe_load(dump_cluster(spec))


@pytest.mark.parametrize("name", ["gpu_infiniband", "cpu_ethernet", "this_machine"])
def test_example_clusters_load(name):
    spec = load_cluster(EXAMPLES / "clusters" / f"{name}.yaml")
    assert spec.n_devices >= 2 and spec.device.flops > 0


@pytest.mark.parametrize("patch, match", [
    ({"device": {**RAW["device"], "memory": "16 parsecs"}},
     r"device\.memory: expected a positive bytes such as .*received '16 parsecs'"),
    ({"links": {"intra_node": {"bandwidth": "1 GB/s", "latency": "1 us"}}},
     r"links: missing key 'inter_node'; expected it for nodes: 2"),
    ({"links": {**RAW["links"], "inter_node": {"bandwith": "1 GB/s", "latency": 0}}},
     r"links\.inter_node: unknown key 'bandwith' \(did you mean 'bandwidth'\?\)"),
    ({"device": {**RAW["device"], "flops": "1 TFLOP/s"}},
     r"device: expected exactly one of 'flops' .* or 'peak_flops'"),
    ({"device": {**RAW["device"], "efficiency": 1.5}},
     r"device\.efficiency: expected .* in \(0, 1\].*received 1\.5"),
    ({"nodes": 0}, r"nodes: expected a positive int; received 0"),
    ({"overhead": {"dispatch": "-1 ms"}}, r"overhead\.dispatch: expected a non-negative time"),
    ({"overhead": {"per_message": "-5 us"}},
     r"overhead\.per_message: expected a non-negative time .*received '-5 us'"),
    ({"device": {**RAW["device"], "kernel_efficiency": {"Conv2D": 0}}},
     r"device\.kernel_efficiency\.Conv2D: expected a fraction"),
])
def test_cluster_errors_name_the_field(patch, match):
    with pytest.raises(ConfigError, match=r"cluster 'c\.yaml': " + match):
        parse_cluster({**RAW, **patch}, source="c.yaml")


@pytest.mark.parametrize("name", ["per_message", "mail_latency"])
def test_direct_exchange_overheads_round_trip_and_default_to_zero(name):
    spec = parse_cluster({**RAW, "overhead": {**RAW["overhead"], name: "40 us"}})
    assert getattr(spec.overhead, name) == pytest.approx(4e-5)
    again = parse_cluster(yaml_round_trip(spec))
    assert getattr(again.overhead, name) == pytest.approx(4e-5)
    assert dump_cluster(again) == dump_cluster(spec)
    assert getattr(parse_cluster(RAW).overhead, name) == 0.0  # specs written before it existed
    with pytest.raises(ConfigError, match=rf"overhead\.{name}: expected a non-negative"):
        Overhead(**{name: -1e-6})


def test_cluster_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_cluster(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 1\ndevice: {flops: 1\n")
    with pytest.raises(ConfigError, match=r"line \d+: invalid YAML"):
        load_cluster(bad)


# ----------------------------------------------------------------------------- step time
def test_single_worker_is_flops_over_rate_plus_overheads():
    net, batch = tiny(), 8
    # forward 192, backward of the first layer (no dx) 192, loss 5*8*3, SGD update 4*15
    flops = 192 + 192 + 120 + 60
    spec = cluster(devices=1, flops=1e3, per_task=0.01, per_op=0.001, per_step=0.5)
    p = simulate(net, None, batch, spec, rd.SGD())
    graph = lower(net, rd.single(), batch, "train", rd.SGD())
    n_ops = sum(op.kind != "placeholder" for op in graph.ops())
    assert p.n_tasks == len(fuse(graph)) and p.n_transfers == 0 and p.exposed_comm == 0
    assert p.compute_time == pytest.approx(flops / 1e3 + n_ops * 0.001)
    assert p.step_time == pytest.approx(0.5 + p.compute_time + p.n_tasks * 0.01)
    unfused = simulate(net, None, batch, spec, rd.SGD(), fused=False)
    assert unfused.n_tasks == n_ops and unfused.step_time > p.step_time


def test_data_parallel_moves_the_all_reduce_bytes():
    net, batch = tiny(), 8
    spec = cluster(devices=2, bandwidth=100.0, latency=0.25)
    p = simulate(net, rd.data_parallel(2), batch, spec, rd.SGD())
    graph = lower(net, rd.data_parallel(2), batch, "train", rd.SGD())
    grads = [t for t in p.transfers if "/grad/" in t.name]
    assert sum(t.nbytes for t in grads) == summarize(graph)["bytes_moved"] == 2 * 15 * 4
    for t in p.transfers:  # one at a time per direction: nothing queues here
        assert t.end - t.start == pytest.approx(0.25 + t.nbytes / 100.0)
    assert p.comm_time == pytest.approx(sum(0.25 + t.nbytes / 100.0 for t in p.transfers))


def test_slower_links_predict_slower_steps():
    net = rd.Sequential([rd.Dense(64, activation="relu"), rd.Dense(10)], input_shape=(32,))
    fast, slow = (cluster(devices=2, nodes=2, flops=1e9, bandwidth=1e9, latency=1e-6,
                          inter=Link(bw, 1e-6)) for bw in (1e9, 1e6))
    p_fast = simulate(net, rd.data_parallel(4), 64, fast, rd.SGD())
    p_slow = simulate(net, rd.data_parallel(4), 64, slow, rd.SGD())
    assert p_slow.step_time > 10 * p_fast.step_time  # the gradients cross nodes
    assert p_slow.bytes_moved == p_fast.bytes_moved
    inside = simulate(net, rd.data_parallel(2), 64, slow, rd.SGD())  # one node: fast links
    assert inside.step_time < p_slow.step_time


def test_memory_counts_params_state_grads_activations():
    p = simulate(tiny(), None, 8, cluster(devices=1), rd.SGD(momentum=0.9))
    (mem,) = p.memory_by_device
    # 15 weights; x (8, 4) and y (8, 3) kept for the backward pass
    assert (mem.params, mem.optimizer, mem.gradients, mem.activations) == (60, 60, 60, 224)
    assert p.fits
    assert not simulate(tiny(), None, 8, cluster(devices=1, memory=300), rd.SGD(0.1, 0.9)).fits
    text = format_prediction(dataclasses.replace(p, memory_capacity=100))
    assert "DOES NOT FIT" in text and "over" in text


def test_model_parallel_halves_the_weights_per_device():
    net = rd.Sequential([rd.Dense(64), rd.Dense(10)], input_shape=(32,))
    one = simulate(net, None, 16, cluster(devices=2), rd.SGD())
    two = simulate(net, rd.model_parallel(2), 16, cluster(devices=2), rd.SGD())
    assert max(m.params for m in two.memory_by_device) < one.memory_by_device[0].params


def test_placement_larger_than_cluster_is_an_error():
    with pytest.raises(PlacementError, match=r"needs 4 workers; cluster 'test'.* has 2"):
        simulate(tiny(), rd.data_parallel(4), 8, cluster(devices=2), rd.SGD())


# ----------------------------------------------------------------------------- overlap
def overlap_graph(nbytes: int) -> TileGraph:
    """Worker 0: ``a`` then a long ``b``; ``a``'s output also travels to worker 1 for ``c``."""
    g = TileGraph()
    g.add_op(TileOp("a", "forward", "forward", 0, None, flops=1000))
    g.add_op(TileOp("s", "send", "comm", 0, None, (Ref("a", (), nbytes),), nbytes=nbytes))
    g.add_op(TileOp("b", "forward", "forward", 0, None, (Ref("a", (), nbytes),), flops=10_000))
    g.add_op(TileOp("c", "forward", "forward", 1, None, (Ref("s", (), nbytes),), flops=1000))
    g.graph.update(placeholders={}, outputs={}, meta=dict(
        mesh=rd.Mesh(model=2), batch=1, mode="eval", dtype=np.dtype("float32"), n_workers=2))
    return g


def test_communication_hides_behind_computation():
    spec = cluster(devices=2, flops=1e3, bandwidth=100.0, latency=1.0)
    p = simulate_graph(overlap_graph(400), spec, fused=False)
    # a 1 s; the 5 s transfer (1 s latency + 400 B / 100 B/s) runs during b's 10 s; then c
    assert p.comm_time == pytest.approx(5.0) and p.exposed_comm == pytest.approx(0.0)
    assert p.step_time == pytest.approx(11.0)
    assert p.step_time < 1 + 10 + 1 + p.comm_time  # compute + comm, were nothing overlapped
    bigger = simulate_graph(overlap_graph(2000), spec, fused=False)  # 21 s transfer: exposed
    assert bigger.step_time == pytest.approx(1 + 21 + 1)
    assert bigger.exposed_comm == pytest.approx(21 - 10)


def test_dispatch_delays_dependents():
    spec = cluster(devices=2, flops=1e3, bandwidth=100.0, latency=1.0, dispatch=0.5)
    p = simulate_graph(overlap_graph(400), spec, fused=False)
    starts = {s.name: s.start for s in p.schedule}
    assert starts["s"] == pytest.approx(1.5)  # a ends at 1, the scheduler answers 0.5 s later
    assert starts["c"] == pytest.approx(1.5 + 0.0 + 0.5 + 5.0)


def two_independent_ops() -> TileGraph:
    """1000 FLOPs on worker 0 and 1000 on worker 1, nothing between them."""
    g = TileGraph()
    for w in (0, 1):
        g.add_op(TileOp(f"op{w}", "forward", "forward", w, None, flops=1000))
    g.graph.update(placeholders={}, outputs={}, meta=dict(
        mesh=rd.Mesh(data=2), batch=2, mode="eval", dtype=np.dtype("float32"), n_workers=2))
    return g


@pytest.mark.parametrize("node_flops, expected", [(0, 1.0), (2e3, 1.0), (1e3, 2.0), (1.5e3, 4 / 3)])
def test_devices_of_a_node_share_its_flops(node_flops, expected):
    spec = dataclasses.replace(cluster(devices=2, flops=1e3), node_flops=node_flops)
    p = simulate_graph(two_independent_ops(), spec)
    assert p.step_time == pytest.approx(expected)  # both busy: each at node_flops / 2
    apart = dataclasses.replace(spec, nodes=2, devices_per_node=1)  # one device per node
    assert simulate_graph(two_independent_ops(), apart).step_time == pytest.approx(1.0)


def test_memory_bound_ops_cost_their_bytes():
    net, batch = tiny(), 8
    fast = simulate(net, None, batch, cluster(devices=1, flops=1e12), rd.SGD())
    slow_memory = ClusterSpec("m", 1, 1, Device(1e12, 1e9, memory_bandwidth=1e3),
                              Link(1e3, 0), Link(1e3, 0))
    assert simulate(net, None, batch, slow_memory, rd.SGD()).step_time > 100 * fast.step_time


# ----------------------------------------------------------------------------- exchanges
def mlp():
    """Dense 8 -> 16 -> 4: two layers, so model-parallel steps exchange activations often."""
    return rd.Sequential([rd.Dense(16, activation="relu"), rd.Dense(4)], input_shape=(8,))


def plan_tasks(net, placement, batch, direct):
    """Dask tasks of the engine's plan for one training step."""
    return StepPlan(lower(net, placement, batch, "train", rd.SGD()), direct=direct).n_tasks


def test_exchanges_agree_where_they_are_one_plan():
    spec = cluster(devices=2, flops=1e6, per_task=1e-3, dispatch=0.05)
    one = [simulate(mlp(), None, 32, spec, rd.SGD(), exchange=ex) for ex in ("direct", "graph")]
    assert one[0] == one[1] and one[0].exchange == "graph"
    unfused = simulate(mlp(), rd.data_parallel(2), 32, spec, rd.SGD(), fused=False)
    assert unfused.exchange == "graph"  # as in the engine: unfused plans exchange by graph
    assert unfused == simulate(mlp(), rd.data_parallel(2), 32, spec, rd.SGD(), fused=False,
                               exchange="graph")


def predict(placement, dispatch, exchange):
    spec = cluster(devices=2, flops=1e6, bandwidth=1e6, latency=1e-4, per_task=1e-3,
                   dispatch=dispatch)
    return simulate(mlp(), placement, 32, spec, rd.SGD(), exchange=exchange)


def test_direct_data_parallel_counts_the_engines_tasks_and_moves_the_same_bytes():
    direct, graph = (predict(rd.data_parallel(2), 0.05, ex) for ex in ("direct", "graph"))
    assert (direct.exchange, graph.exchange) == ("direct", "graph")
    assert direct.n_tasks == plan_tasks(mlp(), rd.data_parallel(2), 32, True) == 5
    assert graph.n_tasks == plan_tasks(mlp(), rd.data_parallel(2), 32, False) == 9
    assert direct.bytes_moved == graph.bytes_moved
    # small gradients that only sums read wait for the worker's first take: all of them
    # travel in one message each way, as the engine sends them
    assert len([t for t in direct.transfers if "/grad/" in t.name]) == 2
    # only the loss scalars and the metrics (Dask tasks after the worker tasks) wait for the
    # scheduler; in the graph exchange the gradient sends also wait twice, beside that path
    assert direct.step_time - predict(rd.data_parallel(2), 0.0, "direct").step_time == \
        pytest.approx(2 * 0.05)
    assert direct.step_time < graph.step_time


def test_direct_model_parallel_pays_no_dispatch_per_exchange():
    direct, graph = (predict(rd.model_parallel(2), 0.05, ex) for ex in ("direct", "graph"))
    assert direct.n_tasks == plan_tasks(mlp(), rd.model_parallel(2), 32, True) < graph.n_tasks
    assert direct.bytes_moved == graph.bytes_moved
    assert direct.step_time < 0.5 * graph.step_time
    paid = {ex: p.step_time - predict(rd.model_parallel(2), 0.0, ex).step_time
            for ex, p in (("direct", direct), ("graph", graph))}
    assert paid["direct"] == pytest.approx(2 * 0.05)  # the outputs' two dispatches only
    assert paid["graph"] > 6 * 0.05  # two per exchange of activations or gradients


def test_direct_reader_waits_for_the_tile():
    spec = cluster(devices=2, flops=1e3, bandwidth=100.0, latency=1.0, per_task=0.5,
                   dispatch=2.0)
    p = simulate_graph(overlap_graph(2000), spec, exchange="direct")
    slots = {s.name: (s.start, s.end) for s in p.schedule}
    # worker tasks start at once (0.5 s per task); a ends at 1.5 and s posts its tile then
    assert (p.exchange, p.n_tasks) == ("direct", 2)
    assert slots["w0"] == slots["w1"] == (0.0, 0.5) and slots["s"] == (1.5, 1.5)
    (t,) = p.transfers
    assert (t.name, t.start, t.end) == ("s", 1.5, pytest.approx(1.5 + 20 + 1))
    assert slots["c"] == pytest.approx((22.5, 23.5))  # c waits on worker 1 for the tile
    assert p.step_time == pytest.approx(0.5 + 1 + 20 + 1 + 1)  # latency on the path
    assert p.exposed_comm == pytest.approx(22.5 - 11.5)  # b computes from 1.5 to 11.5
    graph = simulate_graph(overlap_graph(2000), spec, exchange="graph")
    # a and b as one task; s 2 s later; its tile 2 s after s; then c
    assert graph.step_time == pytest.approx(11.5 + 2 + 0.5 + 2 + 21 + 1.5)


def test_posting_charges_per_message_not_per_task():
    """Where devices share a node's cores, the sender pays ``per_message`` per message (an
    actor call) and the bytes at link bandwidth; ``per_task`` only at each task's start."""
    g = overlap_graph(400)
    base = dataclasses.replace(cluster(devices=2, flops=1e3, bandwidth=100.0, latency=1.0),
                               node_flops=2e3)  # room for both devices at full speed

    def spec(**overhead):
        return dataclasses.replace(base, overhead=Overhead(**overhead))

    assert posting_time(g, spec(per_message=0.25, per_task=7.0), ["s"], 0) == \
        pytest.approx(0.25 + 400 / 100.0)
    assert posting_time(g, spec(per_task=7.0), ["s"], 0) == pytest.approx(400 / 100.0)
    step = {(task, message): simulate_graph(g, spec(per_task=task, per_message=message),
                                            exchange="direct").step_time
            for task in (0.5, 0.75) for message in (0.0, 0.25)}
    # one message (s's tile to worker 1) on the path: a, posting, then b (10 s)
    assert step[0.5, 0.0] == pytest.approx(0.5 + 1 + 4 + 10)
    assert step[0.5, 0.25] - step[0.5, 0.0] == pytest.approx(0.25)
    # per_task is paid once, as the worker task starts, and not per message
    assert step[0.75, 0.25] - step[0.5, 0.25] == pytest.approx(0.25)


def test_direct_tiles_take_the_mailbox_trip_and_cost_the_reader_their_bytes():
    """A posted tile arrives ``mail_latency`` (not the link's latency) after its bytes; across
    nodes the inter-node link's extra latency is added. Where devices share a node's cores,
    the reader's device pays the tile's bytes at link bandwidth when it takes it."""
    g = overlap_graph(2000)
    spec = cluster(devices=2, flops=1e3, bandwidth=100.0, latency=1.0, per_task=0.5,
                   mail_latency=0.25)
    p = simulate_graph(g, spec, exchange="direct")
    (t,) = p.transfers
    assert (t.start, t.end) == (1.5, pytest.approx(1.5 + 20 + 0.25))
    assert {s.name: s.end for s in p.schedule}["c"] == pytest.approx(21.75 + 1)
    two_nodes = cluster(devices=1, nodes=2, flops=1e3, bandwidth=100.0, latency=1.0,
                        inter=Link(100.0, 3.0), per_task=0.5, mail_latency=0.25)
    (t,) = simulate_graph(g, two_nodes, exchange="direct").transfers
    assert t.end == pytest.approx(1.5 + 20 + 0.25 + (3.0 - 1.0))
    assert simulate_graph(g, spec, exchange="graph") == \
        simulate_graph(g, dataclasses.replace(spec, overhead=Overhead(per_task=0.5)),
                       exchange="graph"), "the graph exchange's transfers keep the link latency"
    shared = dataclasses.replace(spec, node_flops=2e3)  # room for both devices at full speed
    p = simulate_graph(g, shared, exchange="direct")
    slots = {s.name: (s.start, s.end) for s in p.schedule}
    # worker 0 pays posting (2000 B / 100 B/s) after a; c pays taking them, besides its 1 s
    assert slots["c"][1] - slots["c"][0] == pytest.approx(1 + 20)
    assert receiving_time(g, shared, "c", {"s"}, set(), 1) == pytest.approx(20)
    assert receiving_time(g, spec, "c", {"s"}, set(), 1) == 0.0  # devices with their own cores
    assert receiving_time(g, shared, "c", {"s"}, {"s"}, 1) == 0.0  # taken once


def test_tiles_through_shared_memory_cost_a_copy_and_no_link():
    """CPU workers of one node pass tiles of MIN_BYTES or more through shared memory: the
    sender pays a copy at memory bandwidth, the link carries no bytes (the tile arrives
    ``mail_latency`` after it leaves) and the reader reads it in place, for free."""
    big = MIN_BYTES * 4
    g = overlap_graph(big)
    gpus = dataclasses.replace(
        cluster(devices=2, flops=1e3, bandwidth=1e6, latency=1.0, per_task=0.5,
                mail_latency=0.25, per_message=0.1), node_flops=2e3)
    cpus = dataclasses.replace(gpus, device=Device(1e3, 1e9, memory_bandwidth=2e6, kind="cpu"))
    assert shared_memory(cpus, 0, 1, big) and not shared_memory(gpus, 0, 1, big)
    assert not shared_memory(cpus, 0, 1, MIN_BYTES - 1)
    two_nodes = dataclasses.replace(cpus, nodes=2, devices_per_node=1)
    assert not shared_memory(two_nodes, 0, 1, big)
    assert posting_time(g, cpus, ["s"], 0) == pytest.approx(0.1 + big / 2e6)
    assert posting_time(g, gpus, ["s"], 0) == pytest.approx(0.1 + big / 1e6)
    assert receiving_time(g, cpus, "c", {"s"}, set(), 1) == 0.0
    assert receiving_time(g, gpus, "c", {"s"}, set(), 1) == pytest.approx(big / 1e6)
    (t,) = simulate_graph(g, cpus, exchange="direct").transfers
    assert t.nbytes == 0 and t.end - t.start == pytest.approx(0.25)


def test_gradients_for_sums_wait_for_the_next_take_where_only_a_message_is_left():
    """Data parallel on CPU workers of one node: every weight gradient goes through shared
    memory or is small, so each worker sends one message a step (at its first sum), as the
    engine does; on GPUs the large gradients leave after the layer that made them."""
    # weights of 192 KiB and 1 MiB: each worker sends the other blocks of rows of at least
    # MIN_BYTES (a sharded update), which, off shared memory, leave at once
    net = rd.Sequential([rd.Dense(512, activation="relu"), rd.Dense(512, activation="relu"),
                         rd.Dense(10)], input_shape=(96,))
    gpus = cluster(devices=2, flops=1e9, bandwidth=1e9, latency=1e-5, per_task=1e-3)
    cpus = dataclasses.replace(gpus, device=Device(1e9, 1e9, kind="cpu"))

    from rapydli.graph.fuse import fuse, mail_sends
    from rapydli.graph.lower import lower
    from rapydli.scheduler.replay import _carriers

    graph = lower(net, rd.data_parallel(2), 64, "train", rd.SGD())
    mail = mail_sends(graph)

    def grad_messages(spec):  # per worker, the ops after which its gradient tiles leave
        out = {}
        for _, worker, keys in fuse(graph, direct=True):
            carrier = _carriers(graph, keys, mail, spec)
            out.setdefault(worker, set()).update(
                carrier[k] for k in keys if k in mail and "/grad/" in k)
        return {w: c for w, c in out.items() if w is not None}

    assert [len(c) for c in grad_messages(cpus).values()] == [1, 1]  # one each way
    assert all(len(c) > 1 for c in grad_messages(gpus).values())
    for spec in (cpus, gpus):  # and the simulator times the step with them
        assert simulate(net, rd.data_parallel(2), 64, spec, rd.SGD(),
                        exchange="direct").n_transfers > 0


def test_direct_worker_task_holds_its_device():
    """Another task ready on a worker waits until the worker task there ended, even while that
    task only waits for a tile (one Dask thread per worker runs one task at a time)."""
    g = overlap_graph(2000)
    g.add_op(TileOp("out", "output", "comm", None, None, flops=1000))  # no input: on device 0
    spec = cluster(devices=2, flops=1e3, bandwidth=100.0, latency=1.0, per_task=0.5)
    slots = {s.name: (s.start, s.end) for s in simulate_graph(g, spec, exchange="direct").schedule}
    assert slots["w0"] == (0.0, 0.5) and slots["b"] == pytest.approx((1.5, 11.5))
    assert slots["out"] == pytest.approx((11.5, 13.0))


def test_mail_and_dask_transfer_from_one_unit_stay_apart():
    """Worker 0's task ends with mail send ``s`` (to ``c`` on worker 1); output ``out``, placed
    on worker 1 by its first input, also reads ``a`` by a Dask transfer after that task. With
    no dispatch both leave unit ``s`` for worker 1 at once: one message, one transfer."""
    g = TileGraph()
    g.add_op(TileOp("a", "forward", "forward", 0, None, flops=1000))
    g.add_op(TileOp("s", "send", "comm", 0, None, (Ref("a", (), 400),), nbytes=400))
    g.add_op(TileOp("c", "forward", "forward", 1, None, (Ref("s", (), 400),), flops=1000))
    g.add_op(TileOp("out", "output", "comm", None, None,
                    (Ref("c", (), 8), Ref("a", (), 100))))
    g.graph.update(placeholders={}, outputs={}, meta=dict(
        mesh=rd.Mesh(model=2), batch=1, mode="eval", dtype=np.dtype("float32"), n_workers=2))
    spec = cluster(devices=2, flops=1e3, bandwidth=100.0, latency=1.0, mail_latency=0.25)
    p = simulate_graph(g, spec, exchange="direct")
    # a ship keyed without ``mail`` would merge them into one 500 B message at mail latency
    assert sorted((t.nbytes, t.end - t.start) for t in p.transfers) == \
        [(100, pytest.approx(100 / 100.0 + 1.0)), (400, pytest.approx(400 / 100.0 + 0.25))]


@pytest.mark.parametrize("call", [
    lambda: simulate(tiny(), None, 8, cluster(), rd.SGD(), exchange="mail"),
    lambda: simulate_graph(overlap_graph(4), cluster(), exchange="mail"),
    lambda: search(tiny(), 8, cluster(), rd.SGD(), exchange="mail")])
def test_unknown_exchange_is_an_error(call):
    with pytest.raises(ConfigError, match=r"exchange: expected one of 'direct', 'graph'; "
                                          r"received 'mail'"):
        call()


def test_prediction_names_its_exchange():
    assert "direct exchange" in format_prediction(predict(rd.model_parallel(2), 0.0, "direct"))


# ----------------------------------------------------------------------------- search
def test_search_ranks_fastest_fitting_first_and_misfits_last():
    net = rd.Sequential([rd.Dense(256, activation="relu"), rd.Dense(10)], input_shape=(256,))
    need = simulate(net, None, 64, cluster(devices=1), rd.SGD()).memory_by_device[0].total
    spec = cluster(devices=4, flops=1e9, memory=0.8 * need, bandwidth=1e8, latency=1e-5)
    ranked = search(net, 64, spec, rd.SGD())
    fits = [p.fits for p in ranked]
    assert fits[0] and not fits[-1] and fits == sorted(fits, reverse=True)
    assert ranked[-1].label.startswith("single") or not ranked[-1].fits
    fitting = [p for p in ranked if p.fits]
    assert ranked[0].step_time == min(p.step_time for p in fitting)
    labels = [p.label for p in ranked]
    assert not any(label.startswith("spatial") for label in labels)  # no conv layers
    assert {"data_parallel Mesh(data=4)", "hybrid Mesh(data=2, model=2)"} <= set(labels)
    assert "rank" in format_ranking(ranked).splitlines()[0]


def test_search_tries_spatial_for_conv_networks():
    net = rd.Sequential([rd.Conv2D(4, 3, padding=1), rd.Flatten(), rd.Dense(10)],
                        input_shape=(1, 8, 8))
    labels = [p.label for p in search(net, 16, cluster(devices=2, flops=1e9), rd.SGD())]
    assert "spatial_parallel Mesh(model=2)" in labels and "single Mesh()" in labels


# ----------------------------------------------------------------------------- command line
def run_cli(argv):
    from rapydli.scheduler.simulate_cli import add_simulate_parser

    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_prediction_and_search(capsys):
    config = str(EXAMPLES / "digits_cnn.yaml")
    gpus = str(EXAMPLES / "clusters" / "gpu_infiniband.yaml")
    assert run_cli(["simulate", config, "--cluster", gpus, "--mesh", "data=2,model=2"]) == 0
    out = capsys.readouterr().out
    assert "hybrid Mesh(data=2, model=2)" in out and "step time" in out
    assert run_cli(["simulate", config, "--cluster", gpus, "--search", "--top", "3",
                    "--batch", "32"]) == 0
    out = capsys.readouterr().out
    assert "23 candidate placements" in out and "best:" in out


@pytest.mark.slow
def test_calibrate_local_measures_this_machine():
    from rapydli.scheduler.cost import calibrate_local

    spec = calibrate_local(repeats=1)
    assert spec.n_devices == 2 and spec.device.flops > 1e8
    assert spec.overhead.dispatch > 0 and spec.intra_node.bandwidth > 0
    assert 0 < spec.overhead.per_message < 0.1  # seconds per 64 B message (by doorbell here)
    assert 0 < spec.overhead.mail_latency < 0.1  # half a round trip of a 64 B tile
    assert dump_cluster(parse_cluster(yaml_round_trip(spec))) == dump_cluster(spec)


def test_weight_gradients_computed_in_shared_memory_cost_no_copy():
    """Data parallel on CPU workers of one node: the engine computes a dense layer's weight
    gradient straight into shared memory, so posting it costs no copy; a bias, and the
    gradients of a layer whose kernel cannot (a convolution), still cost one."""
    from rapydli.graph.lower import lower
    from rapydli.scheduler.replay import computed_in_place

    cpus = dataclasses.replace(cluster(devices=2, flops=1e9, bandwidth=1e9, latency=1e-5,
                                       per_task=1e-3, per_message=0.0),
                               device=Device(1e9, 1e9, memory_bandwidth=1e6, kind="cpu"),
                               node_flops=2e9)

    def in_place(net):
        graph = lower(net, rd.data_parallel(2), 32, "train", rd.SGD())
        sends = [k for k in graph.nodes if "/grad/" in k and graph.op(k).kind == "send"]
        made = {k: computed_in_place(graph, k) for k in sends}
        for key in sends:  # a copy is charged exactly where the tile is not made in place
            op = graph.op(key)
            cost = op.nbytes / 1e9 if op.nbytes < MIN_BYTES else (  # small: in the message
                0.0 if made[key] else op.nbytes / 1e6)  # else a copy at memory bandwidth
            assert posting_time(graph, cpus, [key], op.worker) == pytest.approx(cost, abs=1e-12)
        return {k.split("/grad/")[0] for k, v in made.items() if v}

    cnn = rd.Sequential([rd.Conv2D(32, 3, padding=1), rd.Flatten(),  # conv weight: 72 KiB
                         rd.Dense(256, activation="relu"), rd.Dense(64), rd.Dense(10)],
                        input_shape=(64, 4, 4))
    assert in_place(cnn) == {"2.weight", "3.weight", "4.weight"}  # split backward passes
    mlp = rd.Sequential([rd.Dense(64, activation="relu"), rd.Dense(10)], input_shape=(300,))
    assert in_place(mlp) == {"0.weight", "1.weight"}  # the first layer's is not split


def test_a_sharded_update_costs_no_copy_between_replicas_of_one_machine():
    """Data parallel, a weight updated sharded: a block of rows of a dense weight gradient made
    in shared memory and the updated rows of the weight the replicas share are posted without a
    copy; the views and the rows put in place cost only their op; between machines the rows
    cost their bytes at the link's bandwidth."""
    from rapydli.graph import ops
    from rapydli.scheduler.cost import op_seconds
    from rapydli.scheduler.replay import computed_in_place

    net = rd.Sequential([rd.Dense(256, activation="relu"), rd.Dense(10)], input_shape=(300,))
    graph = lower(net, rd.data_parallel(2), 32, "train", rd.SGD(momentum=0.9))
    grads = [k for k in graph.nodes if k.startswith("0.weight/grad/") and "/w" in k
             and graph.op(k).kind == "send"]
    rows = [k for k in graph.nodes if k.startswith("0.weight/rows/") and "to" in k]
    assert len(grads) == len(rows) == 2
    assert all(computed_in_place(graph, k) for k in grads + rows)
    one_node = dataclasses.replace(cluster(devices=2, flops=1e9, bandwidth=1e9, per_op=1e-6),
                                   device=Device(1e9, 1e9, memory_bandwidth=1e6, kind="cpu"),
                                   node_flops=2e9)
    two_nodes = dataclasses.replace(one_node, nodes=2, devices_per_node=1)
    for key in rows:
        op = graph.op(key)
        assert posting_time(graph, one_node, [key], op.worker) == 0.0
        assert posting_time(graph, two_nodes, [key], op.worker) == pytest.approx(op.nbytes / 1e9)
    free = [k for k in graph.nodes if graph.op(k).fn in (ops.rows_task, ops.place_task)]
    assert len(free) == 2 + 2 + 2  # per worker: its gradient's rows, its weight's rows, place
    assert all(op_seconds(graph, k, one_node.device, one_node.overhead) == 1e-6 for k in free)
