"""Kernel autotuning: pruning, the timing harness, correctness checks, the cache and the CLI."""
from __future__ import annotations

import json
import textwrap
import time

import numpy as np
import pytest

from rapydli.kernels import autotune, conv2d_backward, conv2d_forward, dense_forward
from rapydli.kernels.autotune import Cache, Space


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own default cache file; toy ops are unregistered afterwards."""
    monkeypatch.setenv("RAPYDLI_AUTOTUNE_CACHE", str(tmp_path / "default-cache.json"))
    monkeypatch.delenv("RAPYDLI_AUTOTUNE", raising=False)
    monkeypatch.delenv("RAPYDLI_AUTOTUNE_MEMORY_MB", raising=False)
    before = dict(autotune._REGISTRY)
    autotune.clear_memo()
    yield
    autotune._REGISTRY.clear()
    autotune._REGISTRY.update(before)
    autotune.clear_memo()


def _toy(op="toy", delays=None, wrong=()):
    """A kernel ``x * 2`` whose config ``(tile, algo)`` sleeps ``delays[config]`` seconds."""
    delays = delays or {}

    def make(config):
        delay = delays.get((config["tile"], config["algo"]), 0.0)
        factor = 3.0 if (config["tile"], config["algo"]) in wrong else 2.0

        def kernel(x):
            if delay:
                time.sleep(delay)
            return x * factor
        return kernel

    def divides(config, shapes, dtype, device):
        return shapes["x"][0] % config["tile"] == 0

    space = Space(op, {"tile": (1, 2, 3, 4), "algo": ("a", "b", "c")}, make, (divides,))
    return autotune.register(op, space)


def test_pruning_by_hard_then_soft_constraints():
    _toy()
    x = np.ones((8, 2))  # tiles 1, 2, 4 divide 8; 3 does not
    configs, counts = autotune.candidates("toy", (x,))
    assert counts == {"total": 12, "hard": 3, "soft": 0, "left": 9}
    assert all(c["tile"] != 3 for c in configs)
    _, counts = autotune.candidates("toy", (x,), soft={"algo": "c", "tile": (1,)})
    assert counts == {"total": 12, "hard": 3, "soft": 5, "left": 4}  # tile 1 (3) + algo c (2 more)
    _, counts = autotune.candidates("toy", (x,), soft=lambda c: c["algo"] == "a")
    assert counts["left"] == 3


def test_conv_memory_budget_and_batch_prune(monkeypatch):
    x, w = np.zeros((256, 6, 12, 12), np.float32), np.zeros((16, 6, 5, 5), np.float32)
    args = (x, w, None, (1, 1), (0, 0))
    _, counts = autotune.candidates("conv2d_forward", args)
    assert counts["left"] == 5  # all, 16, 32, 64, 128
    _, counts = autotune.candidates("conv2d_forward", (x[:40], w, None, (1, 1), (0, 0)))
    assert counts["left"] == 3  # all, 16, 32: chunks >= the batch are the plain kernel again
    # one sample's im2col buffer: 6*5*5*8*8*4 = 38400 bytes; budget 2 MB fits chunks <= 54
    monkeypatch.setenv("RAPYDLI_AUTOTUNE_MEMORY_MB", "2")
    configs, counts = autotune.candidates("conv2d_forward", args)
    assert [c["chunk"] for c in configs] == [16, 32]


def test_harness_picks_the_truly_fastest_and_rejects_wrong_output(tmp_path):
    slow = 0.004
    delays = {(t, a): slow for t in (1, 2, 3, 4) for a in "abc"}
    delays[(2, "b")] = 0.0  # the fastest, correct
    delays[(4, "c")] = 0.0  # as fast but wrong output: must be rejected
    delays[(1, "a")] = slow  # the default
    _toy(delays=delays, wrong={(4, "c")})
    r = autotune.search("toy", (np.ones((8, 2)),), repeats=3, cache=tmp_path / "c.json")
    assert r.config == {"tile": 2, "algo": "b"}
    assert [c for c, _ in r.rejected] == [{"tile": 4, "algo": "c"}]
    assert r.time < r.default_time and r.speedup > 2
    assert autotune.choice("toy", (np.ones((8, 2)),), cache=tmp_path / "c.json") == r.config


def test_cache_round_trip_and_key_parts(tmp_path):
    path = tmp_path / "cache.json"
    shapes = {"x": (8, 2), "stride": [1, 1]}
    cache = Cache(path)
    cache.put("op", shapes, "float32", "cpu:A", {"config": {"k": 1}})
    cache.put("op", shapes, "float64", "cpu:A", {"config": {"k": 2}})
    cache.put("op", shapes, "float32", "cuda:B", {"config": {"k": 3}})
    cache.put("op", {"x": (4, 2), "stride": [1, 1]}, "float32", "cpu:A", {"config": {"k": 4}})
    cache.put("op2", shapes, "float32", "cpu:A", {"config": {"k": 5}})
    again = Cache(path)
    assert len(again) == 5
    found = [again.get(op, s, d, dev)["config"]["k"] for op, s, d, dev in [
        ("op", shapes, "float32", "cpu:A"), ("op", shapes, "float64", "cpu:A"),
        ("op", shapes, "float32", "cuda:B"), ("op", {"x": (4, 2), "stride": [1, 1]}, "float32", "cpu:A"),
        ("op2", shapes, "float32", "cpu:A")]]
    assert found == [1, 2, 3, 4, 5]
    assert again.get("op", {"x": (8, 3), "stride": [1, 1]}, "float32", "cpu:A") is None
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_cache_uses_env_and_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPYDLI_AUTOTUNE_CACHE", str(tmp_path / "env.json"))
    assert Cache().path == tmp_path / "env.json"
    assert autotune.default_cache().path == tmp_path / "env.json"
    assert Cache(tmp_path / "arg.json").path == tmp_path / "arg.json"


@pytest.mark.parametrize("text", ["{not json", '{"entries": [1, 2]}', '{"entries": {"k": 3}}', ""])
def test_corrupt_cache_warns_and_starts_empty(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.warns(RuntimeWarning, match="starting empty"):
        cache = Cache(path)
        assert len(cache) == 0
        assert autotune.choice("dense_forward", (np.ones((2, 3)), np.ones((4, 3)), None),
                               cache=cache) is None
        cache.put("op", {"x": (1,)}, "float32", "cpu", {"config": {"k": 1}})
    assert json.loads(path.read_text())["entries"]  # rewritten whole


def _conv_args(n=40):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 10, 10)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    dy = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    return x, w, b, dy


def _close(a, b):
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        if v is None:
            assert u is None
        else:
            assert u.dtype == v.dtype and u.shape == v.shape
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5 * float(np.abs(v).max()))


@pytest.mark.parametrize("need_dx", [True, False])
def test_call_tuned_equals_untuned_conv(tmp_path, monkeypatch, need_dx):
    x, w, b, dy = _conv_args()
    fwd_args, bwd_args = (x, w, b, (1, 1), (0, 0)), (x, w, dy, (1, 1), (0, 0))
    plain_f, plain_b = conv2d_forward(*fwd_args), conv2d_backward(*bwd_args, need_dx=need_dx)
    # no cache entry: a passthrough to the plain kernel, bit for bit
    assert autotune.choice("conv2d_forward", fwd_args) is None
    np.testing.assert_array_equal(autotune.call("conv2d_forward", *fwd_args), plain_f)
    untuned = autotune.call("conv2d_backward", *bwd_args, need_dx=need_dx)
    for u, v in zip(untuned, plain_b):
        assert (u is None and v is None) or np.array_equal(u, v)
    # a cached chunked choice (16 does not divide 40: a ragged last chunk)
    cache = autotune.default_cache()
    calls = [("conv2d_forward", fwd_args, {}), ("conv2d_backward", bwd_args, {"need_dx": need_dx})]
    for op, args, kw in calls:
        cache.put(op, *autotune.signature(op, args, kw), {"config": {"chunk": 16}})
    assert autotune.choice("conv2d_forward", fwd_args) == {"chunk": 16}
    assert autotune.choice("conv2d_backward", bwd_args, {"need_dx": need_dx}) == {"chunk": 16}
    _close(autotune.call("conv2d_forward", *fwd_args), plain_f)
    _close(autotune.call("conv2d_backward", *bwd_args, need_dx=need_dx), plain_b)
    # the same key whether stride/padding come by position or by name
    by_name = {"stride": (1, 1), "padding": (0, 0)}
    assert autotune.choice("conv2d_forward", (x, w, b), by_name) == {"chunk": 16}
    # RAPYDLI_AUTOTUNE=0 disables it
    monkeypatch.setenv("RAPYDLI_AUTOTUNE", "0")
    assert not autotune.enabled()
    np.testing.assert_array_equal(autotune.call("conv2d_forward", *fwd_args), plain_f)


def test_tune_then_call_equals_untuned(tmp_path):
    x, w, b, dy = _conv_args(n=48)
    rng = np.random.default_rng(1)
    xd, wd, bd = (rng.standard_normal(s).astype(np.float32) for s in [(48, 20), (7, 20), (7,)])
    cases = [("conv2d_forward", (x, w, b, (1, 1), (0, 0)), {}),
             ("conv2d_backward", (x, w, dy, (1, 1), (0, 0)), {"need_dx": True}),
             ("dense_forward", (xd, wd, bd), {}), ("dense_forward", (xd, wd, None), {})]
    soft = {"chunk": 32}
    for op, args, kw in cases:
        config = autotune.tune(op, args, kwargs=kw, repeats=1, soft=soft)
        assert config.get("chunk") != 32
        assert autotune.choice(op, args, kw) == config
        _close(autotune.call(op, *args, **kw), autotune.get_space(op).reference(*args, **kw))
    for algorithm in ("matmul", "einsum"):  # each instantiation, not only the chosen one
        fn = autotune.get_space("dense_forward").make({"algorithm": algorithm})
        _close(fn(xd, wd, bd), dense_forward(xd, wd, bd))


def test_choice_is_memoised_and_device_string(monkeypatch):
    x = np.ones((2, 3), np.float32)
    args = (x, np.ones((4, 3), np.float32), None)
    assert autotune.choice("dense_forward", args) is None

    def no_second_lookup(*a, **k):
        raise AssertionError("choice() looked the cache up again instead of its memo")

    monkeypatch.setattr(autotune, "signature", no_second_lookup)
    for _ in range(3):
        assert autotune.choice("dense_forward", args) is None  # memoised, no cache lookup
    monkeypatch.undo()
    shapes, dtype, device = autotune.signature("dense_forward", args)
    assert shapes == {"x": (2, 3), "w": (4, 3), "b": None} and dtype == "float32"
    assert device.startswith("cpu:")


TINY = textwrap.dedent("""
    data: {name: synthetic, n_samples: 64, seed: 0}
    network:
      input_shape: [1, 8, 8]
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: 1, activation: relu}
        - {type: MaxPool2D, pool_size: 2}
        - {type: Flatten}
        - {type: Dense, units: 10}
    train: {epochs: 1, batch_size: 40, seed: 0}
    placement: {preset: single}
