"""Training from sharded stores: shards read on the workers that own them, every record once per
epoch, growing stores, unusable records skipped and counted, the stop threshold."""
from __future__ import annotations

import collections

import numpy as np
import pytest

import rapydli as rd
from rapydli.errors import DataError
from rapydli.scheduler.engine import Engine
from rapydli.storage.importer import import_dataset
from rapydli.storage.loader import StoreSource, _layout, epoch_rng
from rapydli.storage.policies import Subset, distribute
from rapydli.storage.records import Record, RecordSpec, append_records, write_store

SPEC = RecordSpec((1, 4, 4), "float32", tuple(str(i) for i in range(10)))


def _records(ids, bad=()):
    """Record ``i`` holds the value ``i`` everywhere (so a batch row tells which record it is);
    records in ``bad`` hold a NaN."""
    out = []
    for i in ids:
        x = np.full((1, 4, 4), float(i), np.float32)
        if i in bad:
            x[0, 0, 0] = np.nan
        out.append(Record(f"r{i:04d}", x, i % 10))
    return out


def _store(path, n=120, n_shards=6, bad=(), fmt="zarr"):
    ids = list(range(n))
    per = np.array_split(ids, n_shards)
    shards = {f"shard-{s:05d}": _records(part.tolist(), bad) for s, part in enumerate(per)}
    write_store(str(path), fmt, SPEC, shards)
    return str(path)


def _net():
    return rd.Sequential([rd.Flatten(), rd.Dense(10)], input_shape=(1, 4, 4))


def _seen_ids(engine, source, epoch, batch=16, seed=0):
    """Per step, the record id at each batch row, read back from the windows bound on the
    workers; every worker that reads a row must see the same record there."""
    steps = []
    for name, index in source.epoch(engine, epoch, batch, seed):
        seen = np.full(index.shape[-1], -1)
        for w, wanted in enumerate(engine.batch_ranges(index.shape[-1])):
            x = engine.value(engine.data[(name, "x", w)]) if wanted else None
            for b0, b1 in wanted:
                ids = x[index[w, b0:b1], 0, 0, 0].astype(int)
                assert np.all((seen[b0:b1] == -1) | (seen[b0:b1] == ids)), "workers disagree"
                seen[b0:b1] = ids
        assert np.all(seen >= 0)
        steps.append(seen.tolist())
    return steps


def test_one_worker_sees_every_record_once_per_epoch_in_a_seeded_order(tmp_path):
    url = _store(tmp_path / "s")
    engine = Engine(_net(), None, rd.SGD())
    engine.set_params(_net().init(0))
    source = StoreSource(url, window=3, prefetch=2)
    first = _seen_ids(engine, source, 1)
    ids = [i for step in first for i in step]
    assert sorted(ids) == list(range(120))  # 7 batches of 16 and a last one of 8
    assert [len(step) for step in first] == [16] * 7 + [8]
    assert _seen_ids(engine, source, 1) == first  # same (seed, epoch): same order
    assert _seen_ids(engine, source, 2) != first


@pytest.mark.parametrize("placement", ["data_parallel", "model_parallel", "hybrid"])
def test_each_worker_reads_its_own_shards(tmp_path, client, placement):
    """Count the read tasks per worker (Dask's task stream): each shard once per epoch, on a
    worker of the data group the distribution policy gives it; all records covered."""
    from distributed import get_task_stream

    url = _store(tmp_path / "s")
    place = {"data_parallel": rd.data_parallel(3), "model_parallel": rd.model_parallel(3),
             "hybrid": rd.hybrid(data=1, model=2)}[placement]
    engine = Engine(_net(), place, rd.SGD(), client)
    engine.set_params(_net().init(0))
    source = StoreSource(url, window=2, distribution="round_robin")
    with get_task_stream(client) as stream:
        _seen_ids(engine, source, 1, batch=18)
        steps = _seen_ids(engine, source, 2, batch=18)
    reads = collections.Counter(t["worker"] for t in stream.data
                                if t["key"].startswith("read_shard"))
    groups, needs, owners = _layout(engine, 18)
    ahead = sum(min(source.prefetch, len(s)) for s in distribute([20] * 6, len(groups)))
    # every shard read once per epoch (epoch 2's first shards while epoch 1 ran), plus the
    # first shards of epoch 3, read ahead while epoch 2 ran
    assert sum(reads.values()) == 2 * 6 + ahead
    assigned = distribute([20] * 6, len(groups), "round_robin")
    for g, shards in enumerate(assigned):  # read by an owner of the group the policy names
        for s in shards:
            assert source.readers[f"shard-{s:05d}"] in owners[g]
    per_epoch = collections.Counter(engine.workers[w] for w in source.readers.values())
    assert set(reads) == set(per_epoch)  # the task stream agrees: those workers read
    if len(owners[0]) > 1:  # a group's reads are dealt out in turn, every epoch
        assert max(per_epoch.values()) - min(per_epoch.values()) <= 1
    ids = [i for step in steps for i in step]
    if len(groups) == 1:
        assert sorted(ids) == list(range(120))
        # the reads are shared out over the workers whose steps read input rows
        assert set(reads) == {engine.workers[w] for w in owners[0]}
    else:  # lockstep groups: each step takes 6 rows from each; leftovers wait for next epoch
        assert len(ids) == len(set(ids)) and len(ids) >= 120 - 6 * len(groups)
        if placement == "data_parallel":  # each worker's step reads only its group's rows
            assert needs == [[0], [1], [2]]


