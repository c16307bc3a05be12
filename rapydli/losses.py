"""Loss specs: the mean over the batch of a per-sample loss, computed tile by tile.

A tile of the batch computes ``scale * sum(per-sample loss)`` with ``scale = 1 / batch`` (times
``1 / features`` for ``mse``), so the tiles' losses and gradients add up to the full batch's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rapydli.errors import ConfigError
from rapydli.kernels import LOSSES, mse, softmax_cross_entropy

_KERNELS = {"softmax_cross_entropy": softmax_cross_entropy, "mse": mse}


@dataclass(frozen=True)
class Loss:
    """A loss by name: ``softmax_cross_entropy`` (integer labels) or ``mse`` (targets)."""

    name: str = "softmax_cross_entropy"

    def __post_init__(self):
        if self.name not in LOSSES:
            legal = ", ".join(repr(n) for n in LOSSES)
            raise ConfigError(f"loss: unknown loss {self.name!r}; expected one of {legal}")

    @property
    def integer_labels(self) -> bool:
        return self.name == "softmax_cross_entropy"

    def scale(self, batch: int, out_shape: tuple[int, ...]) -> float:
        per_sample = 1 if self.integer_labels else math.prod(out_shape)
        return 1.0 / (batch * per_sample)

    def __call__(self, pred, target, scale: float):
        """``(loss, dpred, n_correct)`` for one tile of the batch."""
        return _KERNELS[self.name](pred, target, scale)


def as_loss(loss: str | Loss) -> Loss:
    return loss if isinstance(loss, Loss) else Loss(loss)
