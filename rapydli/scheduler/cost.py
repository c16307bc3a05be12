"""Cost model and simulator: predict one training step of a network under a placement on a
described cluster, without running it.

A cluster is data (:class:`ClusterSpec`, usually read from YAML by :func:`load_cluster`): nodes,
devices per node, each device's achieved FLOP/s, memory and memory bandwidth, the links inside a
node and between nodes, and what Dask itself costs. :func:`simulate` lowers the network
(:func:`rapydli.graph.lower.lower`), fuses it into the Dask tasks the engine would run
(:func:`rapydli.graph.fuse.fuse`), gives mesh worker ``i`` device ``i`` (nodes filled one after
the other) and replays the tasks as a discrete-event simulation:

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

The step time is the makespan plus ``overhead.per_step`` (graph submission and the metrics'
trip to the client). Memory per device counts parameters, optimizer state, one gradient per
weight tile and the activations the backward pass reads (not the data set itself).

>>> from rapydli import SGD, Sequential, Dense, data_parallel
>>> cluster = parse_cluster({"nodes": 1, "devices_per_node": 2,
...     "device": {"flops": "1 GFLOP/s", "memory": "1 GB"},
...     "links": {"intra_node": {"bandwidth": "1 GB/s", "latency": "1 ms"}}})
>>> net = Sequential([Dense(4, activation="relu"), Dense(3)], input_shape=(5,))
>>> p = simulate(net, data_parallel(2), 8, cluster, SGD())
>>> p.fits, p.n_workers, p.bytes_moved  # 39 float32 gradients each way, 16 B of loss
(True, 2, 328)
"""
from __future__ import annotations

import dataclasses
import difflib
import heapq
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rapydli.errors import ConfigError, PlacementError, RapydliError
from rapydli.graph.fuse import fuse
from rapydli.graph.tiles import shape_of

