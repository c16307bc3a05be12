"""Replay of a step in time: the units a step graph's Dask tasks become, run on the devices
and links of a :class:`~rapydli.scheduler.cluster_spec.ClusterSpec` as a discrete-event
simulation.

:func:`graph_units` and :func:`direct_units` turn a lowered graph into units (a whole Dask
task in the ``"graph"`` exchange; a worker task's start and each of its ops in the
``"direct"`` exchange), their dependencies and the tiles that travel between them;
:class:`Replay` runs them and records a :class:`Slot` per unit run and per transfer. What an
op costs comes from the caller (``op_time``: op key -> device seconds), so this module knows
nothing of kernels. :mod:`rapydli.scheduler.cost` describes the model and builds predictions
from the replay.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from rapydli.graph import ops
from rapydli.graph.fuse import SOLO, fuse, only_summed
from rapydli.scheduler.cluster_spec import ClusterSpec
from rapydli.scheduler.shared import MIN_BYTES

#: device seconds of one tile op, by op key (:func:`rapydli.scheduler.cost.op_seconds`)
OpTime = Callable[[str], float]


@dataclass(frozen=True)
class Slot:
    """A task's run on a device (in a direct exchange: a worker task's start or one of its
    ops, by op key), or a transfer's flight (``worker`` is then the sender)."""

    name: str
    worker: int
    start: float
    end: float
    nbytes: int = 0
    dest: int | None = None


# ----------------------------------------------------------------------------- units
@dataclass
class _Ship:
    """Tiles that leave when a unit ends, for one worker, and the units waiting for them."""

    payload: dict = field(default_factory=dict)  #: (op key, pick) -> nbytes
    readers: set = field(default_factory=set)  #: names of units satisfied on arrival
    mail: bool = False  #: a direct exchange's message (actor call), not a Dask transfer


@dataclass
class _Unit:
    """What the replay runs on a device: a whole Dask task (graph exchange), or the start or
    one op of a worker's task (direct exchange)."""

    name: str
    worker: int
    seconds: float  #: kernels, per-op overhead included
    overhead: float  #: ``per_task`` where the unit starts a Dask task, else 0
    order: tuple  #: run order among ready units on one device (sends first, then graph order)
    task: str  #: the Dask task it is part of
    last: bool = True  #: it ends its task; until then no other task may start on its device
    deps: set = field(default_factory=set)  #: names of the units it waits for
    then: dict = field(default_factory=dict)  #: same-device dependent -> delay after its end
    ships: dict = field(default_factory=dict)  #: (worker, delay after its end, mail) -> _Ship
    pending: int = 0


def _link(src: _Unit, dst: _Unit, delay: float, ref=None, mail: bool = False) -> None:
    """``dst`` waits for ``src``: ``delay`` after its end on one device, else for a transfer
    that leaves ``delay`` after its end and carries ``ref``'s tile (``mail``: posted to the
    reader's mailbox)."""
    dst.deps.add(src.name)
    if src.worker == dst.worker:
        src.then[dst.name] = delay
        return
    ship = src.ships.setdefault((dst.worker, delay, mail), _Ship(mail=mail))
    ship.readers.add(dst.name)
    if ref is not None:
        ship.payload[(ref.key, ref.pick)] = ref.nbytes


def _seconds(keys, op_time: OpTime) -> float:
    """Device seconds of ops ``keys``, no per-task overhead."""
    return sum(op_time(k) for k in keys)


def _place(graph, worker: int | None, keys: list[str], unit_of: dict, units: dict) -> int:
    """The device of the task of ops ``keys``: its worker, or where Dask runs it (where its
    first input lives; ``unit_of`` maps op keys to the units already built)."""
    if worker is not None:
        return worker
    firsts = [unit_of[r.key] for r in graph.op(keys[0]).inputs if r.key in unit_of]
    return units[firsts[0]].worker if firsts else 0


