"""Data sets, input validation, epoch batching and atomic checkpoints."""
from __future__ import annotations

import os

import numpy as np
import pytest

from rapydli.config import DataConfig
from rapydli.errors import ConfigError, DataError
from rapydli.storage import atomic
from rapydli.storage.checkpoint import load_checkpoint, save_checkpoint
from rapydli.storage.datasets import Dataset, batches, load_dataset, synthetic, validate_arrays


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig("digits", test_fraction=0.2, seed=0))


def test_digits_split_sizes_and_layout(digits):
    assert isinstance(digits, Dataset) and digits.name == "digits"
    assert digits.x_train.shape == (1437, 1, 8, 8)
    assert digits.x_test.shape == (360, 1, 8, 8)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.input_shape == (1, 8, 8) and digits.n_classes == 10


def test_digits_ranges_and_dtypes(digits):
    for x in (digits.x_train, digits.x_test):
        assert x.dtype == np.float32
        assert x.min() == 0.0 and x.max() == 1.0
        # pixels of the raw data are integers 0..16
        np.testing.assert_allclose(x * 16, np.round(x * 16), atol=1e-5)
    for y in (digits.y_train, digits.y_test):
        assert y.dtype == np.int64 and set(y.tolist()) == set(range(10))


def test_digits_split_is_stratified_and_disjoint(digits):
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 360 / 10, stratified
    train = {x.tobytes() for x in digits.x_train}
    assert sum(x.tobytes() in train for x in digits.x_test) < 5  # a few true duplicates at most