# ----------------------------------------------------------------------------- quantities
_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "Ki": 2.0 ** 10, "Mi": 2.0 ** 20, "Gi": 2.0 ** 30, "Ti": 2.0 ** 40}
#: quantity kind -> (unit suffixes and their scale, an example for error messages)
_UNITS = {
    "time": ({"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}, "'50 us' or 0.00005"),
    "bytes": ({f"{p}B": s for p, s in _PREFIX.items()}, "'16 GB', '16 GiB' or 16e9"),
    "bandwidth": ({**{f"{p}B/s": s for p, s in _PREFIX.items()},
                   **{f"{p}b/s": s / 8 for p, s in _PREFIX.items()}},
                  "'56 Gb/s' (bits), '12 GB/s' (bytes) or a number of bytes/s"),
    "flops": ({f"{p}FLOP/s": s for p, s in _PREFIX.items()}, "'10 TFLOP/s' or 1e13"),
}
_QUANTITY = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*$")


def quantity(value: Any, kind: str, where: str, positive: bool = True) -> float:
    """``value`` (a number in base units, or a string with a unit) as a float of base units.

    >>> quantity("56 Gb/s", "bandwidth", "links.inter_node.bandwidth")
    7000000000.0
    >>> quantity("1 us", "time", "latency")
    1e-06
    """
    units, example = _UNITS[kind]
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and (m := _QUANTITY.match(value)):
        scale = units.get(m.group(2).replace("FLOPS", "FLOP/s"))
        number = None if scale is None else float(m.group(1)) * scale
    if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
        what = "a positive" if positive else "a non-negative"
        raise ConfigError(f"{where}: expected {what} {kind} such as {example}; received {value!r}")
    return number


# ----------------------------------------------------------------------------- specs
def _check_count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive int; received {value!r}")
    return value


@dataclass(frozen=True)
class Device:
    """One compute device: a GPU, or a CPU worker process."""

    flops: float  #: achieved FLOP/s of dense kernels (matrix products)
    memory: float  #: bytes of device memory
    memory_bandwidth: float = 0.0  #: bytes/s; 0: ops cost their FLOPs only
    #: ``((layer type, fraction of flops achieved), ...)`` for kernel families slower than dense
    kernel_efficiency: tuple[tuple[str, float], ...] = ()
    kind: str = "gpu"  #: free text, e.g. ``gpu`` or ``cpu``

    def __post_init__(self):
        quantity(self.flops, "flops", "device.flops")
        quantity(self.memory, "bytes", "device.memory")
        quantity(self.memory_bandwidth, "bandwidth", "device.memory_bandwidth", positive=False)
        for family, fraction in self.kernel_efficiency:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                    or not 0 < fraction <= 1:
                raise ConfigError(f"device.kernel_efficiency.{family}: expected a fraction in "
                                  f"(0, 1], e.g. 0.3; received {fraction!r}")

    def rate(self, family: str | None) -> float:
        """Achieved FLOP/s of kernel family ``family`` (a layer type name)."""
        return self.flops * dict(self.kernel_efficiency).get(family, 1.0)


@dataclass(frozen=True)
class Link:
    """A network path: ``latency + bytes / bandwidth`` seconds per transfer."""

    bandwidth: float  #: bytes/s
    latency: float  #: seconds

    def __post_init__(self):
        quantity(self.bandwidth, "bandwidth", "link.bandwidth")
        quantity(self.latency, "time", "link.latency", positive=False)


@dataclass(frozen=True)
class Overhead:
    """What the runtime (Dask) costs besides kernels and transfers, in seconds."""

    per_op: float = 0.0  #: device time per tile op (Python dispatch, kernel launch)
    per_task: float = 0.0  #: device time per Dask task (deserialise, run, report)
    dispatch: float = 0.0  #: from a task's end until its dependents are handed out
    per_step: float = 0.0  #: graph submission and the metrics' trip to the client

    def __post_init__(self):
        for f in dataclasses.fields(self):
            quantity(getattr(self, f.name), "time", f"overhead.{f.name}", positive=False)


@dataclass(frozen=True)
class ClusterSpec:
    """``nodes`` x ``devices_per_node`` identical devices and the links between them.

    >>> spec = ClusterSpec("c", 2, 4, Device(1e12, 16e9), Link(25e9, 5e-6), Link(7e9, 1e-6))
    >>> spec.n_devices, spec.node_of(5), spec.link(0, 5).bandwidth
    (8, 1, 7000000000.0)
    """

    name: str
    nodes: int
    devices_per_node: int
    device: Device
    intra_node: Link  #: between two devices of one node
    inter_node: Link  #: between devices of different nodes (per NIC)
    overhead: Overhead = field(default_factory=Overhead)
    #: FLOP/s all devices of one node achieve together (shared cores); 0: no shared limit
    node_flops: float = 0.0

    def __post_init__(self):
        _check_count(self.nodes, "nodes")
        _check_count(self.devices_per_node, "devices_per_node")
        quantity(self.node_flops, "flops", "node.flops", positive=False)

    @property
    def n_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, device: int) -> int:
        return device // self.devices_per_node

    def link(self, a: int, b: int) -> Link:
        return self.intra_node if self.node_of(a) == self.node_of(b) else self.inter_node

    def describe(self) -> str:
        d = self.device
        return (f"cluster {self.name!r}: {self.nodes} node(s) x {self.devices_per_node} "
                f"{d.kind} device(s) of {d.flops / 1e9:,.1f} GFLOP/s, {d.memory / 1e9:,.1f} GB")


# ----------------------------------------------------------------------------- YAML
_TOP = ("name", "nodes", "devices_per_node", "node", "device", "links", "overhead")
_DEVICE = ("kind", "flops", "peak_flops", "efficiency", "memory", "memory_bandwidth",
           "kernel_efficiency")


def _mapping(raw: Any, legal: tuple[str, ...], where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(legal)}; "
                          f"received {type(raw).__name__} {raw!r}")
    for key in raw:
        if key not in legal:
            close = difflib.get_close_matches(str(key), legal, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; expected keys "
                              f"{', '.join(legal)}")
    return dict(raw)


