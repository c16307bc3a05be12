"""Record stores: round trips on every back end and location, corruption, quality, appends."""
from __future__ import annotations

import io
import json
import os
import pickle
import uuid

import fsspec
import numpy as np
import pytest

from rapydli.errors import ConfigError, DataError
from rapydli.storage import backends, records
from rapydli.storage.quality import (QualityReport, check_batch, check_record, check_threshold,
                                     reason_kind)
from rapydli.storage.records import (FORMATS, MANIFEST, READS, Record, RecordSpec, ShardData,
                                     Unreadable, append_records, load_shard, open_store,
                                     write_store)

SPEC = RecordSpec((1, 4, 4), "float32", classes=("a", "b", "c"))
SHARDED = [("lmdb", "local"), ("zarr", "local"), ("zarr", "file"), ("zarr", "memory"),
           ("zarr", "s3"), ("hdf5", "local"), ("hdf5", "memory"), ("hdf5", "s3")]


def make_records(n=12, shape=(1, 4, 4), dtype="float32", seed=0, start=0):
    rng = np.random.default_rng(seed)
    return [Record(f"rec-{i:03d}", (rng.random(shape) * 100).astype(dtype), i % 3,
                   {"i": i, "tag": "odd"} if i % 2 else None) for i in range(start, start + n)]


def assert_records(data: ShardData, expected, skipped=()):
    """``data`` holds exactly ``expected`` (bitwise), in order, and skipped exactly ``skipped``."""
    assert data.keys == tuple(r.key for r in expected)
    want = np.stack([r.x for r in expected]) if expected else np.empty((0, *SPEC.shape), SPEC.dtype)
    assert data.x.dtype == want.dtype and data.x.shape == want.shape
    assert data.x.flags.c_contiguous and data.x.tobytes() == want.tobytes()
    assert data.y.dtype == np.int64 and data.y.tolist() == [r.y for r in expected]
    assert data.meta == tuple(r.meta for r in expected)
    assert [key for key, _ in data.skipped] == list(skipped)
    assert data.n_read == len(expected) + len(skipped)


@pytest.fixture
def s3_root(request):
    options = request.getfixturevalue("s3_options")  # starts moto only for tests that use S3
    import s3fs

    bucket = f"rapydli-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}", options


def location(kind, tmp_path, request, name="store"):
    """``(url, storage_options)`` of a fresh location of ``kind``."""
    if kind == "local":
        return str(tmp_path / name), None
    if kind == "file":
        return f"file://{tmp_path / name}", None
    if kind == "memory":
        return f"memory://rapydli-tests/{uuid.uuid4().hex}/{name}", None
    root, options = request.getfixturevalue("s3_root")
    return f"{root}/{name}", options


def put(url, options, rel, data: bytes):
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    path = f"{root}/{rel}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def npy_bytes(x) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=isinstance(x, np.ndarray) and x.dtype == object)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray, fmt="PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kind", SHARDED)
def test_sharded_store_round_trips_exactly(fmt, kind, tmp_path, request):
    url, options = location(kind, tmp_path, request)
    recs = make_records(30)
    write_store(url, fmt, SPEC, {"shard-00000": recs[:10], "shard-00001": recs[10:]}, options,
                chunk_records=4)
    store = open_store(url, options)
    assert (store.format, store.spec, store.shards, store.counts, len(store)) == \
        (fmt, SPEC, ("shard-00000", "shard-00001"), (10, 20), 30)
    assert all(n and n > 0 for n in store.nbytes)
    assert_records(store.read_shard("shard-00001"), recs[10:])
    assert_records(load_shard(url, "shard-00000", options), recs[:10])
    raw = list(store.iter_records("shard-00000"))
    assert [r.key for r in raw] == [r.key for r in recs[:10]]
    assert all(isinstance(r, Record) and r.x.tobytes() == e.x.tobytes() and r.y == e.y
               and r.meta == e.meta for r, e in zip(raw, recs))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float64"])
