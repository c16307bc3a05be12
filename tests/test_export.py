"""Export to ONNX and .npz: onnxruntime must reproduce ``rapydli.predict``; files round-trip exactly."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

import rapydli
from rapydli import (
    AvgPool2D,
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    Sigmoid,
)
from rapydli.config import DataConfig
from rapydli.errors import ConfigError, DataError, ShapeError
from rapydli.layers import Layer
from rapydli.storage import export
from rapydli.storage.checkpoint import save_checkpoint
from rapydli.storage.datasets import load_dataset
from rapydli.storage.export import (
    export_npz,
    export_onnx,
    export_run,
    load_npz,
    network_from_config,
)

#: largest |onnxruntime - rapydli.predict| allowed, float32 logits
ATOL = 1e-5


def mlp() -> Sequential:
    return Sequential([Flatten(), Dense(32, activation="relu"), Dense(16), ReLU(), Dense(10)],
                      input_shape=(1, 8, 8))


def cnn() -> Sequential:
    return Sequential([
        Conv2D(4, 3, padding=1, activation="relu"),                   # (4, 8, 8)
        MaxPool2D(2),                                                 # (4, 4, 4)
        Conv2D(6, (2, 2), stride=2, padding=(1, 0), use_bias=False),  # (6, 3, 2)
        AvgPool2D((2, 1), stride=1),                                  # (6, 2, 2)
        Sigmoid(),
        Flatten(),                                                    # (24,)
        Dense(16, activation="tanh", use_bias=False),
        Dense(10),
    ], input_shape=(1, 8, 8))


NETWORKS = {"mlp": mlp, "cnn": cnn}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig("digits"))


@pytest.fixture(scope="module")
def trained(digits):
    """Per network name: params after one epoch on 300 digits (single worker, no client)."""
    cache: dict[str, dict] = {}

    def params_of(name: str) -> dict:
        if name not in cache:
            net = NETWORKS[name]()
            history = rapydli.fit(net, digits.x_train[:300], digits.y_train[:300], epochs=1,
                                  batch_size=64, seed=1)
            cache[name] = history.params
        return cache[name]

    return params_of


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def run_onnx(ort, path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine has 2 cores
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(["output"], {"input": np.ascontiguousarray(x, np.float32)})
    return out


def assert_onnx_matches_predict(ort, path, net, params, x):
    expected = rapydli.predict(net, params, x)
    got = run_onnx(ort, path, x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= ATOL


# ----------------------------------------------------------------------------- onnx equality
@pytest.mark.parametrize("state", ["init", "trained"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_onnx_matches_predict(ort, digits, trained, tmp_path, name, state):
    net = NETWORKS[name]()
    params = net.init(3) if state == "init" else trained(name)
    path = export_onnx(net, params, tmp_path / f"{name}.onnx")
    assert path == tmp_path / f"{name}.onnx"
    assert_onnx_matches_predict(ort, path, net, params, digits.x_test)
    assert_onnx_matches_predict(ort, path, net, params, digits.x_test[:1])  # symbolic batch


def test_onnx_graph_layout(tmp_path):
    onnx = pytest.importorskip("onnx")
    net = cnn()
    model = onnx.load(export_onnx(net, net.init(0), tmp_path / "cnn.onnx", opset=13))
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["Conv", "Relu", "MaxPool", "Conv", "AveragePool", "Sigmoid", "Flatten", "Gemm",
                   "Tanh", "Gemm"]
    assert [t.name for t in model.graph.initializer] == list(net.param_shapes())
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
    conv = model.graph.node[3]
    attrs = {a.name: list(a.ints) for a in conv.attribute}
    assert attrs == {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 0, 1, 0]}
    assert list(conv.input) == ["1/MaxPool", "2.weight"]  # no bias input
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "output")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 1, 8, 8]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
    assert model.opset_import[0].version == 13
    props = {p.key: p.value for p in model.metadata_props}
    assert network_from_config(json.loads(props["rapydli.network"])) == net


def test_onnx_opset_out_of_range(tmp_path):
    pytest.importorskip("onnx")
    net = mlp()
    for opset in (7, "17", True):
        with pytest.raises(ConfigError, match=r"opset must be an int in \[13, "):
            export_onnx(net, net.init(0), tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- npz
def test_npz_round_trip_is_exact(digits, trained, tmp_path):
    net, params = cnn(), trained("cnn")
    path = export_npz(net, params, tmp_path / "sub" / "cnn.npz")
    with np.load(path, allow_pickle=False) as npz:  # no pickled object inside
        assert npz["network"].dtype == np.uint8
        assert json.loads(npz["network"].tobytes()) == json.loads(json.dumps(net.get_config()))
    again, loaded = load_npz(path)
    assert again == net and again.get_config() == net.get_config()
    assert sorted(loaded) == sorted(params)
    for key, value in params.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value)
    np.testing.assert_array_equal(rapydli.predict(again, loaded, digits.x_test),
                                  rapydli.predict(net, params, digits.x_test))


def test_npz_keeps_float64_exactly(tmp_path):
    net = mlp()
    params = net.init(0, np.float64)
    _, loaded = load_npz(export_npz(net, params, tmp_path / "m.npz"))
    assert all(loaded[k].dtype == np.float64 and np.array_equal(loaded[k], v)
               for k, v in params.items())


def test_load_npz_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "bare.npz", w=np.zeros(2))
    with pytest.raises(DataError, match="missing entry 'network'"):
        load_npz(tmp_path / "bare.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot be read"):
        load_npz(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------- atomic writes
def test_writes_replace_atomically_and_leave_no_temp_files(tmp_path):
    net = mlp()
    path = tmp_path / "m.npz"
    export_npz(net, net.init(0), path)
    export_npz(net, net.init(1), path)
    np.testing.assert_array_equal(load_npz(path)[1]["1.weight"], net.init(1)["1.weight"])

    def crash(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export._write_atomic(path, crash)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]
    np.testing.assert_array_equal(load_npz(path)[1]["1.weight"], net.init(1)["1.weight"])


def test_params_must_fit_the_network(tmp_path):
    net = mlp()
    params = net.init(0)
    params.pop("1.bias")
    with pytest.raises(ShapeError, match="missing"):
        export_npz(net, params, tmp_path / "m.npz")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- runs
def test_export_run_onnx_and_npz(ort, digits, trained, tmp_path):
    net, params = cnn(), trained("cnn")
    run = tmp_path / "run"
    save_checkpoint(run, params, {}, {"network": net.get_config(), "epoch": 1})
    path = export_run(run, "onnx", tmp_path / "out" / "model.onnx")
    assert path == tmp_path / "out" / "model.onnx"
    assert_onnx_matches_predict(ort, path, net, params, digits.x_test)
    npz = export_run(str(run), "npz")
    assert npz == run / "model.npz"
    again, loaded = load_npz(npz)
    assert again == net and all(np.array_equal(loaded[k], v) for k, v in params.items())


def test_export_run_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match="format 'tflite' is unknown; expected one of 'onnx', 'npz'"):
        export_run(tmp_path, "tflite", tmp_path / "m.tflite")


def test_export_run_without_network_config(tmp_path):
    net = mlp()
    save_checkpoint(tmp_path, net.init(0), {}, {"epoch": 2})
    with pytest.raises(ConfigError, match=r"no 'network' config.*received meta keys \['epoch'\]"):
        export_run(tmp_path, "npz", tmp_path / "m.npz")


def test_export_run_params_must_fit_config(tmp_path):
    save_checkpoint(tmp_path, mlp().init(0), {}, {"network": cnn().get_config()})
    with pytest.raises(ShapeError, match="do not fit meta\\['network'\\]"):
        export_run(tmp_path, "npz", tmp_path / "m.npz")


def test_export_run_bad_network_config(tmp_path):
    config = mlp().get_config()
    config["layers"][1]["type"] = "Dense3D"
    save_checkpoint(tmp_path, mlp().init(0), {}, {"network": config})
    with pytest.raises(ConfigError, match=r"meta\['network'\].*layers\[1\]: unknown layer type"):
        export_run(tmp_path, "npz", tmp_path / "m.npz")


def test_network_from_config_round_trips_json():
    for build in NETWORKS.values():
        net = build()
        again = network_from_config(json.loads(json.dumps(net.get_config())))
        assert again == net and hash(again) == hash(net)
    with pytest.raises(ConfigError, match="expected a network config mapping"):
        network_from_config([1, 2])


# ----------------------------------------------------------------------------- unsupported
@dataclass(frozen=True)
class Square(Layer):
    """Not exportable: no ONNX mapping is registered for it."""

    def output_shape(self, input_shape):
        return tuple(input_shape)


@dataclass(frozen=True)
class FancyDense(Dense):
    """A subclass may compute otherwise, so it is refused too."""


@pytest.mark.parametrize("layer", [Square(), FancyDense(8)])
def test_unsupported_layer_is_named(tmp_path, layer):
    pytest.importorskip("onnx")
    net = Sequential([Flatten(), layer, Dense(10)], input_shape=(1, 8, 8))
    kind = type(layer).__name__
    with pytest.raises(ConfigError, match=rf"layer '1' \({kind}\): cannot be exported to ONNX; "
                                          r"expected one of Dense, Conv2D, .*Activation"):
        export_onnx(net, net.init(0), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_unsupported_activation_is_named(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.delitem(export.ONNX_ACTIVATIONS, "tanh")
    net = cnn()
    with pytest.raises(ConfigError, match=r"layer '6' \(Dense\): activation 'tanh' cannot be "
                                          r"exported to ONNX; expected one of 'relu', 'sigmoid'"):
        export_onnx(net, net.init(0), tmp_path / "m.onnx")