def graph_units(graph, cluster: ClusterSpec, fused: bool,
                 op_time: OpTime) -> tuple[dict[str, _Unit], int]:
    """Graph exchange: one unit per fused Dask task; every edge between tasks waits
    ``dispatch``. Returns the units and the number of Dask tasks."""
    groups = fuse(graph, enabled=fused)
    unit_of = {key: name for name, _, keys in groups for key in keys}
    units: dict[str, _Unit] = {}
    for i, (name, worker, keys) in enumerate(groups):
        sends = all(graph.op(k).kind == "send" for k in keys)
        units[name] = _Unit(name, _place(graph, worker, keys, unit_of, units),
                            _seconds(keys, op_time), cluster.overhead.per_task,
                            (not sends, i), name)
    for name, _, keys in groups:
        for key in keys:
            for ref in graph.op(key).inputs:
                src = unit_of.get(ref.key)
                if src is not None and src != name:
                    _link(units[src], units[name], cluster.overhead.dispatch, ref)
    return _pending(units), len(groups)


def _pending(units: dict[str, _Unit]) -> dict[str, _Unit]:
    """Set every unit's count of what it still waits for; returns ``units``."""
    for unit in units.values():
        unit.pending = len(unit.deps)
    return units


def shared_memory(cluster: ClusterSpec, src: int, dest: int, nbytes: int) -> bool:
    """Whether a posted tile travels through shared memory (:mod:`rapydli.scheduler.shared`):
    CPU workers of one node, a tile of at least ``MIN_BYTES``. Its bytes then cost the sender
    a copy at the device's memory bandwidth and neither the link nor the reader anything."""
    return (cluster.device.kind == "cpu" and cluster.node_of(src) == cluster.node_of(dest)
            and nbytes >= MIN_BYTES)


def computed_in_place(graph, send: str) -> bool:
    """Whether the engine posts the tile of mail send ``send`` to a peer on its machine without
    copying it into shared memory: a parameter gradient the layer's kernel writes straight
    into shared memory (``Layer.gradients_in_place``; :meth:`rapydli.scheduler.mailbox.
    Exchange.allocate`), sent whole from a backward op whose gradients go to sums, or a block
    of its rows (the first such block: a segment holds one posted tile); or the rows a
    sharded update wrote, which are a block of the weight the replicas of one machine share
    (:func:`rapydli.graph.ops.place_task`; from the second step on)."""
    op = graph.op(send)
    if op.fn not in (ops.identity_task, ops.slice_task) or not op.inputs:
        return False
    ref = op.inputs[0]
    src = graph.op(ref.key)
    if src.fn is ops.update_task and src.inputs and \
            graph.op(src.inputs[0].key).fn is ops.rows_task:
        return op.fn is ops.identity_task
    if op.fn is ops.slice_task:
        piece, held = op.kwargs["piece"], op.kwargs["held"]
        blocks = sorted(s for s in graph.successors(ref.key) if graph.op(s).fn is ops.slice_task
                        and graph.op(s).inputs[0] == ref)
        if piece[1:] != held[1:] or blocks[0] != send:
            return False
    if src.fn is ops.backward_params_task:
        pick = ref.pick
    elif src.fn is ops.backward_task and src.kwargs.get("posted"):
        pick = ref.pick[1:] if ref.pick[:1] == (1,) else ()
    else:
        return False
    names, layer = src.kwargs["names"], src.kwargs["layer"]
    return len(pick) == 1 and names[pick[0]] in layer.gradients_in_place


def _deferred(graph, cluster: ClusterSpec, send: str) -> bool:
    """Whether a mail send's tile waits for its program's next take (see
    :meth:`rapydli.scheduler.mailbox.Exchange.flush`): only sums read it, and it costs only
    a message (shared memory, or a small tile)."""
    op = graph.op(send)
    return only_summed(graph, send) and (op.nbytes < MIN_BYTES or all(
        shared_memory(cluster, op.worker, graph.op(r).worker, op.nbytes)
        for r in graph.successors(send)))


