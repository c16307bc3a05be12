"""Unrolling: ``k`` training steps as one tile graph, each step reading the weights the previous
one wrote.

One Dask graph per ``k`` steps means one submission, and, after fusion, the ops a worker runs
between two communications of consecutive steps become one task: on a single worker a whole
group of steps is one task. The numbers are those of ``k`` separate steps.

>>> from rapydli import SGD, Sequential, Dense
>>> from rapydli.graph.lower import lower
>>> net = Sequential([Dense(3)], input_shape=(4,))
>>> g = unroll(lower(net, None, 8, "train", SGD()), 3)
>>> sorted(k for k in g.graph["placeholders"] if k.startswith("$index"))
['$index:0', '$index:1', '$index:2']
"""
from __future__ import annotations

import dataclasses

from rapydli.graph import ops
from rapydli.graph.ops import Ref, TileOp


def _renamed(graph, ref: Ref, k: int, carried: dict[str, Ref]) -> Ref:
    if ref.key == "$index":
        return dataclasses.replace(ref, key=f"$index:{k}")
    if ref.key in carried:
        return carried[ref.key]
    if ref.key.startswith("$"):
        return ref
    return dataclasses.replace(ref, key=f"s{k}/{ref.key}")


def unroll(graph, k: int):
    """A tile graph running the train-mode ``graph`` ``k`` times in a row.

    Step ``i``'s ops are keyed ``s{i}/<key>``; its batch indices are placeholder
    ``$index:{i}``. ``outputs["metrics"]`` is a list of per-step ``(loss, n_correct)``;
    ``outputs["new_values"]`` are the last step's weights and optimizer state.
    """
    meta = graph.graph["meta"]
    if meta["mode"] != "train":
        raise ValueError(f"only train-mode graphs unroll; received mode {meta['mode']!r}")
    out = type(graph)()
    placeholders = {key: info for key, info in graph.graph["placeholders"].items()
                    if key != "$index"}
    for key in placeholders:
        out.add_op(graph.op(key))
    carried: dict[str, Ref] = {}
    metrics = []
    for step in range(k):
        out.add_op(TileOp(f"$index:{step}", "placeholder", "input", None, None))
        placeholders[f"$index:{step}"] = ("index", step)
        for key in graph.nodes:
            op = graph.op(key)
            if op.kind == "placeholder" or op.kind == "output":
                continue
            inputs = tuple(_renamed(graph, r, step, carried) for r in op.inputs)
            out.add_op(dataclasses.replace(op, key=f"s{step}/{key}", inputs=inputs))
        metrics.extend(_renamed(graph, r, step, {}) for r in graph.op("metrics").inputs)
        carried = {ph: _renamed(graph, ref, step, {})
                   for ph, ref in graph.graph["outputs"]["new_values"].items()}
    per_step = len(graph.op("metrics").inputs)
    out.add_op(TileOp("metrics", "output", "comm", None, ops.steps_metrics_task,
                      tuple(metrics), {"per_step": per_step}))
    out.graph.update(placeholders=placeholders, replicas=graph.graph["replicas"],
                     meta={**meta, "steps": k},
                     outputs={"metrics": Ref("metrics"), "new_values": carried, "grads": {}})
    return out
