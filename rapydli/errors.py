"""The errors rapydli raises: one base class, one kind per thing a user can get wrong.

Each message says what was expected, what was received and how to fix it.
"""
from __future__ import annotations


class RapydliError(Exception):
    """Base class of every error rapydli raises on purpose."""


class ConfigError(RapydliError, ValueError):
    """A configuration file or a spec argument is missing a key or holds a bad value."""


class ShapeError(RapydliError, ValueError):
    """Tensor shapes do not fit together (layer to layer, data to network)."""


class PlacementError(RapydliError, ValueError):
    """A mesh or tiling cannot be realised (unknown axis, mesh larger than the cluster)."""


class DataError(RapydliError, ValueError):
    """Input data is malformed (wrong dtype, NaN, labels out of range)."""


class ClusterError(RapydliError, RuntimeError):
    """A Dask cluster cannot be reached or started."""


class LostWorkerError(ClusterError):
    """A worker a step was placed on left the cluster (killed, crashed, restarted); ``fit``
    resumes from its last snapshot once the cluster has the workers again."""