def _carriers(graph, keys: list[str], mail: set[str],
              cluster: ClusterSpec | None = None) -> dict[str, str]:
    """Mail send -> the op of the same program after whose end its tile leaves: the last of
    the run of consecutive mail sends it is in (the engine posts them in one message per
    receiving worker, when the next op that posts nothing starts or takes a tile). With a
    ``cluster``, a run whose every tile may wait (:func:`_deferred`) leaves with the op
    before the program's next take instead, or its last op."""
    carrier: dict[str, str] = {}
    run: list[str] = []
    waiting: list[str] = []  # deferred sends, until the next take
    for i, key in enumerate([*keys, None]):
        reads_mail = key is not None and any(p in mail for p in graph.predecessors(key))
        if key in mail and not reads_mail:
            run.append(key)
            continue
        if cluster is not None and run and all(_deferred(graph, cluster, k) for k in run):
            waiting += run
        elif run:  # the message leaves now, with what waited
            carrier.update((k, run[-1]) for k in [*waiting, *run])
            waiting = []
        if waiting and (reads_mail or key is None):
            carrier.update((k, keys[i - 1]) for k in waiting)
            waiting = []
        run = [key] if key in mail else []
    return carrier


def posting_time(graph, cluster: ClusterSpec, sends: list[str], worker: int) -> float:
    """Device seconds a worker spends posting the tiles of ``sends`` (one run of mail sends,
    leaving as one message per receiving worker), where the devices of a node share its cores
    (``node.flops``): the comms' CPU work (socket writes, framing) takes the cores the kernels
    run on. One ``overhead.per_message`` per message (to the peer's mailbox: a doorbell record
    on one machine, an actor call otherwise; far cheaper than a Dask task) plus the tiles'
    bytes at the link's bandwidth; nothing where devices have cores of their own."""
    if not cluster.node_flops:
        return 0.0
    dests: dict[int, float] = {}
    for mail in sends:
        in_place = computed_in_place(graph, mail)  # its first shared-memory reader: no copy
        for reader in graph.successors(mail):
            dest, nbytes = graph.op(reader).worker, graph.op(mail).nbytes
            if shared_memory(cluster, worker, dest, nbytes):  # a copy, unless made in place
                rate = float("inf") if in_place else \
                    (cluster.device.memory_bandwidth or float("inf"))
                in_place = False
            else:
                rate = cluster.link(worker, dest).bandwidth
            dests[dest] = dests.get(dest, 0.0) + nbytes / rate
    return sum(cluster.overhead.per_message + seconds for seconds in dests.values())


def receiving_time(graph, cluster: ClusterSpec, key: str, mail: set[str], taken: set[str],
               worker: int) -> float:
    """Device seconds op ``key`` adds for the posted tiles it is the first to take (their
    bytes at the link's bandwidth: the worker's event loop reads them off the socket), where
    the devices of a node share its cores; nothing where devices have cores of their own."""
    seconds = 0.0
    for ref in graph.op(key).inputs:
        if ref.key in mail and ref.key not in taken:
            taken.add(ref.key)
            src, nbytes = graph.op(ref.key).worker, graph.op(ref.key).nbytes
            if cluster.node_flops and not shared_memory(cluster, src, worker, nbytes):
                seconds += nbytes / cluster.link(src, worker).bandwidth
    return seconds


