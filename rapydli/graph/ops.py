"""``TileOp``, the one node type of a tile graph, and the pure functions tile ops run.

An op runs ``fn(*input values, **kwargs)`` on one worker. Its inputs are :class:`Ref` s to
other ops' outputs (``pick`` selects an item of a tuple output) or to *placeholders*, keys
starting with ``$`` that the engine binds per step (data, batch indices, resident weights).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np

from rapydli.kernels.backend import get_array_module, outputs_from
from rapydli.graph.tiles import Region, intersect, relative, shape_of

#: phases an op belongs to
PHASES = ("input", "forward", "backward", "update", "comm")


@dataclass(frozen=True)
class Ref:
    """Output ``pick`` (an index path, ``()`` for all) of op ``key``; ``nbytes`` travel with it."""

    key: str
    pick: tuple = ()
    nbytes: int = 0

    def __repr__(self):
        return f"Ref({self.key}{''.join(f'[{p}]' for p in self.pick)})"


@dataclass(frozen=True, eq=False)
class TileOp:
    """One node of a tile graph: a pure function of its inputs, pinned to a mesh worker."""

    key: str
    kind: str
    phase: str
    worker: int | None
    fn: Callable | None
    inputs: tuple[Ref, ...] = ()
    kwargs: dict = field(default_factory=dict)
    layer: str | None = None
    shape: tuple[int, ...] = ()
    nbytes: int = 0
    flops: int = 0

    def __post_init__(self):
        assert self.phase in PHASES, self.phase

    def __repr__(self):
        return f"TileOp({self.key!r}, {self.kind}, worker={self.worker})"


def pick(value, path: tuple):
    for item in path:
        value = value[item]
    return value


#: byte alignment that NumPy's own allocations have and that matrix products need for speed
ALIGNMENT = 16


def aligned(value):
    """``value``, copied to fresh memory when it is a NumPy array whose data is not aligned.

    Arrays that arrive over Dask's comms are views into the received frames, at any byte
    offset; a float32 matrix product on such an array runs 1.5-3x slower (measured on the MLP's
    weights in a worker). Aligned arrays and other values pass through untouched, so updates
    in place still reach the arrays that hold them.
    """
    if isinstance(value, np.ndarray) and value.ctypes.data % ALIGNMENT:
        return value.copy()
    return value


# --- functions the ops run; pure functions of arrays ------------------------------------------


def load_region(data, index, *, region: Region, dtype, worker: int | None = None):
    """The batch rows ``index[batch range]`` of ``data``, cut to ``region`` with zero padding.

    ``index`` is one row of sample numbers shared by every worker, ``(batch,)``, or one row per
    mesh worker, ``(n_workers, batch)``, when each worker holds different data (shards it read
    itself) and numbers its samples its own way.
    """
    b0, b1 = region[0]
    if index.ndim == 2:
        index = index[worker]  # (batch,): this worker's numbering
    rows = data[index[b0:b1]]  # (n, *sample shape)
    held = ((b0, b1), *((0, n) for n in rows.shape[1:]))
    piece = intersect(region, held)
    out = assemble(region, [(piece, rows, held)] if piece else [], dtype, like=rows)
    return out.astype(dtype, copy=False)


def assemble(region: Region, pieces, dtype, add: bool = False, like=None):
    """An array for ``region`` built from ``(piece region, value, value region)`` triples.

    ``value region`` is the region ``value`` holds (``None``: exactly the piece). Cells no piece
    covers are zero (padding); with ``add`` the pieces are summed where they overlap.
    """
    if len(pieces) == 1 and not add:
        piece_region, value, held = pieces[0]
        if piece_region == region and (held is None or held == region):
            return value
    xp = get_array_module(pieces[0][1] if pieces else like)  # NumPy or CuPy, as the data is
    out = xp.zeros(shape_of(region), dtype=dtype)
    for piece_region, value, held in pieces:
        if held is not None:
            value = value[relative(piece_region, held)]
        target = relative(piece_region, region)
        if add:
            out[target] += value
        else:
            out[target] = value
    return out


def assemble_task(*values, region, piece_regions, held_regions, dtype, add=False):
    return assemble(region, list(zip(piece_regions, values, held_regions)), dtype, add=add)


def slice_task(value, *, piece: Region, held: Region):
    """The part ``piece`` of a value that holds ``held``: what one worker sends another."""
    return get_array_module(value).ascontiguousarray(value[relative(piece, held)])


def rows_task(value, *, start: int, stop: int):
    """Rows ``start:stop`` of ``value``, a view: an update through it writes into ``value``."""
    return value[start:stop]


def place_task(weight, *shards, rows: tuple[tuple[int, int], ...], first: bool = False):
    """``weight`` with row block ``rows[i]`` set to ``shards[i]`` (each replica's updated rows
    of a sharded update), in place; a block already there (the same memory) is left alone.

    Where the running task posts through shared memory, the replicas of a weight on one
    machine come to share one copy of it: the ``first`` replica moves its copy into shared
    memory (:meth:`~rapydli.scheduler.mailbox.Exchange.keep`) and returns that, so the rows
    it posts from then on are handles into it; a replica that receives such a block adopts
    that copy (:meth:`~rapydli.scheduler.mailbox.Exchange.whole`), writing its own rows into
    it. From then on each replica updates its rows where all of them read, and no block is
    copied. Nothing races: a replica writes its rows of the next step only once every other
    replica's gradient of that step has come, that is once they all read the weight for the
    last time in it; and adopting writes rows that hold the same bits.
    """
    exchange = getattr(_posting, "exchange", None)
    share = exchange is not None and isinstance(weight, np.ndarray)
    if share and not first and not exchange.kept(weight):
        for (start, stop), shard in zip(rows, shards):
            common = exchange.whole(shard, weight.shape, weight.dtype)
            if common is not None and _same_memory(common[start:stop], shard):
                weight = common
                break
    for (start, stop), shard in zip(rows, shards):
        block = weight[start:stop]
        if not _same_memory(block, shard):
            block[...] = shard
    if share and first and not exchange.kept(weight):
        kept = exchange.keep(weight)
        if kept is not None:
            weight = kept
    return weight


def _same_memory(a, b) -> bool:
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and _address(a) == _address(b))


def _address(array) -> int:
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return interface["data"][0]


def identity_task(value):
    return value


def sum_task(*values):
    out = values[0] + values[1] if len(values) > 1 else values[0].copy()
    for v in values[2:]:
        out += v
    return out


def metrics_task(*values):
    """``(loss, n_correct)`` summed over ``(loss, n_correct)`` pairs of every batch tile."""
    return float(sum(v[0] for v in values)), int(sum(v[1] for v in values))


def steps_metrics_task(*values, per_step: int):
    """Per-step ``(loss, n_correct)`` of an unrolled graph, ``per_step`` tiles a step."""
    return [metrics_task(*values[i:i + per_step]) for i in range(0, len(values), per_step)]


def scalars_task(value):
    """The ``(loss, n_correct)`` of a loss tile's output, without its gradient."""
    return value[0], value[2]


