"""Distributed equals single-worker: every preset on 2 and 3 workers, uneven splits included.

The reference is the in-process, single-worker run (``placement=None``, no client). Every
comparison goes through :func:`assert_same_as_single`: float64 within 1e-9, float32 within
1e-4, relative to the largest magnitude of the single-worker value.
"""
from __future__ import annotations

import numpy as np
import pytest

from rapydli import (
    SGD,
    Activation,
    AvgPool2D,
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    Mesh,
    Placement,
    Sequential,
    Tiling,
    data_parallel,
    fit,
    hybrid,
    model_parallel,
    spatial_parallel,
    value_and_grad,
)
from rapydli.graph.tiles import relative
from rapydli.scheduler.engine import Engine

RTOL = {np.dtype("float64"): 1e-9, np.dtype("float32"): 1e-4}
OPTIMIZER = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)


def assert_same_as_single(got, want, dtype, what: str = "value") -> None:
    """``got`` (distributed) equals ``want`` (single worker): a float or a dict of arrays.

    Relative error ``max |got - want| / max |want|`` must stay under 1e-9 (float64) or 1e-4
    (float32), per array; dict keys and shapes must match exactly.
    """
    rtol = RTOL[np.dtype(dtype)]
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{what}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same_as_single(got[key], want[key], dtype, f"{what}[{key!r}]")
        return
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max(initial=0.0)), np.finfo(np.float64).tiny)
    err = float(np.abs(got - want).max(initial=0.0)) / scale
    assert np.isfinite(got).all() and err < rtol, (
        f"{what}: relative error {err:.3e} >= {rtol:g} (max |single| = {scale:.3e})")


# --- networks: every layer type (softmax cross-entropy), and a small MLP (mse) -----------------


def cnn() -> Sequential:
    """Every layer type; 7 image rows (uneven over 2 and 3), 10 outputs (uneven over 3)."""
    return Sequential([
        Conv2D(3, 3, stride=1, padding=1, activation="relu"),  # 0: (3, 7, 6)
        MaxPool2D(2, stride=1),                                # 1: (3, 6, 5), overlapping windows
        Activation("tanh"),                                    # 2
        Conv2D(4, 2, stride=2, activation="sigmoid"),          # 3: (4, 3, 2), no padding
        Activation("sigmoid"),                                 # 4
        AvgPool2D(2, stride=1),                                # 5: (4, 2, 1)
        Activation("relu"),                                    # 6
        Flatten(),                                             # 7: (8,)
        Dense(6, activation="tanh"),                           # 8
        Activation("relu"),                                    # 9: a rank-2 activation layer
        Dense(10),                                             # 10
    ], input_shape=(2, 7, 6))


def mlp() -> Sequential:
    return Sequential([Dense(7, activation="relu"), Activation("tanh"), Dense(10)],
                      input_shape=(6,), loss="mse")


NETWORKS = {"cnn": cnn, "mlp": mlp}


def mixed(net: str, n: int) -> Placement:
    """Per-layer overrides that mix batch, rows, channels and features cuts in one network."""
    if net == "cnn":
        p = Placement(Mesh(data=1, model=n), "hybrid")
        for name, tiling in [("0", Tiling(rows="model")), ("1", Tiling(channels="model")),
                             ("3", Tiling(rows="model")), ("5", Tiling(batch="model")),
                             ("8", Tiling(features="model")), ("10", Tiling(batch="data"))]:
            p = p.with_tiling(name, tiling)
        return p
    return Placement(Mesh(data=1, model=n), "hybrid",
                     (("0", Tiling(batch="model")), ("2", Tiling(batch="data"))))


PLACEMENTS = {
    "dp2": lambda net: data_parallel(2), "dp3": lambda net: data_parallel(3),
    "mp2": lambda net: model_parallel(2), "mp3": lambda net: model_parallel(3),
    "sp2": lambda net: spatial_parallel(2), "sp3": lambda net: spatial_parallel(3),
    "hy12": lambda net: hybrid(1, 2), "hy13": lambda net: hybrid(1, 3),
    "hy31": lambda net: hybrid(3, 1),
    "mixed2": lambda net: mixed(net, 2), "mixed3": lambda net: mixed(net, 3),
}


def data(net: Sequential, n: int, dtype, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *net.input_shape)).astype(dtype)
    if net.loss.integer_labels:
        y = rng.integers(0, net.output_shape[0], n)
    else:
        y = rng.standard_normal((n, *net.output_shape)).astype(dtype)
    return x, y