def _parse_device(raw: Any) -> Device:
    raw = _mapping(raw, _DEVICE, "device")
    if ("flops" in raw) == ("peak_flops" in raw):
        raise ConfigError("device: expected exactly one of 'flops' (achieved FLOP/s) or "
                          f"'peak_flops' (with 'efficiency', the achieved fraction); received "
                          f"keys {', '.join(map(str, raw)) or 'none'}")
    if "flops" in raw:
        if "efficiency" in raw:
            raise ConfigError("device.efficiency: applies to peak_flops only; received it with "
                              "flops (already achieved). Remove one of them")
        flops = quantity(raw["flops"], "flops", "device.flops")
    else:
        eff = raw.get("efficiency", 1.0)
        if isinstance(eff, bool) or not isinstance(eff, (int, float)) or not 0 < eff <= 1:
            raise ConfigError(f"device.efficiency: expected the achieved fraction of peak_flops "
                              f"in (0, 1], e.g. 0.6; received {eff!r}")
        flops = quantity(raw["peak_flops"], "flops", "device.peak_flops") * eff
    if "memory" not in raw:
        raise ConfigError("device: missing key 'memory' (bytes per device, e.g. '16 GB')")
    kernels = raw.get("kernel_efficiency") or {}
    if not isinstance(kernels, Mapping):
        raise ConfigError(f"device.kernel_efficiency: expected a mapping such as {{Conv2D: 0.3}}; "
                          f"received {kernels!r}")
    return Device(flops, quantity(raw["memory"], "bytes", "device.memory"),
                  quantity(raw.get("memory_bandwidth", 0), "bandwidth",
                           "device.memory_bandwidth", positive=False),
                  tuple(sorted((str(k), v) for k, v in kernels.items())),
                  str(raw.get("kind", "gpu")))


def _parse_link(raw: Any, where: str) -> Link:
    raw = _mapping(raw, ("bandwidth", "latency"), where)
    for key in ("bandwidth", "latency"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}; expected bandwidth (e.g. '56 Gb/s') "
                              "and latency (e.g. '1 us')")
    return Link(quantity(raw["bandwidth"], "bandwidth", f"{where}.bandwidth"),
                quantity(raw["latency"], "time", f"{where}.latency", positive=False))


def _parse_links(raw: Any, nodes: int) -> tuple[Link, Link]:
    raw = _mapping(raw, ("intra_node", "inter_node"), "links")
    if "intra_node" not in raw:
        raise ConfigError("links: missing key 'intra_node' (bandwidth and latency between two "
                          "devices of one node)")
    intra = _parse_link(raw["intra_node"], "links.intra_node")
    if "inter_node" not in raw:
        if nodes > 1:
            raise ConfigError(f"links: missing key 'inter_node'; expected it for nodes: {nodes} "
                              "(e.g. {bandwidth: 56 Gb/s, latency: 1 us})")
        return intra, intra
    return intra, _parse_link(raw["inter_node"], "links.inter_node")


