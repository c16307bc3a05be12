"""Cost model and simulator: predict one training step of a network under a placement on a
described cluster, without running it.

A cluster is data (:class:`ClusterSpec`, usually read from YAML by :func:`load_cluster`): nodes,
devices per node, each device's achieved FLOP/s, memory and memory bandwidth, the links inside a
node and between nodes, and what Dask itself costs. :func:`simulate` lowers the network
(:func:`rapydli.graph.lower.lower`), fuses it into the Dask tasks the engine would run
(:func:`rapydli.graph.fuse.fuse`), gives mesh worker ``i`` device ``i`` (nodes filled one after
the other) and replays the tasks as a discrete-event simulation
(:mod:`rapydli.scheduler.replay`), first as the ``"graph"`` exchange runs them:

- a task occupies its device for ``overhead.per_task`` plus, per tile op, ``overhead.per_op`` +
  ``max(flops / rate, bytes touched / memory_bandwidth)``; ``rate`` is ``device.flops`` times the
  achieved fraction of the op's kernel family (``device.kernel_efficiency``, by layer type);
  where the devices of a node share cores (``node.flops``, e.g. CPU workers on one machine),
  ``k`` devices busy at once each run ``min(1, node_flops / (k * device.flops))`` as fast;
- the scheduler learns that a task ended and hands its dependents out ``overhead.dispatch``
  seconds later (Dask's worker -> scheduler -> worker round trip);
- a task's outputs that other workers read travel once per destination worker, taking
  ``latency + bytes / bandwidth`` of the link between the two devices' nodes;
- communication overlaps computation: a device computes while data moves. Links are resources
  that carry one transfer at a time: inside a node, one channel per ordered device pair (a
  crossbar such as NVLink, or shared memory); between nodes, one NIC per node, full duplex, so a
  transfer holds the sender node's outbound side and the receiver node's inbound side for
  ``bytes / bandwidth`` (latency is in flight, not occupancy). Waiting transfers go first come,
  first served; ready tasks go by Dask's order (sends first, then graph order).

That is the ``"graph"`` exchange. In the ``"direct"`` exchange (``exchange="direct"``, the
default of :func:`simulate` as of the engine on a cluster; see
:mod:`rapydli.scheduler.mailbox`) the Dask tasks are those of ``fuse(graph, direct=True)``: one
per worker holding all its ops, in :func:`~rapydli.graph.fuse.mail_order`, plus the sends read
only by outputs and the outputs themselves. The replay then differs in this:

- a worker task pays ``overhead.per_task`` once, as it starts; then its ops run one after the
  other in program order, each costing as above, with no dispatch between them; an op that
  reads a tile of another worker waits until that tile arrived, holding its device (no other
  task starts there before the worker task ended);
- where the devices of a node share its cores (``node.flops``), posting tiles costs the sender
  device time: ``overhead.per_message`` per message (to the peer's mailbox: a doorbell record between
  workers of one machine, an actor call otherwise;
  0 where a spec does not set it, as in specs written before it existed:
  :func:`calibrate_local` measures it) plus the bytes at the link's bandwidth (the comms'
  socket writes run on the kernels' cores; measured on this machine, each worker's event loop
  spent 19-21 ms of CPU per data-parallel MLP step moving 7.4 MB), and taking them costs the
  reader's device their bytes at the link's bandwidth once (its event loop reads them);
- a tile read by another worker leaves when its send op ends, with no dispatch; consecutive
  sends of a program travel together, one transfer per receiving worker, when the last of them
  ends (the engine posts them in one message), and arrive after their bytes at the link's
  bandwidth plus ``overhead.mail_latency`` (a mailbox's one-way trip, far shorter than a Dask
  transfer's; across nodes plus the inter-node link's extra latency; 0: the link's latency).
  Links are shared as above;
- between CPU devices of one node a tile of at least ``MIN_BYTES`` goes through shared memory
  (:mod:`rapydli.scheduler.shared`): posting it costs the sender its bytes at the device's
  memory bandwidth (a copy), the link carries none of them and the reader pays nothing; sends
  that only sums read and that cost only a message (shared memory, or a small tile) leave
  with the op before their program's next take, as the engine defers them;
- the other Dask tasks start ``overhead.dispatch`` after the worker task they read ended as a
  whole (their inputs then travel as in the graph exchange).

With one worker, no sends between workers or ``fused=False`` both exchanges are one plan,
replayed as the graph exchange. ``Prediction.n_tasks`` counts Dask tasks in both.

The step time is the makespan plus ``overhead.per_step`` (graph submission and the metrics'
trip to the client). Memory per device counts parameters, optimizer state, one gradient per
weight tile and the activations the backward pass reads (not the data set itself).

Cluster specs and their YAML live in :mod:`rapydli.scheduler.cluster_spec`, measuring this
machine in :mod:`rapydli.scheduler.calibrate`; both are re-exported here.

>>> from rapydli import SGD, Sequential, Dense, data_parallel
>>> cluster = parse_cluster({"nodes": 1, "devices_per_node": 2,
...     "device": {"flops": "1 GFLOP/s", "memory": "1 GB"},
...     "links": {"intra_node": {"bandwidth": "1 GB/s", "latency": "1 ms"}}})
>>> net = Sequential([Dense(4, activation="relu"), Dense(3)], input_shape=(5,))
>>> p = simulate(net, data_parallel(2), 8, cluster, SGD(), exchange="direct")
>>> p.fits, p.n_workers, p.exchange, p.bytes_moved  # 39 float32 gradients each way, 16 B loss
(True, 2, 'direct', 328)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rapydli.errors import ConfigError, PlacementError, RapydliError
from rapydli.graph import ops
from rapydli.graph.fuse import mail_sends
from rapydli.graph.tiles import shape_of
from rapydli.scheduler.calibrate import calibrate_local, measure_device, step_rate
from rapydli.scheduler.cluster_spec import (ClusterSpec, Device, Link, Overhead, dump_cluster,
                                            load_cluster, parse_cluster, quantity)
from rapydli.scheduler.replay import Replay, Slot, direct_units, exposed_time, graph_units

#: public names; the cluster specs, calibration and :class:`Slot` (a replayed run) are
#: re-exported from their own modules
__all__ = [
    "ClusterSpec", "Device", "Link", "Overhead", "quantity", "parse_cluster", "load_cluster",
    "dump_cluster", "calibrate_local", "measure_device", "step_rate", "EXCHANGES", "MemoryUse",
    "Slot", "Prediction", "op_seconds", "memory_by_worker", "simulate_graph", "PRESET_OF_RULE",
    "placement_label", "simulate", "candidate_placements", "search", "format_prediction",
    "format_ranking"]


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class MemoryUse:
    """Bytes one device holds during a step."""

    params: int = 0  #: resident weight tiles
    optimizer: int = 0  #: optimizer state beside them (momentum, ...)
    gradients: int = 0  #: one gradient per weight tile
    activations: int = 0  #: layer inputs and outputs kept for the backward pass

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations


@dataclass(frozen=True)
class Prediction:
    """What :func:`simulate` predicts for one step. Times in seconds, sizes in bytes."""

    label: str  #: placement preset and mesh, e.g. ``data_parallel Mesh(data=2)``
    placement: Any  #: the :class:`~rapydli.placement.Placement`
    cluster: str
    batch: int
    n_workers: int
    step_time: float  #: makespan + per-step overhead
    compute_time: float  #: kernel time of the busiest device (stretched where devices share)
    comm_time: float  #: every transfer's latency + bytes / bandwidth, summed
    exposed_comm: float  #: time data is moving while no device computes
    bytes_moved: int
    n_tasks: int
    n_transfers: int
    compute_by_device: tuple[float, ...]
    memory_by_device: tuple[MemoryUse, ...]
    memory_capacity: float  #: bytes per device
    #: how tiles traveled between workers: ``"direct"``, or ``"graph"`` (also where the two
    #: exchanges are one plan: one worker, no sends between workers, unfused)
    exchange: str
    schedule: tuple[Slot, ...] = field(default=(), repr=False, compare=False)
    transfers: tuple[Slot, ...] = field(default=(), repr=False, compare=False)

    @property
    def fits(self) -> bool:
        """Does every device hold its share of the step in memory?"""
        return all(m.total <= self.memory_capacity for m in self.memory_by_device)

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.step_time

    @property
    def other_time(self) -> float:
        """Step time that is neither the busiest device's kernels nor exposed communication:
        runtime overheads, dispatch latency, waiting on other devices."""
        return max(0.0, self.step_time - self.compute_time - self.exposed_comm)


# ----------------------------------------------------------------------------- op costs
def _region_bytes(region, itemsize: int) -> int:
    return math.prod(shape_of(region)) * itemsize


def _placeholder_bytes(info: tuple, itemsize: int) -> int:
    """Bytes a placeholder binds: weight and state tiles; data and index count as read by loads."""
    if info[0] == "param":
        return _region_bytes(info[2], itemsize)
    if info[0] == "state":
        return _region_bytes(info[3], itemsize)
    return 0


def op_seconds(graph, key: str, device: Device, overhead: Overhead) -> float:
    """Device seconds of tile op ``key``: ``per_op + max(flops / rate, bytes / bandwidth)``.

    Bytes touched are the op's inputs plus its outputs. A backward op that needs no input
    gradient (the first layer) does half the FLOPs its graph node states.
    """
    op = graph.op(key)
    if op.fn in (ops.rows_task, ops.place_task):
        # a view; rows put in place: on one machine the replicas share the weight and copy
        # nothing, between machines the copy is charged with the receiving (replay)
        return overhead.per_op
    flops = op.flops
    if op.kind == "backward" and not op.kwargs.get("need_dx", True):
        flops //= 2  # only the weight gradient: one product instead of two
    layer = op.kwargs.get("layer")
    seconds = flops / device.rate(type(layer).__name__ if layer is not None else None)
    if device.memory_bandwidth:
        seconds = max(seconds, _touched(graph, key) / device.memory_bandwidth)
    return overhead.per_op + seconds


def _touched(graph, key: str) -> int:
    itemsize = graph.graph["meta"]["dtype"].itemsize
    placeholders = graph.graph["placeholders"]
    op = graph.op(key)
    read = sum(_placeholder_bytes(placeholders[r.key], itemsize) if r.key in placeholders
               else r.nbytes for r in op.inputs)
    written = {(r.key, r.pick): r.nbytes for s in graph.successors(key)
               for r in graph.op(s).inputs if r.key == key}
    return read + max(op.nbytes, sum(written.values()))


# ----------------------------------------------------------------------------- memory
def memory_by_worker(graph) -> list[MemoryUse]:
    """Bytes each mesh worker holds in a step of ``graph`` (see :class:`MemoryUse`)."""
    meta = graph.graph["meta"]
    itemsize, n = meta["dtype"].itemsize, meta["n_workers"]
    params, state = [0] * n, [0] * n
    for info in graph.graph["placeholders"].values():
        if info[0] == "param":
            params[info[3]] += _placeholder_bytes(info, itemsize)
        elif info[0] == "state":
            state[info[4]] += _placeholder_bytes(info, itemsize)
    kept: list[dict] = [{} for _ in range(n)]
    for op in graph.ops(kind="backward"):
        for ref in op.inputs[:2]:  # the layer's input x and output y, read again backward
            kept[op.worker][(ref.key, ref.pick)] = ref.nbytes
    grads = params if meta["mode"] in ("train", "grad") else [0] * n
    return [MemoryUse(params[w], state[w], grads[w], sum(kept[w].values())) for w in range(n)]


# ----------------------------------------------------------------------------- simulation
#: how tiles may travel between workers (see the module doc)
EXCHANGES = ("direct", "graph")


def _check_exchange(exchange: str) -> None:
    if exchange not in EXCHANGES:
        raise ConfigError(f"exchange: expected one of {', '.join(map(repr, EXCHANGES))}; "
                          f"received {exchange!r}")


def simulate_graph(graph, cluster: ClusterSpec, fused: bool = True, label: str = "",
                   placement=None, exchange: str = "graph") -> Prediction:
    """Replay a lowered :class:`~rapydli.graph.lower.TileGraph` on ``cluster``.

    ``fused=False`` makes every tile op a Dask task of its own (as ``Engine(fused=False)``),
    which implies the graph exchange. ``exchange`` is ``"direct"`` or ``"graph"`` (see the
    module doc); a graph without sends between mesh workers has one plan for both, replayed
    as the graph exchange (:attr:`Prediction.exchange` says which model ran).
    """
    _check_exchange(exchange)
    meta = graph.graph["meta"]
    n = meta["n_workers"]
    if n > cluster.n_devices:
        raise PlacementError(
            f"placement {label or meta['mesh']!r} needs {n} workers; {cluster.describe()} has "
            f"{cluster.n_devices}. Use a smaller mesh (--mesh) or a larger cluster")
    mail = mail_sends(graph) if exchange == "direct" and fused else set()
    def op_time(key: str) -> float:
        return op_seconds(graph, key, cluster.device, cluster.overhead)

    units, n_tasks = (direct_units(graph, cluster, mail, op_time) if mail else
                      graph_units(graph, cluster, fused, op_time))
    replay = Replay(units, cluster)
    replay.run()
    ends = [s.end for s in replay.schedule] + [t.end for t in replay.transfers]
    compute = [0.0] * n
    for s in replay.schedule:  # the kernels' share of the slot (stretched where shared)
        unit = units[s.name]
        compute[s.worker] += (s.end - s.start) * unit.seconds / (
            unit.seconds + unit.overhead or 1)
    return Prediction(
        label=label or repr(meta["mesh"]), placement=placement, cluster=cluster.name,
        batch=meta["batch"], n_workers=n,
        step_time=cluster.overhead.per_step + max(ends, default=0.0),
        compute_time=max(compute), comm_time=sum(t.end - t.start for t in replay.transfers),
        exposed_comm=exposed_time(replay.transfers, replay.schedule),
        bytes_moved=sum(t.nbytes for t in replay.transfers), n_tasks=n_tasks,
        n_transfers=len(replay.transfers), compute_by_device=tuple(compute),
        memory_by_device=tuple(memory_by_worker(graph)), memory_capacity=cluster.device.memory,
        exchange="direct" if mail else "graph",
        schedule=tuple(replay.schedule), transfers=tuple(replay.transfers))


#: placement rule -> the preset name users type
PRESET_OF_RULE = {"single": "single", "data": "data_parallel", "model": "model_parallel",
                  "spatial": "spatial_parallel", "hybrid": "hybrid"}


def placement_label(placement) -> str:
    """``"data_parallel Mesh(data=2)"``; ``+ overrides`` when layers override the preset."""
    extra = " + overrides" if placement.overrides else ""
    return f"{PRESET_OF_RULE.get(placement.rule, placement.rule)} {placement.mesh!r}{extra}"


def simulate(network, placement, batch: int, cluster: ClusterSpec, optimizer=None,
             dtype="float32", fused: bool = True, exchange: str = "direct") -> Prediction:
    """Predict one training step of ``network`` under ``placement`` on ``cluster``.

    Parameters
    ----------
    network : Sequential
    placement : Placement or None
        ``None``: everything on one worker.
    batch : int
        Samples per step, over all workers.
    cluster : ClusterSpec
        From :func:`load_cluster` or :func:`parse_cluster`.
    optimizer : SGD, optional
        Decides the optimizer state held per weight tile (default: plain SGD, none).
    dtype : str
        ``"float32"`` or ``"float64"``.
    fused : bool
        Simulate the fused Dask tasks the engine runs (default) or one task per tile op
        (which implies the graph exchange, as in the engine).
    exchange : {"direct", "graph"}
        How tiles travel between workers (see the module doc). ``"direct"``, the default,
        is what the engine does on a cluster with more than one mesh worker; with one worker
        both are the same plan.

    Returns
    -------
    Prediction
        Step time, compute, communication (total and exposed), memory per device and
        whether it fits; :func:`format_prediction` prints it.
    """
    from rapydli.graph.lower import lower
    from rapydli.optim import SGD
    from rapydli.placement import single

    _check_exchange(exchange)
    placement = placement or single()
    if placement.mesh.size > cluster.n_devices:
        raise PlacementError(
            f"placement {placement_label(placement)} needs {placement.mesh.size} workers; "
            f"{cluster.describe()} has {cluster.n_devices}. Use a smaller mesh (--mesh) or a "
            "larger cluster")
    graph = lower(network, placement, batch, "train", optimizer or SGD(), dtype)
    return simulate_graph(graph, cluster, fused, placement_label(placement), placement,
                          exchange)


# ----------------------------------------------------------------------------- search
def _sizes(n_devices: int) -> list[int]:
    """Worker counts to try: powers of two up to ``n_devices``, and ``n_devices`` itself."""
    sizes = {n_devices} | {2 ** k for k in range(1, n_devices.bit_length()) if 2 ** k <= n_devices}
    return sorted(s for s in sizes if s >= 2)


def candidate_placements(network, n_devices: int, presets=None) -> list:
    """Every preset over the mesh shapes that fit ``n_devices``; ``spatial_parallel`` only
    for networks with convolution or pooling layers."""
    from rapydli.layers import Conv2D, _Pool2D
    from rapydli.placement import PRESETS

    presets = tuple(presets or PRESETS)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ConfigError(f"search: unknown preset {unknown[0]!r}; expected one of "
                          f"{', '.join(map(repr, PRESETS))}")
    windows = any(isinstance(layer, (Conv2D, _Pool2D)) for layer in network.layers)
    out = [PRESETS["single"]()] if "single" in presets else []
    for n in _sizes(n_devices):
        for name in ("data_parallel", "model_parallel", "spatial_parallel"):
            if name in presets and (name != "spatial_parallel" or windows):
                out.append(PRESETS[name](n))
        if "hybrid" in presets:
            out += [PRESETS["hybrid"](n // m, m) for m in range(2, n + 1) if n % m == 0]
    return out


def search(network, batch: int, cluster: ClusterSpec, optimizer=None, dtype="float32",
           presets=None, fused: bool = True, exchange: str = "direct") -> list[Prediction]:
    """Predictions for every candidate placement, fastest fitting first, non-fitting last.

    Candidates are the presets (``single``, ``data_parallel``, ``model_parallel``,
    ``spatial_parallel`` where the network has convolutions, ``hybrid``) over worker counts
    that are powers of two up to the cluster's device count (and that count), every
    factorisation ``data x model`` for ``hybrid``. A candidate the lowering rejects is skipped.
    ``fused`` and ``exchange`` are passed to :func:`simulate`.

    >>> from rapydli import Sequential, Dense
    >>> cluster = parse_cluster({"nodes": 1, "devices_per_node": 2,
    ...     "device": {"flops": "1 GFLOP/s", "memory": "1 GB"},
    ...     "links": {"intra_node": {"bandwidth": "1 GB/s", "latency": "1 ms"}}})
    >>> ranked = search(Sequential([Dense(8), Dense(2)], input_shape=(4,)), 16, cluster)
    >>> [p.label for p in ranked][:1]
    ['single Mesh()']
    """
    _check_exchange(exchange)
    out = []
    for placement in candidate_placements(network, cluster.n_devices, presets):
        try:
            out.append(simulate(network, placement, batch, cluster, optimizer, dtype, fused,
                                exchange))
        except RapydliError:
            continue
    return sorted(out, key=lambda p: (not p.fits, p.step_time))


# ----------------------------------------------------------------------------- printing
def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.4g} ms"
    return f"{seconds * 1e6:.4g} us"


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def format_prediction(p: Prediction) -> str:
    """The text ``rapydli simulate`` prints for one placement."""
    lines = [
        f"prediction: {p.label}, batch {p.batch}, on cluster {p.cluster!r}",
        f"  step time            {_time(p.step_time):>10}   ({p.samples_per_s:,.0f} samples/s)",
        f"  compute (busiest)    {_time(p.compute_time):>10}",
        f"  communication        {_time(p.comm_time):>10}   ({_size(p.bytes_moved)} in "
        f"{p.n_transfers} transfers; exposed {_time(p.exposed_comm)})",
        f"  overhead and waiting {_time(p.other_time):>10}   ({p.n_tasks} Dask tasks, "
        f"{p.exchange} exchange)",
        f"  memory: {'fits' if p.fits else 'DOES NOT FIT'} in "
        f"{_size(p.memory_capacity)} per device",
        "  device  compute     params  optimizer  gradients  activations      total",
    ]
    for w, (c, m) in enumerate(zip(p.compute_by_device, p.memory_by_device)):
        flag = "" if m.total <= p.memory_capacity else "  over"
        lines.append(f"  {w:>6}  {_time(c):>9}  {_size(m.params):>9}  {_size(m.optimizer):>9}"
                     f"  {_size(m.gradients):>9}  {_size(m.activations):>11}  "
                     f"{_size(m.total):>9}{flag}")
    return "\n".join(lines)


def format_ranking(predictions: list[Prediction]) -> str:
    """The table ``rapydli simulate --search`` prints, in the order given."""
    head = (f"{'rank':>4}  {'placement':<32} {'workers':>7} {'step':>10} {'samples/s':>10} "
            f"{'compute':>10} {'comm':>10} {'exposed':>10} {'max memory':>10}  fits")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(predictions, 1):
        peak = max(m.total for m in p.memory_by_device)
        lines.append(f"{i:>4}  {p.label:<32} {p.n_workers:>7} {_time(p.step_time):>10} "
                     f"{p.samples_per_s:>10,.0f} {_time(p.compute_time):>10} "
                     f"{_time(p.comm_time):>10} {_time(p.exposed_comm):>10} {_size(peak):>10}  "
                     f"{'yes' if p.fits else 'NO'}")
    return "\n".join(lines)
