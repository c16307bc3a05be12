"""Locally connected networks: ``LocallyConnected2D``, ``L2Pool2D`` and ``LocalContrastNorm``.

Gradients against central differences (float64, through the lowered graph); compiled kernels
against the NumPy references; the fused backward + SGD update against backward then update;
every placement against the single worker (one shared assert); exact halo bytes counted in the
lowered graph; and locally connected weights never replicated under a split by rows.
"""
from __future__ import annotations


import numpy as np
import pytest
import yaml
from gradcheck import check_grad
from test_equivalence import assert_same_as_single

import rapydli as rd
from rapydli.config import parse_config
from rapydli.graph.lower import lower
from rapydli.graph.tiles import split
from rapydli.kernels import local
from rapydli.kernels._dispatch import numba_available
from rapydli.layers import from_config
from rapydli.placement import Tiling

IMAGE = (2, 7, 6)
OPTIMIZER = rd.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
TOL = {"float64": 1e-12, "float32": 2e-5}
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")


# --- gradients, through the lowered graph -----------------------------------------------------

LAYERS = {  # a 1x1 convolution in front, so the new layer's dx is checked too
    "lc-k3-tanh": rd.LocallyConnected2D(3, 3, activation="tanh"),
    "lc-k4x2-s2x1-nobias": rd.LocallyConnected2D(2, (4, 2), stride=(2, 1), use_bias=False),
    "l2pool": rd.L2Pool2D(2),
    "l2pool-overlap": rd.L2Pool2D(3, stride=(2, 1)),
    "lcn-3": rd.LocalContrastNorm(3),
    "lcn-5-sigma": rd.LocalContrastNorm(5, sigma=1.5, c=0.5),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradients_match_finite_differences(name):
    net = rd.Sequential([rd.Conv2D(2, 1), LAYERS[name], rd.Flatten(), rd.Dense(3)],
                        input_shape=IMAGE)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *IMAGE))
    y = rng.integers(0, 3, 4)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in net.init(1, np.float64).items()}
    loss, grads = rd.value_and_grad(net, params, x, y)

    def f(**p):
        return rd.value_and_grad(net, p, x, y)[0]

    assert f(**params) == loss
    check_grad(f, params, grads, eps=1e-6, rtol=1e-5, n_dirs=2)


# --- kernels: compiled against the NumPy reference --------------------------------------------


def close(got, want, dtype, what="value"):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-300)
    assert err < TOL[str(np.dtype(dtype))], f"{what}: relative error {err:.2e}"


LC_CASES = [((3, 3), (1, 1)), ((4, 2), (2, 1)), ((2, 3), (1, 2))]


def lc_args(kernel, stride, dtype, seed=0, n=3, c=2, h=9, w=8, f=4):
    rng = np.random.default_rng(seed)
    ho, wo = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((ho, wo, f, c, *kernel)).astype(dtype)
    bias = rng.standard_normal((ho, wo, f)).astype(dtype)
    dz = rng.standard_normal((n, f, ho, wo)).astype(dtype)
    return x, weight, bias, dz


@needs_numba
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kernel,stride", LC_CASES)
def test_locally_connected_kernels_match_reference(kernel, stride, dtype):
    x, weight, bias, dz = lc_args(kernel, stride, dtype)
    y = local.locally_connected_forward(x, weight, bias, stride)
    assert y.dtype == dtype
    close(y, local.locally_connected_forward_reference(x, weight, bias, stride), dtype, "y")
    got = local.locally_connected_backward(x, weight, dz, stride)
    want = local.locally_connected_backward_reference(x, weight, dz, stride)
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        close(g, w, dtype, name)
    assert local.locally_connected_backward(x, weight, dz, stride, need_dx=False)[0] is None


@pytest.mark.parametrize("impl", [
    pytest.param(local.locally_connected_backward_update, id="compiled", marks=needs_numba),
    pytest.param(local.locally_connected_backward_update_reference, id="reference")])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kernel,stride", LC_CASES[:2])
def test_fused_backward_update_matches_backward_then_sgd(impl, kernel, stride, dtype, use_bias):
    x, weight, bias, dz = lc_args(kernel, stride, dtype, seed=2)
    bias = bias if use_bias else None
    dx, dw, db = local.locally_connected_backward_reference(x, weight, dz, stride)
    sgd = rd.SGD(lr=0.05)
    want_w = sgd.update(weight, dw, {})[0]
    w_new, b_new, x0, dz0 = weight.copy(), None if bias is None else bias.copy(), x.copy(), dz.copy()
    got_dx = impl(x, w_new, b_new, dz, 0.05, True, stride)
    close(got_dx, dx, dtype, "dx (from the old weights)")
    close(w_new, want_w, dtype, "weight after the step")
    if use_bias:
        close(b_new, sgd.update(bias, db, {})[0], dtype, "bias after the step")
    assert np.array_equal(x, x0) and np.array_equal(dz, dz0)
    assert impl(x, w_new.copy(), None, dz, 0.05, False, stride) is None


