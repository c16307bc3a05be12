"""Importing digits, npy folders, image folders and stores into sharded stores; inspecting them."""
from __future__ import annotations

import io
import json
from collections import Counter

import fsspec
import numpy as np
import pytest

from rapydli.errors import ConfigError, DataError
from rapydli.storage.importer import format_inspect, import_dataset, inspect_store
from rapydli.storage.policies import PARTITIONS, partition
from rapydli.storage.quality import QualityReport
from rapydli.storage.records import FORMATS, Record, RecordSpec, open_store, write_store


@pytest.fixture(scope="module")
def digits():
    """Keys, x ``(N, 1, 8, 8)`` float32 and labels, computed independently of the importer."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:, None] / 16.0).astype(np.float32)
    return [f"digits-{i:05d}" for i in range(len(x))], x, d.target.astype(np.int64)


def put(root: str, rel: str, data: bytes, options=None):
    fs, path = fsspec.core.url_to_fs(f"{root}/{rel}", **(options or {}))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def npy_bytes(x) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def png_bytes(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: str, kind: str, n: int = 13, options=None) -> dict[str, tuple[np.ndarray, int]]:
    """An npy or image folder with 3 classes; returns key -> (x as the reader returns it, label)."""
    rng = np.random.default_rng(7)
    expected = {}
    for i in range(n):
        cls = i % 3
        pixels = rng.integers(0, 256, (6, 5), dtype=np.uint8)
        if kind == "npy":
            rel, x = f"class-{cls}/{i:03d}.npy", rng.random((2, 3)).astype(np.float32)
            put(root, rel, npy_bytes(x), options)
        else:
            rel, x = f"class-{cls}/{i:03d}.png", pixels[None].astype(np.float32) / np.float32(255)
            put(root, rel, png_bytes(pixels), options)
        expected[rel] = (x, cls)
    return expected


def read_all(store):
    return {name: store.read_shard(name) for name in store.shards}


def assert_import(store, keys, x, y, n_shards, kind):
    """Shards are ``partition(keys, n_shards, kind)`` of ``keys``; each record is exact, once."""
    groups = partition(keys, n_shards, kind)
    assert store.shards == tuple(f"shard-{i:05d}" for i in range(n_shards))
    assert store.counts == tuple(len(g) for g in groups)
    seen = []
    for data, group in zip(read_all(store).values(), groups):
        assert data.keys == tuple(keys[i] for i in group) and data.skipped == ()
        assert data.x.tobytes() == x[group].tobytes()
        assert data.y.tolist() == y[group].tolist()
        seen += data.keys
    assert sorted(seen) == sorted(keys)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", PARTITIONS)
def test_import_digits_into_every_format(fmt, kind, tmp_path, digits):
    keys, x, y = digits
    store = import_dataset("digits", str(tmp_path / "d"), format=fmt, shards=4, partition=kind)
    assert store.format == fmt and store.spec == RecordSpec((1, 8, 8), "float32",
                                                             tuple("0123456789"))
    assert_import(open_store(tmp_path / "d"), keys, x, y, 4, kind)


@pytest.mark.parametrize("source", ["npy", "images"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", PARTITIONS)
def test_import_folders_into_every_format(source, fmt, kind, tmp_path):
    expected = make_folder(str(tmp_path / "src"), source)
    keys = sorted(expected)
    x = np.stack([expected[k][0] for k in keys])
    y = np.array([expected[k][1] for k in keys])
    report = QualityReport()
    import_dataset(str(tmp_path / "src"), str(tmp_path / "d"), format=fmt, shards=3,
                   partition=kind, report=report)
    store = open_store(tmp_path / "d")
    assert store.spec.classes == ("class-0", "class-1", "class-2")
    assert_import(store, keys, x, y, 3, kind)
    assert (report.n_read, report.n_skipped) == (13, 0)


def test_import_skips_and_reports_unusable_source_records(tmp_path):
    src = str(tmp_path / "src")
    expected = make_folder(src, "npy", n=10)
    put(src, "class-0/zz-garbled.npy", b"not numpy")
    nan = np.full((2, 3), np.nan, np.float32)
    put(src, "class-1/zz-nan.npy", npy_bytes(nan))
    report = QualityReport()
    store = import_dataset(src, str(tmp_path / "d"), format="lmdb", shards=2, report=report)
    assert (report.n_read, report.n_skipped, len(store)) == (12, 2, 10)
    assert {key for _, _, key, _ in report.skipped} == {"class-0/zz-garbled.npy",
                                                        "class-1/zz-nan.npy"}
    assert report.by_reason() == {"cannot decode": 1, "NaN/Inf": 1}
    keys = sorted(expected)
    assert_import(store, keys, np.stack([expected[k][0] for k in keys]),
                  np.array([expected[k][1] for k in keys]), 2, "contiguous")


def test_import_between_object_stores_and_from_a_store(tmp_path, s3_options):
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir("rapydli-import")
    expected = make_folder("s3://rapydli-import/images", "images", n=7, options=s3_options)
    store = import_dataset("s3://rapydli-import/images", "s3://rapydli-import/store", "hdf5",
                           shards=2, partition="hash", storage_options=s3_options)
    keys = sorted(expected)
    x = np.stack([expected[k][0] for k in keys])
    y = np.array([expected[k][1] for k in keys])
    assert_import(open_store("s3://rapydli-import/store", s3_options), keys, x, y, 2, "hash")
    copy = import_dataset(store.url, str(tmp_path / "copy"), "zarr", shards=3,
                          src_storage_options=s3_options)
    order = [keys.index(k) for name in store.shards for k in store.read_shard(name).keys]
    assert_import(copy, [keys[i] for i in order], x[order], y[order], 3, "contiguous")


def test_inspect_store_counts_labels_and_skipped_records(tmp_path):
    rng = np.random.default_rng(0)
    spec = RecordSpec((3,), "float64", classes=("x", "y", "z", "w"))
    recs = [Record(f"r{i:02d}", rng.random(3), int(rng.integers(0, 4))) for i in range(25)]
    recs[4] = Record("r04", np.array([0.0, np.nan, 1.0]), 1)
    recs[9] = Record("r09", recs[9].x, 7)
    write_store(tmp_path / "s", "hdf5", spec, {"a": recs[:10], "b": recs[10:]})
    info = inspect_store(str(tmp_path / "s"))
    json.dumps(info)  # JSON-able, for run reports
    good = [r for r in recs if r.key not in ("r04", "r09")]
    counts = Counter(r.y for r in good)
    assert info["label_counts"] == [counts[i] for i in range(4)]
    assert (info["n_records"], info["n_usable"], info["n_skipped"]) == (25, 23, 2)
    assert (info["format"], info["shape"], info["dtype"]) == ("hdf5", [3], "float64")
    assert [(s["name"], s["count"], s["usable"]) for s in info["shards"]] == [("a", 10, 8),
                                                                              ("b", 15, 15)]
    assert all(s["nbytes"] > 0 for s in info["shards"])
    assert info["skipped_by_reason"] == {"NaN/Inf": 1, "label": 1}
    assert [s["key"] for s in info["skipped"]] == ["r04", "r09"]
    text = format_inspect(info)
    assert "25 records (23 usable) in 2 shards" in text and "skipped 2 records (8.00%)" in text
    assert "a/r09: label 7 out of range" in text


def test_inspect_digits_and_a_folder(tmp_path, digits):
    _, _, y = digits
    import_dataset("digits", f"memory://rapydli-tests/{tmp_path.name}/d", "zarr", shards=3)
    info = inspect_store(f"memory://rapydli-tests/{tmp_path.name}/d")
    assert info["label_counts"] == np.bincount(y).tolist() and info["n_records"] == len(y)
    assert [s["count"] for s in info["shards"]] == [599, 599, 599]
    make_folder(str(tmp_path / "f"), "images", n=8)
    info = inspect_store(str(tmp_path / "f"))
    assert (info["format"], info["label_counts"], info["shape"]) == ("images", [3, 3, 2], [1, 6, 5])
    assert "files-00000" in format_inspect(info)


def test_import_refuses_bad_arguments_and_existing_stores(tmp_path):
    dest = str(tmp_path / "d")
    import_dataset("digits", dest, "lmdb", shards=2)
    with pytest.raises(DataError, match=f"{dest}: a rapydli store is already there.*overwrite=True"):
        import_dataset("digits", dest, "zarr", shards=2)
    store = import_dataset("digits", dest, "zarr", shards=5, overwrite=True)
    assert store.counts == (359, 359, 360, 359, 360) and store.format == "zarr"
    with pytest.raises(DataError, match="unknown format 'csv'; expected one of 'lmdb', 'zarr', 'hdf5'"):
        import_dataset("digits", str(tmp_path / "e"), "csv")
    with pytest.raises(ConfigError, match="unknown policy 'random'"):
        import_dataset("digits", str(tmp_path / "e"), partition="random")
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: does not exist"):
        import_dataset(str(tmp_path / "nope"), str(tmp_path / "e"))