def test_every_format_keeps_the_dtype(fmt, dtype, tmp_path):
    spec = RecordSpec((2, 3), dtype)
    recs = make_records(5, shape=(2, 3), dtype=dtype)
    write_store(tmp_path / "s", fmt, spec, {"only": recs})
    data = open_store(tmp_path / "s").read_shard("only")
    assert data.x.dtype == np.dtype(dtype)
    assert data.x.tobytes() == np.stack([r.x for r in recs]).tobytes()


def test_write_store_casts_within_a_kind_and_rejects_other_shapes(tmp_path):
    recs = make_records(3, dtype="float64")
    write_store(tmp_path / "s", "zarr", SPEC, {"s": recs})
    data = open_store(tmp_path / "s").read_shard("s")
    assert data.x.tobytes() == np.stack([r.x for r in recs]).astype(np.float32).tobytes()
    bad = [Record("k1", np.zeros((1, 3, 4), np.float32), 0)]
    with pytest.raises(DataError, match=r"'k1' has x of shape \(1, 3, 4\).*expected shape \(1, 4, 4\)"):
        write_store(tmp_path / "t", "hdf5", SPEC, {"s": bad})
    with pytest.raises(DataError, match="used twice"):
        write_store(tmp_path / "u", "lmdb", SPEC, {"a": recs[:1], "b": recs[:1]})


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_npy_folder_round_trips_and_sees_new_files(kind, tmp_path, request, monkeypatch):
    monkeypatch.setattr(records, "FILES_PER_SHARD", 4)
    url, options = location(kind, tmp_path, request, "folder")
    recs = make_records(10)
    files = {f"{('dog', 'cat')[i % 2]}/sub/{r.key}.npy": r for i, r in enumerate(recs)}
    for rel, r in files.items():
        put(url, options, rel, npy_bytes(r.x))
    put(url, options, "README.npy", npy_bytes(np.zeros(3)))  # top level: no class, ignored
    store = open_store(url, options)
    assert (store.format, store.spec) == ("npy", RecordSpec((1, 4, 4), "float32", ("cat", "dog")))
    assert (store.shards, store.counts) == (("files-00000", "files-00001", "files-00002"), (4, 4, 2))
    order = sorted(files)
    expected = [Record(rel, files[rel].x, int(rel.startswith("dog")), None) for rel in order]
    got = [store.read_shard(name) for name in store.shards]
    assert_records(got[0], expected[:4])
    assert_records(got[2], expected[8:])
    put(url, options, "cat/zz-new.npy", npy_bytes(recs[0].x))
    assert len(store) == 10 and len(open_store(url, options)) == 11


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_image_folder_decodes_grayscale_and_colour(kind, tmp_path, request):
    url, options = location(kind, tmp_path, request, "images")
    rng = np.random.default_rng(1)
    gray = {f"c{i % 2}/g{i}.png": rng.integers(0, 256, (5, 6), dtype=np.uint8) for i in range(5)}
    for rel, pixels in gray.items():
        put(url, options, rel, png_bytes(pixels))
    store = open_store(url, options)
    assert (store.format, store.spec) == ("images", RecordSpec((1, 5, 6), "float32", ("c0", "c1")))
    data = store.read_shard("files-00000")
    order = sorted(gray)
    assert data.keys == tuple(order) and data.y.tolist() == [int(k[1]) for k in order]
    want = np.stack([gray[k][None].astype(np.float32) / np.float32(255) for k in order])
    assert data.x.tobytes() == want.tobytes() and 0 <= data.x.min() and data.x.max() <= 1

    colour_url, _ = location(kind, tmp_path, request, "colour")
    rgb = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)  # (H, W, C)
    put(colour_url, options, "x/a.png", png_bytes(rgb))
    put(colour_url, options, "x/b.jpg", png_bytes(rgb, "JPEG"))
    data = open_store(colour_url, options).read_shard("files-00000")
    assert data.x.shape == (2, 3, 4, 3) and data.skipped == ()
    assert np.array_equal(data.x[0], rgb.transpose(2, 0, 1) / np.float32(255))
    from PIL import Image  # JPEG is lossy: compare with Pillow's own decode
    reference = np.asarray(Image.open(io.BytesIO(png_bytes(rgb, "JPEG"))), np.float32) / 255
    assert np.array_equal(data.x[1], reference.transpose(2, 0, 1))


