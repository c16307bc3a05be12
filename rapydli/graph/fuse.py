"""Fusion: merge the ops that run on one worker between two communications into one task.

Every op gets a *stage*: the largest number of worker changes on any path into it. Ops of one
worker and one stage become one coarse task; ``send`` and ``output`` ops stay tasks of their
own (the sends from one coarse task to another travel together as one), so only their exact
bytes travel. An edge between two coarse tasks always climbs a stage (or leaves a send), so the
coarse graph stays acyclic; a step becomes a few large tasks. A task also ends after an op that
sends much (:data:`SPLIT_BYTES`; :data:`REDUCE_SPLIT_BYTES` for what only feeds gradient sums),
so that big transfers overlap the compute that follows them.

With ``direct=True`` (the engine's direct exchange, see :mod:`rapydli.scheduler.mailbox`) all
of a worker's ops become one task: sends between workers are *mail*, posted to the receiving
worker inside the task, and every worker runs its ops in one shared order (:func:`mail_order`).
"""
from __future__ import annotations

import networkx as nx

#: ops that always stay tasks of their own (their output is what moves between workers)
SOLO = ("send", "output")

#: an op that sends at least this many bytes to other workers ends its coarse task, so the
#: transfer overlaps the work after it (below this, a task more costs more than it hides)
SPLIT_BYTES = 1 << 20
#: the same for sends that only feed ``reduce`` ops (data-parallel gradient sums). A split costs
#: two tasks more per worker and step (the task and the send after it) and hides only the
#: remaining backward of the earlier layers; measured on a LocalCluster (2 workers, ~1 GB/s
#: between them), splitting at 1 MiB made the data-parallel MLP 784-1024-1024-10 step at batch
#: 512 take 77-80 ms against 59-62 ms without (its 4 MB gradients take ~4 ms to move, each task
#: costs the scheduler ~2 ms of CPU). Model-parallel activations keep SPLIT_BYTES: splitting
#: them lets the neighbour start sooner (4096-wide MLP: 293-307 ms against 394-417 ms).
REDUCE_SPLIT_BYTES = 16 << 20


def only_summed(graph, key: str) -> bool:
    """Whether only ``reduce`` ops (partial sums: data-parallel gradients) read op ``key``'s
    output: nothing needs it before the reader's own partial is made."""
    return all(graph.op(s).kind == "reduce" for s in graph.successors(key))


def _splits(graph, key: str, split_bytes: int, reduce_split_bytes: int) -> bool:
    """Whether the coarse task ends after op ``key``: it sends enough to other workers."""
    to_reduce = other = 0
    for s in graph.successors(key):
        op = graph.op(s)
        if op.kind != "send":
            continue
        if only_summed(graph, s):
            to_reduce += op.nbytes
        else:
            other += op.nbytes
    return other >= split_bytes or to_reduce >= reduce_split_bytes or \
        (other > 0 and other + to_reduce >= split_bytes)


def stages(graph, split_bytes: int = SPLIT_BYTES,
           reduce_split_bytes: int = REDUCE_SPLIT_BYTES) -> dict[str, int]:
    """Stage of every non-placeholder op."""
    stage: dict[str, int] = {}
    for key in nx.topological_sort(graph):
        op = graph.op(key)
        if op.kind == "placeholder":
            continue
        s = 0
        for pred in graph.predecessors(key):
            p = graph.op(pred)
            if p.kind == "placeholder":
                continue
            boundary = (p.worker != op.worker or p.kind in SOLO
                        or (op.kind != "send"
                            and _splits(graph, pred, split_bytes, reduce_split_bytes)))
            s = max(s, stage[pred] + boundary)
        stage[key] = s
    return stage


def mail_sends(graph) -> set[str]:
    """The sends whose every reader sits on another mesh worker (not an output): in a direct
    exchange they are posted worker to worker inside tasks."""
    mail = set()
    for op in graph.ops(kind="send"):
        readers = [graph.op(s).worker for s in graph.successors(op.key)]
        if readers and all(w is not None for w in readers):
            assert op.worker not in readers, f"{op.key} sends to its own worker"
            mail.add(op.key)
        else:
            assert all(w is None for w in readers), f"{op.key} feeds outputs and workers"
    return mail


def bottom_levels(graph) -> dict[str, int]:
    """For each op, the FLOPs on the longest path from it to the end of the graph, its own
    included: how much work still waits, at the least, once it ran."""
    level: dict[str, int] = {}
    for key in reversed(list(nx.topological_sort(graph))):
        after = max((level[s] for s in graph.successors(key)), default=0)
        level[key] = graph.op(key).flops + after
    return level