CASES = [pytest.param(n, p, id=f"{n}-{p}") for n in NETWORKS for p in PLACEMENTS]


# --- value_and_grad ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("net_name,placement", CASES)
def test_value_and_grad_matches_single(client, net_name, placement, dtype):
    net = NETWORKS[net_name]()
    params = net.init(0, dtype)
    x, y = data(net, 5, dtype)  # batch 5: uneven over 2 and 3 workers
    want_loss, want_grads = value_and_grad(net, params, x, y)
    loss, grads = value_and_grad(net, params, x, y, placement=PLACEMENTS[placement](net_name),
                                 client=client)
    assert_same_as_single(loss, want_loss, dtype, "loss")
    assert_same_as_single(grads, want_grads, dtype, "grads")


@pytest.mark.parametrize("placement", ["dp3", "hy13", "hy31", "sp3", "mixed3"])
@pytest.mark.parametrize("net_name", list(NETWORKS))
def test_batch_smaller_than_mesh(client, net_name, placement):
    net = NETWORKS[net_name]()
    params = net.init(0, "float64")
    x, y = data(net, 2, "float64")
    want_loss, want_grads = value_and_grad(net, params, x, y)
    loss, grads = value_and_grad(net, params, x, y, placement=PLACEMENTS[placement](net_name),
                                 client=client)
    assert_same_as_single(loss, want_loss, "float64", "loss")
    assert_same_as_single(grads, want_grads, "float64", "grads")


# --- SGD steps ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("net_name,placement", CASES)
def test_three_sgd_steps_match_single(client, net_name, placement, dtype):
    net = NETWORKS[net_name]()
    params = net.init(0, dtype)
    x, y = data(net, 15, dtype)  # exactly 3 batches of 5
    kw = {"optimizer": OPTIMIZER, "epochs": 1, "batch_size": 5, "seed": 3, "params": params,
          "dtype": dtype}
    want = fit(net, x, y, **kw)
    got = fit(net, x, y, placement=PLACEMENTS[placement](net_name), client=client, **kw)
    assert not any(np.array_equal(want.params[k], params[k]) for k in params if "weight" in k)
    assert_same_as_single(got.params, want.params, dtype, "params after 3 steps")
    assert_same_as_single(got.opt_state, want.opt_state, dtype, "momentum after 3 steps")
    assert_same_as_single(got["loss"], want["loss"], dtype, "epoch loss")


def _run_steps(engine: Engine, net: Sequential, x, y, batches) -> None:
    engine.set_params(net.init(0, engine.dtype))
    engine.set_data("train", x, y)
    for index in batches:
        engine.value(engine.run("train", index)["metrics"])


IDLE_CASES = [pytest.param(n, p, id=f"{n}-{p}") for n in NETWORKS
              for p in ["dp3", "hy13", "hy31", "mp3", "mixed3"] + (["sp3"] if n == "cnn" else [])]


@pytest.mark.parametrize("net_name,placement", IDLE_CASES)
def test_idle_replicas_still_updated(client, net_name, placement):
    """A full batch, then a batch of 2 on 3 workers: every replica of every weight tile,
    including those on workers with no sample, ends equal to the single-worker weights."""
    net = NETWORKS[net_name]()
    x, y = data(net, 5, "float64")
    batches = [np.arange(5), np.array([3, 1])]
    ref = Engine(net, None, OPTIMIZER, None, "float64")
    _run_steps(ref, net, x, y, batches)
    want = {"param": ref.get_params(), "state": ref.get_opt_state()}
    engine = Engine(net, PLACEMENTS[placement](net_name), OPTIMIZER, client, "float64")
    _run_steps(engine, net, x, y, batches)
    seen = set()
    for key, info in sorted(engine.resident_info.items()):
        kind, pkey = info[0], info[1]
        name, region, worker = (pkey, info[2], info[3]) if kind == "param" else \
            (f"{info[2]}/{pkey}", info[3], info[4])
        full = want[kind][name]
        expected = full[relative(region, tuple((0, n) for n in full.shape))]
        assert_same_as_single(engine.value(engine.resident[key]), expected, "float64",
                              f"{kind} {name} {region} on worker {worker}")
        seen.add((kind, name, worker))
    workers = {w for _, _, w in seen}
    assert workers == {0, 1, 2}, f"replicas only on workers {sorted(workers)}"
    assert {(k, n) for k, n, _ in seen} >= {("param", n) for n in net.param_shapes()}
    engine.close()
    ref.close()
