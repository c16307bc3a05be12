"""What a step plan does, counted from its graph: ops, tasks, communication, bytes per worker
pair; and a drawing of the graph (backs ``rapydli plan``).

>>> from rapydli import Sequential, Dense, data_parallel
>>> from rapydli.graph.lower import lower
>>> g = lower(Sequential([Dense(4), Dense(2)], input_shape=(3,)), data_parallel(2), 8, "grad")
>>> summarize(g)["bytes_moved"]  # the gradients of 26 float32 weights, reduced once
104
"""
from __future__ import annotations

from collections import Counter

import networkx as nx

from rapydli.graph.to_dask import StepPlan

PHASE_COLORS = {"input": "#9e9e9e", "forward": "#1f77b4", "backward": "#d62728",
                "update": "#2ca02c", "comm": "#ff7f0e"}


def summarize(graph) -> dict:
    """Counts and bytes of one step: ops per phase and kind, tasks after fusion, comm bytes."""
    ops = [op for op in graph.ops() if op.kind != "placeholder"]
    pairs: Counter = Counter()
    for u, v, size in graph.crossing_edges():
        pairs[(graph.op(u).worker, graph.op(v).worker)] += size
    flops: Counter = Counter()
    for op in ops:
        flops[op.worker] += op.flops
    meta = graph.graph["meta"]
    return {
        "mode": meta["mode"], "batch": meta["batch"], "mesh": repr(meta["mesh"]),
        "n_ops": len(ops),
        "n_tasks": StepPlan(graph).n_tasks,
        "n_tasks_unfused": len(ops),
        "ops_by_phase": dict(Counter(op.phase for op in ops)),
        "ops_by_kind": dict(Counter(op.kind for op in ops)),
        "n_comm_ops": sum(op.kind == "send" for op in ops),
        "bytes_by_pair": dict(sorted(pairs.items())),
        "bytes_moved": sum(pairs.values()),
        "flops_by_worker": {w: f for w, f in sorted(flops.items(), key=str)},
    }


def format_summary(summary: dict) -> str:
    """The text ``rapydli plan`` prints."""
    lines = [
        f"step plan: mode={summary['mode']} batch={summary['batch']} mesh={summary['mesh']}",
        f"  tile ops: {summary['n_ops']}  ({_kv(summary['ops_by_phase'])})",
        f"  dask tasks per step: {summary['n_tasks']} fused ({summary['n_tasks_unfused']} unfused)",
        f"  communication ops (sends): {summary['n_comm_ops']}",
        f"  bytes moved per step: {summary['bytes_moved']:,}",
    ]
    for (a, b), size in summary["bytes_by_pair"].items():
        lines.append(f"    worker {a} -> worker {b}: {size:,} bytes")
    for worker, flops in summary["flops_by_worker"].items():
        where = "client/any" if worker is None else f"worker {worker}"
        lines.append(f"  {where}: {flops / 1e6:,.2f} MFLOP")
    return "\n".join(lines)


def _kv(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def draw(graph, path: str) -> None:
    """Draw the tile graph to ``path`` (PNG/SVG/PDF): one row per worker, colour by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = graph.subgraph(k for k in graph if graph.op(k).kind != "placeholder")
    level = {k: i for i, layer in enumerate(nx.topological_generations(g)) for k in layer}
    workers = sorted({graph.op(k).worker for k in g}, key=lambda w: (w is None, w))
    row = {w: i for i, w in enumerate(workers)}
    offsets: Counter = Counter()
    pos = {}
    for k in sorted(g, key=lambda k: level[k]):
        w = graph.op(k).worker
        offsets[(w, level[k])] += 1
        pos[k] = (level[k], -row[w] - 0.15 * (offsets[(w, level[k])] - 1))
    width = max(8.0, 0.35 * (max(level.values()) + 1))
    fig, ax = plt.subplots(figsize=(width, 1.8 + 1.4 * len(workers)))
    colors = [PHASE_COLORS[graph.op(k).phase] for k in g]
    crossing = {(u, v) for u, v, _ in graph.crossing_edges() if u in g and v in g}
    nx.draw_networkx_edges(g, pos, ax=ax, edgelist=[e for e in g.edges if e not in crossing],
                           alpha=0.3, arrows=False)
    nx.draw_networkx_edges(g, pos, ax=ax, edgelist=list(crossing), edge_color="#ff7f0e",
                           arrows=True, arrowsize=6)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=40)
    ax.set_yticks([-row[w] for w in workers],
                  ["any" if w is None else f"worker {w}" for w in workers])
    ax.set_xlabel("topological level")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=p)
               for p, c in PHASE_COLORS.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    meta = graph.graph["meta"]
    ax.set_title(f"step graph: {meta['mode']}, batch {meta['batch']}, {meta['mesh']!r} "
                 "(orange edges move data between workers)")
    ax.tick_params(left=False, labelleft=True, bottom=True, labelbottom=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