def parse_cluster(mapping: Any, source: str = "<dict>") -> ClusterSpec:
    """Validate a mapping (as read from YAML) into a :class:`ClusterSpec`.

    Numbers are base units (bytes, seconds, FLOP/s, bytes/s); strings may carry a unit:
    ``"16 GB"``, ``"56 Gb/s"`` (bits), ``"12 GB/s"`` (bytes), ``"1 us"``, ``"10 TFLOP/s"``.
    Errors name ``source`` and the dotted path of the field at fault.
    """
    try:
        raw = _mapping(mapping, _TOP, "top level")
        for key in ("nodes", "devices_per_node", "device", "links"):
            if key not in raw:
                raise ConfigError(f"top level: missing key {key!r}; expected keys "
                                  f"{', '.join(_TOP)} (name, node and overhead are optional)")
        nodes = _check_count(raw["nodes"], "nodes")
        intra, inter = _parse_links(raw["links"], nodes)
        overhead_raw = _mapping(raw.get("overhead"), tuple(
            f.name for f in dataclasses.fields(Overhead)), "overhead")
        overhead = Overhead(**{k: quantity(v, "time", f"overhead.{k}", positive=False)
                               for k, v in overhead_raw.items()})
        node = _mapping(raw.get("node"), ("flops",), "node")
        return ClusterSpec(str(raw.get("name", Path(source).stem)), nodes,
                           raw["devices_per_node"], _parse_device(raw["device"]), intra, inter,
                           overhead, quantity(node.get("flops", 0), "flops", "node.flops",
                                              positive=False))
    except RapydliError as exc:
        raise type(exc)(f"cluster {source!r}: {exc}") from None


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster YAML file such as ``examples/clusters/gpu_infiniband.yaml``."""
    path = Path(path)
    try:
        mapping = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"cluster {str(path)!r}: file not found; expected a YAML file such as "
                          "examples/clusters/gpu_infiniband.yaml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"cluster {str(path)!r}{line}: invalid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    return parse_cluster(mapping, source=str(path))


def dump_cluster(spec: ClusterSpec) -> str:
    """The YAML text of ``spec`` in readable units (6 significant digits), as
    :func:`parse_cluster` reads it back."""
    d, o = spec.device, spec.overhead

    def link(x: Link) -> dict:
        return {"bandwidth": f"{x.bandwidth / 1e9:.6g} GB/s", "latency": f"{x.latency * 1e6:.6g} us"}

    device = {"kind": d.kind, "flops": f"{d.flops / 1e9:.6g} GFLOP/s",
              "memory": f"{d.memory / 1e9:.6g} GB",
              "memory_bandwidth": f"{d.memory_bandwidth / 1e9:.6g} GB/s"}
    if d.kernel_efficiency:
        device["kernel_efficiency"] = dict(d.kernel_efficiency)
    doc: dict = {"name": spec.name, "nodes": spec.nodes, "devices_per_node": spec.devices_per_node}
    if spec.node_flops:
        doc["node"] = {"flops": f"{spec.node_flops / 1e9:.6g} GFLOP/s"}
    doc.update({"device": device, "links": {"intra_node": link(spec.intra_node),
                                       "inter_node": link(spec.inter_node)},
           "overhead": {f.name: f"{getattr(o, f.name) * 1e6:.6g} us"
                        for f in dataclasses.fields(o)}})
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


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
class Slot:
    """A task's run on a device, or a transfer's flight (``worker`` is then the sender)."""

    name: str
    worker: int
    start: float
    end: float
    nbytes: int = 0
    dest: int | None = None


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


# ----------------------------------------------------------------------------- tasks
@dataclass
class _Task:
    """A fused task while it is simulated."""

    name: str
    worker: int
    seconds: float  #: kernels, per-op overhead included
    order: tuple  #: run order among ready tasks on one device (sends first, then graph order)
    deps: set = field(default_factory=set)  #: names of tasks it reads
    #: destination worker -> {(op key, pick): nbytes} this task's outputs it must receive
    sends: dict = field(default_factory=dict)
    dependents: list = field(default_factory=list)
    pending: int = 0


def _tasks(graph, cluster: ClusterSpec, fused: bool) -> dict[str, _Task]:
    """The fused tasks of ``graph`` with their device seconds, dependencies and transfers."""
    groups = fuse(graph, enabled=fused)
    task_of = {key: name for name, _, keys in groups for key in keys}
    tasks: dict[str, _Task] = {}
    for i, (name, worker, keys) in enumerate(groups):
        if worker is None:  # Dask runs it where its first input lives
            firsts = [task_of[r.key] for r in graph.op(keys[0]).inputs if r.key in task_of]
            worker = tasks[firsts[0]].worker if firsts else 0
        sends = all(graph.op(k).kind == "send" for k in keys)
        seconds = sum(op_seconds(graph, k, cluster.device, cluster.overhead) for k in keys)
        tasks[name] = _Task(name, worker, seconds, (not sends, i))
    for name, _, keys in groups:
        task = tasks[name]
        for key in keys:
            for ref in graph.op(key).inputs:
                src = task_of.get(ref.key)
                if src is None or src == name:
                    continue
                task.deps.add(src)
                if tasks[src].worker != task.worker:
                    payload = tasks[src].sends.setdefault(task.worker, {})
                    payload[(ref.key, ref.pick)] = ref.nbytes
    for task in tasks.values():
        task.pending = len(task.deps)
        for dep in task.deps:
            tasks[dep].dependents.append(task.name)
    return tasks


# ----------------------------------------------------------------------------- simulation
class _Replay:
    """Discrete-event replay of fused tasks on devices and transfers on links.

    Devices of one node share ``cluster.node_flops``: while ``k`` of them run tasks, each
    progresses at ``min(1, node_flops / (k * device.flops))`` of its own speed (processor
    sharing), so a running task's end moves whenever a neighbour starts or ends.
    """

    def __init__(self, tasks: dict[str, _Task], cluster: ClusterSpec):
        self.tasks, self.cluster = tasks, cluster
        self.dispatch = cluster.overhead.dispatch
        self.events: list = []  # (time, seq, kind, payload)
        self.seq = 0
        self.ready: dict[int, list] = {}  # device -> heap of (order, task name)
        #: device -> [task name, seconds of work left at full speed, last update, start]
        self.running: dict[int, list] = {}
        self.speed: dict[int, float] = {}  # node -> current speed of its busy devices
        self.version: dict[str, int] = {}  # end events of a task older than this are stale
        self.link_free: dict[tuple, float] = {}
        self.schedule: list[Slot] = []
        self.transfers: list[Slot] = []

    def push(self, time: float, kind: str, payload) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, payload))

    def run(self) -> None:
        for task in self.tasks.values():
            if not task.deps:
                self.push(0.0, "satisfy", task.name)
        while self.events:
            time, _, kind, payload = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(time, payload)

    def _on_satisfy(self, time: float, name: str) -> None:
        task = self.tasks[name]
        task.pending -= 1 if task.deps else 0
        if task.pending <= 0:
            heapq.heappush(self.ready.setdefault(task.worker, []), (task.order, name))
            self._start(time, task.worker)

    def _start(self, time: float, device: int) -> None:
        queue = self.ready.get(device)
        if not queue or device in self.running:
            return
        _, name = heapq.heappop(queue)
        node = self.cluster.node_of(device)
        self._advance(node, time)
        work = self.cluster.overhead.per_task + self.tasks[name].seconds
        self.running[device] = [name, work, time, time]
        self._reschedule(node, time)

    def _advance(self, node: int, time: float) -> None:
        for device, run in self.running.items():
            if self.cluster.node_of(device) == node:
                run[1] -= (time - run[2]) * self.speed[node]
                run[2] = time

    def _reschedule(self, node: int, time: float) -> None:
        busy = [d for d in self.running if self.cluster.node_of(d) == node]
        limit = self.cluster.node_flops
        self.speed[node] = (min(1.0, limit / (len(busy) * self.cluster.device.flops))
                            if limit and busy else 1.0)
        for device in busy:
            name, work = self.running[device][:2]
            self.version[name] = self.version.get(name, 0) + 1
            self.push(time + max(work, 0.0) / self.speed[node], "end",
                      (name, self.version[name]))

    def _on_end(self, time: float, payload: tuple[str, int]) -> None:
        name, version = payload
        if version != self.version[name]:
            return  # superseded: the node's speed changed while it ran
        task = self.tasks[name]
        node = self.cluster.node_of(task.worker)
        self._advance(node, time)
        start = self.running.pop(task.worker)[3]
        self.schedule.append(Slot(name, task.worker, start, time))
        self._reschedule(node, time)
        for dep in task.dependents:
            if self.tasks[dep].worker == task.worker:
                self.push(time + self.dispatch, "satisfy", dep)
        for dest in task.sends:
            self.push(time + self.dispatch, "send", (name, dest))
        self._start(time, task.worker)

    def _on_send(self, time: float, payload: tuple[str, int]) -> None:
        name, dest = payload
        src = self.tasks[name].worker
        nbytes = sum(self.tasks[name].sends[dest].values())
        link = self.cluster.link(src, dest)
        resources = self._resources(src, dest)
        start = max([time, *(self.link_free.get(r, 0.0) for r in resources)])
        done = start + nbytes / link.bandwidth
        for r in resources:
            self.link_free[r] = done
        self.transfers.append(Slot(name, src, start, done + link.latency, nbytes, dest))
        self.push(done + link.latency, "arrive", payload)

    def _resources(self, src: int, dest: int) -> tuple:
        a, b = self.cluster.node_of(src), self.cluster.node_of(dest)
        return (("pair", src, dest),) if a == b else (("nic-out", a), ("nic-in", b))

    def _on_arrive(self, time: float, payload: tuple[str, int]) -> None:
        name, dest = payload
        for dep in self.tasks[name].dependents:
            if self.tasks[dep].worker == dest:
                self._on_satisfy(time, dep)


def _union(intervals) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _exposed(transfers: list[Slot], schedule: list[Slot]) -> float:
    """Length of time some transfer is in flight while no device computes."""
    moving = _union((t.start, t.end) for t in transfers)
    computing = _union((s.start, s.end) for s in schedule)
    hidden = sum(max(0.0, min(b, d) - max(a, c)) for a, b in moving for c, d in computing)
    return sum(b - a for a, b in moving) - hidden


def simulate_graph(graph, cluster: ClusterSpec, fused: bool = True, label: str = "",
                   placement=None) -> Prediction:
    """Replay a lowered :class:`~rapydli.graph.lower.TileGraph` on ``cluster``.

    ``fused=False`` makes every tile op a Dask task of its own (as ``Engine(fused=False)``).
    """
    meta = graph.graph["meta"]
    n = meta["n_workers"]
    if n > cluster.n_devices:
        raise PlacementError(
            f"placement {label or meta['mesh']!r} needs {n} workers; {cluster.describe()} has "
            f"{cluster.n_devices}. Use a smaller mesh (--mesh) or a larger cluster")
    tasks = _tasks(graph, cluster, fused)
    replay = _Replay(tasks, cluster)
    replay.run()
    ends = [s.end for s in replay.schedule] + [t.end for t in replay.transfers]
    compute = [0.0] * n
    for s in replay.schedule:  # the kernels' share of the slot (stretched where shared)
        work = tasks[s.name].seconds
        compute[s.worker] += (s.end - s.start) * work / (work + cluster.overhead.per_task or 1)
    return Prediction(
        label=label or repr(meta["mesh"]), placement=placement, cluster=cluster.name,
        batch=meta["batch"], n_workers=n,
        step_time=cluster.overhead.per_step + max(ends, default=0.0),
        compute_time=max(compute), comm_time=sum(t.end - t.start for t in replay.transfers),
        exposed_comm=_exposed(replay.transfers, replay.schedule),
        bytes_moved=sum(t.nbytes for t in replay.transfers), n_tasks=len(tasks),
        n_transfers=len(replay.transfers), compute_by_device=tuple(compute),
        memory_by_device=tuple(memory_by_worker(graph)), memory_capacity=cluster.device.memory,
        schedule=tuple(replay.schedule), transfers=tuple(replay.transfers))


#: placement rule -> the preset name users type
PRESET_OF_RULE = {"single": "single", "data": "data_parallel", "model": "model_parallel",
                  "spatial": "spatial_parallel", "hybrid": "hybrid"}


def placement_label(placement) -> str:
    """``"data_parallel Mesh(data=2)"``; ``+ overrides`` when layers override the preset."""
    extra = " + overrides" if placement.overrides else ""
    return f"{PRESET_OF_RULE.get(placement.rule, placement.rule)} {placement.mesh!r}{extra}"


def simulate(network, placement, batch: int, cluster: ClusterSpec, optimizer=None,
             dtype="float32", fused: bool = True) -> Prediction:
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
        Simulate the fused Dask tasks the engine runs (default) or one task per tile op.

    Returns
    -------
    Prediction
        Step time, compute, communication (total and exposed), memory per device and
        whether it fits; :func:`format_prediction` prints it.
    """
    from rapydli.graph.lower import lower
    from rapydli.optim import SGD
    from rapydli.placement import single

    placement = placement or single()
    if placement.mesh.size > cluster.n_devices:
        raise PlacementError(
            f"placement {placement_label(placement)} needs {placement.mesh.size} workers; "
            f"{cluster.describe()} has {cluster.n_devices}. Use a smaller mesh (--mesh) or a "
            "larger cluster")
    graph = lower(network, placement, batch, "train", optimizer or SGD(), dtype)
    return simulate_graph(graph, cluster, fused, placement_label(placement), placement)


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
           presets=None, fused: bool = True) -> list[Prediction]:
    """Predictions for every candidate placement, fastest fitting first, non-fitting last.

    Candidates are the presets (``single``, ``data_parallel``, ``model_parallel``,
    ``spatial_parallel`` where the network has convolutions, ``hybrid``) over worker counts
    that are powers of two up to the cluster's device count (and that count), every
    factorisation ``data x model`` for ``hybrid``. A candidate the lowering rejects is skipped.

    >>> from rapydli import Sequential, Dense
    >>> cluster = parse_cluster({"nodes": 1, "devices_per_node": 2,
    ...     "device": {"flops": "1 GFLOP/s", "memory": "1 GB"},
    ...     "links": {"intra_node": {"bandwidth": "1 GB/s", "latency": "1 ms"}}})
    >>> ranked = search(Sequential([Dense(8), Dense(2)], input_shape=(4,)), 16, cluster)
    >>> [p.label for p in ranked][:1]
    ['single Mesh()']
    """
    out = []
    for placement in candidate_placements(network, cluster.n_devices, presets):
        try:
            out.append(simulate(network, placement, batch, cluster, optimizer, dtype, fused))
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
        f"  overhead and waiting {_time(p.other_time):>10}   ({p.n_tasks} Dask tasks)",
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


