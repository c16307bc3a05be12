"""Fusion: merge the ops that run on one worker between two communications into one task.

Every op gets a *stage*: the largest number of worker changes on any path into it. Ops of one
worker and one stage become one coarse task; ``send`` and ``output`` ops stay tasks of their
own, so only their exact bytes travel. An edge between two coarse tasks always climbs a stage
(or leaves a send), so the coarse graph stays acyclic; a step becomes a few large tasks.
"""
from __future__ import annotations

import networkx as nx

#: ops that always stay tasks of their own (their output is what moves between workers)
SOLO = ("send", "output")


def stages(graph) -> dict[str, int]:
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
            s = max(s, stage[pred] + (p.worker != op.worker or p.kind in SOLO))
        stage[key] = s
    return stage


def fuse(graph, enabled: bool = True) -> list[tuple[str, int | None, list[str]]]:
    """Groups ``(task name, worker, op keys in run order)`` covering every op of ``graph``.

    With ``enabled=False`` every op is a task of its own (for comparisons and debugging).
    """
    order = [k for k in nx.topological_sort(graph) if graph.op(k).kind != "placeholder"]
    if not enabled:
        return [(key, graph.op(key).worker, [key]) for key in order]
    stage = stages(graph)
    groups: dict[tuple, list[str]] = {}
    for key in order:
        op = graph.op(key)
        gid = ("solo", key) if op.kind in SOLO or op.worker is None else (op.worker, stage[key])
        groups.setdefault(gid, []).append(key)
    result = []
    for gid, keys in groups.items():
        name = keys[0] if gid[0] == "solo" else f"w{gid[0]}/s{gid[1]}"
        result.append((name, graph.op(keys[0]).worker, keys))
    return result
