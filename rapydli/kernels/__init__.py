"""Numerical kernels of rapydli: pure, stateless array functions (NumPy or CuPy).

Every kernel returns new arrays, never modifies its inputs and keeps the input
dtype. Layouts follow PyTorch/ONNX: NCHW activations, ``(O, I)`` dense weights,
``(O, C, kh, kw)`` convolution weights.

Examples
--------
>>> import numpy as np
>>> from rapydli.kernels import dense_forward
>>> dense_forward(np.ones((2, 3)), np.ones((4, 3)), None).shape
(2, 4)
"""
from __future__ import annotations

from rapydli.kernels.activations import ACTIVATIONS, activation_backward, activation_forward
from rapydli.kernels.backend import available_backends, get_array_module
from rapydli.kernels.conv import conv2d_backward, conv2d_forward
from rapydli.kernels.dense import dense_backward, dense_forward
from rapydli.kernels.local import (
    l2pool2d_backward,
    l2pool2d_forward,
    local_contrast_norm_backward,
    local_contrast_norm_forward,
    locally_connected_backward,
    locally_connected_backward_update,
    locally_connected_forward,
)
from rapydli.kernels.losses import LOSSES, mse, softmax_cross_entropy
from rapydli.kernels.optim import sgd_update
from rapydli.kernels.pool import (
    avgpool2d_backward,
    avgpool2d_forward,
    maxpool2d_backward,
    maxpool2d_forward,
)

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "activation_backward",
    "activation_forward",
    "available_backends",
    "avgpool2d_backward",
    "avgpool2d_forward",
    "conv2d_backward",
    "conv2d_forward",
    "dense_backward",
    "dense_forward",
    "get_array_module",
    "l2pool2d_backward",
    "l2pool2d_forward",
    "local_contrast_norm_backward",
    "local_contrast_norm_forward",
    "locally_connected_backward",
    "locally_connected_backward_update",
    "locally_connected_forward",
    "maxpool2d_backward",
    "maxpool2d_forward",
    "mse",
    "sgd_update",
    "softmax_cross_entropy",
]