# -- corruption ------------------------------------------------------------------------------


def bad_value_records():
    """12 records; 5 (NaN, Inf, labels 3 and -1 with 3 classes) unusable by value."""
    recs = make_records(12)
    x = recs[2].x.copy()
    x[0, 0, :2] = np.nan
    recs[2] = Record(recs[2].key, x, 2)
    x = recs[5].x.copy()
    x[0, 3, 3] = -np.inf
    recs[5] = Record(recs[5].key, x, 2)
    recs[7] = Record(recs[7].key, recs[7].x, 3)
    recs[8] = Record(recs[8].key, recs[8].x, -1)
    return recs, {recs[2].key: "holds 2 NaN/Inf values", recs[5].key: "holds 1 NaN/Inf values",
                  recs[7].key: "label 3 out of range; expected 0..2 (3 classes)",
                  recs[8].key: "label -1 out of range; expected >= 0"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_records_with_bad_values_are_skipped_with_reasons(fmt, tmp_path):
    recs, reasons = bad_value_records()
    write_store(tmp_path / "s", fmt, SPEC, {"s": recs}, chunk_records=5)
    data = open_store(tmp_path / "s").read_shard("s")
    good = [r for r in recs if r.key not in reasons]
    assert_records(data, good, skipped=sorted(reasons))
    assert dict(data.skipped) == reasons


def test_lmdb_undecodable_wrong_shape_and_dtype_values_are_skipped(tmp_path):
    import lmdb

    recs = make_records(10)
    write_store(tmp_path / "s", "lmdb", SPEC, {"s": recs})
    env = lmdb.open(str(tmp_path / "s" / "s.lmdb"))
    with env.begin(write=True) as txn:
        keys = [k for k, _ in txn.cursor()]
        txn.put(keys[1], b"\x00garbage")
        txn.put(keys[2], backends.encode(recs[2])[:-5])  # payload shorter than the header says
        txn.put(keys[3], backends.encode(Record("k", np.zeros((1, 3, 4), np.float32), 0)))
        txn.put(keys[4], backends.encode(Record("k", recs[4].x.astype(np.float64), 1)))
    env.close()
    store = open_store(tmp_path / "s")
    data = store.read_shard("s")
    assert_records(data, [recs[i] for i in (0, 5, 6, 7, 8, 9)],
                   skipped=[r.key for r in recs[1:5]])
    why = dict(data.skipped)
    assert why["rec-001"].startswith("cannot decode:") and why["rec-002"].startswith("cannot decode:")
    assert why["rec-003"] == "shape (1, 3, 4); expected (1, 4, 4)"
    assert why["rec-004"] == "dtype float64; expected float32"
    raw = list(store.iter_records("s"))
    assert [type(r) for r in raw[:5]] == [Record, Unreadable, Unreadable, Record, Record]


def test_unreadable_lmdb_environment_skips_its_records_by_position(tmp_path):
    write_store(tmp_path / "s", "lmdb", SPEC, {"a": make_records(3), "b": make_records(4, start=3)})
    path = tmp_path / "s" / "b.lmdb" / "data.mdb"
    path.write_bytes(b"\xff" * path.stat().st_size)
    store = open_store(tmp_path / "s")
    data = store.read_shard("b")
    assert len(data) == 0 and [k for k, _ in data.skipped] == [f"b[{i}]" for i in range(4)]
    assert all(r.startswith("cannot decode: LMDB") for _, r in data.skipped)
    assert len(store.read_shard("a")) == 3


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_corrupt_or_missing_zarr_chunks_skip_only_their_records(kind, tmp_path, request):
    url, options = location(kind, tmp_path, request)
    recs = make_records(12)
    write_store(url, "zarr", SPEC, {"s": recs}, options, chunk_records=4)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/s.zarr/x/c/1/0/0/0", b"definitely not zstd")
    fs.rm_file(f"{root}/s.zarr/x/c/2/0/0/0")  # a lost chunk reads as NaN, never as zeros
    data = open_store(url, options).read_shard("s")
    assert_records(data, recs[:4], skipped=[r.key for r in recs[4:]])
    why = dict(data.skipped)
    assert why["rec-004"].startswith("cannot decode: zarr chunk of records 4..7")
    assert why["rec-008"] == "holds 16 NaN/Inf values"


def test_unreadable_zarr_group_skips_all_its_records(tmp_path):
    write_store(tmp_path / "s", "zarr", SPEC, {"a": make_records(3), "b": make_records(2, start=3)})
    os.remove(tmp_path / "s" / "b.zarr" / "zarr.json")
    store = open_store(tmp_path / "s")
    assert store.read_shard("b").skipped[1][0] == "b[1]"
    assert store.read_shard("b").skipped[1][1].startswith("cannot decode: zarr group b")
    assert len(store.read_shard("a")) == 3


def test_corrupt_hdf5_chunk_and_file_are_skipped(tmp_path):
    import h5py

    recs = make_records(12)
    write_store(tmp_path / "s", "hdf5", SPEC, {"s": recs, "t": recs[:0]}, chunk_records=4)
    path = tmp_path / "s" / "s.h5"
    with h5py.File(path, "r") as f:
        info = f["x"].id.get_chunk_info(1)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + 3)
        f.write(b"\x13\x37\x13\x37")
    store = open_store(tmp_path / "s")
    data = store.read_shard("s")
    assert_records(data, recs[:4] + recs[8:], skipped=[r.key for r in recs[4:8]])
    assert data.skipped[0][1].startswith("cannot decode: HDF5 chunk of records 4..7")
    assert_records(store.read_shard("t"), [])
    path.write_bytes(path.read_bytes()[:200])
    data = open_store(tmp_path / "s").read_shard("s")
    assert len(data) == 0 and len(data.skipped) == 12 and data.skipped[0][0] == "s[0]"


