"""Bad input gets a clear error: it names the field, what was expected and received, the fix.

One test per mistake. Missing config keys are covered in ``test_config.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from rapydli import (
    Conv2D,
    DataError,
    Dense,
    Flatten,
    PlacementError,
    RapydliError,
    Sequential,
    ShapeError,
    Tiling,
    data_parallel,
    hybrid,
    model_parallel,
    value_and_grad,
)
from rapydli.errors import ConfigError
from rapydli.graph.lower import lower
from rapydli.layers import from_config


@pytest.fixture
def net() -> Sequential:
    return Sequential([Conv2D(2, 3, padding=1, activation="relu"), Flatten(), Dense(4)],
                      input_shape=(1, 5, 5))


@pytest.fixture
def batch(net):
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 1, 5, 5)).astype("float32"), np.array([0, 3, 1])


def test_unknown_layer_type():
    with pytest.raises(ConfigError, match=r"unknown layer type 'Dense2D'; expected one of .*"
                                          r"Conv2D, Dense, Flatten"):
        from_config({"type": "Dense2D", "units": 3})


def test_dense_after_conv_without_flatten():
    with pytest.raises(ShapeError, match=r"layer '1' \(Dense\).*received shape \(2, 3, 3\)"
                                         r".*Insert a Flatten layer"):
        Sequential([Conv2D(2, 3), Dense(4)], input_shape=(1, 5, 5))


def test_mesh_larger_than_cluster(client, net, batch):
    x, y = batch
    with pytest.raises(PlacementError, match=r"needs 4 workers.*cluster has 3.*start more "
                                             r"workers or choose a smaller mesh"):
        value_and_grad(net, net.init(0), x, y, placement=data_parallel(4), client=client)


def test_tiling_names_unknown_mesh_axis(net):
    placement = hybrid(1, 2).with_tiling("0", Tiling(batch="modle"))
    with pytest.raises(PlacementError, match=r"layer '0' \(Conv2D\): tiling names mesh axis "
                                             r"'modle'.*expected one of 'data', 'model'"):
        lower(net, placement, 4, "eval")


def test_tiling_along_an_axis_the_layer_cannot_cut(net):
    placement = model_parallel(2).with_tiling("1", Tiling(features="model"))
    with pytest.raises(PlacementError, match=r"layer '1' \(Flatten\): cannot cut its output "
                                             r"along 'features'; expected one of 'batch'"):
        lower(net, placement, 4, "eval")


def test_tiling_for_a_layer_the_network_does_not_have(net):
    """A misspelt layer name in an override must not be silently ignored."""
    placement = hybrid(1, 2).with_tiling("conv0", Tiling(rows="model"))
    with pytest.raises(PlacementError, match=r"'conv0'.*expected one of '0', '1', '2'"):
        lower(net, placement, 4, "eval")


def test_x_with_the_wrong_shape(net, batch):
    x, y = batch
    with pytest.raises(ShapeError, match=r"x: expected shape \(batch, 1, 5, 5\); received "
                                         r"\(3, 1, 5, 4\)\. Reshape the data"):
        value_and_grad(net, net.init(0), x[..., :4], y)


def test_empty_batch(net):
    x, y = np.zeros((0, 1, 5, 5), "float32"), np.zeros(0, dtype=np.int64)
    with pytest.raises(RapydliError, match=r"x: .*at least one sample"):
        value_and_grad(net, net.init(0), x, y)


def test_labels_out_of_range(net, batch):
    x, _ = batch
    # errors.py: DataError is the kind for "labels out of range" (as the loss kernel raises)
    with pytest.raises(DataError, match=r"y: expected integer class labels in \[0, 4\).*"
                                        r"range \[0, 4\]"):
        value_and_grad(net, net.init(0), x, np.array([0, 4, 1]))


def test_params_with_a_wrong_shape(net, batch):
    x, y = batch
    params = net.init(0)
    params["2.weight"] = params["2.weight"][:, :24]
    with pytest.raises(ShapeError, match=r"params\['2\.weight'\]: expected shape \(4, 50\); "
                                         r"received \(4, 24\)"):
        value_and_grad(net, params, x, y)
