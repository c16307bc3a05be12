"""Every layer and loss, through the whole lowered graph, against central finite differences
in float64; plus the layer contract (shapes, parameter layouts, configs)."""
from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad

import rapydli as rd
from rapydli.layers import from_config

IMAGE = (2, 7, 6)

LAYERS = {
    "dense-relu": ([rd.Flatten(), rd.Dense(5, activation="relu")], IMAGE),
    "dense-sigmoid": ([rd.Dense(4, activation="sigmoid")], (6,)),
    "dense-tanh-nobias": ([rd.Dense(4, activation="tanh", use_bias=False)], (6,)),
    "conv-pad1": ([rd.Conv2D(3, 3, padding=1, activation="tanh")], IMAGE),
    "conv-stride2": ([rd.Conv2D(3, (3, 2), stride=2)], IMAGE),
    "conv-5x5-pad2": ([rd.Conv2D(2, 5, padding=2, activation="sigmoid")], IMAGE),
    "maxpool": ([rd.MaxPool2D(2)], IMAGE),
    "maxpool-overlap": ([rd.MaxPool2D(3, stride=2)], IMAGE),
    "avgpool": ([rd.AvgPool2D(2)], IMAGE),
    "relu": ([rd.ReLU()], IMAGE),
    "sigmoid": ([rd.Sigmoid()], IMAGE),
    "tanh": ([rd.Tanh()], (6,)),
    "flatten": ([rd.Flatten()], IMAGE),
}


def _network(layers, input_shape, loss="softmax_cross_entropy"):
    flat = len(input_shape) == 1 or isinstance(layers[-1], (rd.Flatten, rd.Dense))
    head = [] if flat else [rd.Flatten()]
    return rd.Sequential([*layers, *head, rd.Dense(3)], input_shape=input_shape, loss=loss)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_gradients_match_finite_differences(name, loss):
    layers, shape = LAYERS[name]
    net = _network(layers, shape, loss)
    rng = np.random.default_rng(0)
    # distinct values: no ties in max pooling, no relu exactly at 0
    x = rng.permutation(np.linspace(-1, 1, 5 * int(np.prod(shape)))).reshape(5, *shape)
    y = rng.integers(0, 3, 5) if loss == "softmax_cross_entropy" else rng.normal(size=(5, 3))
    params = {k: v + 0.01 * rng.normal(size=v.shape) for k, v in net.init(1, np.float64).items()}
    loss_value, grads = rd.value_and_grad(net, params, x, y)

    def f(**p):
        return rd.value_and_grad(net, p, x, y)[0]

    assert f(**params) == loss_value
    check_grad(f, params, grads, eps=1e-6, rtol=1e-5, n_dirs=2)


def test_parameter_layouts_follow_onnx():
    net = rd.Sequential([rd.Conv2D(4, (3, 2)), rd.Flatten(), rd.Dense(5)], input_shape=(2, 6, 6))
    shapes = net.param_shapes()
    assert shapes == {"0.weight": (4, 2, 3, 2), "0.bias": (4,),
                      "2.weight": (5, 4 * 4 * 5), "2.bias": (5,)}
    params = net.init(0)
    assert {k: v.shape for k, v in params.items()} == shapes
    assert all(v.dtype == np.float32 for v in params.values())
    assert not params["0.bias"].any() and params["0.weight"].std() > 0


def test_dense_matches_numpy_and_summary_lists_shapes():
    net = rd.Sequential([rd.Dense(3)], input_shape=(4,))
    params = net.init(0, np.float64)
    x = np.arange(8.0).reshape(2, 4)
    out = rd.predict(net, params, x)
    np.testing.assert_allclose(out, x @ params["0.weight"].T + params["0.bias"])
    summary = net.summary()
    assert "Dense" in summary and "(3,)" in summary and "total parameters: 15" in summary


@pytest.mark.parametrize("name", list(LAYERS))
def test_config_round_trip(name):
    for layer in LAYERS[name][0]:
        config = layer.get_config()
        rebuilt = from_config(config)
        assert rebuilt == layer.__class__(**{k: v for k, v in config.items() if k != "type"})
