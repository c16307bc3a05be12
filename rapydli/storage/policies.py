"""Data policies: which records a run uses, how records fall into shards, which worker reads which.

Three independent choices, each a pure function of keys, labels and sizes (no I/O), so each can be
checked on its own and replayed exactly:

- **subset** (:class:`Subset`): index ranges, a seeded fraction, a label filter;
- **partition** (:func:`partition`): records -> shards, ``contiguous``, ``round_robin`` or ``hash``
  of the record key (stable across runs and machines, unlike Python's ``hash``);
- **distribution** (:func:`distribute`): shards -> data groups (one group per coordinate of the
  mesh's ``data`` axis; every worker of a group reads that group's shards, on that worker).

>>> partition(["a", "b", "c", "d", "e"], 2, "contiguous")
[[0, 1], [2, 3, 4]]
>>> partition(["a", "b", "c", "d", "e"], 2, "round_robin")
[[0, 2, 4], [1, 3]]
>>> distribute([10, 10, 10, 10, 10], 2, "round_robin")
[[0, 2, 4], [1, 3]]
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rapydli.errors import ConfigError

PARTITIONS = ("contiguous", "round_robin", "hash")
DISTRIBUTIONS = ("round_robin", "contiguous", "balanced")


def _check_count(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{where}: expected a positive int; received {value!r}")


def _check_kind(kind: str, legal: tuple[str, ...], where: str) -> None:
    if kind not in legal:
        raise ConfigError(f"{where}: unknown policy {kind!r}; expected one of "
                          f"{', '.join(map(repr, legal))}")


def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process and on every machine.

    >>> stable_hash("record-1") == stable_hash("record-1")
    True
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def partition(keys: Sequence[str], n_shards: int, kind: str = "contiguous") -> list[list[int]]:
    """Record indices of each of ``n_shards`` shards.

    ``contiguous`` cuts the key order into runs whose sizes differ by at most one;
    ``round_robin`` deals records out in turn; ``hash`` puts a record in shard
    ``stable_hash(key) % n_shards``, so a record keeps its shard when others are added.
    Every index appears in exactly one shard; shards may be empty only under ``hash`` or
    when there are fewer records than shards.

    >>> partition(["x", "y", "z"], 3, "hash") == partition(["x", "y", "z"], 3, "hash")
    True
    """
    _check_count(n_shards, "partition: n_shards")
    _check_kind(kind, PARTITIONS, "partition")
    n = len(keys)
    if kind == "contiguous":
        bounds = [n * i // n_shards for i in range(n_shards + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(n_shards)]
    if kind == "round_robin":
        return [list(range(i, n, n_shards)) for i in range(n_shards)]
    shards: list[list[int]] = [[] for _ in range(n_shards)]
    for i, key in enumerate(keys):
        shards[stable_hash(str(key)) % n_shards].append(i)
    return shards


def distribute(shard_sizes: Sequence[int], n_groups: int,
               kind: str = "round_robin") -> list[list[int]]:
    """Shard indices each of ``n_groups`` data groups reads.

    ``round_robin`` deals shards out in turn; ``contiguous`` gives each group a run of shards;
    ``balanced`` gives the next largest shard to the group with the fewest records so far
    (ties to the lower group), which evens out record counts when shard sizes differ.
    Every shard is read by exactly one group.

    >>> distribute([5, 1, 1, 1], 2, "balanced")
    [[0], [1, 2, 3]]
    """
    _check_count(n_groups, "distribute: n_groups")
    _check_kind(kind, DISTRIBUTIONS, "distribute")
    n = len(shard_sizes)
    if kind == "round_robin":
        return [list(range(g, n, n_groups)) for g in range(n_groups)]
    if kind == "contiguous":
        bounds = [n * g // n_groups for g in range(n_groups + 1)]
        return [list(range(bounds[g], bounds[g + 1])) for g in range(n_groups)]
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    totals = [0] * n_groups
    for shard in sorted(range(n), key=lambda s: (-shard_sizes[s], s)):
        g = min(range(n_groups), key=lambda i: (totals[i], i))
        groups[g].append(shard)
        totals[g] += shard_sizes[shard]
    return [sorted(g) for g in groups]


@dataclass(frozen=True)
class Subset:
    """Which records of a store a run uses; applied per shard, so workers filter what they read.

    Parameters
    ----------
    ranges : tuple of (start, stop) pairs, optional
        Global record positions (store order: shard by shard) to keep; ``None`` keeps all.
    fraction : float or (low, high), optional
        Keep each record with this probability, decided by a hash of ``(seed, key)`` mapped to
        ``[0, 1)``, so the choice is the same on every worker and stable when records are
        appended; a pair keeps the records whose draw lies in ``[low, high)`` (how
        :meth:`split` makes disjoint train and test subsets).
    labels : tuple of int, optional
        Keep only records with these labels.
    seed : int
        Seeds ``fraction``.

    >>> s = Subset(ranges=((0, 2),), labels=(1,))
    >>> s.keep(["a", "b", "c"], np.array([1, 0, 1]), offset=0).tolist()
    [True, False, False]
    """

    ranges: tuple[tuple[int, int], ...] | None = None
    fraction: float | tuple[float, float] | None = None
    labels: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.ranges is not None:
            object.__setattr__(self, "ranges", tuple((int(a), int(b)) for a, b in self.ranges))
            for start, stop in self.ranges:
                if not 0 <= start <= stop:
                    raise ConfigError(f"subset.ranges: expected 0 <= start <= stop; received "
                                      f"({start}, {stop})")
        if self.fraction is not None:
            band = self.band
            if not (0 <= band[0] < band[1] <= 1):
                raise ConfigError(f"subset.fraction: expected a number in (0, 1] or a pair "
                                  f"0 <= low < high <= 1; received {self.fraction!r}")
        if isinstance(self.fraction, list):
            object.__setattr__(self, "fraction", tuple(self.fraction))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))

    @classmethod
    def split(cls, test_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
        """Disjoint train and test subsets by hash of key: a record stays on its side of the
        split when others are appended.

        >>> train, test = Subset.split(0.25, seed=1)
        >>> keys = [f"k{i}" for i in range(400)]
        >>> a, b = train.keep(keys, np.zeros(400), 0), test.keep(keys, np.zeros(400), 0)
        >>> bool(np.all(a ^ b)), 60 < int(b.sum()) < 140
        (True, True)
        """
        return cls(fraction=(test_fraction, 1.0), seed=seed), cls(fraction=(0.0, test_fraction),
                                                                  seed=seed)

    @property
    def band(self) -> tuple[float, float]:
        """The ``[low, high)`` range of hash draws kept."""
        if self.fraction is None:
            return (0.0, 1.0)
        if isinstance(self.fraction, (tuple, list)):
            return (float(self.fraction[0]), float(self.fraction[1]))
        return (0.0, float(self.fraction))

    @property
    def everything(self) -> bool:
        return self.ranges is None and self.fraction is None and self.labels is None

    def keep(self, keys: Sequence[str], labels: np.ndarray, offset: int) -> np.ndarray:
        """Boolean mask over records ``keys`` (with ``labels``) at global positions from
        ``offset`` on."""
        n = len(keys)
        mask = np.ones(n, dtype=bool)
        if self.ranges is not None:
            position = np.arange(offset, offset + n)
            mask &= np.any([(position >= a) & (position < b) for a, b in self.ranges] or
                           [np.zeros(n, bool)], axis=0)
        if self.fraction is not None:
            low, high = self.band
            draws = np.array([stable_hash(f"{self.seed}/{k}") / 2.0**64 for k in keys])
            mask &= (draws >= low) & (draws < high)
        if self.labels is not None:
            mask &= np.isin(np.asarray(labels), self.labels)
        return mask