def _program(graph, cluster: ClusterSpec, op_time: OpTime, name: str, worker: int,
             keys: list[str], i: int, units: dict[str, _Unit], carriers: dict,
             mail: set[str]) -> None:
    """Units of worker task ``name`` of a direct exchange: its start (``per_task``), then one
    unit per op, each waiting for the one before it (the worker runs them in order)."""
    carried: dict[str, list[str]] = {}  # carrier op -> the mail sends leaving after it
    for send, carrier in carriers.items():
        carried.setdefault(carrier, []).append(send)
    taken: set[str] = set()
    chain = [_Unit(name, worker, 0.0, cluster.overhead.per_task, (True, i, 0), name, False)]
    for k, key in enumerate(keys, 1):
        chain.append(_Unit(key, worker, _seconds([key], op_time) +
                           posting_time(graph, cluster, carried.get(key, []), worker) +
                           receiving_time(graph, cluster, key, mail, taken, worker), 0.0,
                           (True, i, k), name, k == len(keys)))
        _link(chain[-2], chain[-1], 0.0)
    units.update((u.name, u) for u in chain)


def direct_units(graph, cluster: ClusterSpec, mail: set[str],
                  op_time: OpTime) -> tuple[dict[str, _Unit], int]:
    """Direct exchange: each worker task as a chain of units (:func:`_program`); a mail tile
    leaves when its carrier op ends (:func:`_carriers`) and its reader waits for it; edges
    into or out of the other Dask tasks wait ``dispatch`` after the whole task ended.
    Returns the units and the number of Dask tasks."""
    groups = fuse(graph, direct=True)
    task_of = {key: name for name, _, keys in groups for key in keys}
    first, last, unit_of, carrier = {}, {}, {}, {}
    units: dict[str, _Unit] = {}
    for i, (name, owner, keys) in enumerate(groups):
        worker = _place(graph, owner, keys, unit_of, units)
        if owner is not None and any(k in mail or graph.op(k).kind not in SOLO for k in keys):
            carriers = _carriers(graph, keys, mail, cluster)
            _program(graph, cluster, op_time, name, worker, keys, i, units, carriers, mail)
            unit_of.update((k, k) for k in keys)
            carrier.update(carriers)
            first[name], last[name] = name, keys[-1]
        else:
            sends = all(graph.op(k).kind == "send" for k in keys)
            units[name] = _Unit(name, worker, _seconds(keys, op_time),
                                cluster.overhead.per_task, (not sends, i, 0), name)
            unit_of.update((k, name) for k in keys)
            first[name] = last[name] = name
    for name, _, keys in groups:
        for key in keys:
            for ref in graph.op(key).inputs:
                src = task_of.get(ref.key)
                if src is None or src == name:
                    continue  # a placeholder, or an earlier op of the same task
                if ref.key in mail:  # through shared memory, only the message travels
                    src_worker, dest = graph.op(ref.key).worker, graph.op(key).worker
                    travels = dataclasses.replace(ref, nbytes=0) if shared_memory(
                        cluster, src_worker, dest, ref.nbytes) else ref
                    _link(units[carrier[ref.key]], units[unit_of[key]], 0.0, travels,
                          mail=True)
                else:
                    _link(units[last[src]], units[first[name]], cluster.overhead.dispatch, ref)
    return _pending(units), len(groups)