def _paced_loads(graph, index: dict[str, int]):
    """``graph`` plus ordering edges: each worker's load op (a batch of data, which waits for
    nothing) after the first reader of that worker's previous load. Without them a worker
    that would otherwise wait loads every step of an unrolled task at once and holds all
    their batches; with them it holds about two. The order stays one of ``graph``'s."""
    paced = nx.DiGraph(graph)
    previous: dict = {}
    for key in sorted((op.key for op in graph.ops(kind="load")), key=index.__getitem__):
        worker = graph.op(key).worker
        before = previous.get(worker)
        previous[worker] = key
        readers = list(graph.successors(before)) if before else []
        if readers:
            paced.add_edge(min(readers, key=index.__getitem__), key)
    # loads read only placeholders, so no such edge should close a cycle; a graph where one
    # would is ordered unpaced
    return paced if nx.is_directed_acyclic_graph(paced) else graph


def mail_order(graph, mail: set[str]) -> list[str]:
    """One topological order of all ops, shared by every worker of a direct exchange.

    Among the ops ready at a time, mail sends go first (the tile leaves as soon as it exists,
    so its transfer overlaps what the sender computes next) and ops that read mail go last
    (a worker computes all it can before it waits); among those, the one whose last tile is
    posted earliest (by the order without this rule) goes first. Among the other ops, backward
    ops go first, the one with the most FLOPs still waiting behind it (:func:`bottom_levels`)
    first: in data parallel each worker runs the chain of input gradients first, then the
    weight gradients from the first layer up (a layer's backward pass is two ops there, see
    :meth:`rapydli.graph.lower._Lowering.split_backward`), so the first layer's gradients,
    which the next step needs first, are posted, summed and applied first. The rest keep the
    graph's order (forward and update ops have no choice worth making there, and loads, which
    wait for nothing, would all go first). Every worker following the same order is what makes
    the exchange deadlock-free.
    """
    index = {key: i for i, key in enumerate(graph.nodes)}
    level = bottom_levels(graph)
    reads_mail = {key: [p for p in graph.predecessors(key) if p in mail] for key in graph.nodes}
    reads_mail = {key: sends for key, sends in reads_mail.items() if sends}

    def order(posted: dict[str, int]) -> list[str]:
        def rank(key):
            if key in mail:
                return (0, 0, index[key])
            if key in reads_mail:
                return (2, max(posted.get(p, 0) for p in reads_mail[key]), index[key])
            if graph.op(key).phase == "backward":  # the critical path first, see above
                return (1, -level[key], index[key])
            return (1, 0, index[key])

        return list(nx.lexicographical_topological_sort(paced, key=rank))

    paced = _paced_loads(graph, index)
    first = order({})  # where each tile is posted, readers aside
    posted = {key: i for i, key in enumerate(first) if key in mail}
    return [k for k in order(posted) if graph.op(k).kind != "placeholder"]


def fuse(graph, enabled: bool = True,
         direct: bool = False) -> list[tuple[str, int | None, list[str]]]:
    """Groups ``(task name, worker, op keys in run order)`` covering every op of ``graph``.

    With ``enabled=False`` every op is a task of its own (for comparisons and debugging);
    with ``direct`` each worker's ops are one task (mail sends included, see module doc).
    """
    mail = mail_sends(graph) if direct and enabled else set()
    order = (mail_order(graph, mail) if mail else
             [k for k in nx.topological_sort(graph) if graph.op(k).kind != "placeholder"])
    if not enabled:
        return [(key, graph.op(key).worker, [key]) for key in order]
    stage = stages(graph) if not mail else {k: 0 for k in order}
    gid = {}
    for key in order:
        op = graph.op(key)
        solo = op.worker is None or (op.kind in SOLO and key not in mail)
        gid[key] = ("solo", key) if solo else (op.worker, stage[key])
    for key in order:  # sends between the same two groups travel as one task
        if graph.op(key).kind == "send" and key not in mail:
            sources = {gid[p] for p in graph.predecessors(key) if p in gid}
            targets = {gid[s] for s in graph.successors(key)}
            if len(sources) == 1 and len(targets) == 1:
                gid[key] = ("send", *sources, *targets)
    groups: dict[tuple, list[str]] = {}
    for key in order:
        groups.setdefault(gid[key], []).append(key)
    result = []
    for g, keys in groups.items():
        if g[0] == "solo" or (g[0] == "send" and len(keys) == 1):
            name = keys[0]
        elif g[0] == "send":
            name = f"{keys[0]}+{len(keys) - 1}"
        elif mail:
            name = f"w{g[0]}"
        else:
            name = f"w{g[0]}/s{g[1]}"
        result.append((name, graph.op(keys[0]).worker, keys))
    return result
