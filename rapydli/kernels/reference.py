"""The NumPy/CuPy reference implementations of every kernel, under their public names.

The public functions of :mod:`rapydli.kernels` run Numba-compiled code for NumPy
float32/float64 arrays; these are the array-module-generic implementations they
fall back to (and that ``RAPYDLI_KERNELS=numpy`` selects). Signatures are the same.

Examples
--------
>>> import numpy as np
>>> from rapydli.kernels import reference
>>> reference.maxpool2d_forward(np.arange(16.0).reshape(1, 1, 4, 4), 2, 2).shape
(1, 1, 2, 2)
"""
from __future__ import annotations

from rapydli.kernels.activations import activation_backward_reference as activation_backward
from rapydli.kernels.activations import activation_forward_reference as activation_forward
from rapydli.kernels.conv import conv2d_backward_reference as conv2d_backward
from rapydli.kernels.conv import conv2d_forward_reference as conv2d_forward
from rapydli.kernels.dense import dense_backward, dense_forward
from rapydli.kernels.losses import mse_reference as mse
from rapydli.kernels.losses import softmax_cross_entropy_reference as softmax_cross_entropy
from rapydli.kernels.optim import sgd_update_reference as sgd_update
from rapydli.kernels.pool import avgpool2d_backward_reference as avgpool2d_backward
from rapydli.kernels.pool import avgpool2d_forward_reference as avgpool2d_forward
from rapydli.kernels.pool import maxpool2d_backward_reference as maxpool2d_backward
from rapydli.kernels.pool import maxpool2d_forward_reference as maxpool2d_forward

__all__ = [
    "activation_backward",
    "activation_forward",
    "avgpool2d_backward",
    "avgpool2d_forward",
    "conv2d_backward",
    "conv2d_forward",
    "dense_backward",
    "dense_forward",
    "maxpool2d_backward",
    "maxpool2d_forward",
    "mse",
    "sgd_update",
    "softmax_cross_entropy",
]