""")


def test_cli_tune_writes_a_cache_choice_finds(tmp_path, capsys):
    from rapydli.cli import main
    from rapydli.config import load_config

    path, cache_path = tmp_path / "tiny.yaml", tmp_path / "tuned.json"
    path.write_text(TINY)
    assert main(["tune", str(path), "--cache", str(cache_path), "--repeats", "1",
                 "--exclude", "chunk=16"]) == 0
    out = capsys.readouterr().out
    assert "conv2d_forward" in out and "dense_forward" in out and "speedup" in out
    entries = json.loads(cache_path.read_text())["entries"]
    assert {e["op"] for e in entries.values()} == {"conv2d_forward", "conv2d_backward", "dense_forward"}
    assert all(e["config"].get("chunk") != 16 for e in entries.values())

    layer = load_config(path).network.build().layers[0]
    x = np.zeros((40, 1, 10, 10), np.float32)  # the batch, zero-padded as the graph passes it
    w, b = np.zeros((4, 1, 3, 3), np.float32), np.zeros(4, np.float32)
    config = autotune.choice("conv2d_forward", (x, w, b, layer.strides, (0, 0)), cache=cache_path)
    assert config is not None and config["chunk"] in ("all", 32)
    dense = autotune.choice("dense_forward", (np.zeros((40, 64), np.float32),
                                              np.zeros((10, 64), np.float32), np.zeros(10, np.float32)),
                            cache=cache_path)
    assert dense is not None