def test_digits_matches_sklearn_images(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    all_images = np.concatenate([digits.x_train, digits.x_test])[:, 0] * 16
    np.testing.assert_allclose(np.sort(all_images.ravel()), np.sort(raw.images.ravel()), atol=1e-4)
    assert np.array_equal(np.sort(np.concatenate([digits.y_train, digits.y_test])),
                          np.sort(raw.target))


def test_digits_is_deterministic_and_seeded(digits):
    again = load_dataset(DataConfig("digits", seed=0))
    assert np.array_equal(again.x_train, digits.x_train)
    assert np.array_equal(again.y_test, digits.y_test)
    other = load_dataset(DataConfig("digits", seed=1))
    assert not np.array_equal(other.y_train, digits.y_train)


def test_digits_float64_and_subset():
    ds = load_dataset(DataConfig("digits", n_samples=500), dtype="float64")
    assert ds.x_train.dtype == np.float64
    assert len(ds.x_train) + len(ds.x_test) == 500 and len(ds.x_test) == 100
    with pytest.raises(DataError, match="data.n_samples"):
        load_dataset(DataConfig("digits", n_samples=5000))


def test_dataset_arrays_are_read_only(digits):
    with pytest.raises(ValueError):
        digits.x_train[0, 0, 0, 0] = 5.0


def test_load_dataset_rejects_bad_dtype():
    with pytest.raises(DataError, match="float16"):
        load_dataset(DataConfig("synthetic", n_samples=100), dtype="float16")


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic():
    a = load_dataset(DataConfig("synthetic", seed=3))
    b = load_dataset(DataConfig("synthetic", seed=3))
    c = load_dataset(DataConfig("synthetic", seed=4))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_synthetic_shape_range_and_balance():
    ds = load_dataset(DataConfig("synthetic"))
    assert len(ds.x_train) + len(ds.x_test) == 600 and len(ds.x_test) == 120
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert np.array_equal(np.bincount(ds.y_train, minlength=10), np.full(10, 48))


def test_synthetic_classes_are_separable():
    # nearest class mean on the training split must beat chance by far: a CNN can learn it
    x, y = synthetic(1000, seed=0)
    flat = x.reshape(len(x), -1)
    means = np.stack([flat[:800][y[:800] == k].mean(0) for k in range(10)])
    pred = np.argmin(((flat[800:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[800:]).mean() > 0.8


# ----------------------------------------------------------------------------- validation
def test_validate_arrays_counts_non_finite_values():
    x = np.zeros((4, 3))
    x[1, 2], x[3, 0], x[3, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(DataError) as info:
        validate_arrays(x, np.arange(4), where="train")
    assert "train.x: found 3 NaN or infinite value(s)" in str(info.value)
    assert "(1, 2)" in str(info.value)


@pytest.mark.parametrize("y, n_classes, match", [
    (np.array([0, 1, 2]), None, r"expected 4 labels"),
    (np.array([0.0, 1.0, 2.0, 3.0]), None, r"expected integer class labels; received dtype float64"),
    (np.array([0, 1, 2, 10]), 10, r"expected labels in \[0, 10\); received range \[0, 10\]"),
    (np.array([0, -1, 2, 3]), None, r"expected labels in >= 0; received range \[-1, 3\]"),
    (np.zeros((4, 1), np.int64), None, r"received shape \(4, 1\)"),
])
def test_validate_arrays_bad_labels(y, n_classes, match):
    with pytest.raises(DataError, match=match):
        validate_arrays(np.zeros((4, 2)), y, n_classes)


def test_validate_arrays_accepts_good_data():
    validate_arrays(np.ones((3, 1, 8, 8), np.float32), np.array([0, 9, 4]), n_classes=10)


# ----------------------------------------------------------------------------- batches
def test_batches_cover_every_index_once():
    out = batches(10, 4, np.random.default_rng(0))
    assert [len(b) for b in out] == [4, 4, 2]
    assert sorted(np.concatenate(out).tolist()) == list(range(10))
    again = batches(10, 4, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(out, again))
    assert not np.array_equal(np.concatenate(out), np.arange(10))  # shuffled


def test_batches_edge_cases():
    assert batches(0, 4, np.random.default_rng(0)) == []
    assert [len(b) for b in batches(8, 4, np.random.default_rng(0))] == [4, 4]
    with pytest.raises(DataError, match="batch_size"):
        batches(8, 0, np.random.default_rng(0))


# ----------------------------------------------------------------------------- checkpoints
def _state(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {"0.weight": rng.standard_normal((4, 1, 3, 3)).astype(dtype),
              "0.bias": rng.standard_normal(4).astype(dtype),
              "5.weight": rng.standard_normal((10, 64)).astype(dtype)}
    opt_state = {f"{name}/velocity": rng.standard_normal(p.shape).astype(dtype)
                 for name, p in params.items()}
    return params, opt_state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpoint_round_trip_exact(tmp_path, dtype):
    params, opt_state = _state(dtype)
    meta = {"epoch": 3, "step": 69, "loss": 0.125, "config": {"mesh": [["data", 2]]}, "ok": True}
    path = save_checkpoint(tmp_path / "run", params, opt_state, meta)
    assert path == tmp_path / "run" / "checkpoint.npz"
    for where in (path, tmp_path / "run", str(tmp_path / "run")):
        p2, s2, m2 = load_checkpoint(where)
        assert m2 == meta
        for saved, loaded in ((params, p2), (opt_state, s2)):
            assert saved.keys() == loaded.keys()
            for name in saved:
                assert loaded[name].dtype == dtype
                assert np.array_equal(loaded[name], saved[name])


def test_checkpoint_loads_without_pickle(tmp_path):
    path = save_checkpoint(tmp_path, *_state(np.float32), {"epoch": 1})
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) >= {"meta", "version", "param/0.weight", "state/0.weight/velocity"}
        assert npz["meta"].dtype == np.uint8


def test_checkpoint_overwrites_previous(tmp_path):
    save_checkpoint(tmp_path, *_state(np.float32, seed=0), {"epoch": 1})
    new_params, new_state = _state(np.float32, seed=1)
    save_checkpoint(tmp_path, new_params, new_state, {"epoch": 2})
    params, _, meta = load_checkpoint(tmp_path)
    assert meta == {"epoch": 2} and np.array_equal(params["0.weight"], new_params["0.weight"])
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old_params, old_state = _state(np.float64, seed=0)
    save_checkpoint(tmp_path, old_params, old_state, {"epoch": 1})
    calls = []

    def crash(src, dst):
        calls.append((src, dst))
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, *_state(np.float64, seed=1), {"epoch": 2})
    assert len(calls) == 1 and os.path.dirname(calls[0][0]) == str(tmp_path)
    monkeypatch.undo()
    params, _, meta = load_checkpoint(tmp_path)
    assert meta == {"epoch": 1} and np.array_equal(params["0.weight"], old_params["0.weight"])
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # temporary file removed


def test_failed_first_save_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (_ for _ in ()).throw(
        OSError("crash")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "run", *_state(np.float32), {})
    assert os.listdir(tmp_path / "run") == []


def test_write_is_fsynced_before_replace(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"),
                                                           real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda s, d: (events.append("replace"),
                                                               real_replace(s, d))[1])
    save_checkpoint(tmp_path, *_state(np.float32), {})
    assert events[:2] == ["fsync", "replace"]


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_checkpoint(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "checkpoint.npz") in str(info.value)
    assert "not found" in str(info.value)
    with pytest.raises(ConfigError, match="ckpt.npz"):
        load_checkpoint(tmp_path / "ckpt.npz")


def test_load_corrupt_checkpoint(tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_save_rejects_non_json_meta(tmp_path):
    with pytest.raises(DataError, match="checkpoint meta"):
        save_checkpoint(tmp_path, {}, {}, {"when": object()})
    assert os.listdir(tmp_path) == []
