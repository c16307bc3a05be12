"""Export a trained network for inference elsewhere: an ONNX model or a plain ``.npz`` of weights.

The ONNX graph is built with ``onnx.helper`` (no torch). It takes ``"input"``, float32 of shape
``(N, *network.input_shape)`` with a symbolic batch ``N``, and gives ``"output"``: exactly what
:func:`rapydli.predict` returns (logits for classifiers, no softmax). Weights are float32
initializers named like the rapydli parameters (``"0.weight"``, ``"0.bias"``). Layers map as

==============  ====================================  ===================================
rapydli         ONNX                                  notes
==============  ====================================  ===================================
Dense           Gemm(transB=1)                        weight is ``(units, in)``
Conv2D          Conv(kernel_shape, strides, pads)     symmetric zero padding
MaxPool2D       MaxPool(kernel_shape, strides)        no padding, floor mode
AvgPool2D       AveragePool(kernel_shape, strides)    no padding, floor mode
Flatten         Flatten(axis=1)                       C order on both sides
Activation      Relu / Sigmoid / Tanh                 also ``activation=`` of Dense/Conv2D
==============  ====================================  ===================================

The ``.npz`` holds one entry per parameter and ``"network"``: the JSON of
``network.get_config()`` as ``uint8`` bytes, so nothing is pickled. Both files are written to a
temporary file in the target directory and renamed over the final name.

>>> import tempfile, numpy as np
>>> from rapydli import Dense, Sequential
>>> net = Sequential([Dense(3)], input_shape=(4,))
>>> path = export_npz(net, net.init(0), tempfile.mkdtemp() + "/model.npz")
>>> again, params = load_npz(path)
>>> again == net, sorted(params)
(True, ['0.bias', '0.weight'])
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rapydli.config import parse_config
from rapydli.storage.atomic import atomic_write
from rapydli.errors import ConfigError, DataError, ShapeError
from rapydli.layers import Activation, AvgPool2D, Conv2D, Dense, Flatten, Layer, MaxPool2D
from rapydli.network import Sequential
from rapydli.storage.checkpoint import load_checkpoint

#: export formats understood by :func:`export_run`
FORMATS = ("onnx", "npz")
#: ONNX opset used when :func:`export_onnx` is given none (every op used is unchanged since 13)
DEFAULT_OPSET = 17
MIN_OPSET = 13
#: rapydli activation name -> ONNX operator
ONNX_ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
#: the ``.npz`` entry holding the network's config
NETWORK_ENTRY = "network"

#: one ONNX node before it is named: (op_type, inputs after the layer's input, attributes)
NodeSpec = tuple[str, list[str], dict[str, Any]]


# ----------------------------------------------------------------------------- network config
def network_from_config(config: Mapping, source: str = "<dict>") -> Sequential:
    """Rebuild a :class:`~rapydli.network.Sequential` from its ``get_config()`` output.

    Parameters
    ----------
    config : Mapping
        ``{"input_shape": [...], "layers": [...], "loss": ...}``, e.g. read back from JSON.
    source : str
        Where ``config`` came from, named in error messages.

    Raises
    ------
    ConfigError, ShapeError
        Naming ``source`` and the field at fault.

    Examples
    --------
    >>> from rapydli import Dense, Flatten, Sequential
    >>> net = Sequential([Flatten(), Dense(10)], input_shape=(1, 8, 8))
    >>> network_from_config(json.loads(json.dumps(net.get_config()))) == net
    True
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: expected a network config mapping with keys input_shape, "
                          f"layers, loss (network.get_config()); received {type(config).__name__}")
    # the config parser turns JSON lists back into tuples, so the specs stay hashable
    return parse_config({"network": dict(config)}, source=source).network.build()


# ----------------------------------------------------------------------------- atomic writes
def _write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    return atomic_write(path, write)