def test_npy_folder_skips_undecodable_and_unusable_files(tmp_path):
    url = str(tmp_path / "f")
    recs = make_records(4)
    for i, r in enumerate(recs):
        put(url, None, f"{'ab'[i % 2]}/good-{i}.npy", npy_bytes(r.x))
    bad_x = recs[0].x.copy()
    bad_x[0, 0, 0] = np.nan
    put(url, None, "a/z-garbled.npy", b"\x93NUMPY garbage")
    put(url, None, "a/z-object.npy", npy_bytes(np.array([{"pickled": 1}], dtype=object)))
    put(url, None, "b/z-truncated.npy", npy_bytes(recs[1].x)[:-7])
    put(url, None, "b/z-shape.npy", npy_bytes(np.zeros((4, 4), np.float32)))
    put(url, None, "b/z-dtype.npy", npy_bytes(np.zeros((1, 4, 4), np.float16)))
    put(url, None, "b/z-nan.npy", npy_bytes(bad_x))
    data = open_store(url).read_shard("files-00000")
    assert data.keys == ("a/good-0.npy", "a/good-2.npy", "b/good-1.npy", "b/good-3.npy")
    assert data.x.tobytes() == np.stack([recs[i].x for i in (0, 2, 1, 3)]).tobytes()
    why = dict(data.skipped)
    assert set(why) == {"a/z-garbled.npy", "a/z-object.npy", "b/z-truncated.npy", "b/z-shape.npy",
                        "b/z-dtype.npy", "b/z-nan.npy"}
    assert all(why[k].startswith("cannot decode:")
               for k in ("a/z-garbled.npy", "a/z-object.npy", "b/z-truncated.npy"))
    assert why["b/z-shape.npy"] == "shape (4, 4); expected (1, 4, 4)"
    assert why["b/z-dtype.npy"] == "dtype float16; expected float32"
    assert why["b/z-nan.npy"] == "holds 1 NaN/Inf values"


