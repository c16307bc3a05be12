"""rapydli: deep networks lowered to tiled task graphs and trained on Dask.

The names users type: network and layer specs, placements, optimizers, and the verbs
``value_and_grad``, ``fit``, ``evaluate``, ``predict``.
"""
import os as _os

# Idle BLAS and OpenMP threads go to sleep at once instead of spinning: a step alternates BLAS
# calls with Numba kernels, and a spinning pool takes the cores the next kernel needs. Read when
# the libraries load, so this holds when rapydli is imported before NumPy (the command line, the
# Dask workers rapydli starts); set the variables yourself to choose otherwise.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from rapydli.errors import (
    ClusterError,
    ConfigError,
    DataError,
    PlacementError,
    RapydliError,
    ShapeError,
)
from rapydli.layers import (
    Activation,
    AvgPool2D,
    Conv2D,
    Dense,
    Flatten,
    L2Pool2D,
    LocalContrastNorm,
    LocallyConnected2D,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Tanh,
)
from rapydli.losses import Loss
from rapydli.network import Sequential
from rapydli.optim import SGD
from rapydli.placement import (
    Mesh,
    Placement,
    Tiling,
    data_parallel,
    hybrid,
    model_parallel,
    single,
    spatial_parallel,
)
from rapydli.training import evaluate, fit, predict, value_and_grad
from rapydli.unsupervised import SparsityPenalty  # registers the layer type for configs

__version__ = "0.1.0"

__all__ = [
    "Activation", "AvgPool2D", "ClusterError", "ConfigError", "Conv2D", "DataError", "Dense",
    "Flatten", "L2Pool2D", "LocalContrastNorm", "LocallyConnected2D", "Loss", "MaxPool2D",
    "Mesh", "Placement", "PlacementError", "RapydliError", "SparsityPenalty",
    "ReLU", "SGD", "Sequential", "ShapeError", "Sigmoid", "Tanh", "Tiling", "data_parallel",
    "evaluate", "fit", "hybrid", "model_parallel", "predict", "single", "spatial_parallel",
    "value_and_grad",
]