# ----------------------------------------------------------------------------- calibration
def _mean_seconds(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls after a warm-up: a mean, not a median,
    so that time lost to other processes counts as it does in a step."""
    import time

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
    program = tuple((i, identity_task, (((i - 1) if i else 0, ()),), {}) for i in range(1, 201))
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
        import time

        time.sleep(hold)
    return value


def _graph_seconds(client, tasks: list[tuple]) -> float:
    """Seconds for ``client.get`` of the last of ``tasks``: ``(fn, input task indices, literal
    args, worker)``, one graph layer per task pinned to its worker as the engine's plans do."""
    import time
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
    return {"per_task": per_task, "dispatch": dispatch, "per_step": max(0.0, t["one"] - per_task),
            "latency": latency, "bandwidth": payload / max(moving, 1e-6)}


def step_rate(seconds: float = 1.5, n_layers: int = 6) -> float:
    """FLOP/s of step-like work for ``seconds``: forward and backward of ``n_layers`` distinct
    1024-unit ReLU dense layers in turn at batch 128, on a fresh copy of the input each time.
    Their weights (4 MB each, 24 MB in all) are a training step's working set: larger than a
    core's share of a shared last-level cache, so workers computing at once contend for it and
    for memory, as they do in steps."""
    import time

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
    them): ``per_step`` is a one-task graph's round trip from the client, ``per_task`` the extra
    time per independent task on one worker; ``dispatch`` (the extra time per dependent task
    beyond ``per_task``), link ``latency`` (the extra time per task when consecutive tasks
    alternate workers) and link ``bandwidth`` (from tasks that pass on 4 MB) are measured with
    one chain per worker running at once, as a multi-worker step keeps every worker busy, each
    task holding its worker 5 ms as step tasks compute for milliseconds.
    Memory is each worker's Dask memory limit.
    Takes about half a minute.
    """
    from rapydli.scheduler.cluster import local_client

    own = client is None
    if own:
        client = local_client(n_workers, threads_per_worker=1)
        client.wait_for_workers(n_workers)
    try:
        info = client.scheduler_info()["workers"]
        workers = sorted(info)
        if len(workers) < 2:
            raise PlacementError(f"calibrate_local: expected a client with at least 2 workers "
                                 f"to time transfers; received {len(workers)}")
        device = client.submit(measure_device, repeats, pure=False, workers=workers[:1]).result()
        alone = client.submit(step_rate, pure=False, workers=workers[:1]).result()
        together = client.gather([client.submit(step_rate, pure=False, workers=[w])
                                  for w in workers])  # every worker at once, as steps run
        dask_costs = _measure_dask(client, workers, repeats)
        memory = float(info[workers[0]].get("memory_limit") or 0) or 1e9
    finally:
        if own:
            cluster = client.cluster
            client.close()
            cluster.close()
    link = Link(dask_costs["bandwidth"], dask_costs["latency"])
    return ClusterSpec(
        "this-machine", 1, len(workers),
        Device(device["flops"], memory, device["memory_bandwidth"],
               tuple(sorted(device["kernel_efficiency"].items())), "cpu"), link, link,
        Overhead(device["per_op"], dask_costs["per_task"], dask_costs["dispatch"],
                 dask_costs["per_step"]),
        node_flops=device["flops"] * min(len(workers), sum(together) / alone))