def test_image_folder_skips_truncated_and_mismatched_images(tmp_path):
    url = str(tmp_path / "f")
    pixels = np.arange(30, dtype=np.uint8).reshape(5, 6)
    put(url, None, "a/1.png", png_bytes(pixels))
    put(url, None, "a/2-truncated.png", png_bytes(pixels)[:40])
    put(url, None, "b/3-not-an-image.png", b"hello")
    put(url, None, "b/4-small.png", png_bytes(pixels[:4]))
    put(url, None, "b/5-colour.png", png_bytes(np.stack([pixels] * 3, axis=-1)))
    put(url, None, "b/6.PNG", png_bytes(pixels))
    data = open_store(url).read_shard("files-00000")
    assert data.keys == ("a/1.png", "b/6.PNG") and data.y.tolist() == [0, 1]
    why = dict(data.skipped)
    assert why["a/2-truncated.png"].startswith("cannot decode:")
    assert why["b/3-not-an-image.png"].startswith("cannot decode:")
    assert why["b/4-small.png"] == "shape (1, 4, 6); expected (1, 5, 6)"
    assert why["b/5-colour.png"] == "shape (3, 5, 6); expected (1, 5, 6)"


# -- quality checks and the threshold ----------------------------------------------------------


def test_check_record_names_each_problem():
    ok = np.zeros((1, 4, 4), np.float32)
    assert check_record(ok, 2, SPEC) is None
    assert check_record(np.zeros((1, 7, 4), np.float32), 0, SPEC) == "shape (1, 7, 4); expected (1, 4, 4)"
    assert check_record(ok.astype(np.int32), 0, SPEC) == "dtype int32; expected float32"
    bad = ok.copy()
    bad[0, :3, 0] = [np.nan, np.inf, -np.inf]
    assert check_record(bad, 0, SPEC) == "holds 3 NaN/Inf values"
    assert check_record(ok, 3, SPEC) == "label 3 out of range; expected 0..2 (3 classes)"
    assert check_record(ok, 1.5, SPEC) == "label 1.5 is not an integer"
    assert check_record(ok, 99, RecordSpec((1, 4, 4), "float32")) is None  # classes unknown
    assert check_record([0.0], 0, SPEC).startswith("not an array")


def test_check_batch_agrees_with_check_record():
    rng = np.random.default_rng(3)
    x = rng.random((40, 1, 4, 4)).astype(np.float32)
    x[rng.random(x.shape) < 0.02] = np.nan
    y = rng.integers(-1, 5, 40)
    assert check_batch(x, y, SPEC) == [check_record(x[i], y[i], SPEC) for i in range(40)]
    assert check_batch(x[:, :, :3], y, SPEC) == ["shape (1, 3, 4); expected (1, 4, 4)"] * 40


def report_with(n_read, n_bad, url="memory://store-a"):
    keys = tuple(f"k{i}" for i in range(n_read - n_bad))
    data = ShardData(np.zeros((len(keys), 1)), np.zeros(len(keys), np.int64), keys,
                     (None,) * len(keys),
                     skipped=tuple((f"bad{i}", "holds 1 NaN/Inf values" if i % 2 else
                                    "cannot decode: truncated") for i in range(n_bad)))
    report = QualityReport()
    report.add(url, "shard-00000", data)
    return report


def test_quality_report_counts_and_summarises():
    report = report_with(50, 3)
    clean = ShardData(np.zeros((50, 1)), np.zeros(50, np.int64), tuple(map(str, range(50))),
                      (None,) * 50)
    report.add("memory://store-b", "files-00000", clean)
    assert (report.n_read, report.n_skipped, report.fraction) == (100, 3, 0.03)
    assert report.by_reason() == {"cannot decode": 2, "NaN/Inf": 1}
    assert report.stores == ["memory://store-a", "memory://store-b"]
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["n_skipped"] == 3 and summary["examples"][1]["key"] == "bad1"
    assert "skipped 3 (3.00%)" in str(report) and "shard-00000/bad2" in str(report)
    assert reason_kind("dtype int8; expected float32") == "dtype"


