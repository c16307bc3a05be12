"""Tile arithmetic: cutting an axis into parts, intersecting regions, locating a piece.

A *region* is a tuple of ``(start, stop)`` per axis of a batched tensor. Regions of an input may
reach past the tensor's edges (negative starts, stops past the size): that part is zero padding.

>>> split(10, 3)
[(0, 4), (4, 7), (7, 10)]
>>> intersect(((0, 4), (0, 8)), ((2, 6), (-1, 3)))
((2, 4), (0, 3))
"""
from __future__ import annotations

import itertools
import math

Region = tuple[tuple[int, int], ...]


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``parts`` contiguous pieces, the first ``n % parts`` one longer."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shape_of(region: Region) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in region)


def is_empty(region: Region) -> bool:
    return any(stop <= start for start, stop in region)


def intersect(a: Region, b: Region) -> Region | None:
    """The overlap of two regions, or ``None`` when they do not overlap."""
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return None if is_empty(out) else out


def relative(inner: Region, outer: Region) -> tuple[slice, ...]:
    """Slices that pick ``inner`` out of an array holding ``outer``."""
    return tuple(slice(i0 - o0, i1 - o0) for (i0, i1), (o0, _) in zip(inner, outer))


def nbytes(region: Region, itemsize: int) -> int:
    return math.prod(shape_of(region)) * itemsize


def tile_grid(shape: tuple[int, ...], cuts: list[tuple[str, ...]],
              mesh_shape: dict[str, int]) -> list[tuple[dict[str, int], Region]]:
    """Every tile of a tensor of ``shape`` whose axis ``i`` is cut over mesh axes ``cuts[i]``.

    Returns ``(coordinate on the mesh axes used, region)`` pairs, row-major in the tensor axes;
    empty tiles (more parts than elements) are left out. An axis cut over several mesh axes is
    numbered mixed-radix, the first mesh axis slowest.
    """
    used = [m for axes in cuts for m in axes]
    tiles = []
    for values in itertools.product(*(range(mesh_shape[m]) for m in used)):
        coord = dict(zip(used, values))
        region = []
        for n, axes in zip(shape, cuts):
            index, parts = 0, 1
            for m in axes:
                index, parts = index * mesh_shape[m] + coord[m], parts * mesh_shape[m]
            region.append(split(n, parts)[index])
        region = tuple(region)
        if not is_empty(region):
            tiles.append((coord, region))
    return tiles
