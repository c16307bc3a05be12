"""Communication rules: the ops inserted where a consumer's tiling differs from its producer's.

One mechanism covers every case. A consumer tile needs a *region* of a tensor; the producer's
tiles that overlap it each contribute a *piece*. A piece on the consumer's worker is cut
locally; a piece on another worker is cut there by a ``send`` op, so exactly its bytes travel.

- forward, dense layer after a cut layer: the pieces are whole tiles (an all-gather);
- forward, window layer cut by rows: the pieces from neighbours are the border rows (a halo);
- backward: the same pieces flow back and are *summed* (``add=True``) into the producer's tile;
- weight gradients: :func:`all_reduce` sums partial gradients onto every replica, or
  :func:`reduce_scatter` sums each row block of them on the replica that updates those rows
  (a sharded update); :func:`tree_reduce` sums them onto one worker.
"""
from __future__ import annotations

from dataclasses import dataclass

from rapydli.graph.ops import (Ref, TileOp, assemble_task, identity_task, rows_task, slice_task,
                               sum_task)
from rapydli.graph.tiles import Region, intersect, nbytes


@dataclass(frozen=True)
class Source:
    """A tile of a tensor: where its value is (``ref``), what region it holds, on which worker."""

    ref: Ref
    region: Region
    worker: int


def redistribute(graph, name: str, region: Region, worker: int, sources: list[Source],
                 dtype, itemsize: int, add: bool = False, phase: str = "comm") -> Ref:
    """A ref to the value of ``region`` on ``worker``, built from the overlapping ``sources``.

    Cells outside every source are zero (padding). With ``add`` overlapping pieces are summed,
    as gradients flowing back into a tile are. Adds no op when one local source is the region.
    """
    pieces = [(p, s) for s in sources if (p := intersect(region, s.region)) is not None]
    if len(pieces) == 1:
        piece, src = pieces[0]
        if piece == region == src.region and src.worker == worker:
            return src.ref
    values, piece_regions, held_regions = [], [], []
    for i, (piece, src) in enumerate(pieces):
        if src.worker == worker:
            values.append(src.ref)
            held_regions.append(src.region)
        else:
            values.append(send(graph, f"{name}/send{i}", src, piece, itemsize))
            held_regions.append(None)
        piece_regions.append(piece)
    size = nbytes(region, itemsize)
    graph.add_op(TileOp(
        name, "assemble", phase, worker, assemble_task, tuple(values),
        dict(region=region, piece_regions=tuple(piece_regions),
             held_regions=tuple(held_regions), dtype=dtype, add=add),
        shape=tuple(e - s for s, e in region), nbytes=size))
    return Ref(name, (), size)


def send(graph, name: str, src: Source, piece: Region, itemsize: int) -> Ref:
    """A ``send`` op on the source's worker that cuts ``piece``; its output travels."""
    size = nbytes(piece, itemsize)
    graph.add_op(TileOp(name, "send", "comm", src.worker, slice_task, (src.ref,),
                        dict(piece=piece, held=src.region),
                        shape=tuple(e - s for s, e in piece), nbytes=size))
    return Ref(name, (), size)


def forward_value(graph, name: str, ref: Ref, worker: int, size: int) -> Ref:
    """A ``send`` op on ``worker`` holding exactly the value ``ref`` points into."""
    graph.add_op(TileOp(name, "send", "comm", worker, identity_task, (ref,), nbytes=size))
    return Ref(name, (), size)


#: up to this many workers hold partial sums, all-reduce by a direct exchange (one hop)
DIRECT_ALLREDUCE_MAX = 4


def _local_sums(graph, name: str, parts: list[tuple[Ref, int]], size: int) -> list[tuple[Ref, int]]:
    """One partial per worker, in worker order: the partials each worker holds, summed there."""
    by_worker: dict[int, list[Ref]] = {}
    for ref, worker in parts:
        by_worker.setdefault(worker, []).append(ref)
    level = []
    for worker, refs in sorted(by_worker.items()):
        if len(refs) > 1:
            key = f"{name}/w{worker}"
            graph.add_op(TileOp(key, "reduce", "comm", worker, sum_task, tuple(refs), nbytes=size))
            refs = [Ref(key, (), size)]
        level.append((refs[0], worker))
    return level