def test_check_threshold_passes_below_and_raises_above():
    check_threshold(report_with(200, 2), threshold=0.01)  # exactly at the threshold passes
    check_threshold(QualityReport(), threshold=0.0)  # nothing read, nothing skipped
    with pytest.raises(DataError) as info:
        check_threshold(report_with(100, 7, url="s3://bucket/digits"), threshold=0.05)
    message = str(info.value)
    for text in ("s3://bucket/digits", "7 of 100", "7.00%", "5.00%", "bad0", "bad4",
                 "cannot decode: truncated", "raise the threshold", "re-import"):
        assert text in message
    assert "bad5" not in message  # five examples at most
    with pytest.raises(ConfigError, match="threshold"):
        check_threshold(QualityReport(), threshold=1.5)


# -- appends, the manifest, load_shard ------------------------------------------------------


@pytest.mark.parametrize("fmt, kind", [("lmdb", "local"), ("zarr", "local"), ("zarr", "memory"),
                                       ("hdf5", "local"), ("zarr", "s3"), ("hdf5", "s3")])
def test_append_records_is_seen_after_reopening(fmt, kind, tmp_path, request):
    url, options = location(kind, tmp_path, request)
    recs = make_records(20)
    write_store(url, fmt, SPEC, {"shard-00000": recs[:6], "shard-00001": recs[6:12]}, options)
    before = open_store(url, options)
    name = append_records(url, recs[12:], options)
    assert name == "shard-00002"
    assert before.shards == ("shard-00000", "shard-00001") and len(before) == 12
    after = open_store(url, options)
    assert after.shards == ("shard-00000", "shard-00001", "shard-00002")
    assert after.counts == (6, 6, 8)
    assert_records(after.read_shard(name), recs[12:])
    assert_records(before.read_shard("shard-00001"), recs[6:12])


