"""``Sequential``: an ordered stack of layer specs with shape inference and initialisation.

>>> from rapydli.layers import Conv2D, Dense, Flatten, MaxPool2D
>>> net = Sequential([Conv2D(4, 3, padding=1, activation="relu"), MaxPool2D(2), Flatten(),
...                   Dense(10)], input_shape=(1, 8, 8))
>>> net.output_shape, net.n_params
((10,), 690)
"""
from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np

from rapydli.errors import ConfigError, DataError, ShapeError
from rapydli.layers import Layer
from rapydli.losses import Loss, as_loss


class Sequential:
    """A feed-forward network: ``layers`` applied in order to inputs of ``input_shape``.

    Parameters
    ----------
    layers : list of Layer
        Layer specs; unnamed layers are named ``"0"``, ``"1"``, ... by position.
    input_shape : tuple of int
        Shape of one sample, without the batch axis: ``(C, H, W)`` or ``(features,)``.
    loss : str or Loss
        ``"softmax_cross_entropy"`` (integer labels) or ``"mse"``.
    """

    def __init__(self, layers, input_shape, loss="softmax_cross_entropy"):
        if not layers:
            raise ConfigError("network.layers: expected at least one layer; received none")
        named = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise ConfigError(f"network.layers[{i}]: expected a Layer; received {layer!r}")
            named.append(layer if layer.name else dataclasses.replace(layer, name=str(i)))
        names = [layer.name for layer in named]
        if len(set(names)) != len(names):
            raise ConfigError(f"network.layers: layer names must be unique; received {names}")
        try:
            self.input_shape = tuple(int(n) for n in input_shape)
        except TypeError:
            raise ConfigError(
                f"network.input_shape: expected a list of ints; received {input_shape!r}"
            ) from None
        self.layers: tuple[Layer, ...] = tuple(named)
        self.loss: Loss = as_loss(loss)
        _ = self.shapes  # validates every layer's input shape now, on the client

    @cached_property
    def shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """``(input_shape, output_shape)`` per layer, one sample each."""
        shapes, shape = [], self.input_shape
        for layer in self.layers:
            out = layer.output_shape(shape)
            shapes.append((shape, out))
            shape = out
        return shapes

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes[-1][1]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{layer.name}.{pname}": shape
            for layer, (in_shape, _) in zip(self.layers, self.shapes)
            for pname, shape in layer.param_shapes(in_shape).items()
        }

    @property
    def n_params(self) -> int:
        return int(sum(np.prod(s) for s in self.param_shapes().values()))

    def init(self, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
        """Fresh parameters ``{"<layer>.weight": array, "<layer>.bias": array}``."""
        rng = np.random.default_rng(seed)
        params = {}
        for layer, (in_shape, _) in zip(self.layers, self.shapes):
            for pname, value in layer.init_params(rng, in_shape, dtype).items():
                params[f"{layer.name}.{pname}"] = value
        return params

    def init_region(self, seed: int, key: str, region, dtype=np.float32) -> np.ndarray:
        """The tile ``region`` of parameter ``key``, drawn on its own.

        For networks too large to initialise in one place: each worker draws its own tiles
        (see :meth:`rapydli.scheduler.engine.Engine.init_params`). The generator is seeded by
        ``seed`` and a hash of ``(key, region)``; the scale is the layer's usual one (He- or
        LeCun-uniform by fan-in, biases zero), so only the draws differ from :meth:`init`.

        >>> from rapydli.layers import Dense
        >>> net = Sequential([Dense(4)], input_shape=(3,))
        >>> net.init_region(0, "0.weight", ((0, 2), (0, 3))).shape
        (2, 3)
        """
        from rapydli.layers import _uniform
        from rapydli.storage.policies import stable_hash

        layer_name, pname = key.rsplit(".", 1)
        index = [layer.name for layer in self.layers].index(layer_name)
        layer, in_shape = self.layers[index], self.shapes[index][0]
        shape = tuple(int(b) - int(a) for a, b in region)
        rng = np.random.default_rng([int(seed), stable_hash(f"{key}@{region}")])
        if hasattr(layer, "init_region"):
            return layer.init_region(rng, in_shape, pname, region, dtype)
        if pname == "bias":
            return np.zeros(shape, dtype)
        full = layer.param_shapes(in_shape)[pname]
        fan_in = layer.fan_in(in_shape) if hasattr(layer, "fan_in") else int(np.prod(full[1:]))
        return _uniform(rng, shape, fan_in, getattr(layer, "activation", None) == "relu", dtype)

    def check_params(self, params: dict) -> None:
        """Raise :class:`ShapeError` unless ``params`` has exactly this network's shapes."""
        expected = self.param_shapes()
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise ShapeError(f"params: missing {missing}, unexpected {extra}; "
                             "build them with network.init(seed)")
        for key, shape in expected.items():
            if tuple(np.shape(params[key])) != shape:
                raise ShapeError(f"params[{key!r}]: expected shape {shape}; "
                                 f"received {tuple(np.shape(params[key]))}")

    def check_inputs(self, x, y=None) -> None:
        """Raise :class:`ShapeError` unless a batch ``x`` (and labels ``y``) fits this network."""
        if tuple(np.shape(x)[1:]) != self.input_shape:
            raise ShapeError(
                f"x: expected shape (batch, {', '.join(map(str, self.input_shape))}); received "
                f"{tuple(np.shape(x))}. Reshape the data or set network.input_shape to match."
            )
        if len(x) == 0:
            raise ShapeError("x: expected at least one sample; received an empty batch")
        if y is not None and len(y) != len(x):
            raise ShapeError(f"y: expected {len(x)} labels (one per sample); received {len(y)}")
        if y is not None and self.loss.integer_labels:
            k = self.output_shape[0]
            y = np.asarray(y)
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
                raise DataError(f"y: expected integer class labels in [0, {k}) for "
                                 f"softmax_cross_entropy; received dtype {y.dtype}, "
                                 f"shape {y.shape}, range [{y.min()}, {y.max()}]")

    def summary(self) -> str:
        """A table of layers, output shapes and parameter counts."""
        rows = [("layer", "type", "output shape", "params")]
        for layer, (in_shape, out_shape) in zip(self.layers, self.shapes):
            n = sum(int(np.prod(s)) for s in layer.param_shapes(in_shape).values())
            rows.append((layer.name, type(layer).__name__, str(out_shape), f"{n:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"total parameters: {self.n_params:,}; loss: {self.loss.name}")
        return "\n".join(lines)

    def get_config(self) -> dict:
        return {"input_shape": list(self.input_shape), "loss": self.loss.name,
                "layers": [layer.get_config() for layer in self.layers]}

    def __repr__(self):
        return f"Sequential({len(self.layers)} layers, input_shape={self.input_shape})"

    def __eq__(self, other):
        return isinstance(other, Sequential) and (self.layers, self.input_shape, self.loss) == (
            other.layers, other.input_shape, other.loss)

    def __hash__(self):
        return hash((self.layers, self.input_shape, self.loss))

    def __dask_tokenize__(self):
        return (Sequential.__name__, self.layers, self.input_shape, self.loss)