# ----------------------------------------------------------------------------- simulation
class Replay:
    """Discrete-event replay of units on devices and transfers on links.

    A device runs one unit at a time; once a task's first unit started, no other task starts
    on that device before the task's last unit ended (a worker thread runs one Dask task).
    Devices of one node share ``cluster.node_flops``: while ``k`` of them run units, each
    progresses at ``min(1, node_flops / (k * device.flops))`` of its own speed (processor
    sharing), so a running unit's end moves whenever a neighbour starts or ends.
    """

    def __init__(self, units: dict[str, _Unit], cluster: ClusterSpec):
        self.units, self.cluster = units, cluster
        self.events: list = []  # (time, seq, kind, payload)
        self.seq = 0
        self.ready: dict[int, list] = {}  # device -> heap of (order, unit name)
        self.held: dict[int, str] = {}  # device -> the task part way through on it
        self.next: dict[int, str] = {}  # device -> the held task's unit ready to run
        #: device -> [unit name, seconds of work left at full speed, last update, start]
        self.running: dict[int, list] = {}
        self.speed: dict[int, float] = {}  # node -> current speed of its busy devices
        self.version: dict[str, int] = {}  # end events of a unit older than this are stale
        self.link_free: dict[tuple, float] = {}
        self.schedule: list[Slot] = []
        self.transfers: list[Slot] = []

    def push(self, time: float, kind: str, payload) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, payload))

    def run(self) -> None:
        for unit in self.units.values():
            if not unit.deps:
                self.push(0.0, "satisfy", unit.name)
        while self.events:
            time, _, kind, payload = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(time, payload)

    def _on_satisfy(self, time: float, name: str) -> None:
        unit = self.units[name]
        unit.pending -= 1 if unit.deps else 0
        if unit.pending <= 0:
            if self.held.get(unit.worker) == unit.task:
                self.next[unit.worker] = name
            else:
                heapq.heappush(self.ready.setdefault(unit.worker, []), (unit.order, name))
            self._start(time, unit.worker)

    def _start(self, time: float, device: int) -> None:
        if device in self.running:
            return
        if device in self.held:
            name = self.next.pop(device, None)
        else:
            queue = self.ready.get(device)
            name = heapq.heappop(queue)[1] if queue else None
        if name is None:
            return
        unit = self.units[name]
        if unit.last:
            self.held.pop(device, None)
        else:
            self.held[device] = unit.task
        node = self.cluster.node_of(device)
        self._advance(node, time)
        self.running[device] = [name, unit.overhead + unit.seconds, time, time]
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
        unit = self.units[name]
        node = self.cluster.node_of(unit.worker)
        self._advance(node, time)
        start = self.running.pop(unit.worker)[3]
        self.schedule.append(Slot(name, unit.worker, start, time))
        self._reschedule(node, time)
        for dep, delay in unit.then.items():
            self.push(time + delay, "satisfy", dep)
        for ship in unit.ships:  # (dest worker, delay, mail)
            self.push(time + ship[1], "send", (name, ship))
        self._start(time, unit.worker)

    def _on_send(self, time: float, payload: tuple[str, tuple]) -> None:
        name, key = payload
        src, dest = self.units[name].worker, key[0]
        nbytes = sum(self.units[name].ships[key].payload.values())
        link = self.cluster.link(src, dest)
        latency = link.latency
        if self.units[name].ships[key].mail and self.cluster.overhead.mail_latency:
            # a mailbox's one-way trip replaces the software part of the link's latency (what
            # a Dask transfer costs between two workers of one node); across nodes the wire's
            # extra latency remains
            latency = self.cluster.overhead.mail_latency + max(
                0.0, link.latency - self.cluster.intra_node.latency)
        resources = self._resources(src, dest)
        start = max([time, *(self.link_free.get(r, 0.0) for r in resources)])
        done = start + nbytes / link.bandwidth
        for r in resources:
            self.link_free[r] = done
        self.transfers.append(Slot(name, src, start, done + latency, nbytes, dest))
        self.push(done + latency, "arrive", payload)

    def _resources(self, src: int, dest: int) -> tuple:
        a, b = self.cluster.node_of(src), self.cluster.node_of(dest)
        return (("pair", src, dest),) if a == b else (("nic-out", a), ("nic-in", b))

    def _on_arrive(self, time: float, payload: tuple[str, tuple]) -> None:
        name, key = payload
        for reader in self.units[name].ships[key].readers:
            self._on_satisfy(time, reader)


def _union(intervals) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def exposed_time(transfers: list[Slot], schedule: list[Slot]) -> float:
    """Length of time some transfer is in flight while no device computes."""
    moving = _union((t.start, t.end) for t in transfers)
    computing = _union((s.start, s.end) for s in schedule)
    hidden = sum(max(0.0, min(b, d) - max(a, c)) for a, b in moving for c, d in computing)
    return sum(b - a for a, b in moving) - hidden