def all_reduce(graph, name: str, parts: list[tuple[Ref, int]], replicas, size: int) -> dict:
    """The sum of partial values ``(ref, worker)`` on every worker in ``replicas``.

    Few workers (at most :data:`DIRECT_ALLREDUCE_MAX`): each sends its partial to every replica,
    which sums them in worker order (one hop; every replica adds in the same order, so all get
    the same bits). More: a tree reduction to one worker, then a broadcast of the sum.
    """
    level = _local_sums(graph, name, parts, size)
    if len(level) > DIRECT_ALLREDUCE_MAX:
        total, root = tree_reduce(graph, name, parts, size)
        return {w: total if w == root else forward_value(graph, f"{name}/to{w}", total, root, size)
                for w in replicas}
    sums = {}
    for w in replicas:
        refs = tuple(ref if src == w else forward_value(graph, f"{name}/w{src}to{w}", ref, src, size)
                     for ref, src in level)
        if len(refs) == 1:
            sums[w] = refs[0]
            continue
        key = f"{name}/sum@w{w}"
        graph.add_op(TileOp(key, "reduce", "comm", w, sum_task, refs, nbytes=size))
        sums[w] = Ref(key, (), size)
    return sums


def row_shards(region: Region, n: int) -> list[Region]:
    """``region`` cut into ``n`` blocks of consecutive rows (its first axis), as even as they
    can be, the first ones larger; a block of a C-ordered array is one contiguous run."""
    (start, stop), rest = region[0], tuple(region[1:])
    base, extra = divmod(stop - start, n)
    shards, at = [], start
    for i in range(n):
        end = at + base + (i < extra)
        shards.append(((at, end), *rest))
        at = end
    return shards


def reduce_scatter(graph, name: str, parts: list[tuple[Ref, int]], region: Region,
                   owners: list[int], itemsize: int) -> list[Ref]:
    """Per owner, the sum of the partial values ``(ref, worker)`` of ``region`` over the rows
    of its shard (:func:`row_shards`, the ``i``-th to ``owners[i]``), held there.

    Each worker sends every other owner only that owner's rows of its partial; the owner adds
    the rows in worker order, the order :func:`all_reduce` adds whole partials in, so each
    row sums to the same bits either way.
    """
    level = _local_sums(graph, name, parts, nbytes(region, itemsize))
    sums = []
    for i, (owner, shard) in enumerate(zip(owners, row_shards(region, len(owners)))):
        size = nbytes(shard, itemsize)
        rows = []
        for ref, src in level:
            if src != owner:
                rows.append(send(graph, f"{name}/w{src}to{owner}", Source(ref, region, src),
                                 shard, itemsize))
                continue
            key = f"{name}/rows{i}@w{owner}"
            graph.add_op(TileOp(key, "slice", "comm", owner, rows_task, (ref,),
                                dict(start=shard[0][0] - region[0][0],
                                     stop=shard[0][1] - region[0][0]), nbytes=size))
            rows.append(Ref(key, (), size))
        if len(rows) == 1:
            sums.append(rows[0])
            continue
        key = f"{name}/sum{i}@w{owner}"
        graph.add_op(TileOp(key, "reduce", "comm", owner, sum_task, tuple(rows), nbytes=size))
        sums.append(Ref(key, (), size))
    return sums


def tree_reduce(graph, name: str, parts: list[tuple[Ref, int]], size: int) -> tuple[Ref, int]:
    """Sum partial values ``(ref, worker)``: per worker first, then pairwise across workers.

    Returns the ref of the sum and the worker that holds it. Depth is ``ceil(log2(workers))``.
    """
    level = _local_sums(graph, name, parts, size)
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for i in range(0, len(level) - 1, 2):
            (a, wa), (b, wb) = level[i], level[i + 1]
            b = forward_value(graph, f"{name}/d{depth}/send{i}", b, wb, size)
            key = f"{name}/d{depth}/{i}"
            graph.add_op(TileOp(key, "reduce", "comm", wa, sum_task, (a, b), nbytes=size))
            nxt.append((Ref(key, (), size), wa))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]
