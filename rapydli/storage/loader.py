"""Feeding steps: in-memory arrays, or a sharded store read by the workers that own its shards.

A *source* gives the engine its data and, for each epoch, the steps to run as
``(dataset name, index)`` pairs. The order of an epoch is a pure function of ``(seed, epoch)``
(:func:`epoch_rng`), so a run resumed at step ``k`` of epoch ``e`` sees the same batches as one
that never stopped.

:class:`StoreSource` is the sharded path. The placement's plan says which batch rows each mesh
worker reads; workers reading the same rows form a *data group* (one per coordinate of the
``data`` axis). :func:`~rapydli.storage.policies.distribute` gives each group its shards, and each
shard is read by a Dask task pinned to a worker of its group (:func:`read_shard`): records go
from the store to that worker, never through the client. The client sees only counts and the
keys of skipped records. Shards are read ``prefetch`` ahead while earlier steps compute; a
*window* task on each worker then gathers ``window`` steps' rows from the shards it needs (Dask
moves them between workers when a group spans several), and steps index that window with one
row of sample numbers per worker. The store is re-opened at every epoch, so records appended
while a run trains are picked up at the next epoch boundary.
"""
from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from rapydli.errors import DataError
from rapydli.graph.to_dask import Bound
from rapydli.storage.datasets import batches
from rapydli.storage.policies import Subset, distribute

#: steps gathered into one window task per worker
WINDOW_STEPS = 32
#: shards per data group read ahead of the one being consumed
PREFETCH = 2


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that orders epoch ``epoch`` (counted from 1) of a run seeded ``seed``."""
    return np.random.default_rng([int(seed), int(epoch)])


class ArraySource:
    """Arrays held by the client, placed once on every worker; batches shuffled per epoch."""

    def __init__(self, x, y=None, name: str = "train"):
        self.x, self.y, self.name = x, y, name
        self.report = None  # nothing is skipped: arrays are validated whole

    def __len__(self) -> int:
        return len(self.x)

    def attach(self, engine) -> None:
        engine.set_data(self.name, self.x, self.y)

    def epoch(self, engine, epoch: int, batch_size: int, seed: int,
              position: dict | None = None) -> Iterator[tuple[str, np.ndarray]]:
        for index in batches(len(self.x), batch_size, epoch_rng(seed, epoch)):
            yield self.name, index

    def position(self) -> dict:
        return {}


class ShardRows(NamedTuple):
    """A shard's records a run uses, as held on the worker that read it."""

    x: np.ndarray  #: (n, *record shape)
    y: np.ndarray  #: (n,) int64
    keys: tuple
    skipped: tuple  #: (key, reason) of unusable records, whatever the subset
    n_read: int  #: records attempted


def read_shard(url: str, shard: str, storage_options, subset: Subset | None,
               offset: int) -> ShardRows:
    """Runs on the worker that owns ``shard``: its usable records, filtered by ``subset``."""
    from rapydli.storage import records  # back ends load only where shards are read

    data = records.load_shard(url, shard, storage_options)
    if subset is None or subset.everything:
        return ShardRows(data.x, data.y, data.keys, data.skipped, data.n_read)
    keep = subset.keep(data.keys, data.y, offset)
    return ShardRows(np.ascontiguousarray(data.x[keep]), data.y[keep],
                     tuple(k for k, m in zip(data.keys, keep) if m), data.skipped, data.n_read)


def shard_summary(data) -> tuple[int, tuple, int]:
    """What the client learns of a shard read on a worker: counts and skipped keys only."""
    return len(data.y), data.skipped, data.n_read


def gather_window(layout: list[tuple[int, list]], *shards):
    """Rows of one window for one worker: for each group it reads, its ``(shard, positions)``
    pieces in step order. ``layout`` refers to ``shards`` by position."""
    xs, ys = [], []
    for _, pieces in layout:
        for i, positions in pieces:
            xs.append(shards[i].x[positions])  # (rows, *sample shape)
            ys.append(shards[i].y[positions])
    return np.concatenate(xs), np.concatenate(ys)


