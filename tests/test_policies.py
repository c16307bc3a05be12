"""Subset, partition and distribution policies: each assignment checked exactly."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapydli.errors import ConfigError
from rapydli.storage.policies import Subset, distribute, partition, stable_hash

KEYS = [f"rec-{i:03d}" for i in range(10)]


def test_partition_contiguous_and_round_robin_exactly():
    assert partition(KEYS, 3, "contiguous") == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert partition(KEYS, 3, "round_robin") == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert partition(KEYS[:2], 3, "contiguous") == [[], [0], [1]]


def test_partition_by_hash_follows_the_key_and_survives_appends():
    shards = partition(KEYS, 4, "hash")
    for s, indices in enumerate(shards):
        assert all(stable_hash(KEYS[i]) % 4 == s for i in indices)
    more = KEYS + [f"new-{i}" for i in range(5)]
    grown = partition(more, 4, "hash")
    for s in range(4):  # old records keep their shard
        assert [i for i in grown[s] if i < len(KEYS)] == shards[s]


def test_stable_hash_is_fixed_across_processes():
    """Python's own hash() of a str changes with PYTHONHASHSEED; shard choice must not."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from rapydli.storage.policies import "
                          "stable_hash; print(stable_hash('record-1'))"], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    assert int(out) == stable_hash("record-1")


@given(n=st.integers(0, 60), n_shards=st.integers(1, 8),
       kind=st.sampled_from(["contiguous", "round_robin", "hash"]))
def test_every_record_in_exactly_one_shard(n, n_shards, kind):
    shards = partition([f"k{i}" for i in range(n)], n_shards, kind)
    assert len(shards) == n_shards
    assert sorted(i for s in shards for i in s) == list(range(n))
    if kind != "hash":
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_distribute_each_policy_exactly():
    sizes = [50, 10, 10, 10, 40, 10]
    assert distribute(sizes, 2, "round_robin") == [[0, 2, 4], [1, 3, 5]]
    assert distribute(sizes, 2, "contiguous") == [[0, 1, 2], [3, 4, 5]]
    # largest first to the lightest group: 0->A, 4->B, 1->B, 2->A, 3->B, 5->A (tie: A)
    assert distribute(sizes, 2, "balanced") == [[0, 2, 5], [1, 3, 4]]


@given(sizes=st.lists(st.integers(0, 100), max_size=20), groups=st.integers(1, 5),
       kind=st.sampled_from(["round_robin", "contiguous", "balanced"]))
def test_every_shard_read_by_exactly_one_group(sizes, groups, kind):
    out = distribute(sizes, groups, kind)
    assert len(out) == groups
    assert sorted(s for g in out for s in g) == list(range(len(sizes)))
    if kind == "balanced" and sizes:  # greedy: no group exceeds the mean by more than a shard
        totals = [sum(sizes[s] for s in g) for g in out]
        assert max(totals) - min(totals) <= max(sizes)


def test_subset_ranges_labels_and_fraction():
    keys = [f"k{i}" for i in range(1000)]
    labels = np.arange(1000) % 10
    assert np.flatnonzero(Subset(ranges=((5, 8), (990, 2000))).keep(keys[:20], labels[:20],
                                                                      offset=0)).tolist() == [5, 6, 7]
    assert np.flatnonzero(Subset(ranges=((5, 8),)).keep(keys[:20], labels[:20],
                                                         offset=4)).tolist() == [1, 2, 3]
    assert set(labels[Subset(labels=(3, 7)).keep(keys, labels, 0)]) == {3, 7}
    kept = Subset(fraction=0.3, seed=1).keep(keys, labels, 0)
    assert 230 < kept.sum() < 370
    assert np.array_equal(kept, Subset(fraction=0.3, seed=1).keep(keys, labels, 0))
    assert not np.array_equal(kept, Subset(fraction=0.3, seed=2).keep(keys, labels, 0))


def test_split_is_disjoint_complete_and_stable_when_records_are_added():
    train, test = Subset.split(0.2, seed=0)
    keys = [f"k{i}" for i in range(500)]
    a, b = train.keep(keys, np.zeros(500), 0), test.keep(keys, np.zeros(500), 0)
    assert np.all(a ^ b)
    more = keys + [f"n{i}" for i in range(100)]
    assert np.array_equal(test.keep(more, np.zeros(600), 0)[:500], b)


@pytest.mark.parametrize("call", [
    lambda: partition(KEYS, 0), lambda: partition(KEYS, 2, "random"),
    lambda: distribute([1, 2], 0), lambda: distribute([1], 1, "nearest"),
    lambda: Subset(fraction=1.5), lambda: Subset(ranges=((5, 2),)),
])
def test_bad_policy_arguments_are_config_errors(call):
    with pytest.raises(ConfigError, match="expected"):
        call()