def forward_task(x, *params, layer, names: tuple[str, ...]):
    return layer.forward(x, dict(zip(names, params)))


def backward_task(x, y, dy, *params, layer, names: tuple[str, ...], need_dx: bool,
                  posted: bool = False):
    """``(dx, (dparam, ...))`` with the parameter gradients in the order of ``names``;
    ``posted``: they go to sums on other workers (as :func:`backward_params_task`'s do)."""
    with _posting_outputs(layer, posted):
        dx, grads = layer.backward(x, y, dict(zip(names, params)), dy, need_dx)
    return dx, tuple(grads[n] for n in names)


def _posting_outputs(layer, posted: bool):
    """Where the running task posts through shared memory, the kernels of a layer that can
    (``Layer.gradients_in_place``, what the simulator reads too) write its gradients there as
    they compute them (``posted``: the op's gradients are posted), so that posting them
    copies nothing (see :meth:`rapydli.scheduler.mailbox.Exchange.allocate`)."""
    exchange = getattr(_posting, "exchange", None)
    return outputs_from(exchange.allocate if exchange is not None and posted
                        and layer.gradients_in_place else None)


def backward_input_task(x, y, dy, *params, layer, names: tuple[str, ...]):
    """``(dx, carry)``: the first part of a layer's backward pass, what the layers below wait
    for; ``carry`` is what :func:`backward_params_task` needs of it (see
    :meth:`rapydli.graph.lower._Lowering.split_backward`)."""
    return layer.backward_input(x, y, dict(zip(names, params)), dy)


