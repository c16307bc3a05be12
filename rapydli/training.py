"""The user-facing verbs: ``value_and_grad``, ``fit``, ``evaluate``, ``predict``.

Each lowers the network under the placement, runs the step graph on Dask through an
:class:`~rapydli.scheduler.engine.Engine`, and returns NumPy results.

>>> import numpy as np
>>> from rapydli import Sequential, Dense, value_and_grad
>>> net = Sequential([Dense(3)], input_shape=(4,))
>>> loss, grads = value_and_grad(net, net.init(0), np.ones((2, 4), "float32"), np.array([0, 2]))
>>> sorted(grads), round(loss, 4) > 0
(['0.bias', '0.weight'], True)
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from rapydli.graph.tiles import relative
from rapydli.optim import SGD
from rapydli.scheduler.cluster import local_client
from rapydli.scheduler.engine import Engine
from rapydli.storage.datasets import batches

#: most training steps submitted ahead of the one whose metrics were last collected
MAX_IN_FLIGHT = 4


@contextlib.contextmanager
def _client_for(placement, client):
    """The given client, or an embedded cluster for multi-worker meshes (closed afterwards)."""
    if client is not None or placement is None or placement.mesh.size == 1:
        yield client
        return
    own = local_client(placement.mesh.size)
    try:
        yield own
    finally:
        cluster = own.cluster
        own.close()
        cluster.close()


def _dtype_of(params, dtype):
    if dtype is not None:
        return np.dtype(dtype)
    return np.result_type(*params.values())


def value_and_grad(network, params, x, y, placement=None, client=None, dtype=None, fused=True):
    """Loss and gradients of ``network`` at ``params`` on the batch ``(x, y)``.

    Runs the lowered forward and backward graph under ``placement`` (single worker when
    ``None``) and returns ``(loss, grads)``, ``grads`` shaped like ``params``.
    """
    dtype = _dtype_of(params, dtype)
    with _client_for(placement, client) as c:
        engine = Engine(network, placement, None, c, dtype, fused)
        engine.set_params(params)
        engine.set_data("batch", x, y)
        out = engine.run("grad", np.arange(len(x)), "batch")
        loss, _ = engine.value(out["metrics"])
        grads = {}
        for name, tiles in out["grads"].items():
            full = grads.setdefault(name, np.zeros(np.shape(params[name]), dtype))
            for region, bound in tiles:
                full[relative(region, ((0, n) for n in full.shape))] = engine.value(bound)
        engine.close()
    return loss, grads


@dataclass
class History:
    """Per-epoch metrics of a :func:`fit` run."""

    epochs: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    opt_state: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return [row[key] for row in self.epochs]


def _evaluate_engine(engine: Engine, name: str, n: int, batch_size: int) -> tuple[float, float]:
    results = [engine.run("eval", np.arange(i, min(i + batch_size, n)), name)["metrics"]
               for i in range(0, n, batch_size)]
    total_loss = total_correct = 0.0
    for i, bound in zip(range(0, n, batch_size), results):
        loss, correct = engine.value(bound)
        total_loss += loss * (min(i + batch_size, n) - i)
        total_correct += correct
    return total_loss / n, total_correct / n


def fit(network, x, y, *, placement=None, optimizer=None, epochs: int = 1,
        batch_size: int = 64, seed: int = 0, params=None, opt_state=None,
        validation_data=None, client=None, dtype="float32", progress: bool = False,
        on_epoch=None, fused: bool = True, steps_per_task: int = 1,
        eval_every: int = 1) -> History:
    """Train ``network`` on ``(x, y)``; returns a :class:`History` with the final params.

    Steps are submitted ahead (up to ``MAX_IN_FLIGHT``) while earlier ones compute; the
    weights stay on the workers until the end. ``on_epoch(row)`` is called after each epoch
    with a dict of ``epoch``, ``loss``, ``train_accuracy``, ``test_accuracy`` (when
    ``validation_data`` is given), ``samples_per_s`` and ``seconds``.
    The test split is evaluated every ``eval_every`` epochs and after the last one.
    ``steps_per_task > 1`` unrolls that many steps into one graph (see
    :mod:`rapydli.graph.unroll`): fewer, larger tasks, the same numbers.
    """
    optimizer = optimizer or SGD()
    rng = np.random.default_rng(seed)
    params = params if params is not None else network.init(seed, dtype)
    history = History()
    with _client_for(placement, client) as c:
        engine = Engine(network, placement, optimizer, c, dtype, fused)
        engine.set_params(params, opt_state)
        engine.set_data("train", x, y)
        if validation_data is not None:
            engine.set_data("test", *validation_data)
        bar = _progress(progress, epochs * -(-len(x) // batch_size))
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            loss, correct = _train_epoch(engine, len(x), batch_size, rng, bar, steps_per_task)
            seconds = time.perf_counter() - start
            row = {"epoch": epoch, "loss": loss / len(x), "train_accuracy": correct / len(x),
                   "samples_per_s": len(x) / seconds, "seconds": seconds}
            if validation_data is not None and (epoch % eval_every == 0 or epoch == epochs):
                row["test_loss"], row["test_accuracy"] = _evaluate_engine(
                    engine, "test", len(validation_data[0]), batch_size)
            history.epochs.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['train_accuracy']:.3f}")
            if on_epoch is not None:
                on_epoch(row)
        if bar is not None:
            bar.close()
        history.params = engine.get_params()
        history.opt_state = engine.get_opt_state()
        engine.close()
    return history


def _chunks(batches: list[np.ndarray], k: int) -> list[list[np.ndarray]]:
    """Runs of up to ``k`` consecutive batches of equal size (one unrolled graph each)."""
    chunks: list[list[np.ndarray]] = []
    for index in batches:
        if chunks and len(chunks[-1]) < k and len(chunks[-1][0]) == len(index):
            chunks[-1].append(index)
        else:
            chunks.append([index])
    return chunks


def _train_epoch(engine: Engine, n: int, batch_size: int, rng, bar,
                 steps_per_task: int = 1) -> tuple[float, int]:
    """One pass over the data; returns summed (loss * batch) and correct predictions."""
    pending: list = []
    loss_sum, correct = 0.0, 0

    def collect():
        nonlocal loss_sum, correct
        bound, chunk = pending.pop(0)
        values = engine.value(bound)
        for (loss, n_correct), index in zip(values if len(chunk) > 1 else [values], chunk):
            loss_sum += loss * len(index)
            correct += n_correct
        if bar is not None:
            bar.update(len(chunk))

    for chunk in _chunks(batches(n, batch_size, rng), steps_per_task):
        pending.append((engine.run("train", chunk if len(chunk) > 1 else chunk[0],
                                   "train")["metrics"], chunk))
        if len(pending) > max(1, MAX_IN_FLIGHT // steps_per_task):
            collect()
    while pending:
        collect()
    return loss_sum, correct


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True)


def evaluate(network, params, x, y, *, placement=None, client=None, batch_size: int = 256,
             dtype=None) -> tuple[float, float]:
    """Mean loss and accuracy of ``network`` at ``params`` on ``(x, y)``."""
    dtype = _dtype_of(params, dtype)
    with _client_for(placement, client) as c:
        engine = Engine(network, placement, None, c, dtype)
        engine.set_params(params)
        engine.set_data("eval", x, y)
        result = _evaluate_engine(engine, "eval", len(x), batch_size)
        engine.close()
    return result


def predict(network, params, x, *, placement=None, client=None, batch_size: int = 256,
            dtype=None) -> np.ndarray:
    """Network outputs (logits for classifiers) for every sample of ``x``."""
    dtype = _dtype_of(params, dtype)
    out = np.zeros((len(x), *network.output_shape), dtype)
    with _client_for(placement, client) as c:
        engine = Engine(network, placement, None, c, dtype)
        engine.set_params(params)
        engine.set_data("predict", x)
        for start in range(0, len(x), batch_size):
            index = np.arange(start, min(start + batch_size, len(x)))
            for region, bound in engine.run("predict", index, "predict")["predictions"]:
                (b0, b1), *rest = region
                out[(slice(start + b0, start + b1), *(slice(a, b) for a, b in rest))] = \
                    engine.value(bound)
        engine.close()
    return out