@dataclass
class _Stream:
    """One data group's records for an epoch: shards in shuffled order, rows shuffled within."""

    shards: list[int]  #: store shard indices still to read, in epoch order
    reading: collections.deque = field(default_factory=collections.deque)  #: (shard, future)
    rows: list = field(default_factory=list)  #: [(shard future, permuted positions)]
    n_rows: int = 0
    n_started: int = 0  #: shards whose read has been started

    def take(self, n: int) -> list[tuple[object, np.ndarray]]:
        """The next ``n`` rows as ``(shard future, positions)`` pieces."""
        pieces = []
        while n:
            future, positions = self.rows[0]
            used = positions[:n]
            pieces.append((future, used))
            if len(used) == len(positions):
                self.rows.pop(0)
            else:
                self.rows[0] = (future, positions[len(used):])
            n -= len(used)
            self.n_rows -= len(used)
        return pieces


class StoreSource:
    """Training data in a sharded store, read on the workers (see the module docstring).

    Parameters
    ----------
    url : str
        A store :func:`rapydli.storage.records.open_store` opens (local path or fsspec URL).
    storage_options : dict, optional
        fsspec options (credentials, endpoint) for object stores.
    subset : Subset, optional
        Which records to use, e.g. one side of :meth:`Subset.split`.
    distribution : str
        Shards -> data groups: ``round_robin``, ``contiguous`` or ``balanced``.
    threshold : float
        Largest share of unusable records tolerated before the run stops (default 1%).
    window, prefetch : int
        Steps per window task; shards read ahead per group.
    """

    def __init__(self, url: str, *, storage_options=None, subset: Subset | None = None,
                 distribution: str = "round_robin", threshold: float = 0.01,
                 window: int = WINDOW_STEPS, prefetch: int = PREFETCH, name: str = "train"):
        from rapydli.storage import records
        from rapydli.storage.quality import QualityReport

        self._records = records
        self.url, self.storage_options, self.subset = str(url), storage_options, subset
        self.distribution, self.threshold = distribution, threshold
        self.window, self.prefetch, self.name = max(1, int(window)), max(1, int(prefetch)), name
        self.store = records.open_store(self.url, storage_options)
        #: skipped records of every shard read so far
        self.report = QualityReport()
        #: per shard name: the worker (mesh index) that read it last
        self.readers: dict[str, int] = {}
        self._shards: tuple[str, ...] = ()
        self._epoch = self._step = 0
        self._bound: collections.deque = collections.deque()  #: windows bound, oldest first
        #: reads of the next epoch's first shards, started early: (shard, worker) -> future
        self._stash: dict[tuple[str, int], object] = {}

    def __len__(self) -> int:
        return len(self.store)

    def _check(self) -> None:
        from rapydli.storage.quality import check_threshold

        check_threshold(self.report, self.threshold)

    def attach(self, engine) -> None:
        """Nothing to place up front: each epoch's shards are read when it runs."""

    def position(self) -> dict:
        """Where the run is in the data: epoch, steps done in it, the shards it covers."""
        return {"epoch": self._epoch, "epoch_step": self._step, "shards": list(self._shards)}

    # --- an epoch ----------------------------------------------------------------------------

    def epoch(self, engine, epoch: int, batch_size: int, seed: int,
              position: dict | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """The steps of epoch ``epoch``: ``(dataset name, index (n_workers, batch))`` pairs.

        ``position`` (from a checkpoint of this epoch) fixes the shards the epoch covers, so a
        resumed epoch sees the store as it was, even if records were appended since.
        """
        names, counts, offsets = self._open(epoch, position)
        groups, needs, owners = _layout(engine, batch_size)
        sizes = [b - a for a, b in groups]
        rng = epoch_rng(seed, epoch)
        streams = [_Stream(order) for order in self._orders(names, counts, len(groups), rng)]
        empty = [g for g, s in enumerate(streams) if not s.shards]
        if empty and names:
            raise DataError(f"store {self.url!r}: {len(names)} shard(s) for {len(groups)} data "
                            f"groups of the placement; groups {empty} would read nothing. "
                            f"Re-import with at least {len(groups)} shards (rapydli data import "
                            "--shards N) or use a smaller data axis")
        k, ahead = 0, False
        while True:
            steps = 1 if k == 0 else self.window  # the first window starts after one step's rows
            for g, stream in enumerate(streams):
                self._fill(engine, stream, owners[g], steps * sizes[g], offsets, rng)
            if k == 0:
                self._stash.clear()  # reads made ahead that this epoch did not want
            if not ahead and not any(s.shards for s in streams):  # all read: start the next epoch's
                self._read_ahead(engine, names, counts, owners, offsets, seed, epoch + 1)
                ahead = True
            n_steps = min(self.window, *(s.n_rows // size for s, size in zip(streams, sizes)))
            if n_steps == 0:
                if len(groups) == 1 and streams[0].n_rows:  # one group: a last, smaller batch
                    yield from self._last_batch(engine, streams[0], k)
                break
            name = f"{self.name}:{epoch}:{k}"
            self._bind_window(engine, name, [s.take(n_steps * size) for s, size in
                                             zip(streams, sizes)], needs)
            for t in range(n_steps):
                self._step += 1
                yield name, _window_index(groups, needs, sizes, n_steps, t, batch_size)
            k += 1

    def _open(self, epoch: int, position: dict | None):
        """Re-open the store (appended shards join now); the shards, counts and record offsets
        this epoch covers."""
        self.store = self._records.open_store(self.url, self.storage_options)
        names = list(self.store.shards)
        if position and position.get("epoch") == epoch and position.get("shards"):
            names = [n for n in position["shards"] if n in set(self.store.shards)]
        self._shards, self._epoch, self._step = tuple(names), epoch, 0
        counts = dict(zip(self.store.shards, self.store.counts))
        offsets = dict(zip(self.store.shards, np.cumsum([0, *self.store.counts[:-1]]).tolist()))
        return names, counts, offsets

    def _orders(self, names, counts, n_groups: int, rng) -> list[list[str]]:
        """Per data group, its shards in this epoch's order."""
        groups = distribute([counts[n] for n in names], n_groups, self.distribution)
        return [[names[i] for i in rng.permutation(shards)] if shards else [] for shards in groups]

    def _read_ahead(self, engine, names, counts, owners, offsets, seed: int, epoch: int):
        """Start reading the first shards of epoch ``epoch`` now, on the workers that will want
        them, so its first steps do not wait (used if the store is unchanged by then)."""
        orders = self._orders(names, counts, len(owners), epoch_rng(seed, epoch))
        for g, order in enumerate(orders):
            for j, name in enumerate(order[:self.prefetch]):
                worker = owners[g][j % len(owners[g])]
                self._stash[(name, worker)] = _submit(engine, worker, read_shard, self.url,
                                                      name, self.storage_options, self.subset,
                                                      offsets[name])

    def _last_batch(self, engine, stream: _Stream, k: int):
        n = stream.n_rows
        _, needs, _ = _layout(engine, n)
        name = f"{self.name}:{self._epoch}:{k}"
        self._bind_window(engine, name, [stream.take(n)], [[0] if w else [] for w in needs])
        self._step += 1
        yield name, np.tile(np.arange(n, dtype=np.int64), (len(needs), 1))

    def _fill(self, engine, stream: _Stream, owners: list[int], wanted: int, offsets, rng):
        """Read shards until the stream holds ``wanted`` rows or runs dry; keep reads ahead."""
        while stream.shards and len(stream.reading) < self.prefetch:
            name = stream.shards.pop(0)
            worker = owners[stream.n_started % len(owners)]  # a group's reads dealt in turn
            stream.n_started += 1
            self.readers[name] = worker
            future = self._stash.pop((name, worker), None)
            if future is None:
                future = _submit(engine, worker, read_shard, self.url, name,
                                 self.storage_options, self.subset, offsets[name])
            # asked for now, so its answer is on its way while earlier steps compute
            summary = _submit(engine, worker, shard_summary, future)
            stream.reading.append((name, future, summary))
        while stream.n_rows < wanted and stream.reading:
            name, future, summary = stream.reading.popleft()
            n, skipped, n_read = _result(summary)
            self.report.add(self.url, name, _Counts(n_read, skipped))
            self._check()
            if n:
                stream.rows.append((future, rng.permutation(n)))
                stream.n_rows += n
            if stream.shards:
                self._fill(engine, stream, owners, 0, offsets, rng)  # keep `prefetch` in flight

    def _bind_window(self, engine, name: str, pieces: list[list], needs: list[list[int]]):
        # a caller may still hold steps of the previous window: forget only the one before it
        self._bound.append(name)
        while len(self._bound) > 2:
            engine.drop_data(self._bound.popleft())
        per_worker = {}
        for w, wanted in enumerate(needs):
            futures, layout = [], []
            for g in wanted:
                refs = []
                for future, positions in pieces[g]:
                    futures.append(future)
                    refs.append((len(futures) - 1, positions))
                layout.append((g, refs))
            if not layout:  # this worker's step reads no rows
                per_worker[w] = (Bound(np.zeros((0,))), Bound(np.zeros((0,), np.int64)))
                continue
            window = _submit(engine, w, gather_window, layout, *futures)
            if engine.client is None:  # in-process: the arrays themselves
                per_worker[w] = (Bound(window[0]), Bound(window[1]))
            else:  # one task holds (x, y) on that worker
                per_worker[w] = (Bound(window, (0,)), Bound(window, (1,)))
        engine.bind_data(name, per_worker)

    # --- a whole (test) set on every worker -------------------------------------------------

    def materialize(self, engine, name: str) -> int:
        """Read every shard (spread over the workers) and place all usable records on every
        worker as dataset ``name``, for evaluation; returns the record count."""
        self.store = self._records.open_store(self.url, self.storage_options)
        offsets = np.cumsum([0, *self.store.counts[:-1]]).tolist()
        reads = []
        for i, shard in enumerate(self.store.shards):
            worker = i % len(engine.workers)
            self.readers[shard] = worker
            future = _submit(engine, worker, read_shard, self.url, shard, self.storage_options,
                             self.subset, offsets[i])
            n, skipped, n_read = _result(_submit(engine, worker, shard_summary, future))
            self.report.add(self.url, shard, _Counts(n_read, skipped))
            if n:
                reads.append((future, np.arange(n)))
        self._check()
        if not reads:
            raise DataError(f"store {self.url!r}: no usable records for {name!r}; check the "
                            "subset (ranges, fraction, labels) and the store's contents")
        self._bind_window(engine, name, [reads], [[0]] * len(engine.workers))
        return sum(len(p) for _, p in reads)


def _window_index(groups, needs, sizes, n_steps: int, t: int, batch: int) -> np.ndarray:
    """Index ``(n_workers, batch)`` of step ``t`` of a window: each worker numbers the rows of
    the groups it reads, group after group, ``n_steps * size`` rows each."""
    index = np.zeros((len(needs), batch), np.int64)
    for w, wanted in enumerate(needs):
        offset = 0
        for g in wanted:
            a, b = groups[g]
            index[w, a:b] = offset + t * sizes[g] + np.arange(b - a)
            offset += n_steps * sizes[g]
    return index


class _Counts(NamedTuple):
    """What :class:`QualityReport` needs of a shard read on a worker."""

    n_read: int
    skipped: tuple


def _layout(engine, batch: int):
    """Data groups for a batch: ``groups`` (row ranges partitioning the batch), ``needs`` (per
    worker, the groups whose rows its step reads) and ``owners`` (per group, who reads its
    shards: the workers that read only that group's rows, else all that read it)."""
    ranges = engine.batch_ranges(batch)
    cuts = sorted({c for rs in ranges for r in rs for c in r} | {0, batch})
    groups = list(itertools.pairwise(cuts))
    needs = [[g for g, (a, b) in enumerate(groups) if any(r0 <= a and b <= r1 for r0, r1 in rs)]
             for rs in ranges]
    owners = []
    for g in range(len(groups)):
        only = [w for w, wanted in enumerate(needs) if wanted == [g]]
        owners.append(only or [w for w, wanted in enumerate(needs) if g in wanted] or [0])
    return groups, needs, owners


def _submit(engine, worker: int, fn, *args):
    """``fn(*args)`` on mesh worker ``worker``: a Dask task pinned there, or a call in-process."""
    if engine.client is None:
        return fn(*args)
    return engine.client.submit(fn, *args, workers=[engine.workers[worker]], pure=False,
                                allow_other_workers=False)


def _result(value):
    return value.result() if hasattr(value, "result") and hasattr(value, "key") else value