def backward_params_task(x, carry, *params, layer, names: tuple[str, ...]):
    """``(dparam, ...)`` in the order of ``names``: the second part of a split backward pass.
    Its gradients go to sums on other workers (see :func:`_posting_outputs`)."""
    with _posting_outputs(layer, True):
        grads = layer.backward_params(x, carry, dict(zip(names, params)))
    return tuple(grads[n] for n in names)


def backward_update_task(x, y, dy, *params, layer, names: tuple[str, ...], need_dx: bool,
                         optimizer):
    """``(dx, (new param, ...))``: the layer's gradients applied to its parameters in place as
    they are computed, so no gradient the size of the weights ever exists (see
    :meth:`rapydli.graph.lower._Lowering.fused_update`)."""
    dx, new = layer.backward_update(x, y, dict(zip(names, params)), dy, need_dx, optimizer)
    return dx, tuple(new[n] for n in names)


def loss_task(pred, target, *, loss, scale: float, backward: bool = True):
    """``(loss, dpred or None, n_correct)`` for one batch tile."""
    value, dpred, n_correct = loss(pred, target, scale)
    return float(value), (dpred if backward else None), int(n_correct)


def penalty_stats_task(y, *, layer):
    """A penalty's statistics of one output tile, summed over its batch rows."""
    return layer.penalty_stats(y)


def penalty_task(y, stats, *, layer, batch: int, backward: bool = True):
    """``(value, dy_extra or None, 0)`` of a layer's penalty, from whole-batch ``stats``."""
    value, dy_extra = layer.penalty(y, stats, batch)
    return float(value), (dy_extra if backward else None), 0


def update_task(weight, grad, *state, optimizer, slots: tuple[str, ...], inplace: bool = False):
    """``(new weight, new slot, ...)`` for one resident weight tile; with ``inplace`` the
    weight and state arrays are updated where they are (no op reads them afterwards)."""
    new_weight, new_state = optimizer.update(weight, grad, dict(zip(slots, state)),
                                             inplace=inplace)
    return (new_weight, *(new_state[s] for s in slots))


def sum_update_task(weight, *values, optimizer, slots: tuple[str, ...], inplace: bool = False,
                    grads: int = 2):
    """:func:`update_task` of the sum of the first ``grads`` of ``values`` (the rest are the
    state slots), with the bits of :func:`sum_task` then :func:`update_task`: the task
    builder fuses a gradient sum into the update that alone reads it, so that the optimizer
    adds the last two gradients as it reads them instead of writing their sum out."""
    tiles, state = values[:grads], values[grads:]
    first = tiles[0] if grads == 2 else sum_task(*tiles[:-1])
    new_weight, new_state = optimizer.update(weight, first, dict(zip(slots, state)),
                                             inplace=inplace, grad_add=tiles[-1])
    return (new_weight, *(new_state[s] for s in slots))


#: per thread: the running task's :class:`~rapydli.scheduler.mailbox.Exchange` (or None), for
#: the ops that take memory from it (:func:`_posting_outputs`, :func:`place_task`)
_posting = threading.local()