PEAK_SCRIPT = """
import os, tracemalloc
import numpy as np
os.environ["RAPYDLI_KERNELS"] = "numpy"
from rapydli.kernels import local
rng = np.random.default_rng(0)
x, dz = rng.standard_normal((2, 4, 18, 18)), rng.standard_normal((2, 8, 16, 16))
weight, bias = rng.standard_normal((16, 16, 8, 4, 3, 3)), rng.standard_normal((16, 16, 8))
tracemalloc.start()
local.locally_connected_backward_update(x, weight, bias, dz, 0.1, True)
print(tracemalloc.get_traced_memory()[1], weight.nbytes)
"""


def test_fused_update_never_holds_the_whole_weight_gradient():
    """Peak allocation of the NumPy fused path, measured in a process of its own (tracemalloc
    would also count, and slow down, every other thread of this one, Dask's included)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True,
                         check=True).stdout
    peak, weight_nbytes = map(int, out.split())
    assert peak < weight_nbytes / 4, (peak, weight_nbytes)


@needs_numba
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("size,stride", [(2, 2), (3, (2, 1)), ((2, 3), 1)])
def test_l2pool_kernels_match_reference(size, stride, dtype):
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 8)).astype(dtype)
    x[0, 0] = 0  # all-zero windows: eps keeps the gradient finite (zero)
    y = local.l2pool2d_forward(x, size, stride)
    assert y.dtype == dtype
    close(y, local.l2pool2d_forward_reference(x, size, stride), dtype, "y")
    dy = np.ones_like(y)
    dx = local.l2pool2d_backward(x, y, dy, size, stride)
    close(dx, local.l2pool2d_backward_reference(x, y, dy, size, stride), dtype, "dx")
    assert np.isfinite(dx).all() and not dx[0, 0].any()


@needs_numba
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("size,sigma", [(1, None), (3, None), (5, 1.5)])
def test_local_contrast_norm_kernels_match_reference(size, sigma, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 13, 12)).astype(dtype)
    y = local.local_contrast_norm_forward(x, size, sigma, 0.2)
    halo = 2 * (size // 2)
    assert y.shape == (2, 3, 13 - 2 * halo, 12 - 2 * halo) and y.dtype == dtype
    close(y, local.local_contrast_norm_forward_reference(x, size, sigma, 0.2), dtype, "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = local.local_contrast_norm_backward(x, dy, size, sigma, 0.2)
    assert dx.shape == x.shape and dx.dtype == dtype
    close(dx, local.local_contrast_norm_backward_reference(x, dy, size, sigma, 0.2), dtype, "dx")


def test_local_contrast_norm_normalises_a_constant_and_a_scaled_image():
    x = np.random.default_rng(3).standard_normal((1, 2, 15, 15))
    flat = local.local_contrast_norm_forward_reference(np.full((1, 2, 15, 15), 5.0), 3, c=0.1)
    assert np.allclose(flat, 0)  # the local mean of a constant is itself
    big = local.local_contrast_norm_forward_reference(1e4 * x, 3, c=0.1)
    assert np.allclose(big, local.local_contrast_norm_forward_reference(x, 3, c=1e-5), atol=1e-6)


# --- distributed equals single worker ---------------------------------------------------------


def lc_net():
    return rd.Sequential([
        rd.Conv2D(3, 3, padding=1, activation="relu"),        # (3, 9, 7)
        rd.LocallyConnected2D(4, 3, activation="tanh"),        # (4, 7, 5)
        rd.LocallyConnected2D(3, (2, 3), stride=(2, 1)),       # (3, 3, 3)
        rd.Flatten(), rd.Dense(5)], input_shape=(2, 9, 7))


def l2_net():
    return rd.Sequential([
        rd.Conv2D(3, 3, padding=1, activation="tanh"),        # (3, 9, 7)
        rd.L2Pool2D(3, stride=2),                              # (3, 4, 3)
        rd.L2Pool2D(2, stride=1),                              # (3, 3, 2)
        rd.Flatten(), rd.Dense(5)], input_shape=(2, 9, 7))


def lcn_net():
    return rd.Sequential([
        rd.Conv2D(3, 3, padding=1, activation="tanh"),        # (3, 9, 7)
        rd.LocalContrastNorm(5),                               # halo 4 > 3 rows a tile on sp3
        rd.Conv2D(2, 3),                                       # (2, 7, 5)
        rd.Flatten(), rd.Dense(5)], input_shape=(2, 9, 7))


NETS = {"lc": lc_net, "l2pool": l2_net, "lcn": lcn_net}
PLACEMENTS = {"sp2": lambda: rd.spatial_parallel(2), "sp3": lambda: rd.spatial_parallel(3),
              "mp2": lambda: rd.model_parallel(2), "dp2": lambda: rd.data_parallel(2)}
CASES = [pytest.param(n, p, id=f"{n}-{p}") for n in NETS for p in PLACEMENTS]


def batch(net, n, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *net.input_shape)).astype(dtype), rng.integers(0, 5, n)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("net_name,placement", CASES)
def test_value_and_grad_matches_single(client, net_name, placement, dtype):
    net = NETS[net_name]()
    params = net.init(0, dtype)
    x, y = batch(net, 5, dtype)
    want_loss, want_grads = rd.value_and_grad(net, params, x, y)
    loss, grads = rd.value_and_grad(net, params, x, y, placement=PLACEMENTS[placement](),
                                    client=client)
    assert_same_as_single(loss, want_loss, dtype, "loss")
    assert_same_as_single(grads, want_grads, dtype, "grads")


@pytest.mark.parametrize("net_name,placement", CASES)
def test_three_sgd_steps_match_single(client, net_name, placement):
    net = NETS[net_name]()
    params = net.init(0, "float64")
    x, y = batch(net, 15, "float64")
    kw = {"optimizer": OPTIMIZER, "epochs": 1, "batch_size": 5, "seed": 3, "params": params,
          "dtype": "float64"}
    want = rd.fit(net, x, y, **kw)
    got = rd.fit(net, x, y, placement=PLACEMENTS[placement](), client=client, **kw)
    assert not np.array_equal(want.params["1.weight" if net_name == "lc" else "0.weight"],
                              params["1.weight" if net_name == "lc" else "0.weight"])
    assert_same_as_single(got.params, want.params, "float64", "params after 3 steps")
    assert_same_as_single(got["loss"], want["loss"], "float64", "epoch loss")


def test_placement_rules_for_the_new_layers():
    lc, pool, lcn = rd.LocallyConnected2D(2, 3, name="1"), rd.L2Pool2D(name="2"), \
        rd.LocalContrastNorm(name="3")
    for layer in (lc, pool, lcn):
        assert rd.spatial_parallel(2).tiling_for(layer, 4) == Tiling(rows="model")
        assert rd.data_parallel(2).tiling_for(layer, 4) == Tiling(batch="data")
    assert rd.model_parallel(2).tiling_for(lc, 4) == Tiling(channels="model")
    assert rd.model_parallel(2).tiling_for(pool, 4) == Tiling(channels="model")
    assert rd.model_parallel(2).tiling_for(lcn, 4) == Tiling(rows="model")
    with pytest.raises(rd.PlacementError, match="'batch', 'rows'"):
        rd.model_parallel(2).with_tiling("3", Tiling(channels="model")).tiling_for(lcn, 4)


# --- halo bytes, counted in the lowered graph -------------------------------------------------


def crossing_bytes_into(graph, prefix):
    return sorted(size for _, v, size in graph.crossing_edges() if v.startswith(prefix))


HALO_CASES = [  # layer, image rows, cols, workers, rows each halo piece carries (by hand)
    pytest.param(rd.LocallyConnected2D(2, 3), 8, 5, 2, [1, 1], id="lc-k3-s1-w2"),
    pytest.param(rd.LocallyConnected2D(2, 3), 9, 5, 3, [1, 1, 2], id="lc-k3-s1-w3"),
    pytest.param(rd.LocallyConnected2D(2, 4, stride=2), 10, 6, 2, [1, 1], id="lc-k4-s2-w2"),
    pytest.param(rd.LocallyConnected2D(2, 4, stride=2), 11, 6, 3, [2, 2], id="lc-k4-s2-w3"),
    pytest.param(rd.LocalContrastNorm(3), 8, 5, 2, [2, 2], id="lcn3-w2"),
    pytest.param(rd.LocalContrastNorm(5), 13, 5, 3, [4, 4, 4, 4], id="lcn5-w3"),
    pytest.param(rd.LocalContrastNorm(5), 9, 5, 3, [1, 1, 3, 3, 3, 3], id="lcn5-w3-two-hops"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layer,rows,cols,workers,halo_rows", HALO_CASES)
def test_halo_bytes_are_exactly_the_window_rows(layer, rows, cols, workers, halo_rows, dtype):
    channels, n = 3, 4
    net = rd.Sequential([rd.Conv2D(channels, 3, padding=1), layer, rd.Flatten(), rd.Dense(3)],
                        input_shape=(2, rows, cols))
    graph = lower(net, rd.spatial_parallel(workers), n, "grad", dtype=dtype)
    if isinstance(layer, rd.LocallyConnected2D):  # the columns its windows read (floor mode)
        (_, kw), (_, sw) = layer.kernel, layer.strides
        cols = (net.shapes[1][1][2] - 1) * sw + kw
    per_row = cols * channels * n * np.dtype(dtype).itemsize
    want = sorted(r * per_row for r in halo_rows)
    assert crossing_bytes_into(graph, "1/in/") == want  # forward: border rows in
    assert crossing_bytes_into(graph, "0/dy/") == want  # backward: their gradients out
    assert not crossing_bytes_into(graph, "0/in/")


def test_spatial_split_keeps_each_weight_row_on_one_worker():
    net = lc_net()
    graph = lower(net, rd.spatial_parallel(3), 5, "train", OPTIMIZER, dtype="float64")
    ho = net.shapes[1][1][1]  # output rows of the first locally connected layer
    for pname, full in net.param_shapes().items():
        if not pname.startswith("1."):
            continue
        tiles = sorted((workers, region) for (key, region), workers
                       in graph.graph["replicas"].items() if key == pname)
        assert [len(w) for w, _ in tiles] == [1, 1, 1], tiles  # never replicated
        assert [w[0] for w, _ in tiles] == [0, 1, 2]
        rows = [region[0] for _, region in tiles]  # weight rows = output rows of the tile
        assert rows == split(ho, 3) == [(0, 3), (3, 5), (5, 7)]
        for _, region in tiles:
            assert region[1:] == tuple((0, s) for s in full[1:])
        assert sum(np.prod([b - a for a, b in r]) for _, r in tiles) == np.prod(full)
    fwd = {op.worker: op for op in graph.ops(kind="forward") if op.layer == "1"}
    assert {w: op.shape[2] for w, op in fwd.items()} == {0: 3, 1: 2, 2: 2}
    weight_grads = [op for op in graph.ops() if op.key.startswith("1.weight/grad")]
    assert not weight_grads or all(op.kind != "send" for op in weight_grads)
    updates = sorted(op.worker for op in graph.ops(kind="update") if op.layer == "1")
    assert updates == [0, 0, 1, 1, 2, 2]  # weight and bias, once per worker


# --- configs ----------------------------------------------------------------------------------

YAML = """
network:
  input_shape: [2, 12, 10]
  layers:
    - {type: LocallyConnected2D, filters: 4, kernel_size: [3, 2], stride: 1, activation: relu}
    - {type: L2Pool2D, pool_size: 2}
    - {type: LocalContrastNorm, size: 3, sigma: 1.0, c: 0.05}
    - {type: Flatten}
    - {type: Dense, units: 3}
placement: {preset: spatial_parallel}
"""


def test_new_layers_parse_from_yaml_and_round_trip():
    cfg = parse_config(yaml.safe_load(YAML))
    net = cfg.network.build()
    lc, pool, lcn = net.layers[:3]
    assert lc == rd.LocallyConnected2D(4, (3, 2), 1, "relu", name="0")
    assert pool == rd.L2Pool2D(2, name="1") and lcn == rd.LocalContrastNorm(3, 1.0, 0.05, name="2")
    assert net.param_shapes()["0.weight"] == (10, 9, 4, 2, 3, 2)
    assert net.param_shapes()["0.bias"] == (10, 9, 4)
    assert [s[1] for s in net.shapes[:3]] == [(4, 10, 9), (4, 5, 4), (4, 5, 4)]
    for layer in (lc, pool, lcn):
        config = layer.get_config()
        assert from_config(config) == type(layer)(**{k: v for k, v in config.items()
                                                     if k != "type"})
    with pytest.raises(rd.ConfigError, match="odd"):
        from_config({"type": "LocalContrastNorm", "size": 4})
    with pytest.raises(rd.ConfigError, match="positive"):
        from_config({"type": "LocalContrastNorm", "c": 0})
