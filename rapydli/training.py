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
from dataclasses import dataclass, field

import numpy as np

from rapydli.graph.tiles import relative
from rapydli.optim import SGD
from rapydli.scheduler.cluster import local_client
from rapydli.scheduler.engine import Engine
from rapydli.storage.loader import ArraySource
from rapydli.trainer import Trainer, evaluate_engine


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
        with Engine(network, placement, None, c, dtype, fused) as engine:
            engine.set_params(params)
            engine.set_data("batch", x, y)
            out = engine.run("grad", np.arange(len(x)), "batch")
            loss, _ = engine.value(out["metrics"])
            grads = {}
            for name, tiles in out["grads"].items():
                full = grads.setdefault(name, np.zeros(np.shape(params[name]), dtype))
                for region, bound in tiles:
                    full[relative(region, ((0, n) for n in full.shape))] = engine.value(bound)
    return loss, grads


@dataclass
class History:
    """Per-epoch metrics of a :func:`fit` run, its final state, and what happened on the way."""

    epochs: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    opt_state: dict = field(default_factory=dict)
    #: lost workers and the step each recovery resumed from
    events: list[dict] = field(default_factory=list)
    #: records skipped as unusable (store sources), as :meth:`QualityReport.to_dict`
    data_report: dict | None = None

    def __getitem__(self, key):
        return [row[key] for row in self.epochs]


def fit(network, x, y=None, *, placement=None, optimizer=None, epochs: int = 1,
        batch_size: int = 64, seed: int = 0, params=None, opt_state=None,
        validation_data=None, client=None, dtype="float32", progress: bool = False,
        on_epoch=None, fused: bool = True, steps_per_task: int | str = "auto",
        exchange: str = "auto", eval_every: int = 1,
        checkpoints=None, checkpoint_every: int | None = None, resume=None,
        on_checkpoint=None) -> History:
    """Train ``network``; returns a :class:`History` with the final params.

    ``x`` is an array of samples (with labels ``y``) or a source from
    :mod:`rapydli.storage.loader` (e.g. a :class:`~rapydli.storage.loader.StoreSource`, whose
    shards the workers read themselves); ``validation_data`` likewise, or ``(x, y)``.
    Steps are submitted ahead (up to ``MAX_IN_FLIGHT``) while earlier ones compute; the
    weights stay on the workers until the end. ``on_epoch(row)`` is called after each epoch
    with a dict of ``epoch``, ``loss``, ``train_accuracy``, ``test_accuracy`` (when
    ``validation_data`` is given), ``samples_per_s`` and ``seconds``.
    The test split is evaluated every ``eval_every`` epochs and after the last one.
    ``steps_per_task > 1`` unrolls that many steps into one graph (see
    :mod:`rapydli.graph.unroll`): fewer, larger tasks, the same numbers; ``"auto"`` (the
    default) sizes the graphs from the measured step time on a cluster (about two seconds
    of work each, see :class:`rapydli.trainer.TaskSize`) and runs one step at a time
    in-process. ``exchange`` is how tiles travel between workers: ``"direct"`` (worker to
    worker inside tasks, see :mod:`rapydli.scheduler.mailbox`; what ``"auto"`` picks on a
    cluster with more than one mesh worker) or ``"graph"`` (as Dask dependencies; use it when
    trainings started from several processes share workers).

    With ``checkpoints`` (a :class:`~rapydli.storage.checkpoint.Checkpoints`), a checkpoint is
    written every ``checkpoint_every`` steps and at the end; ``resume=(params, opt_state,
    meta)`` from :func:`~rapydli.storage.checkpoint.load_checkpoint` continues such a run where
    it stopped, with the same batches as a run that never stopped. With a client, a worker lost
    mid-run is recovered from (see :mod:`rapydli.trainer`); ``History.events`` lists it.
    """
    source = x if hasattr(x, "epoch") else ArraySource(x, y)
    with _client_for(placement, client) as c:
        trainer = Trainer(network, source, placement=placement, optimizer=optimizer or SGD(),
                          client=c, dtype=dtype, fused=fused, batch_size=batch_size, seed=seed,
                          steps_per_task=steps_per_task, exchange=exchange,
                          validation=validation_data,
                          eval_every=eval_every, checkpoints=checkpoints,
                          checkpoint_every=checkpoint_every, on_epoch=on_epoch,
                          on_checkpoint=on_checkpoint)
        if resume is not None:
            trainer.restore(*resume)
        else:
            trainer.restore(params if params is not None else network.init(seed, dtype),
                            opt_state, None)
        remaining = max(0, epochs - trainer.epoch + 1) * -(-len(source) // batch_size)
        trainer.bar = _progress(progress, remaining)
        try:
            trainer.run(epochs)
            history = History(trainer.rows, trainer.engine.get_params(),
                              trainer.engine.get_opt_state(), trainer.events,
                              source.report.to_dict() if source.report is not None else None)
        finally:  # also after an error: no task of it is left waiting on the workers
            if trainer.bar is not None:
                trainer.bar.close()
            trainer.engine.close()
    return history


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
        with Engine(network, placement, None, c, dtype) as engine:
            engine.set_params(params)
            engine.set_data("eval", x, y)
            result = evaluate_engine(engine, "eval", len(x), batch_size)
    return result


def predict(network, params, x, *, placement=None, client=None, batch_size: int = 256,
            dtype=None) -> np.ndarray:
    """Network outputs (logits for classifiers) for every sample of ``x``."""
    dtype = _dtype_of(params, dtype)
    out = np.zeros((len(x), *network.output_shape), dtype)
    with _client_for(placement, client) as c:
        with Engine(network, placement, None, c, dtype) as engine:
            engine.set_params(params)
            engine.set_data("predict", x)
            for start in range(0, len(x), batch_size):
                index = np.arange(start, min(start + batch_size, len(x)))
                for region, bound in engine.run("predict", index, "predict")["predictions"]:
                    (b0, b1), *rest = region
                    out[(slice(start + b0, start + b1), *(slice(a, b) for a, b in rest))] = \
                        engine.value(bound)
    return out
