"""Layer specs: shapes, parameter shapes, initialisation and the region each output tile reads.

A layer is a frozen dataclass: it knows its shapes and how to compute one output *tile* from the
input *region* that tile needs, but it owns no arrays and runs nothing by itself. Regions are
tuples of ``(start, stop)`` per axis of the batched tensor (batch first); an input region may
reach past the tensor's edges, where the lowering fills zeros (that is how padding is done, so
a spatially split convolution pads only on its outer tiles).

Examples
--------
>>> from rapydli.layers import Conv2D
>>> Conv2D(8, 3, padding=1).output_shape((1, 8, 8))
(8, 8, 8)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from rapydli.errors import ConfigError, ShapeError
from rapydli.kernels import autotune
from rapydli.kernels import (
    ACTIVATIONS,
    activation_backward,
    activation_forward,
    avgpool2d_backward,
    avgpool2d_forward,
    maxpool2d_backward,
    maxpool2d_forward,
)
from rapydli.kernels.dense import dense_backward_input, dense_backward_params
from rapydli.kernels.local import (
    CONTRAST_FLOOR,
    L2POOL_EPS,
    gaussian_window,
    l2pool2d_backward,
    l2pool2d_forward,
    local_contrast_norm_backward,
    local_contrast_norm_forward,
    locally_connected_backward,
    locally_connected_backward_update,
    locally_connected_forward,
)

Shape = tuple[int, ...]
Region = tuple[tuple[int, int], ...]

#: names of the axes of a batched tensor, by its number of dimensions
AXES = {2: ("batch", "features"), 4: ("batch", "channels", "rows", "cols")}


def _pair(value: Any, field: str, layer: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
        raise ConfigError(
            f"{layer}: {field} must be a non-negative int or a pair of them; received {value!r}"
        )
    return pair  # type: ignore[return-value]


def _check_activation(activation: str | None, layer: str) -> None:
    if activation not in (None, "linear", *ACTIVATIONS):
        legal = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ConfigError(
            f"{layer}: unknown activation {activation!r}; expected one of {legal} or None"
        )


def _expect_rank(layer: Layer, input_shape: Shape, rank: int, what: str) -> None:
    if len(input_shape) != rank:
        raise ShapeError(
            f"layer '{layer.name}' ({type(layer).__name__}) expects {what} input of rank {rank} "
            f"per sample; received shape {tuple(input_shape)}. Insert a Flatten layer before a "
            "Dense layer, or check the network's input_shape (channels, rows, cols)."
        )


@dataclass(frozen=True)
class Layer:
    """Base of all layer specs. ``name`` is given by :class:`~rapydli.network.Sequential`."""

    name: str | None = dataclasses.field(default=None, kw_only=True)

    #: output axes this layer can cut across workers
    splittable: ClassVar[tuple[str, ...]] = ("batch",)
    #: parameters whose gradient kernel writes into memory the caller gives it (see
    #: :func:`rapydli.kernels.backend.outputs_from`): the direct exchange has them computed
    #: straight into shared memory where they are posted to workers on the same machine
    gradients_in_place: ClassVar[tuple[str, ...]] = ()

    def output_shape(self, input_shape: Shape) -> Shape:
        raise NotImplementedError

    def param_shapes(self, input_shape: Shape) -> dict[str, Shape]:
        return {}

    def init_params(self, rng: np.random.Generator, input_shape: Shape, dtype) -> dict:
        return {}

    def input_region(self, out: Region, input_shape: Shape) -> Region:
        """The region of the batched input that the output tile ``out`` depends on."""
        raise NotImplementedError

    def param_regions(self, out: Region, input_shape: Shape) -> dict[str, Region]:
        """For each parameter, the slice of it that computes the output tile ``out``."""
        return {}

    def forward(self, x, params: dict):
        raise NotImplementedError

    def backward(self, x, y, params: dict, dy, need_dx: bool) -> tuple[Any, dict]:
        """Gradients ``(dx, dparams)`` for one tile; ``x`` and ``y`` as seen by :meth:`forward`."""
        raise NotImplementedError

    def flops(self, out_shape: Shape, input_shape: Shape) -> int:
        """Forward FLOPs for a tile of batched shape ``out_shape``; backward is about twice."""
        return int(np.prod(out_shape))

    def get_config(self) -> dict:
        config = {"type": type(self).__name__}
        config.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        config.pop("name")
        return config


def _apply_activation(kind: str | None, z):
    return z if kind in (None, "linear") else activation_forward(kind, z)


def _unapply_activation(kind: str | None, y, dy):
    return dy if kind in (None, "linear") else activation_backward(kind, y, dy)


def _uniform(rng: np.random.Generator, shape: Shape, fan_in: int, relu: bool, dtype):
    # He-uniform for rectifiers, LeCun-uniform otherwise
    bound = math.sqrt((6.0 if relu else 3.0) / max(fan_in, 1))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


@dataclass(frozen=True)
class Dense(Layer):
    """Fully connected layer ``y = act(x @ weight.T + bias)``; weight is ``(units, in)``."""

    units: int
    activation: str | None = None
    use_bias: bool = True
    splittable: ClassVar[tuple[str, ...]] = ("batch", "features")
    gradients_in_place: ClassVar[tuple[str, ...]] = ("weight",)  # dense_backward_params' dw

    def __post_init__(self):
        if not isinstance(self.units, int) or self.units < 1:
            raise ConfigError(f"Dense: units must be a positive int; received {self.units!r}")
        _check_activation(self.activation, "Dense")

    def output_shape(self, input_shape):
        _expect_rank(self, input_shape, 1, "flat")
        return (self.units,)

    def param_shapes(self, input_shape):
        shapes = {"weight": (self.units, input_shape[0])}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def init_params(self, rng, input_shape, dtype):
        (n_in,) = input_shape
        relu = self.activation == "relu"
        params = {"weight": _uniform(rng, (self.units, n_in), n_in, relu, dtype)}
        if self.use_bias:
            params["bias"] = np.zeros(self.units, dtype)
        return params

    def input_region(self, out, input_shape):
        return (out[0], (0, input_shape[0]))

    def param_regions(self, out, input_shape):
        regions = {"weight": (out[1], (0, input_shape[0]))}
        if self.use_bias:
            regions["bias"] = (out[1],)
        return regions

    def forward(self, x, params):
        z = autotune.call("dense_forward", x, params["weight"], params.get("bias"))
        return _apply_activation(self.activation, z)

    def backward(self, x, y, params, dy, need_dx):
        dz = _unapply_activation(self.activation, y, dy)
        dx = dense_backward_input(dz, params["weight"], x.dtype) if need_dx else None
        return dx, self.backward_params(x, dz, params)

    def backward_input(self, x, y, params, dy):
        dz = _unapply_activation(self.activation, y, dy)
        return dense_backward_input(dz, params["weight"], x.dtype), dz

    def backward_params(self, x, dz, params):
        dw, db = dense_backward_params(x, dz, params["weight"].dtype)
        grads = {"weight": dw}
        if self.use_bias:
            grads["bias"] = db
        return grads

    def flops(self, out_shape, input_shape):
        return 2 * int(np.prod(out_shape)) * input_shape[0]


def _window_rows(out: tuple[int, int], kernel: int, stride: int, pad: int) -> tuple[int, int]:
    """Input rows (possibly past the edges) read by output rows ``out`` of a window op."""
    start, stop = out
    if stop <= start:
        return (start * stride - pad, start * stride - pad)
    return (start * stride - pad, (stop - 1) * stride - pad + kernel)


class _FilterBank:
    """What Conv2D and LocallyConnected2D share: ``filters`` windows of ``kernel_size`` moved by
    ``stride``, an activation, a bias; checked the same way."""

    def _check_filter_bank(self) -> None:
        kind = type(self).__name__
        if not isinstance(self.filters, int) or self.filters < 1:
            raise ConfigError(f"{kind}: filters must be a positive int; received {self.filters!r}")
        if min(self.kernel) < 1 or min(self.strides) < 1:
            raise ConfigError(f"{kind}: kernel_size and stride must be at least 1; received "
                              f"kernel_size={self.kernel_size!r}, stride={self.stride!r}")
        _check_activation(self.activation, kind)

    @property
    def kernel(self) -> tuple[int, int]:
        return _pair(self.kernel_size, "kernel_size", type(self).__name__)

    @property
    def strides(self) -> tuple[int, int]:
        return _pair(self.stride, "stride", type(self).__name__)

    def _grads(self, dw, db) -> dict:
        return {"weight": dw, "bias": db} if self.use_bias else {"weight": dw}

    def flops(self, out_shape, input_shape):
        kh, kw = self.kernel
        return 2 * int(np.prod(out_shape)) * input_shape[0] * kh * kw


@dataclass(frozen=True)
class Conv2D(_FilterBank, Layer):
    """2-D convolution (cross-correlation), NCHW; weight is ``(filters, in_channels, kh, kw)``."""

    filters: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    activation: str | None = None
    use_bias: bool = True
    splittable: ClassVar[tuple[str, ...]] = ("batch", "channels", "rows")

    def __post_init__(self):
        self._check_filter_bank()
        _pair(self.padding, "padding", "Conv2D")

    @property
    def pads(self) -> tuple[int, int]:
        return _pair(self.padding, "padding", "Conv2D")

    def output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "image (channels, rows, cols)")
        _, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.strides, self.pads
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if ho < 1 or wo < 1:
            raise ShapeError(
                f"layer '{self.name}' (Conv2D): kernel {self.kernel} does not fit the padded "
                f"input {(h + 2 * ph, w + 2 * pw)}; received input shape {tuple(input_shape)}. "
                "Use a smaller kernel, more padding, or fewer pooling layers before it."
            )
        return (self.filters, ho, wo)

    def param_shapes(self, input_shape):
        shapes = {"weight": (self.filters, input_shape[0], *self.kernel)}
        if self.use_bias:
            shapes["bias"] = (self.filters,)
        return shapes

    def init_params(self, rng, input_shape, dtype):
        shape = self.param_shapes(input_shape)["weight"]
        fan_in = int(np.prod(shape[1:]))
        params = {"weight": _uniform(rng, shape, fan_in, self.activation == "relu", dtype)}
        if self.use_bias:
            params["bias"] = np.zeros(self.filters, dtype)
        return params

    def input_region(self, out, input_shape):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.strides, self.pads
        return (out[0], (0, input_shape[0]), _window_rows(out[2], kh, sh, ph),
                _window_rows(out[3], kw, sw, pw))

    def param_regions(self, out, input_shape):
        kh, kw = self.kernel
        regions = {"weight": (out[1], (0, input_shape[0]), (0, kh), (0, kw))}
        if self.use_bias:
            regions["bias"] = (out[1],)
        return regions

    def forward(self, x, params):
        # x arrives already zero-padded (its region reaches past the edges), so padding=0 here
        z = autotune.call("conv2d_forward", x, params["weight"], params.get("bias"),
                          self.strides, (0, 0))
        return _apply_activation(self.activation, z)

    def backward(self, x, y, params, dy, need_dx):
        dz = _unapply_activation(self.activation, y, dy)
        dx, dw, db = autotune.call("conv2d_backward", x, params["weight"], dz, self.strides,
                                   (0, 0), need_dx=need_dx)
        return dx, self._grads(dw, db)

    def backward_input(self, x, y, params, dy):
        dz = _unapply_activation(self.activation, y, dy)
        dx, _, _ = autotune.call("conv2d_backward", x, params["weight"], dz, self.strides,
                                 (0, 0), need_dw=False)
        return dx, dz

    def backward_params(self, x, dz, params):
        _, dw, db = autotune.call("conv2d_backward", x, params["weight"], dz, self.strides,
                                  (0, 0), need_dx=False)
        return self._grads(dw, db)


@dataclass(frozen=True)
class _Pool2D(Layer):
    pool_size: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None
    splittable: ClassVar[tuple[str, ...]] = ("batch", "channels", "rows")

    def __post_init__(self):
        kind = type(self).__name__
        if min(_pair(self.pool_size, "pool_size", kind)) < 1:
            raise ConfigError(f"{kind}: pool_size must be at least 1; received {self.pool_size!r}")
        if self.stride is not None and min(_pair(self.stride, "stride", kind)) < 1:
            raise ConfigError(f"{kind}: stride must be at least 1; received {self.stride!r}")

    @property
    def window(self) -> tuple[int, int]:
        return _pair(self.pool_size, "pool_size", type(self).__name__)

    @property
    def strides(self) -> tuple[int, int]:
        return self.window if self.stride is None else _pair(self.stride, "stride", "pool")

    def output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "image (channels, rows, cols)")
        c, h, w = input_shape
        (kh, kw), (sh, sw) = self.window, self.strides
        if h < kh or w < kw:
            raise ShapeError(
                f"layer '{self.name}' ({type(self).__name__}): window {self.window} is larger "
                f"than its input {(h, w)}. Use a smaller pool_size or remove a pooling layer."
            )
        return (c, (h - kh) // sh + 1, (w - kw) // sw + 1)

    def input_region(self, out, input_shape):
        (kh, kw), (sh, sw) = self.window, self.strides
        return (out[0], out[1], _window_rows(out[2], kh, sh, 0), _window_rows(out[3], kw, sw, 0))

    def flops(self, out_shape, input_shape):
        kh, kw = self.window
        return int(np.prod(out_shape)) * kh * kw


@dataclass(frozen=True)
class MaxPool2D(_Pool2D):
    """Max pooling over ``pool_size`` windows (stride defaults to the window), no padding."""

    def forward(self, x, params):
        return maxpool2d_forward(x, self.window, self.strides)

    def backward(self, x, y, params, dy, need_dx):
        return maxpool2d_backward(x, y, dy, self.window, self.strides), {}


@dataclass(frozen=True)
class AvgPool2D(_Pool2D):
    """Average pooling over ``pool_size`` windows (stride defaults to the window), no padding."""

    def forward(self, x, params):
        return avgpool2d_forward(x, self.window, self.strides)

    def backward(self, x, y, params, dy, need_dx):
        return avgpool2d_backward(tuple(x.shape), dy, self.window, self.strides, dy.dtype), {}


@dataclass(frozen=True)
class L2Pool2D(_Pool2D):
    """L2 pooling ``y = sqrt(sum over the window of x**2 + eps)``, ``eps = 1e-12``
    (:data:`~rapydli.kernels.local.L2POOL_EPS`: keeps the gradient ``x / y`` finite where a
    window is all zeros); stride defaults to the window, no padding.
    """

    eps: ClassVar[float] = L2POOL_EPS

    def forward(self, x, params):
        return l2pool2d_forward(x, self.window, self.strides)

    def backward(self, x, y, params, dy, need_dx):
        return l2pool2d_backward(x, y, dy, self.window, self.strides), {}

    def flops(self, out_shape, input_shape):
        kh, kw = self.window
        return int(np.prod(out_shape)) * (2 * kh * kw + 1)


@dataclass(frozen=True)
class Flatten(Layer):
    """``(N, C, H, W) -> (N, C*H*W)`` in C order, as ONNX Flatten(axis=1)."""

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def input_region(self, out, input_shape):
        return (out[0], *((0, n) for n in input_shape))

    def forward(self, x, params):
        return x.reshape(x.shape[0], -1)  # (N, C*H*W)

    def backward(self, x, y, params, dy, need_dx):
        return dy.reshape(x.shape), {}  # (N, C, H, W)


@dataclass(frozen=True)
class Activation(Layer):
    """An element-wise nonlinearity as a layer of its own: ``relu``, ``sigmoid`` or ``tanh``."""

    kind: str = "relu"
    splittable: ClassVar[tuple[str, ...]] = ("batch", "features", "channels", "rows")

    def __post_init__(self):
        _check_activation(self.kind, "Activation")
        if self.kind in (None, "linear"):
            legal = ", ".join(repr(a) for a in ACTIVATIONS)
            raise ConfigError(f"Activation: kind must be one of {legal}; received {self.kind!r}")

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def input_region(self, out, input_shape):
        return out

    def forward(self, x, params):
        return activation_forward(self.kind, x)

    def backward(self, x, y, params, dy, need_dx):
        return activation_backward(self.kind, y, dy), {}


def ReLU(**kw) -> Activation:
    return Activation("relu", **kw)


def Sigmoid(**kw) -> Activation:
    return Activation("sigmoid", **kw)


def Tanh(**kw) -> Activation:
    return Activation("tanh", **kw)


@dataclass(frozen=True)
class LocallyConnected2D(_FilterBank, Layer):
    """Like :class:`Conv2D` without padding, but with *untied* weights: one filter bank per
    output position, NCHW.

    Layout (position-major): ``weight (out_rows, out_cols, filters, in_channels, kh, kw)`` and
    ``bias (out_rows, out_cols, filters)``. One position's filter bank is one contiguous
    ``(filters, in_channels*kh*kw)`` block, read once per batch by the kernels and updated in
    place by the fused :func:`~rapydli.kernels.local.locally_connected_backward_update`; a tile
    owning output rows ``[r0, r1)`` holds exactly ``weight[r0:r1]``, so a split by rows
    (``spatial_parallel``) keeps every weight on one worker.

    >>> LocallyConnected2D(4, 3, stride=2).param_shapes((2, 9, 7))
    {'weight': (4, 3, 4, 2, 3, 3), 'bias': (4, 3, 4)}
    """

    filters: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    activation: str | None = None
    use_bias: bool = True
    splittable: ClassVar[tuple[str, ...]] = ("batch", "channels", "rows")

    def __post_init__(self):
        self._check_filter_bank()

    def output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "image (channels, rows, cols)")
        _, h, w = input_shape
        (kh, kw), (sh, sw) = self.kernel, self.strides
        if h < kh or w < kw:
            raise ShapeError(
                f"layer '{self.name}' (LocallyConnected2D): kernel {self.kernel} does not fit "
                f"its input {(h, w)}; received input shape {tuple(input_shape)}. Use a smaller "
                "kernel or fewer pooling layers before it.")
        return (self.filters, (h - kh) // sh + 1, (w - kw) // sw + 1)

    def param_shapes(self, input_shape):
        _, ho, wo = self.output_shape(input_shape)
        shapes = {"weight": (ho, wo, self.filters, input_shape[0], *self.kernel)}
        if self.use_bias:
            shapes["bias"] = (ho, wo, self.filters)
        return shapes

    def init_params(self, rng, input_shape, dtype):
        shapes = self.param_shapes(input_shape)
        fan_in = int(np.prod(shapes["weight"][3:]))
        weight = np.empty(shapes["weight"], dtype)
        for r in range(weight.shape[0]):  # a row at a time: no float64 copy of a huge weight
            weight[r] = _uniform(rng, weight.shape[1:], fan_in, self.activation == "relu", dtype)
        params = {"weight": weight}
        if self.use_bias:
            params["bias"] = np.zeros(shapes["bias"], dtype)
        return params

    def input_region(self, out, input_shape):
        (kh, kw), (sh, sw) = self.kernel, self.strides
        return (out[0], (0, input_shape[0]), _window_rows(out[2], kh, sh, 0),
                _window_rows(out[3], kw, sw, 0))

    def param_regions(self, out, input_shape):
        kh, kw = self.kernel
        regions = {"weight": (out[2], out[3], out[1], (0, input_shape[0]), (0, kh), (0, kw))}
        if self.use_bias:
            regions["bias"] = (out[2], out[3], out[1])
        return regions

    def forward(self, x, params):
        z = locally_connected_forward(x, params["weight"], params.get("bias"), self.strides)
        return _apply_activation(self.activation, z)

    def init_region(self, rng, input_shape, name, region, dtype):
        """One tile of a parameter, drawn a row at a time (see ``Sequential.init_region``)."""
        shape = tuple(b - a for a, b in region)
        if name == "bias":
            return np.zeros(shape, dtype)
        fan_in = input_shape[0] * self.kernel[0] * self.kernel[1]
        tile = np.empty(shape, dtype)
        for r in range(shape[0]):  # no float64 copy of a multi-gigabyte tile
            tile[r] = _uniform(rng, shape[1:], fan_in, self.activation == "relu", dtype)
        return tile

    def backward_update(self, x, y, params, dy, need_dx, optimizer):
        """Backward and a plain SGD step in one pass: ``dx`` from the old weights while each
        position's weights are updated in place, so the weight gradient never exists whole
        (see :func:`rapydli.kernels.local.locally_connected_backward_update`)."""
        dz = _unapply_activation(self.activation, y, dy)
        if optimizer.weight_decay:  # the fused kernel knows plain SGD only
            dx, grads = self.backward(x, y, params, dy, need_dx)
            for name, grad in grads.items():
                optimizer.update(params[name], grad, {}, inplace=True)
            return dx, params
        dx = locally_connected_backward_update(x, params["weight"], params.get("bias"), dz,
                                               optimizer.lr, need_dx, self.strides)
        return dx, params

    def backward(self, x, y, params, dy, need_dx):
        dz = _unapply_activation(self.activation, y, dy)
        dx, dw, db = locally_connected_backward(x, params["weight"], dz, self.strides, need_dx)
        return dx, self._grads(dw, db)


@dataclass(frozen=True)
class LocalContrastNorm(Layer):
    """Local contrast normalisation (Jarrett et al. 2009), subtractive then divisive.

    ``G``: a ``size x size`` Gaussian (``sigma`` defaults to ``size / 4``) divided by the number
    of channels, so it sums to 1 over window and channels. ``v = x - sum_c G * x`` (one local
    mean for all channels), ``sigma_map = sqrt(sum_c G * v**2)``, ``y = v / sqrt(c**2 +
    sigma_map**2)``. ``c`` is a fixed constant (default 0.1: for inputs of unit variance,
    contrast below ``c`` is amplified at most ``1/c`` times), not the paper's mean of
    ``sigma_map`` over the image, which is not local and would couple spatial tiles.

    Zero padding: a tile reads ``2 * (size // 2)`` halo rows and columns (two window passes),
    zero past the image edges, and computes ``v`` over its input less ``size // 2`` on each
    side, so ``v`` is also defined just past the edges (from zero-padded ``x``); a single
    worker and any split by rows therefore compute the same numbers. Same output shape as
    input; it mixes channels, so it cuts only batch and rows.

    >>> LocalContrastNorm(5).input_region(((0, 2), (0, 3), (4, 8), (0, 6)), (3, 12, 6))
    ((0, 2), (0, 3), (0, 12), (-4, 10))
    """

    size: int = 9
    sigma: float | None = None
    c: float = CONTRAST_FLOOR
    splittable: ClassVar[tuple[str, ...]] = ("batch", "rows")

    def __post_init__(self):
        gaussian_window(self.size, 1.0)  # ConfigError unless size is an odd positive int
        for field, value in (("sigma", self.sigma), ("c", self.c)):
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"LocalContrastNorm: {field} must be a positive number"
                                  f"{' or None' if field == 'sigma' else ''}; received {value!r}")

    @property
    def halo(self) -> int:
        """Rows (and columns) read past each side of an output tile: two window passes."""
        return 2 * (self.size // 2)

    def output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "image (channels, rows, cols)")
        return tuple(input_shape)

    def input_region(self, out, input_shape):
        h = self.halo
        return (out[0], (0, input_shape[0]), (out[2][0] - h, out[2][1] + h),
                (out[3][0] - h, out[3][1] + h))

    def forward(self, x, params):
        return local_contrast_norm_forward(x, self.size, self.sigma, self.c)

    def backward(self, x, y, params, dy, need_dx):
        return local_contrast_norm_backward(x, dy, self.size, self.sigma, self.c), {}

    def flops(self, out_shape, input_shape):
        return int(np.prod(out_shape)) * (8 * self.size + 12)  # two separable passes + glue


#: layer classes by the ``type`` name used in configs
LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls for cls in (Dense, Conv2D, MaxPool2D, AvgPool2D, Flatten, Activation,
                                  LocallyConnected2D, L2Pool2D, LocalContrastNorm)
}


def from_config(config: dict, where: str = "layer") -> Layer:
    """Build a layer from a dict such as ``{"type": "Dense", "units": 10}``.

    >>> from_config({"type": "Dense", "units": 10, "activation": "relu"})
    Dense(name=None, units=10, activation='relu', use_bias=True)
    """
    if not isinstance(config, dict) or "type" not in config:
        raise ConfigError(f"{where}: expected a mapping with a 'type' key; received {config!r}")
    kind = config["type"]
    aliases = {"ReLU": ("relu",), "Sigmoid": ("sigmoid",), "Tanh": ("tanh",)}
    kwargs = {k: v for k, v in config.items() if k != "type"}
    if kind in aliases:
        kind, kwargs = "Activation", {"kind": aliases[kind][0], **kwargs}
    if kind not in LAYER_TYPES:
        legal = ", ".join(sorted([*LAYER_TYPES, *aliases]))
        raise ConfigError(f"{where}: unknown layer type {kind!r}; expected one of {legal}")
    cls = LAYER_TYPES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(
            f"{where} ({kind}): unknown field(s) {', '.join(map(repr, unknown))}; "
            f"expected some of {', '.join(sorted(names))}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where} ({kind}): {exc}") from None
