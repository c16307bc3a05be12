"""Meshes of workers and per-layer tilings; the placement alone decides the parallelism.

A :class:`Mesh` names worker axes (sizes only, no cluster needed). A :class:`Tiling` says which
axis of a layer's output is cut along which mesh axes. A :class:`Placement` gives every layer its
tiling, from a preset rule plus per-layer overrides:

- ``data_parallel(n)``: every layer cut along ``batch`` over ``data``;
- ``model_parallel(n)``: dense layers cut along their output ``features``, convolutions,
  locally connected layers and pooling along ``channels``, local contrast normalisation
  (which mixes channels) along ``rows``, over ``model``;
- ``spatial_parallel(n)``: convolutions, locally connected layers, pooling and local contrast
  normalisation cut along image ``rows`` over ``model`` (a locally connected layer's weights
  are cut with its rows, never replicated);
- ``hybrid(data, model)``: convolution and pooling cut along ``batch`` over all workers, dense
  layers along ``batch`` over ``data`` and ``features`` over ``model``.

A tensor tile that is not cut along some mesh axis lives on the worker at coordinate 0 of it.

>>> p = hybrid(data=1, model=2)
>>> p.mesh
Mesh(data=1, model=2)
>>> from rapydli.layers import Dense
>>> p.tiling_for(Dense(10, name="3"), 2)
Tiling(batch=('data',), features=('model',))
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from rapydli.errors import PlacementError
from rapydli.layers import (
    AXES,
    Activation,
    Conv2D,
    Dense,
    Layer,
    LocalContrastNorm,
    LocallyConnected2D,
    _Pool2D,
)

#: layers that slide a window over the image rows (their row cuts need halos)
_WINDOWED = (Conv2D, LocallyConnected2D, _Pool2D, LocalContrastNorm)


class Mesh:
    """Named worker axes, e.g. ``Mesh(data=2, model=2)`` over 4 workers (row-major)."""

    __slots__ = ("axes",)

    def __init__(self, **sizes: int):
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise PlacementError(f"Mesh: axis {name!r} must have a positive int size; "
                                     f"received {size!r}")
        object.__setattr__(self, "axes", tuple(sizes.items()))

    def __setattr__(self, name, value):
        raise AttributeError("Mesh is immutable")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def size(self) -> int:
        return math.prod(size for _, size in self.axes)

    def coords(self) -> list[dict[str, int]]:
        """Every coordinate, in the row-major order that numbers the workers."""
        ranges = [range(size) for _, size in self.axes]
        return [dict(zip(self.names, c)) for c in itertools.product(*ranges)]

    def index(self, coord: dict[str, int]) -> int:
        """Row-major worker number of a coordinate; absent axes count as 0."""
        index = 0
        for name, size in self.axes:
            index = index * size + coord.get(name, 0)
        return index

    def __eq__(self, other):
        return isinstance(other, Mesh) and self.axes == other.axes

    def __hash__(self):
        return hash(self.axes)

    def __repr__(self):
        return "Mesh(" + ", ".join(f"{n}={s}" for n, s in self.axes) + ")"

    def __dask_tokenize__(self):
        return ("Mesh", self.axes)


def _as_axes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True, init=False)
class Tiling:
    """Which output axes of a layer are cut along which mesh axes.

    ``Tiling(batch="data", features="model")``; a value may be a tuple of mesh axes, e.g.
    ``Tiling(batch=("data", "model"))`` cuts the batch over every worker of a 2-D mesh.
    """

    cuts: tuple[tuple[str, tuple[str, ...]], ...]

    def __init__(self, **cuts):
        legal = ("batch", "features", "channels", "rows", "cols")
        unknown = sorted(set(cuts) - set(legal))
        if unknown:
            raise PlacementError(f"Tiling: unknown tensor axis {unknown[0]!r}; expected one of "
                                 f"{', '.join(map(repr, legal))}")
        items = tuple((a, _as_axes(cuts[a])) for a in legal if _as_axes(cuts.get(a)))
        used = [m for _, axes in items for m in axes]
        if len(used) != len(set(used)):
            raise PlacementError(f"Tiling: a mesh axis may cut only one tensor axis; received {cuts}")
        object.__setattr__(self, "cuts", items)

    def __getitem__(self, axis: str) -> tuple[str, ...]:
        return dict(self.cuts).get(axis, ())

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        return tuple(m for _, axes in self.cuts for m in axes)

    def __repr__(self):
        inner = ", ".join(f"{a}={axes!r}" for a, axes in self.cuts)
        return f"Tiling({inner})"

    def validate(self, layer: Layer, rank: int, mesh: Mesh) -> None:
        """Raise :class:`PlacementError` naming the layer if this tiling cannot apply to it."""
        where = f"layer '{layer.name}' ({type(layer).__name__})"
        for axis, mesh_axes in self.cuts:
            if axis not in AXES[rank] or axis not in layer.splittable:
                legal = [a for a in layer.splittable if a in AXES[rank]]
                raise PlacementError(f"{where}: cannot cut its output along {axis!r}; expected "
                                     f"one of {', '.join(map(repr, legal))}")
            for m in mesh_axes:
                if m not in mesh.names:
                    raise PlacementError(
                        f"{where}: tiling names mesh axis {m!r}, not in {mesh!r}; expected one "
                        f"of {', '.join(map(repr, mesh.names))} or None")


def _rule_data(layer: Layer, rank: int, mesh: Mesh) -> Tiling:
    return Tiling(batch="data")


def _rule_model(layer: Layer, rank: int, mesh: Mesh) -> Tiling:
    if isinstance(layer, Dense) or (isinstance(layer, Activation) and rank == 2):
        return Tiling(features="model")
    if isinstance(layer, LocalContrastNorm):  # mixes channels: cut the rows instead
        return Tiling(rows="model")
    if isinstance(layer, (Conv2D, LocallyConnected2D, _Pool2D, Activation)):
        return Tiling(channels="model")
    return Tiling()


def _rule_spatial(layer: Layer, rank: int, mesh: Mesh) -> Tiling:
    if isinstance(layer, _WINDOWED) or (isinstance(layer, Activation) and rank == 4):
        return Tiling(rows="model")
    return Tiling()


def _rule_hybrid(layer: Layer, rank: int, mesh: Mesh) -> Tiling:
    if isinstance(layer, Dense) or (isinstance(layer, Activation) and rank == 2):
        return Tiling(batch="data", features="model")
    return Tiling(batch=("data", "model"))


RULES = {"data": _rule_data, "model": _rule_model, "spatial": _rule_spatial,
         "hybrid": _rule_hybrid, "single": lambda layer, rank, mesh: Tiling()}


@dataclass(frozen=True)
class Placement:
    """A mesh, a preset rule and per-layer tiling overrides ``{layer name: Tiling}``."""

    mesh: Mesh
    rule: str = "single"
    overrides: tuple[tuple[str, Tiling], ...] = field(default=())

    def __post_init__(self):
        if self.rule not in RULES:
            raise PlacementError(f"placement: unknown preset {self.rule!r}; expected one of "
                                 f"{', '.join(map(repr, RULES))}")
        if isinstance(self.overrides, dict):
            object.__setattr__(self, "overrides", tuple(self.overrides.items()))

    def tiling_for(self, layer: Layer, rank: int) -> Tiling:
        """The tiling of ``layer``'s output (a tensor of ``rank`` dims, batch included)."""
        tiling = dict(self.overrides).get(layer.name)
        if tiling is None:
            tiling = RULES[self.rule](layer, rank, self.mesh)
        tiling.validate(layer, rank, self.mesh)
        return tiling

    def check_layers(self, names: list[str]) -> None:
        """Raise :class:`PlacementError` if an override names a layer not in ``names``."""
        unknown = [name for name, _ in self.overrides if name not in names]
        if unknown:
            raise PlacementError(
                f"placement.layers: no layer named {unknown[0]!r} in the network; expected one "
                f"of {', '.join(map(repr, names))} (layers are named by position unless given "
                "a name)")

    def with_tiling(self, layer_name: str, tiling: Tiling) -> Placement:
        """A copy where layer ``layer_name`` uses ``tiling``."""
        overrides = dict(self.overrides)
        overrides[str(layer_name)] = tiling
        return Placement(self.mesh, self.rule, tuple(overrides.items()))

    @property
    def n_workers(self) -> int:
        return self.mesh.size


def single() -> Placement:
    """Everything on one worker."""
    return Placement(Mesh(), "single")


def data_parallel(n: int) -> Placement:
    return Placement(Mesh(data=n), "data")


def model_parallel(n: int) -> Placement:
    return Placement(Mesh(model=n), "model")


def spatial_parallel(n: int) -> Placement:
    return Placement(Mesh(model=n), "spatial")


def hybrid(data: int = 1, model: int = 2) -> Placement:
    return Placement(Mesh(data=data, model=model), "hybrid")


PRESETS = {"single": single, "data_parallel": data_parallel, "model_parallel": model_parallel,
           "spatial_parallel": spatial_parallel, "hybrid": hybrid}