def test_fit_from_a_store_learns_and_reports(tmp_path, client):
    store = import_dataset("digits", str(tmp_path / "digits"), "lmdb", shards=4)
    train, test = Subset.split(0.2, seed=0)
    net = rd.Sequential([rd.Flatten(), rd.Dense(32, activation="relu"), rd.Dense(10)],
                        input_shape=(1, 8, 8))
    history = rd.fit(net, StoreSource(store.url, subset=train), placement=rd.data_parallel(2),
                     client=client, epochs=4, batch_size=64, optimizer=rd.SGD(0.1, momentum=0.9),
                     validation_data=StoreSource(store.url, subset=test, name="test"))
    assert history["test_accuracy"][-1] > 0.85
    assert history.data_report["n_skipped"] == 0 and history.data_report["n_read"] == 4 * 1797


def test_unusable_records_are_skipped_counted_and_reported(tmp_path):
    url = _store(tmp_path / "s", n=400, n_shards=4, bad={7, 250})  # 0.5%
    history = rd.fit(_net(), StoreSource(url), epochs=1, batch_size=32)
    report = history.data_report
    assert report["n_skipped"] == 2 and report["by_reason"] == {"NaN/Inf": 2}
    assert sorted(e["key"] for e in report["examples"]) == ["r0007", "r0250"]
    assert history.epochs[0]["steps"] == -(-398 // 32)


def test_too_many_unusable_records_stop_the_run(tmp_path):
    url = _store(tmp_path / "s", n=200, n_shards=2, bad=set(range(0, 200, 25)))  # 4%
    with pytest.raises(DataError) as info:
        rd.fit(_net(), StoreSource(url, threshold=0.01), epochs=1, batch_size=32)
    message = str(info.value)
    assert url in message and "r0000" in message and "1.00%" in message


def test_records_appended_while_training_join_at_the_next_epoch(tmp_path):
    url = _store(tmp_path / "s", n=64, n_shards=2)
    added = []

    def grow(row):
        if row["epoch"] == 1:
            added.append(append_records(url, _records(range(64, 128))))

    history = rd.fit(_net(), StoreSource(url), epochs=2, batch_size=16, on_epoch=grow)
    assert added and history["steps"] == [4, 8]
    assert history.data_report["n_read"] == 64 + 128


def test_a_store_on_s3_trains(tmp_path, s3_options):
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir("train-data")
    url = "s3://train-data/digits"
    import_dataset("digits", url, "zarr", shards=2, storage_options=s3_options)
    history = rd.fit(_net_digits(), StoreSource(url, storage_options=s3_options), epochs=1,
                     batch_size=128)
    assert history["steps"] == [-(-1797 // 128)]


def _net_digits():
    return rd.Sequential([rd.Flatten(), rd.Dense(10)], input_shape=(1, 8, 8))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert np.array_equal(epoch_rng(3, 2).permutation(10), epoch_rng(3, 2).permutation(10))
    assert not np.array_equal(epoch_rng(3, 2).permutation(10), epoch_rng(3, 1).permutation(10))


def test_fewer_shards_than_data_groups_is_a_clear_error(tmp_path, client):
    url = _store(tmp_path / "s", n=40, n_shards=1)
    with pytest.raises(DataError, match="--shards"):
        rd.fit(_net(), StoreSource(url), placement=rd.data_parallel(2), client=client, epochs=1)
