"""Lowering: network + placement + batch size -> ``TileGraph`` of forward, backward, update ops.

Each layer's output is cut into tiles by its tiling; a tile is computed on the worker of its
mesh coordinate from the input region it needs, which :func:`~rapydli.graph.comm.redistribute`
brings together (gather, halo exchange). Backward mirrors forward, pieces summed. Weight tiles
are resident on every worker that computes with them; their partial gradients are summed and
each replica applies the same update, so replicas never diverge; a large replicated tile is
updated sharded instead, each replica summing and updating a block of its rows and sending
the others the result (:meth:`_Lowering.sharded_update`).

>>> from rapydli import SGD, Sequential, Dense, data_parallel
>>> net = Sequential([Dense(4, activation="relu"), Dense(3)], input_shape=(5,))
>>> g = lower(net, data_parallel(2), batch=8, optimizer=SGD())
>>> g.count("forward"), g.count("backward"), g.count("update")  # 2 layers + loss, x 2 tiles
(6, 4, 8)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from rapydli.errors import ShapeError
from rapydli.graph import ops
from rapydli.graph.comm import (DIRECT_ALLREDUCE_MAX, Source, all_reduce, forward_value,
                                redistribute, reduce_scatter, row_shards, tree_reduce)
from rapydli.graph.ops import Ref, TileOp
from rapydli.graph.tiles import Region, nbytes, shape_of, tile_grid
from rapydli.layers import AXES

MODES = ("train", "grad", "eval", "predict")

#: weight tiles of at least this many bytes update sharded across their replicas; smaller ones
#: are updated whole by every replica, sparing the second round of messages a sharded update
#: adds for an update that costs little (the size where shared memory starts to pay,
#: ``rapydli.scheduler.shared.MIN_BYTES``; not tuned further)
SHARD_MIN_BYTES = 1 << 16


class TileGraph(nx.DiGraph):
    """A DAG of :class:`TileOp` s (node attribute ``op``); edges carry the ``nbytes`` they move.

    ``graph.graph`` holds ``placeholders`` (``$`` keys bound per step), ``outputs`` (refs by
    role) and ``meta`` (mesh, batch, mode, dtype).
    """

    def add_op(self, op: TileOp) -> None:
        assert op.key not in self, f"duplicate op key {op.key}"
        self.add_node(op.key, op=op)
        for ref in op.inputs:
            self.add_edge(ref.key, op.key, nbytes=ref.nbytes)

    def op(self, key: str) -> TileOp:
        return self.nodes[key]["op"]

    def ops(self, kind: str | None = None, phase: str | None = None) -> list[TileOp]:
        return [op for _, op in self.nodes(data="op")
                if (kind is None or op.kind == kind) and (phase is None or op.phase == phase)]

    def count(self, phase: str) -> int:
        return len(self.ops(phase=phase))

    def crossing_edges(self):
        """``(producer, consumer, nbytes)`` for every edge whose ends sit on different workers."""
        for u, v, size in self.edges(data="nbytes"):
            wu, wv = self.op(u).worker, self.op(v).worker
            if wu is not None and wv is not None and wu != wv:
                yield u, v, size

    def validate(self) -> None:
        """Check the invariants the scheduler relies on; raise ``AssertionError`` if broken."""
        assert nx.is_directed_acyclic_graph(self), "tile graph has a cycle"
        for u, v, _ in self.crossing_edges():
            assert self.op(u).kind == "send", f"{u} -> {v} crosses workers without a send op"
        for key, op in self.nodes(data="op"):
            assert op is not None, f"edge to unknown op {key}"
        placeholders = self.graph.get("placeholders", {})
        for op in self.ops(kind="update"):  # in-place updates: nothing reads the old values after
            for ref in (op.inputs[0], *op.inputs[2:]):
                for reader in self.successors(ref.key):
                    assert reader == op.key or nx.has_path(self, reader, op.key), \
                        f"{reader} reads {ref.key} but may run after its in-place update {op.key}"
            view = self.op(op.inputs[0].key)
            if view.fn is not ops.rows_task:
                continue
            # a sharded update writes rows of a weight that every replica's copy may be (the
            # replicas on one machine share one): each replica reads its copy before it, or
            # only to pass it on (views, the blocks put in place after it)
            for key in self._copies(view.inputs[0].key, placeholders):
                for reader in self.successors(key):
                    assert self.op(reader).fn in (ops.rows_task, ops.place_task) or \
                        nx.has_path(self, reader, op.key), \
                        f"{reader} reads {key} but may run after the sharded update {op.key}"


    def _copies(self, key: str, placeholders: dict) -> list[str]:
        """Every replica's copy of the weight ``key`` holds: the placeholders of the same weight
        tile, or, in an unrolled graph, the ops that put the blocks of the step before in
        place (those that read what the same updates made)."""
        if key in placeholders:
            return [k for k, info in placeholders.items() if info[:3] == placeholders[key][:3]]
        updates = set()
        for ref in self.op(key).inputs[1:]:
            op = self.op(ref.key)
            updates.add(op.inputs[0].key if op.kind == "send" else ref.key)
        copies = set()
        for update in updates:  # its blocks go to place ops directly or through one send
            for reader in self.successors(update):
                after = self.successors(reader) if self.op(reader).kind == "send" else [reader]
                copies.update(r for r in after if self.op(r).fn is ops.place_task)
        return sorted(copies)


@dataclass
class _Tile:
    region: Region
    worker: int
    x: Ref
    x_region: Region
    params: tuple[tuple[str, str, Region], ...]  # (param name, key, region)
    y: Ref | None = None
    dy_extra: Ref | None = None  # a penalty's gradient, added to the incoming dy


@dataclass
class _Lowering:
    network: object
    placement: object
    batch: int
    mode: str
    optimizer: object
    dtype: np.dtype
    shard_updates: bool = True
    graph: TileGraph = field(default_factory=TileGraph)
    placeholders: dict = field(default_factory=dict)
    replicas: dict = field(default_factory=dict)  # (param key, region) -> set of workers

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def placeholder(self, key: str, info: tuple, worker: int | None) -> Ref:
        if key not in self.placeholders:
            self.placeholders[key] = info
            self.graph.add_op(TileOp(key, "placeholder", "input", worker, None))
        return Ref(key)

    def param_ref(self, pkey: str, region: Region, worker: int) -> Ref:
        self.replicas.setdefault((pkey, region), set()).add(worker)
        return self.placeholder(f"$param:{pkey}:{region}@{worker}",
                                ("param", pkey, region, worker), worker)

    def state_ref(self, pkey: str, slot: str, region: Region, worker: int) -> Ref:
        return self.placeholder(f"$state:{slot}:{pkey}:{region}@{worker}",
                                ("state", pkey, slot, region, worker), worker)

    def load(self, name: str, what: str, region: Region, worker: int, dtype) -> Ref:
        data = self.placeholder(f"$data:{what}@{worker}", ("data", what, worker), worker)
        index = self.placeholder("$index", ("index",), None)
        self.graph.add_op(TileOp(name, "load", "input", worker, ops.load_region, (data, index),
                                 dict(region=region, dtype=dtype, worker=worker),
                                 shape=shape_of(region),
                                 nbytes=nbytes(region, np.dtype(dtype).itemsize)))
        return Ref(name, (), nbytes(region, np.dtype(dtype).itemsize))

    def register_replicas(self, layer, in_s, out_s, cuts) -> None:
        """Every worker that holds a tile of this layer's weights, however small the batch.

        A batch smaller than the mesh leaves some workers without work; their replicas must
        still receive every update, or they would drift from the others.
        """
        mesh = self.placement.mesh
        big = (max(self.batch, mesh.size), *out_s)
        for coord, region in tile_grid(big, cuts, mesh.shape):
            for pkey, preg in layer.param_regions(region, in_s).items():
                key = (f"{layer.name}.{pkey}", preg)
                self.replicas.setdefault(key, set()).add(mesh.index(coord))

    # --- forward ---------------------------------------------------------------------------

    def forward(self) -> tuple[list[list[_Tile]], list[Source]]:
        layers_tiles, sources = [], []
        mesh = self.placement.mesh
        for i, (layer, (in_s, out_s)) in enumerate(zip(self.network.layers, self.network.shapes)):
            out_full = (self.batch, *out_s)
            tiling = self.placement.tiling_for(layer, len(out_full))
            cuts = [tiling[axis] for axis in AXES[len(out_full)]]
            self.register_replicas(layer, in_s, out_s, cuts)
            tiles = []
            for t, (coord, region) in enumerate(tile_grid(out_full, cuts, mesh.shape)):
                worker = mesh.index(coord)
                need = layer.input_region(region, in_s)
                name = f"{layer.name}/in/t{t}"
                x = (self.load(name, "x", need, worker, self.dtype) if i == 0 else
                     redistribute(self.graph, name, need, worker, sources, self.dtype,
                                  self.itemsize))
                params = tuple((p, f"{layer.name}.{p}", r)
                               for p, r in layer.param_regions(region, in_s).items())
                for _, pkey, preg in params:  # tiles computing with each weight region
                    self.uses[(pkey, preg)] = self.uses.get((pkey, preg), 0) + 1
                tile = _Tile(region, worker, x, need, params)
                key = f"{layer.name}/fwd/t{t}"
                size = nbytes(region, self.itemsize)
                refs = tuple(self.param_ref(k, r, worker) for _, k, r in params)
                self.graph.add_op(TileOp(
                    key, "forward", "forward", worker, ops.forward_task, (x, *refs),
                    dict(layer=layer, names=tuple(p for p, _, _ in params)), layer.name,
                    shape_of(region), size, layer.flops(shape_of(region), in_s)))
                tile.y = Ref(key, (), size)
                tiles.append(tile)
            if self.mode != "predict" and hasattr(layer, "penalty"):
                self.penalty(layer, tiles)
            layers_tiles.append(tiles)
            sources = [Source(tile.y, tile.region, tile.worker) for tile in tiles]
        return layers_tiles, sources

    def penalty(self, layer, tiles: list[_Tile]) -> None:
        """Ops for a layer's penalty on its output, a function of whole-batch statistics.

        The hooks: ``layer.penalty_stats(y)`` sums a tile's rows (additive over batch tiles);
        ``layer.penalty(y, stats, batch)`` gives ``(value, dy_extra)`` from the whole batch's
        sums. Tiles holding the same units all-reduce their sums, so a batch cut moves only
        those sums, never the activations; the first batch tile of each unit range counts the
        value in the metrics, and ``dy_extra`` joins the tile's ``dy`` in backward.
        """
        groups: dict[Region, list[int]] = {}
        for t, tile in enumerate(tiles):
            groups.setdefault(tile.region[1:], []).append(t)
        backward = self.mode in ("train", "grad")
        for units, members in groups.items():
            size = nbytes(units, self.itemsize)
            parts = []
            for t in members:
                key = f"{layer.name}/stats/t{t}"
                self.graph.add_op(TileOp(
                    key, "penalty", "forward", tiles[t].worker, ops.penalty_stats_task,
                    (tiles[t].y,), dict(layer=layer), layer.name, shape_of(units), size,
                    int(np.prod(shape_of(tiles[t].region)))))
                parts.append((Ref(key, (), size), tiles[t].worker))
            sums = all_reduce(self.graph, f"{layer.name}/stats/{_tag(units)}", parts,
                              sorted({w for _, w in parts}), size)
            first = min(members, key=lambda t: tiles[t].region[0])
            for t in members:
                tile, key = tiles[t], f"{layer.name}/penalty/t{t}"
                self.graph.add_op(TileOp(
                    key, "penalty", "forward", tile.worker, ops.penalty_task,
                    (tile.y, sums[tile.worker]),
                    dict(layer=layer, batch=self.batch, backward=backward), layer.name,
                    shape_of(tile.region), flops=4 * int(np.prod(shape_of(units)))))
                if backward:
                    tile.dy_extra = Ref(key, (1,), size)
                if t == first:  # (value, 0 correct) joins the metrics, as a loss tile's does
                    self.graph.add_op(TileOp(f"{key}/scalars", "send", "comm", tile.worker,
                                             ops.scalars_task, (Ref(key),), nbytes=16))
                    self.penalty_scalars.append(Ref(f"{key}/scalars", (), 16))

    # --- loss --------------------------------------------------------------------------------

    def loss(self, last_tiles: list[_Tile], sources: list[Source]) -> list[Source]:
        """Loss tiles cut along the batch like the last layer; returns their ``dpred`` sources."""
        out_s = self.network.output_shape
        loss = self.network.loss
        owners: dict[tuple[int, int], int] = {}
        for tile in last_tiles:  # one loss tile per batch range, on its first tile's worker
            owners[tile.region[0]] = min(owners.get(tile.region[0], tile.worker), tile.worker)
        batch_regions = sorted(owners.items())
        grads, scalars = [], []
        for t, ((b0, b1), worker) in enumerate(batch_regions):
            region = ((b0, b1), *((0, n) for n in out_s))
            pred = redistribute(self.graph, f"loss/in/t{t}", region, worker, sources,
                                self.dtype, self.itemsize)
            target = (self.load(f"loss/target/t{t}", "y", ((b0, b1),), worker, np.int64)
                      if loss.integer_labels else
                      self.load(f"loss/target/t{t}", "y", region, worker, self.dtype))
            key = f"loss/t{t}"
            backward = self.mode in ("train", "grad")
            self.graph.add_op(TileOp(
                key, "loss", "forward", worker, ops.loss_task, (pred, target),
                dict(loss=loss, scale=loss.scale(self.batch, out_s), backward=backward),
                shape=shape_of(region), flops=5 * int(np.prod(shape_of(region)))))
            grads.append(Source(Ref(key, (1,), nbytes(region, self.itemsize)), region, worker))
            self.graph.add_op(TileOp(f"loss/scalars/t{t}", "send", "comm", worker,
                                     ops.scalars_task, (Ref(key),), nbytes=16))
            scalars.append(Ref(f"loss/scalars/t{t}", (), 16))
        self.graph.add_op(TileOp("metrics", "output", "comm", None, ops.metrics_task,
                                 (*scalars, *self.penalty_scalars)))
        self.outputs["metrics"] = Ref("metrics")
        return grads

    # --- backward and update -------------------------------------------------------------

    def backward(self, layers_tiles: list[list[_Tile]], grads: list[Source]) -> dict:
        """Backward ops, last layer first; returns partial weight gradients by weight tile."""
        partials: dict[tuple[str, Region], list[tuple[Ref, int]]] = {}
        for i in range(len(layers_tiles) - 1, -1, -1):
            layer = self.network.layers[i]
            new_grads = []
            for t, tile in enumerate(layers_tiles[i]):
                dy = redistribute(self.graph, f"{layer.name}/dy/t{t}", tile.region, tile.worker,
                                  grads, self.dtype, self.itemsize, add=True, phase="comm")
                if tile.dy_extra is not None:  # dy_extra broadcasts over the tile's rows
                    key = f"{layer.name}/dy+penalty/t{t}"
                    self.graph.add_op(TileOp(key, "penalty", "backward", tile.worker,
                                             ops.sum_task, (dy, tile.dy_extra), layer=layer.name,
                                             shape=shape_of(tile.region)))
                    dy = Ref(key, (), nbytes(tile.region, self.itemsize))
                key = f"{layer.name}/bwd/t{t}"
                refs = tuple(self.param_ref(k, r, tile.worker) for _, k, r in tile.params)
                names = tuple(p for p, _, _ in tile.params)
                flops = 2 * layer.flops(shape_of(tile.region), self.network.shapes[i][0])
                size = nbytes(tile.x_region, self.itemsize)
                new_grads.append(Source(Ref(key, (0,), size), tile.x_region, tile.worker))
                if i > 0 and self.split_backward(layer, tile):
                    self.graph.add_op(TileOp(
                        key, "backward", "backward", tile.worker, ops.backward_input_task,
                        (tile.x, tile.y, dy, *refs), dict(layer=layer, names=names),
                        layer.name, tile.x_region, flops=flops // 2))
                    grads_key, grads_pick = f"{layer.name}/bwd-params/t{t}", ()
                    self.graph.add_op(TileOp(
                        grads_key, "backward", "backward", tile.worker, ops.backward_params_task,
                        (tile.x, Ref(key, (1,)), *refs), dict(layer=layer, names=names),
                        layer.name, flops=flops - flops // 2))
                else:
                    kwargs = dict(layer=layer, names=names, need_dx=i > 0)
                    if self.split_backward(layer, tile):  # the first layer: nothing to split
                        kwargs["posted"] = True
                    fused = self.fused_update(layer, tile)
                    if fused:
                        kwargs["optimizer"] = self.optimizer
                    self.graph.add_op(TileOp(
                        key, "backward", "backward", tile.worker,
                        ops.backward_update_task if fused else ops.backward_task,
                        (tile.x, tile.y, dy, *refs), kwargs, layer.name, tile.x_region,
                        flops=flops))
                    if fused:  # updated in place by the backward op itself: no reduction
                        for j, (_, _, region) in enumerate(tile.params):
                            self.fused_values[refs[j].key] = Ref(key, (1, j),
                                                                  nbytes(region, self.itemsize))
                        continue
                    grads_key, grads_pick = key, (1,)
                for j, (_, pkey, region) in enumerate(tile.params):
                    ref = Ref(grads_key, (*grads_pick, j), nbytes(region, self.itemsize))
                    partials.setdefault((pkey, region), []).append((ref, tile.worker))
            grads = new_grads
        return partials

    def split_backward(self, layer, tile: _Tile) -> bool:
        """Whether this tile's backward pass runs as two ops, the input gradient first and the
        parameter gradients second.

        It does when the layer offers the two parts and some of the tile's parameter gradients
        are summed across workers (data parallel): the layers below then start on the input
        gradient at once, the lowest layers' weight gradients, which the next step needs first,
        leave sooner, and their transfer overlaps the parameter gradients still to compute.
        """
        if not hasattr(layer, "backward_params") or not tile.params:
            return False
        return any(len(self.replicas[(pkey, region)]) > 1 for _, pkey, region in tile.params)

    def fused_update(self, layer, tile: _Tile) -> bool:
        """Whether this tile's backward op can apply its own update, in place.

        It can when the layer offers ``backward_update``, the step trains with an optimizer that
        keeps no state, and each of the tile's weight regions is computed by this tile alone on
        one worker (nothing to reduce, no replica to keep in step): the weights of a spatially
        split locally connected layer, say. Then gradients are consumed as they are made and
        the step never holds a second copy of those weights.
        """
        if self.mode != "train" or not tile.params or not hasattr(layer, "backward_update"):
            return False
        if self.optimizer is None or self.optimizer.slots:
            return False
        return all(self.replicas[(pkey, region)] == {tile.worker}
                   and self.uses[(pkey, region)] == 1 for _, pkey, region in tile.params)

    def reduce_and_update(self, partials: dict) -> None:
        grads_out: dict[str, list] = {}
        new_values: dict[str, Ref] = {}
        slots = self.optimizer.slots if self.optimizer is not None else ()
        for (pkey, region), parts in sorted(partials.items()):
            size = nbytes(region, self.itemsize)
            name = f"{pkey}/grad/{_tag(region)}"
            if self.mode == "grad":
                total, root = tree_reduce(self.graph, name, parts, size)
                out = forward_value(self.graph, f"{name}/out", total, root, size)
                grads_out.setdefault(pkey, []).append((region, out))
                continue
            replicas = sorted(self.replicas[(pkey, region)])
            if self.sharded(region, parts, replicas):
                self.sharded_update(pkey, region, parts, replicas, name, new_values)
                continue
            sums = all_reduce(self.graph, name, parts, replicas, size)
            for worker in replicas:
                g = sums[worker]
                weight = self.param_ref(pkey, region, worker)
                state = tuple(self.state_ref(pkey, s, region, worker) for s in slots)
                key = f"{pkey}/update/{_tag(region)}/w{worker}"
                self.graph.add_op(TileOp(
                    key, "update", "update", worker, ops.update_task, (weight, g, *state),
                    dict(optimizer=self.optimizer, slots=slots, inplace=True),
                    pkey.split(".")[0],
                    shape_of(region), size, 4 * int(np.prod(shape_of(region)))))
                new_values[weight.key] = Ref(key, (0,), size)
                for k, s in enumerate(state):
                    new_values[s.key] = Ref(key, (1 + k,), size)
        self.outputs["grads"] = grads_out
        self.outputs["new_values"] = {**new_values, **self.fused_values}

    def sharded(self, region: Region, parts: list, replicas: list[int]) -> bool:
        """Whether the replicas of a weight tile update it sharded (:meth:`sharded_update`):
        it is at least :data:`SHARD_MIN_BYTES`, has a row for each of its (at most
        :data:`~rapydli.graph.comm.DIRECT_ALLREDUCE_MAX`) replicas, and its partial
        gradients are made on those replicas (data parallel)."""
        rows = region[0][1] - region[0][0]
        return (self.shard_updates and 1 < len(replicas) <= DIRECT_ALLREDUCE_MAX
                and rows >= len(replicas) and nbytes(region, self.itemsize) >= SHARD_MIN_BYTES
                and {w for _, w in parts} == set(replicas))

    def sharded_update(self, pkey: str, region: Region, parts: list, replicas: list[int],
                       name: str, new_values: dict) -> None:
        """Each replica sums and updates one block of rows of the weight tile and sends the
        others its updated rows (a reduce-scatter, then an all-gather).

        Against every replica summing whole gradients and updating the whole tile, each does
        1/n of the update's memory traffic, keeps the optimizer state of its rows only, and
        receives the same bytes (other replicas' rows of weights instead of whole gradients);
        the numbers are the same bits, row by row. Replicas on one machine go further and
        share one copy of the weights (see :func:`rapydli.graph.ops.place_task`).
        """
        slots = self.optimizer.slots
        shards = row_shards(region, len(replicas))
        sums = reduce_scatter(self.graph, name, parts, region, replicas, self.itemsize)
        top = region[0][0]
        rows = tuple((shard[0][0] - top, shard[0][1] - top) for shard in shards)
        updated = []
        for owner, shard, g, (start, stop) in zip(replicas, shards, sums, rows):
            size = nbytes(shard, self.itemsize)
            weight = self.param_ref(pkey, region, owner)
            view = f"{pkey}/rows/{_tag(shard)}/w{owner}"
            self.graph.add_op(TileOp(view, "slice", "update", owner, ops.rows_task, (weight,),
                                     dict(start=start, stop=stop), nbytes=size))
            state = tuple(self.state_ref(pkey, s, shard, owner) for s in slots)
            key = f"{pkey}/update/{_tag(shard)}/w{owner}"
            self.graph.add_op(TileOp(
                key, "update", "update", owner, ops.update_task,
                (Ref(view, (), size), g, *state),
                dict(optimizer=self.optimizer, slots=slots, inplace=True), pkey.split(".")[0],
                shape_of(shard), size, 4 * int(np.prod(shape_of(shard)))))
            for k, s in enumerate(state):
                new_values[s.key] = Ref(key, (1 + k,), size)
            updated.append((Ref(key, (0,), size), owner, size))
        for worker in replicas:
            weight = self.param_ref(pkey, region, worker)
            blocks = tuple(ref if owner == worker else forward_value(
                self.graph, f"{pkey}/rows/{_tag(shard)}/w{owner}to{worker}", ref, owner, size)
                for shard, (ref, owner, size) in zip(shards, updated))
            key = f"{pkey}/place/{_tag(region)}/w{worker}"
            size = nbytes(region, self.itemsize)
            self.graph.add_op(TileOp(
                key, "place", "update", worker, ops.place_task, (weight, *blocks),
                dict(rows=rows, first=worker == replicas[0]), pkey.split(".")[0],
                shape_of(region), size))
            new_values[weight.key] = Ref(key, (), size)

    def predictions(self, last_tiles: list[_Tile]) -> None:
        outs = []
        for t, tile in enumerate(last_tiles):
            size = nbytes(tile.region, self.itemsize)
            outs.append((tile.region, forward_value(self.graph, f"output/t{t}", tile.y,
                                                    tile.worker, size)))
        self.outputs["predictions"] = outs

    def run(self) -> TileGraph:
        self.outputs: dict = {}
        self.penalty_scalars: list[Ref] = []
        #: number of output tiles that compute with each (weight, region)
        self.uses: dict[tuple[str, Region], int] = {}
        #: weight placeholders updated inside backward ops -> the op output holding them
        self.fused_values: dict[str, Ref] = {}
        layers_tiles, sources = self.forward()
        if self.mode == "predict":
            self.predictions(layers_tiles[-1])
        if self.mode != "predict":
            grads = self.loss(layers_tiles[-1], sources)
        if self.mode in ("train", "grad"):
            self.reduce_and_update(self.backward(layers_tiles, grads))
        self.graph.graph.update(
            placeholders=self.placeholders, outputs=self.outputs,
            replicas={k: tuple(sorted(v)) for k, v in self.replicas.items()},
            meta=dict(mesh=self.placement.mesh, batch=self.batch, mode=self.mode,
                      dtype=self.dtype, n_workers=self.placement.mesh.size))
        return self.graph


def _tag(region: Region) -> str:
    return "x".join(f"{a}:{b}" for a, b in region)


def lower(network, placement, batch: int, mode: str = "train", optimizer=None,
          dtype="float32", shard_updates: bool = True) -> TileGraph:
    """Lower one step of ``network`` under ``placement`` for a batch of ``batch`` samples.

    ``mode``: ``"train"`` (forward, loss, backward, gradient reduction, update), ``"grad"``
    (up to reduced gradients), ``"eval"`` (forward and loss) or ``"predict"`` (forward).
    ``shard_updates``: replicated weight tiles update sharded across their replicas (see
    :meth:`_Lowering.sharded_update`); False: each replica updates its whole tile, one round
    of messages a step instead of two (what a graph exchange, where each round is Dask tasks,
    wants).
    """
    from rapydli.placement import single

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; received {mode!r}")
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ShapeError(f"batch: expected a positive int; received {batch!r}")
    if mode == "train" and optimizer is None:
        raise ValueError("mode='train' needs an optimizer")
    placement = placement or single()
    placement.check_layers([layer.name for layer in network.layers])
    return _Lowering(network, placement, int(batch), mode, optimizer, np.dtype(dtype),
                     shard_updates).run()