def run_fused(program: tuple, keep: tuple, *values, exchange=None, drops=None) -> dict:
    """Run a fused chain of ops in order; returns the outputs in ``keep``, by key.

    ``program`` is a tuple of ``(key, fn, input slots, kwargs, post)``; an input slot is
    ``(i, pick)`` for the ``i``-th external value, ``(key, pick)`` for an earlier op or
    ``(("mail", key), pick)`` for an op of another worker that posts its output here;
    ``post`` is ``()`` or ``(mesh workers this op's output is posted to, whether only sums
    read it)``; posts of consecutive ops leave together, and those only sums read may wait
    for the task's next take (see :meth:`rapydli.scheduler.mailbox.Exchange.flush`). Mail
    goes through ``exchange`` (:class:`rapydli.scheduler.mailbox.Exchange`). ``drops``:
    ``drop_plan(program, keep)``, where the caller has it already (a plan's tasks do).
    While it runs, ops that make tiles to post or share may take their memory from the
    exchange (``_posting.exchange``; :func:`backward_params_task` and :func:`place_task` do).
    """
    _posting.exchange = exchange
    try:
        return _run(program, keep, values, exchange, drop_plan(program, keep) if drops is None
                    else drops)
    finally:
        _posting.exchange = None


def _run(program: tuple, keep: tuple, values: tuple, exchange, drops: tuple) -> dict:
    env: dict[Any, Any] = dict(enumerate(values))
    seconds = _OP_SECONDS
    for i, (key, fn, slots, kwargs, post) in enumerate(program):
        if exchange is not None and not post:  # tiles posted by the ops just run leave now
            exchange.flush(urgent_only=True)
        args = []
        for src, path in slots:
            if type(src) is tuple and src not in env:  # the first read of a posted tile
                env[src] = exchange.take(src[1])
            args.append(pick(env[src], path))
        if seconds is None:
            env[key] = fn(*args, **kwargs)
        else:
            start = time.perf_counter()
            env[key] = fn(*args, **kwargs)
            seconds[fn.__name__] = seconds.get(fn.__name__, 0.0) + time.perf_counter() - start
        if post:
            exchange.post(key, env[key], *post)
        for done in drops[i]:  # read for the last time: an unrolled task holds one step's tiles
            del env[done]
    if exchange is not None:
        exchange.finish()
    return {k: env[k] for k in keep}


def drop_plan(program: tuple, keep: tuple) -> tuple[tuple, ...]:
    """For each op of ``program``, the values :func:`run_fused` no longer needs once it ran:
    the inputs it was the last to read and its own output when nothing reads it, except what
    ``keep`` returns. Without this, an unrolled task of k steps held all k steps' activations
    and gradients until it ended."""
    last: dict[Any, int] = {}
    for i, (key, _, slots, _, _) in enumerate(program):
        last.setdefault(key, i)  # an output nothing reads goes right after its op
        for src, _ in slots:
            last[src] = i
    kept = set(keep)
    drops: list[list] = [[] for _ in program]
    for src, i in last.items():
        if src not in kept:
            drops[i].append(src)
    return tuple(map(tuple, drops))


#: seconds per op function added up by :func:`run_fused` while :func:`time_ops` is on
_OP_SECONDS: dict[str, float] | None = None


def time_ops(on: bool = True) -> dict[str, float]:
    """Start (``on``) or stop adding up, in this process, the seconds each op function of the
    tasks run here takes; returns the sums since the last call and starts afresh.

    What a step spends outside these calls is the runtime's: scheduling, transfers, Python
    glue. Run it on workers with ``client.run(time_ops)`` (``benchmarks/overhead.py``).
    """
    global _OP_SECONDS
    sums, _OP_SECONDS = _OP_SECONDS or {}, ({} if on else None)
    return sums
