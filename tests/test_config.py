"""Config loading: the example file, and one test per mistake a user can make."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rapydli.config import (
    Config,
    DataConfig,
    PlacementConfig,
    TrainConfig,
    load_config,
    parse_config,
    parse_mesh,
    with_mesh,
)
from rapydli.errors import ConfigError, PlacementError, ShapeError
from rapydli.layers import Conv2D, Dense, Flatten, MaxPool2D
from rapydli.network import Sequential
from rapydli.optim import SGD
from rapydli.placement import Mesh, Tiling

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.yaml"


def minimal() -> dict:
    return {
        "network": {
            "input_shape": [1, 8, 8],
            "layers": [
                {"type": "Conv2D", "filters": 4, "kernel_size": 3, "padding": 1,
                 "activation": "relu"},
                {"type": "Flatten"},
                {"type": "Dense", "units": 10},
            ],
        }
    }


def with_(section: str, **values) -> dict:
    raw = minimal()
    raw.setdefault(section, {}).update(values)
    return raw


# ----------------------------------------------------------------------------- the example
def test_example_loads_and_builds():
    cfg = load_config(EXAMPLE)
    net = cfg.network.build()
    assert isinstance(net, Sequential)
    assert net.output_shape == (10,)
    # parameter count by hand: conv (out*in*k*k + out), dense (out*in + out)
    conv1 = 16 * 1 * 3 * 3 + 16
    conv2 = 32 * 16 * 3 * 3 + 32
    flat = 32 * (8 // 2 // 2) ** 2
    dense1 = 64 * flat + 64
    dense2 = 10 * 64 + 10
    assert net.n_params == conv1 + conv2 + dense1 + dense2 == 13706
    assert [type(layer) for layer in net.layers] == [
        Conv2D, MaxPool2D, Conv2D, MaxPool2D, Flatten, Dense, Dense]


def test_example_sections():
    cfg = load_config(str(EXAMPLE))
    assert cfg.data == DataConfig("digits", 0.2, 0, None)
    assert cfg.optimizer.build() == SGD(lr=0.05, momentum=0.9, weight_decay=0.0001)
    assert cfg.train == TrainConfig(epochs=16, batch_size=96, seed=0)
    placement = cfg.placement.build()
    assert placement.mesh == Mesh(data=1, model=2)
    assert placement.rule == "hybrid"
    assert cfg.network.loss == "softmax_cross_entropy"


def test_defaults_when_sections_omitted():
    cfg = parse_config(minimal())
    assert cfg.data == DataConfig()
    assert cfg.train == TrainConfig()
    assert cfg.optimizer.build() == SGD()
    assert cfg.placement.build().mesh == Mesh()
    assert cfg.placement.build().rule == "single"


@pytest.mark.parametrize("preset, mesh, rule", [
    ("single", Mesh(), "single"),
    ("data_parallel", Mesh(data=2), "data"),
    ("model_parallel", Mesh(model=2), "model"),
    ("spatial_parallel", Mesh(model=2), "spatial"),
    ("hybrid", Mesh(data=1, model=2), "hybrid"),
])
def test_preset_default_meshes(preset, mesh, rule):
    placement = parse_config(with_("placement", preset=preset)).placement.build()
    assert (placement.mesh, placement.rule) == (mesh, rule)


def test_layer_override():
    raw = with_("placement", preset="hybrid", layers={2: {"batch": "data", "features": "model"}})
    placement = parse_config(raw).placement.build()
    assert placement.overrides == (("2", Tiling(batch="data", features="model")),)


def test_config_is_hashable_and_equal():
    assert parse_config(minimal()) == parse_config(copy.deepcopy(minimal()))
    assert hash(parse_config(minimal())) == hash(parse_config(minimal()))


# ----------------------------------------------------------------------------- bad inputs
def test_unknown_layer_type_lists_legal_types():
    raw = minimal()
    raw["network"]["layers"][0] = {"type": "Conv3D", "filters": 4}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="bad.yaml")
    message = str(info.value)
    assert "'bad.yaml'" in message and "network.layers[0]" in message and "'Conv3D'" in message
    assert "Conv2D" in message and "Dense" in message and "MaxPool2D" in message


def test_dense_after_conv_without_flatten_is_a_shape_error():
    raw = minimal()
    del raw["network"]["layers"][1]  # Conv2D -> Dense, no Flatten
    with pytest.raises(ShapeError) as info:
        parse_config(raw)
    assert "layer '1' (Dense)" in str(info.value)
    assert "Flatten" in str(info.value)


def test_missing_network():
    with pytest.raises(ConfigError) as info:
        parse_config({"train": {"epochs": 1}}, source="x.yaml")
    message = str(info.value)
    assert "'x.yaml'" in message and "missing key 'network'" in message
    assert "data, network, optimizer, train, placement" in message


def test_missing_input_shape():
    raw = minimal()
    del raw["network"]["input_shape"]
    with pytest.raises(ConfigError, match=r"network: missing key 'input_shape'"):
        parse_config(raw)


def test_typo_in_top_level_key():
    raw = minimal()
    raw["optimiser"] = {"lr": 0.1}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert "'optimiser'" in message and "did you mean 'optimizer'" in message
    assert "data, network, optimizer, train, placement" in message


def test_typo_in_nested_key_lists_legal_keys():
    with pytest.raises(ConfigError, match=r"train: unknown key 'batchsize'.*batch_size"):
        parse_config(with_("train", batchsize=32))
    with pytest.raises(ConfigError, match=r"optimizer: unknown key 'learning_rate'.*lr"):
        parse_config(with_("optimizer", learning_rate=0.1))


@pytest.mark.parametrize("value", [-3, 0, 2.5, "64", True])
def test_bad_batch_size(value):
    with pytest.raises(ConfigError) as info:
        parse_config(with_("train", batch_size=value))
    assert f"train.batch_size: expected a positive int; received {value!r}" in str(info.value)


@pytest.mark.parametrize("section, values, field", [
    ("train", {"dtype": "float16"}, "train.dtype"),
    ("train", {"epochs": "ten"}, "train.epochs"),
    ("data", {"test_fraction": 1.5}, "data.test_fraction"),
    ("data", {"name": "mnist"}, "data.name"),
    ("optimizer", {"lr": "fast"}, "optimizer.lr"),
    ("optimizer", {"lr": -1.0}, "lr"),
    ("placement", {"mesh": {"data": 0}, "preset": "data_parallel"}, "placement.mesh.data"),
])
def test_wrong_values_name_the_field(section, values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(with_(section, **values))


def test_unknown_preset():
    with pytest.raises(ConfigError) as info:
        parse_config(with_("placement", preset="pipeline"))
    message = str(info.value)
    assert "placement.preset" in message and "'pipeline'" in message
    assert "'data_parallel'" in message and "'hybrid'" in message


@pytest.mark.parametrize("preset, mesh, missing", [
    ("data_parallel", {"model": 2}, "'data'"),
    ("model_parallel", {"data": 2}, "'model'"),
    ("spatial_parallel", {"data": 2}, "'model'"),
    ("hybrid", {"model": 2}, "'data'"),
])
def test_mesh_missing_axis_of_preset(preset, mesh, missing):
    with pytest.raises(ConfigError) as info:
        parse_config(with_("placement", preset=preset, mesh=mesh))
    message = str(info.value)
    assert f"placement.mesh: preset {preset!r}" in message and missing in message


def test_misspelt_mesh_axis():
    with pytest.raises(ConfigError, match=r"unknown mesh axis 'modle'.*'data', 'model'"):
        parse_config(with_("placement", preset="model_parallel", mesh={"modle": 2}))


def test_override_of_unknown_layer():
    with pytest.raises(ConfigError, match=r"no layer named '9'"):
        parse_config(with_("placement", preset="data_parallel", layers={"9": {"batch": "data"}}))


def test_override_that_cannot_apply_to_layer():
    # Flatten can only be cut along the batch
    raw = with_("placement", preset="model_parallel", layers={"1": {"features": "model"}})
    with pytest.raises(PlacementError, match=r"layer '1' \(Flatten\)"):
        parse_config(raw)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"no_such\.yaml.*not found"):
        load_config("no_such.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("network:\n  input_shape: [1, 8, 8\n  layers: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "broken.yaml" in str(info.value) and "line 3" in str(info.value)


# ----------------------------------------------------------------------------- --mesh
@pytest.mark.parametrize("text", ["", "data", "data=", "data=0", "data=-1", "data=two",
                                  "gpu=2", "data=2;model=2", "data=2,data=3", "data=2,"])
def test_bad_mesh_string(text):
    cfg = parse_config(with_("placement", preset="hybrid"))
    with pytest.raises(ConfigError, match=r"--mesh: .*data=2,model=2"):
        with_mesh(cfg, text)


def test_with_mesh_round_trip():
    cfg = load_config(EXAMPLE)
    bigger = with_mesh(cfg, "data=2,model=2")
    assert bigger.placement.build().mesh == Mesh(data=2, model=2)
    assert bigger.placement.mesh_string == "data=2,model=2"
    assert (bigger.network, bigger.train, bigger.placement.preset) == (
        cfg.network, cfg.train, cfg.placement.preset)
    assert with_mesh(bigger, cfg.placement.mesh_string) == cfg
    assert isinstance(bigger, Config)


def test_with_mesh_revalidates_preset_axes():
    cfg = parse_config(with_("placement", preset="hybrid"))
    with pytest.raises(ConfigError, match=r"preset 'hybrid'.*'data'"):
        with_mesh(cfg, "model=4")


def test_parse_mesh_spaces():
    assert parse_mesh(" data = 2 , model=3 ") == (("data", 2), ("model", 3))


def test_placement_config_accepts_dicts():
    cfg = PlacementConfig("hybrid", {"data": 2, "model": 1}, {"5": {"batch": "data"}})
    assert cfg.mesh == (("data", 2), ("model", 1))
    assert cfg.layers == (("5", Tiling(batch="data")),)
