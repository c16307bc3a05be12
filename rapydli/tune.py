"""Tune the kernels of a network: ``rapydli tune CONFIG.yaml``.

For every layer whose kernels have a registered autotuning space (see
:mod:`rapydli.kernels.autotune`), build random arguments of the shapes that layer's kernels see
during training and tune them; the choices go to the autotuning cache, where
:func:`rapydli.kernels.autotune.call` finds them.

Examples
--------
>>> from rapydli.layers import Conv2D, Flatten, Dense
>>> from rapydli.network import Sequential
>>> net = Sequential([Conv2D(2, 3), Flatten(), Dense(3)], input_shape=(1, 6, 6))
>>> [(op, shapes["x"]) for op, shapes, *_ in tune_network(net, 4, "float32", store=False,
...                                                            repeats=1)]  # doctest: +SKIP
[('conv2d_forward', (4, 1, 6, 6)), ('conv2d_backward', (4, 1, 6, 6)), ('dense_forward', (4, 32))]
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from rapydli.kernels import autotune
from rapydli.layers import Conv2D, Dense, Layer

__all__ = ["Tuned", "format_table", "kernel_calls", "tune_network"]


class Tuned(NamedTuple):
    """One tuned kernel call: ``(op, shapes, config, time, default_time)`` (seconds)."""

    op: str
    shapes: dict
    config: dict
    time: float
    default_time: float

    @property
    def speedup(self) -> float:
        return self.default_time / self.time if self.time > 0 else float("inf")


def _extent(region) -> tuple[int, ...]:
    return tuple(int(b - a) for a, b in region)


def _conv_calls(layer: Conv2D, x, out, params, need_dx) -> list[tuple[str, tuple, dict]]:
    # the graph hands a conv tile its input already zero-padded by layer.pads: padding (0, 0)
    s, p = layer.strides, (0, 0)
    w, b = params["weight"], params.get("bias")
    return [("conv2d_forward", (x, w, b, s, p), {}),
            ("conv2d_backward", (x, w, out, s, p), {"need_dx": need_dx})]


def _dense_calls(layer: Dense, x, out, params, need_dx) -> list[tuple[str, tuple, dict]]:
    w, b = params["weight"], params.get("bias")
    return [("dense_forward", (x, w, b), {}),
            ("dense_backward", (x, w, out), {"need_dx": need_dx})]


#: layer type -> ``f(layer, x, y, params, need_dx) -> [(op, args, kwargs)]`` (y: an array of the
#: output's shape, standing in for dy as well)
CALLS: dict[type, Callable] = {Conv2D: _conv_calls, Dense: _dense_calls}


def _tile_shapes(network, placement, batch: int) -> dict[str, set]:
    """For each layer, the (output tile shape) set the lowered training graph runs."""
    from rapydli.graph.lower import lower

    graph = lower(network, placement, batch, "grad", None, "float32")
    shapes: dict[str, set] = {}
    for op in graph.ops(phase="forward"):
        if op.layer is not None and op.kind == "forward":
            shapes.setdefault(op.layer, set()).add(tuple(op.shape))
    return shapes


def kernel_calls(network, batch: int | Iterable[int], dtype, *, placement=None, seed: int = 0,
                 ops: Iterable[str] | None = None) -> list[tuple[str, tuple, dict]]:
    """Random arguments for every tunable kernel call of ``network``'s training step.

    With ``placement``, the shapes are those of the tiles the lowered step graph gives each
    worker (what the kernels then see); without, those of whole batches of ``batch`` samples.
    Calls of the same op with the same signature appear once.
    """
    wanted = set(autotune.tunable_ops() if ops is None else ops)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    batches = [int(batch)] if isinstance(batch, (int, np.integer)) else [int(b) for b in batch]
    tiles: dict[str, set] = {}
    if placement is not None:
        for n in batches:
            for name, shapes in _tile_shapes(network, placement, n).items():
                tiles.setdefault(name, set()).update(shapes)

    def rand(shape):
        return rng.standard_normal(shape).astype(dtype)

    calls, seen = [], set()
    for i, (layer, (in_s, out_s)) in enumerate(zip(network.layers, network.shapes)):
        make = next((f for t, f in CALLS.items() if isinstance(layer, t)), None)
        if make is None:
            continue
        out_tiles = sorted(tiles.get(layer.name, ())) or [(n, *out_s) for n in batches]
        for out_tile in out_tiles:
            region = tuple((0, n) for n in out_tile)
            x = rand(_extent(layer.input_region(region, in_s)))
            params = {k: rand(_extent(r)) for k, r in layer.param_regions(region, in_s).items()}
            for op, args, kwargs in make(layer, x, rand(out_tile), params, i > 0):
                if op not in wanted or op not in autotune.tunable_ops():
                    continue
                shapes, dt, device = autotune.signature(op, args, kwargs)
                key = (op, repr(shapes), dt, device)
                if key not in seen:
                    seen.add(key)
                    calls.append((op, args, kwargs))
    return calls


def tune_network(network, batch: int | Iterable[int], dtype="float32", cache=None, soft=None, *,
                 repeats: int = 5, placement=None, seed: int = 0, ops: Iterable[str] | None = None,
                 store: bool = True, on_result: Callable[[Tuned], Any] | None = None) -> list[Tuned]:
    """Tune every registered kernel ``network`` calls; return ``[(op, shapes, config, time,
    default_time)]`` per distinct call, in layer order (see :func:`kernel_calls` for the shapes).

    ``cache`` is an :class:`~rapydli.kernels.autotune.Cache`, a path or None (the default cache);
    ``soft`` excludes configurations (a predicate or a dict of excluded values).
    """
    if isinstance(network, Layer):
        raise TypeError("tune_network expects a network (Sequential), not a layer")
    results = []
    for op, args, kwargs in kernel_calls(network, batch, dtype, placement=placement, seed=seed, ops=ops):
        r = autotune.search(op, args, kwargs, soft=soft, repeats=repeats, cache=cache, store=store)
        row = Tuned(op, r.shapes, r.config, r.time, r.default_time)
        results.append(row)
        if on_result is not None:
            on_result(row)
    return results


def _short(shapes: dict) -> str:
    arrays = [("x".join(map(str, v))) for v in shapes.values() if isinstance(v, tuple)]
    return ", ".join(arrays)


def format_table(rows: list[Tuned]) -> str:
    """A plain-text table: op, argument shapes, choice, median times and speedup vs default."""
    head = ("op", "shapes", "choice", "tuned ms", "default ms", "speedup")
    body = [(r.op, _short(r.shapes), ", ".join(f"{k}={v}" for k, v in r.config.items()),
             f"{r.time * 1e3:.3f}", f"{r.default_time * 1e3:.3f}", f"{r.speedup:.2f}x") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
