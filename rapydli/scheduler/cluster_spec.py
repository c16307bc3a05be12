"""Cluster descriptions for the cost model: frozen, validated specs and their YAML form.

A cluster is data: nodes, devices per node, each device's achieved FLOP/s, memory and memory
bandwidth, the links inside a node and between nodes, and what Dask itself costs
(:class:`ClusterSpec`, :class:`Device`, :class:`Link`, :class:`Overhead`). :func:`load_cluster`
and :func:`parse_cluster` read it from YAML, with units (``"16 GB"``, ``"56 Gb/s"``, ``"1 us"``);
:func:`dump_cluster` writes it back. :mod:`rapydli.scheduler.cost` simulates steps on it.

>>> spec = parse_cluster({"nodes": 1, "devices_per_node": 2,
...     "device": {"flops": "1 GFLOP/s", "memory": "1 GB"},
...     "links": {"intra_node": {"bandwidth": "1 GB/s", "latency": "1 ms"}}})
>>> spec.describe()
"cluster '<dict>': 1 node(s) x 2 gpu device(s) of 1.0 GFLOP/s, 1.0 GB"
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rapydli.config import check_keys  # unknown keys, with "did you mean"
from rapydli.errors import ConfigError, RapydliError

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
    #: device time a worker spends posting one message of the direct exchange (an actor call
    #: to a peer's mailbox), besides its bytes; 0 in specs that predate it (calibration fills it)
    per_message: float = 0.0
    #: from a direct-exchange message's departure until its reader may take it, besides its
    #: bytes: an actor call's one-way trip between two workers of a node (across nodes the
    #: inter-node link's extra latency is added); 0: the link's latency, as a Dask transfer
    mail_latency: float = 0.0

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


def _parse_device(raw: Any) -> Device:
    raw = check_keys(raw, _DEVICE, "device")
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
    raw = check_keys(raw, ("bandwidth", "latency"), where)
    for key in ("bandwidth", "latency"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}; expected bandwidth (e.g. '56 Gb/s') "
                              "and latency (e.g. '1 us')")
    return Link(quantity(raw["bandwidth"], "bandwidth", f"{where}.bandwidth"),
                quantity(raw["latency"], "time", f"{where}.latency", positive=False))


def _parse_links(raw: Any, nodes: int) -> tuple[Link, Link]:
    raw = check_keys(raw, ("intra_node", "inter_node"), "links")
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
        raw = check_keys(mapping, _TOP, "top level")
        for key in ("nodes", "devices_per_node", "device", "links"):
            if key not in raw:
                raise ConfigError(f"top level: missing key {key!r}; expected keys "
                                  f"{', '.join(_TOP)} (name, node and overhead are optional)")
        nodes = _check_count(raw["nodes"], "nodes")
        intra, inter = _parse_links(raw["links"], nodes)
        overhead_raw = check_keys(raw.get("overhead"), tuple(
            f.name for f in dataclasses.fields(Overhead)), "overhead")
        overhead = Overhead(**{k: quantity(v, "time", f"overhead.{k}", positive=False)
                               for k, v in overhead_raw.items()})
        node = check_keys(raw.get("node"), ("flops",), "node")
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
