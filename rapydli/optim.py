"""Optimizer specs. An optimizer names its per-parameter state slots and a pure update kernel,
so the engine can keep that state resident beside each weight tile and new optimizers (Adam,
L-BFGS) slot in without changing the graph.

>>> opt = SGD(lr=0.1, momentum=0.9)
>>> opt.slots
('velocity',)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rapydli.errors import ConfigError
from rapydli.kernels import sgd_update
from rapydli.kernels.optim import sgd_update_


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with momentum and (L2) weight decay, PyTorch semantics."""

    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        for field in ("lr", "momentum", "weight_decay"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"optimizer: {field} must be a number >= 0; received {value!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optimizer: nesterov=True needs momentum > 0; set momentum: 0.9")

    @property
    def slots(self) -> tuple[str, ...]:
        return ("velocity",) if self.momentum else ()

    def init_state(self, weight: np.ndarray) -> dict:
        return {slot: np.zeros_like(weight) for slot in self.slots}

    def update(self, weight, grad, state: dict, inplace: bool = False, grad_add=None):
        """``(new_weight, new_state)``; pure unless ``inplace``, which writes into ``weight``
        and the state arrays (for callers that own them). ``grad_add``: a second gradient
        tile the step uses the sum ``grad + grad_add`` of (added as it is read, in place)."""
        args = (state.get("velocity"), self.lr, self.momentum, self.weight_decay, self.nesterov)
        if inplace:
            w, v = sgd_update_(weight, grad, *args, g_add=grad_add)
        else:
            w, v = sgd_update(weight, grad if grad_add is None else grad + grad_add, *args)
        return w, ({"velocity": v} if self.slots else {})


OPTIMIZERS = {"sgd": SGD}


def from_config(config: dict) -> SGD:
    """``{"name": "sgd", "lr": 0.1, "momentum": 0.9}`` -> :class:`SGD`."""
    config = dict(config)
    name = config.pop("name", "sgd")
    if name not in OPTIMIZERS:
        legal = ", ".join(repr(n) for n in OPTIMIZERS)
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; expected one of {legal}")
    try:
        return OPTIMIZERS[name](**config)
    except TypeError as exc:
        raise ConfigError(f"optimizer ({name}): {exc}") from None