# ----------------------------------------------------------------------------- npz
def export_npz(network: Sequential, params: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write the parameters and the network's config to one ``.npz`` (no pickle), atomically.

    Parameters
    ----------
    network : Sequential
    params : dict of str to ndarray
        ``{"0.weight": ..., "0.bias": ...}`` as from ``network.init`` or ``fit``; stored exactly.
    path : str or Path
        The file to write; its directory is created if missing.

    Returns
    -------
    Path
        ``path``; read it back with :func:`load_npz`.

    Examples
    --------
    >>> import tempfile
    >>> from rapydli import Dense, Sequential
    >>> net = Sequential([Dense(2)], input_shape=(3,))
    >>> sorted(np.load(export_npz(net, net.init(0), tempfile.mkdtemp() + "/w.npz")).files)
    ['0.bias', '0.weight', 'network']
    """
    network.check_params(params)
    entries = {name: np.asarray(params[name]) for name in network.param_shapes()}
    text = json.dumps(network.get_config(), sort_keys=True)
    entries[NETWORK_ENTRY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return _write_atomic(path, lambda file: np.savez(file, **entries))


def load_npz(path: str | Path) -> tuple[Sequential, dict[str, np.ndarray]]:
    """Read a file written by :func:`export_npz`: the rebuilt network and its parameters.

    Raises
    ------
    ConfigError
        If there is no file at ``path``.
    DataError
        If the file is not a ``.npz`` written by :func:`export_npz`.

    Examples
    --------
    >>> load_npz("no/such/model.npz")
    Traceback (most recent call last):
    ...
    rapydli.errors.ConfigError: export 'no/such/model.npz': file not found; ...
    """
    where = f"export {str(path)!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: file not found; expected a .npz written by export_npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            entries = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{where}: cannot be read as .npz ({exc}); the file is corrupt") from None
    if NETWORK_ENTRY not in entries:
        raise DataError(f"{where}: missing entry {NETWORK_ENTRY!r}; expected a file written by "
                        f"export_npz; received entries {sorted(entries)}")
    config = json.loads(entries.pop(NETWORK_ENTRY).tobytes().decode("utf-8"))
    network = network_from_config(config, source=f"{where} entry {NETWORK_ENTRY!r}")
    network.check_params(entries)
    return network, entries


# ----------------------------------------------------------------------------- onnx: layers
def _activation_nodes(kind: str | None, layer: Layer) -> list[NodeSpec]:
    if kind in (None, "linear"):
        return []
    if kind not in ONNX_ACTIVATIONS:
        raise ConfigError(
            f"layer '{layer.name}' ({type(layer).__name__}): activation {kind!r} cannot be "
            f"exported to ONNX; expected one of {', '.join(map(repr, ONNX_ACTIVATIONS))} or None"
        )
    return [(ONNX_ACTIVATIONS[kind], [], {})]


def _weights(layer: Dense | Conv2D) -> list[str]:
    names = [f"{layer.name}.weight"]
    return names + [f"{layer.name}.bias"] if layer.use_bias else names


def _dense_nodes(layer: Dense) -> list[NodeSpec]:
    # x (N, in) @ weight.T (in, units) + bias: the weight is kept (units, in), as in PyTorch
    return [("Gemm", _weights(layer), {"transB": 1}), *_activation_nodes(layer.activation, layer)]


def _conv_nodes(layer: Conv2D) -> list[NodeSpec]:
    (ph, pw) = layer.pads
    attrs = {"kernel_shape": list(layer.kernel), "strides": list(layer.strides),
             "pads": [ph, pw, ph, pw]}  # begin rows, begin cols, end rows, end cols
    return [("Conv", _weights(layer), attrs), *_activation_nodes(layer.activation, layer)]


def _pool_nodes(op: str) -> Callable[[MaxPool2D | AvgPool2D], list[NodeSpec]]:
    def nodes(layer):
        return [(op, [], {"kernel_shape": list(layer.window), "strides": list(layer.strides)})]

    return nodes


#: exact layer class -> its ONNX nodes; subclasses are refused, as they may compute otherwise
_LAYER_NODES: dict[type[Layer], Callable[[Any], list[NodeSpec]]] = {
    Dense: _dense_nodes,
    Conv2D: _conv_nodes,
    MaxPool2D: _pool_nodes("MaxPool"),
    AvgPool2D: _pool_nodes("AveragePool"),
    Flatten: lambda layer: [("Flatten", [], {"axis": 1})],
    Activation: lambda layer: _activation_nodes(layer.kind, layer),
}


def _layer_nodes(layer: Layer) -> list[NodeSpec]:
    build = _LAYER_NODES.get(type(layer))
    if build is None:
        legal = ", ".join(cls.__name__ for cls in _LAYER_NODES)
        raise ConfigError(
            f"layer '{layer.name}' ({type(layer).__name__}): cannot be exported to ONNX; expected "
            f"one of {legal} (ReLU, Sigmoid, Tanh are Activation). Export the weights with "
            "format 'npz' instead, or rebuild the network from supported layers."
        )
    return build(layer)


def _graph_nodes(network: Sequential, onnx_helper) -> list:
    """The network as a chain of ONNX nodes from ``"input"`` to ``"output"``."""
    specs = [(layer, spec) for layer in network.layers for spec in _layer_nodes(layer)]
    nodes, x = [], "input"
    for i, (layer, (op, extra, attrs)) in enumerate(specs):
        out = "output" if i == len(specs) - 1 else f"{layer.name}/{op}"
        nodes.append(onnx_helper.make_node(op, [x, *extra], [out], name=f"{layer.name}/{op}",
                                           **attrs))
        x = out
    return nodes


# ----------------------------------------------------------------------------- onnx: model
def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("export_onnx needs the 'onnx' package; install it with "
                          "pip install 'rapydli[export]' or pip install onnx") from None
    return onnx


def _check_opset(opset: int | None, newest: int) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"export_onnx: opset must be an int in [{MIN_OPSET}, {newest}] (the "
                          f"installed onnx's newest); received {opset!r}. Leave it None for "
                          f"{DEFAULT_OPSET}.")
    return opset


def build_onnx(network: Sequential, params: Mapping[str, np.ndarray], opset: int | None = None):
    """The ``onnx.ModelProto`` of ``network`` at ``params``, checked; see :func:`export_onnx`.

    Examples
    --------
    >>> from rapydli import Dense, Sequential
    >>> net = Sequential([Dense(4, activation="relu"), Dense(2)], input_shape=(3,))
    >>> [node.op_type for node in build_onnx(net, net.init(0)).graph.node]
    ['Gemm', 'Relu', 'Gemm']
    """
    onnx = _import_onnx()
    from onnx import helper, numpy_helper

    opset = _check_opset(opset, onnx.defs.onnx_opset_version())
    network.check_params(params)
    nodes = _graph_nodes(network, helper)
    weights = [numpy_helper.from_array(np.asarray(params[name], np.float32), name)
               for name in network.param_shapes()]
    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "rapydli",
        [helper.make_tensor_value_info("input", float32, ["N", *network.input_shape])],
        [helper.make_tensor_value_info("output", float32, ["N", *network.output_shape])],
        initializer=weights,
    )
    opsets = [helper.make_opsetid("", opset)]
    # the oldest IR version that can hold this opset, so older runtimes load the file too
    model = helper.make_model(graph, opset_imports=opsets, producer_name="rapydli",
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(model, {"rapydli.network": json.dumps(network.get_config())})
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(network: Sequential, params: Mapping[str, np.ndarray], path: str | Path,
                opset: int | None = None) -> Path:
    """Write ``network`` at ``params`` as an ONNX model for inference, atomically.

    Parameters
    ----------
    network : Sequential
        Built from Dense, Conv2D, MaxPool2D, AvgPool2D, Flatten and Activation layers.
    params : dict of str to ndarray
        As from ``network.init`` or ``fit``; stored as float32 initializers of the same names.
    path : str or Path
        The file to write; its directory is created if missing.
    opset : int, optional
        ONNX opset version; ``None`` gives :data:`DEFAULT_OPSET`.

    Returns
    -------
    Path
        ``path``. The model maps ``"input"`` ``(N, *input_shape)`` float32 to ``"output"``,
        equal to :func:`rapydli.predict` (logits for classifiers).

    Raises
    ------
    ConfigError
        If a layer or activation has no ONNX counterpart, or ``opset`` is out of range.
    ShapeError
        If ``params`` does not fit ``network``.

    Examples
    --------
    >>> import tempfile
    >>> from rapydli import Conv2D, Dense, Flatten, Sequential
    >>> net = Sequential([Conv2D(2, 3), Flatten(), Dense(3)], input_shape=(1, 5, 5))
    >>> export_onnx(net, net.init(0), tempfile.mkdtemp() + "/model.onnx").name
    'model.onnx'
    """
    data = build_onnx(network, params, opset).SerializeToString()
    return _write_atomic(path, lambda file: file.write(data))


# ----------------------------------------------------------------------------- runs
_EXPORTERS: dict[str, Callable[[Sequential, Mapping, Path], Path]] = {
    "onnx": export_onnx, "npz": export_npz,
}


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Export the latest checkpoint of a training run as ``fmt`` (``"onnx"`` or ``"npz"``).

    Parameters
    ----------
    run_dir : str or Path
        A run directory holding a checkpoint whose meta has ``"network"``, the network's
        ``get_config()`` (as ``rapydli train`` writes it).
    fmt : str
        ``"onnx"`` or ``"npz"``.
    out : str or Path, optional
        The file to write; ``None`` gives ``run_dir/model.<fmt>``.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> export_run("some/run", "tflite")
    Traceback (most recent call last):
    ...
    rapydli.errors.ConfigError: export format 'tflite' is unknown; expected one of 'onnx', 'npz'
    """
    if fmt not in _EXPORTERS:
        raise ConfigError(f"export format {fmt!r} is unknown; expected one of "
                          f"{', '.join(map(repr, FORMATS))}")
    params, _, meta = load_checkpoint(run_dir)
    if not isinstance(meta.get("network"), Mapping):
        raise ConfigError(
            f"checkpoint in {str(run_dir)!r}: its meta has no 'network' config; expected "
            f"meta['network'] = network.get_config(); received meta keys {sorted(meta)}. Save "
            "checkpoints with that entry (rapydli train does), or call export_onnx / "
            "export_npz with the network yourself."
        )
    where = f"checkpoint in {str(run_dir)!r}"
    network = network_from_config(meta["network"], source=f"{where} meta['network']")
    try:
        network.check_params(params)
    except ShapeError as exc:
        raise ShapeError(f"{where}: its parameters do not fit meta['network']: {exc}") from None
    out = Path(run_dir) / f"model.{fmt}" if out is None else Path(out)
    return _EXPORTERS[fmt](network, params, out)