def test_append_writes_the_whole_shard_before_the_manifest(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    recs = make_records(9)
    write_store(url, "zarr", SPEC, {"shard-00000": recs[:4]})
    seen = []
    real = records._write_manifest

    def spy(loc, fmt, spec, entries):
        on_disk = json.loads((tmp_path / "s" / MANIFEST).read_text())
        complete = records.Store(loc, fmt, spec, entries).read_shard(entries[-1]["name"])
        seen.append(([s["name"] for s in on_disk["shards"]], complete.keys))
        real(loc, fmt, spec, entries)

    monkeypatch.setattr(records, "_write_manifest", spy)
    append_records(url, recs[4:])
    assert seen == [(["shard-00000"], tuple(r.key for r in recs[4:]))]


def test_failed_append_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    recs = make_records(9)
    write_store(url, "hdf5", SPEC, {"shard-00000": recs[:4]})

    def crash(loc, path, spec, records_, chunk):
        with open(path, "wb") as f:
            f.write(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setitem(records.WRITERS, "hdf5", crash)
    with pytest.raises(DataError, match="disk full"):
        append_records(url, recs[4:])
    monkeypatch.undo()
    store = open_store(url)
    assert store.shards == ("shard-00000",)
    assert_records(store.read_shard("shard-00000"), recs[:4])
    assert append_records(url, recs[4:]) == "shard-00001"  # the leftover is replaced
    assert_records(open_store(url).read_shard("shard-00001"), recs[4:])


def test_local_manifest_is_replaced_atomically(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    recs = make_records(6)
    write_store(url, "zarr", SPEC, {"shard-00000": recs[:3]})
    old = (tmp_path / "s" / MANIFEST).read_bytes()

    def fail(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(records.os, "replace", fail)
    with pytest.raises(DataError, match="power cut"):
        append_records(url, recs[3:])
    assert (tmp_path / "s" / MANIFEST).read_bytes() == old
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == \
        [MANIFEST, "shard-00000.zarr", "shard-00001.zarr"]  # no temp file left behind
    assert open_store(url).shards == ("shard-00000",)


def test_write_store_refuses_to_overwrite_unless_told(tmp_path):
    url = str(tmp_path / "s")
    write_store(url, "lmdb", SPEC, {"a": make_records(2), "b": make_records(2, start=2)})
    with pytest.raises(DataError, match=f"{url}: a rapydli store is already there.*overwrite=True"):
        write_store(url, "zarr", SPEC, {"c": make_records(1)})
    write_store(url, "zarr", SPEC, {"c": make_records(1)}, overwrite=True)
    assert sorted(os.listdir(url)) == ["c.zarr", MANIFEST]
    folder = tmp_path / "folder"
    put(str(folder), None, "cls/a.npy", npy_bytes(np.zeros(2)))
    with pytest.raises(DataError, match="not part of a rapydli store"):
        write_store(folder, "zarr", SPEC, {"c": make_records(1)}, overwrite=True)


def test_load_shard_counts_reads_and_runs_as_a_dask_task(tmp_path):
    import dask

    url = str(tmp_path / "s")
    write_store(url, "zarr", SPEC, {"shard-00000": make_records(3)})
    before = READS[(url, "shard-00000")]
    task = dask.delayed(pickle.loads(pickle.dumps(load_shard)))(url, "shard-00000")
    assert len(task.compute(scheduler="sync")) == 3
    load_shard(url, "shard-00000")
    assert READS[(url, "shard-00000")] - before == 2
    store = pickle.loads(pickle.dumps(open_store(url)))  # a Store travels to workers too
    assert len(store.read_shard("shard-00000")) == 3


# -- bad locations -------------------------------------------------------------------------


def test_bad_locations_raise_data_errors_naming_them(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"{missing}: does not exist"):
        open_store(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no rapydli-store.json.*rapydli data import"):
        open_store(tmp_path / "empty")
    with pytest.raises(DataError, match="bogus://x/y: not a location"):
        open_store("bogus://x/y")
    with pytest.raises(DataError, match="need a local path.*'zarr' or 'hdf5'"):
        write_store("memory://rapydli-tests/lmdb", "lmdb", SPEC, {"a": make_records(1)})
    with pytest.raises(DataError, match="unknown format 'parquet'; expected one of"):
        write_store(tmp_path / "p", "parquet", SPEC, {"a": make_records(1)})
    with pytest.raises(DataError, match="shard name 'a/b'"):
        write_store(tmp_path / "p", "zarr", SPEC, {"a/b": make_records(1)})


def test_bad_shards_manifests_and_appends_raise_data_errors(tmp_path):
    url = str(tmp_path / "s")
    write_store(url, "zarr", SPEC, {"shard-00000": make_records(2)})
    with pytest.raises(DataError, match=r"no shard 'shard-00009'; expected one of 1 shards \(shard-00000\)"):
        open_store(url).read_shard("shard-00009")
    with pytest.raises(DataError, match="received no records"):
        append_records(url, [])
    (tmp_path / "s" / MANIFEST).write_text('{"format": "zarr"')
    with pytest.raises(DataError, match=f"{MANIFEST} is malformed"):
        open_store(url)
    put(str(tmp_path / "f"), None, "c/a.npy", npy_bytes(np.zeros(2)))
    with pytest.raises(DataError, match="append_records needs a sharded store"):
        append_records(tmp_path / "f", make_records(1))


def test_s3_errors_name_the_url(request):
    root, options = request.getfixturevalue("s3_root")
    with pytest.raises(DataError, match="s3://rapydli-no-such-bucket/data"):
        open_store("s3://rapydli-no-such-bucket/data", options)
    with pytest.raises(DataError, match=f"{root}/missing: does not exist"):
        open_store(f"{root}/missing", options)
    unreachable = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(DataError, match="s3://bucket/data: cannot read rapydli-store.json"):
        open_store("s3://bucket/data", unreachable)
