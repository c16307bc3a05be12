"""One training run: epochs of steps from a source, snapshots, checkpoints, lost-worker recovery.

:func:`rapydli.training.fit` builds a :class:`Trainer`. The run's position is ``(epoch,
epoch_step)``; with the data order a function of ``(seed, epoch)``
(:func:`rapydli.storage.loader.epoch_rng`), a position plus the parameters and optimizer state is
everything needed to continue. The trainer keeps such a *snapshot* in memory at every checkpoint
and epoch boundary, and writes it to disk every ``checkpoint_every`` steps and at the end when
given a :class:`~rapydli.storage.checkpoint.Checkpoints`.

When a worker dies mid-run (its resident weights and data go with it), the trainer waits until
the cluster has enough workers again (a nanny restarts a killed worker), builds a new engine on
them, restores the last snapshot and replays from its position: at most the steps since that
snapshot are lost, and because every step is deterministic the run ends with the weights an
undisturbed run would have. :attr:`History.events` says what happened.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time

import numpy as np

from rapydli.scheduler.engine import Engine

#: most training steps submitted ahead of the one whose metrics were last collected
MAX_IN_FLIGHT = 4
#: times a run rebuilds its engine after losing workers before it gives up
MAX_RECOVERIES = 3
#: seconds to wait for the cluster to have enough workers again
RECOVERY_TIMEOUT = 120


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Exceptions by which Dask reports results lost with a worker."""
    errors: list[type[BaseException]] = [concurrent.futures.CancelledError, asyncio.CancelledError]
    try:
        from distributed.client import FutureCancelledError
        from distributed.comm.core import CommClosedError
        from distributed.scheduler import KilledWorker

        errors += [FutureCancelledError, CommClosedError, KilledWorker]
    except ImportError:  # pragma: no cover - distributed is a dependency
        pass
    return tuple(errors)


class Trainer:
    """Runs ``epochs`` over ``source`` (see :mod:`rapydli.storage.loader`) on an engine."""

    def __init__(self, network, source, *, placement, optimizer, client, dtype, fused,
                 batch_size: int, seed: int, steps_per_task: int = 1, validation=None,
                 eval_every: int = 1, checkpoints=None, checkpoint_every: int | None = None,
                 bar=None, on_epoch=None, on_checkpoint=None):
        self.network, self.source, self.placement = network, source, placement
        self.optimizer, self.client, self.dtype, self.fused = optimizer, client, dtype, fused
        self.batch_size, self.seed, self.steps_per_task = batch_size, seed, steps_per_task
        self.validation, self.eval_every = validation, eval_every
        self.checkpoints, self.checkpoint_every = checkpoints, checkpoint_every
        self.bar, self.on_epoch, self.on_checkpoint = bar, on_epoch, on_checkpoint
        #: position: current epoch (from 1), steps done in it, steps done in the run
        self.epoch, self.epoch_step, self.step = 1, 0, 0
        #: this epoch so far: summed loss * batch, correct predictions, samples, seconds
        self.sums = [0.0, 0, 0, 0.0]
        #: per-epoch metric rows and what happened (recoveries)
        self.rows: list[dict] = []
        self.events: list[dict] = []
        #: the last snapshot: (params, opt_state, meta)
        self.snapshot: tuple | None = None
        self.engine: Engine | None = None
        self._n_test = 0
        self._position: dict | None = None  #: the data position a resumed epoch starts from
        self._saved_step = 0  #: step of the last checkpoint written

    # --- state -------------------------------------------------------------------------------

    def meta(self) -> dict:
        """The JSON part of a snapshot: position, running sums, history, data position."""
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step,
                "seed": self.seed, "rng": f"numpy default_rng([{self.seed}, epoch])",
                "sums": list(self.sums), "history": [dict(r) for r in self.rows],
                "events": [dict(e) for e in self.events],
                "data": self.source.position(), "network": self.network.get_config()}

    def restore(self, params, opt_state, meta: dict | None) -> None:
        """Start (or restart) from ``params``/``opt_state`` at the position in ``meta``."""
        if meta:
            self.epoch, self.epoch_step, self.step = meta["epoch"], meta["epoch_step"], meta["step"]
            self.sums = list(meta["sums"])
            self.rows = [dict(r) for r in meta["history"]]
            self.events = [dict(e) for e in meta.get("events", [])]
            self._position = meta.get("data")
            self._saved_step = self.step
        else:
            self._position = None
        self.snapshot = (params, opt_state, self.meta() if meta is None else meta)
        self._start_engine(params, opt_state)

    def _start_engine(self, params, opt_state) -> None:
        self.engine = Engine(self.network, self.placement, self.optimizer, self.client,
                             self.dtype, self.fused)
        self.engine.set_params(params, opt_state)
        self.source.attach(self.engine)
        self._n_test = 0
        if self.validation is not None:
            if hasattr(self.validation, "materialize"):
                self._n_test = self.validation.materialize(self.engine, "test")
            else:
                self.engine.set_data("test", *self.validation)
                self._n_test = len(self.validation[0])

    def take_snapshot(self, save: bool) -> None:
        """Parameters and state to the client (waits for submitted steps), optionally to disk."""
        params, opt_state = self.engine.get_params(), self.engine.get_opt_state()
        meta = self.meta()
        self.snapshot = (params, opt_state, meta)
        if save and self.checkpoints is not None:
            self._saved_step = self.step
            path = self.checkpoints.save(self.step, params, opt_state, meta)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, meta)

    # --- the loop ----------------------------------------------------------------------------

    def run(self, epochs: int) -> None:
        errors = _lost_worker_errors() if self.client is not None else ()
        while self.epoch <= epochs:
            try:
                self._epoch(epochs)
            except errors as exc:
                self._recover(exc)
        if self.checkpoints is not None and self._saved_step != self.step:
            self.take_snapshot(save=True)

    def _epoch(self, epochs: int) -> None:
        start = time.perf_counter() - self.sums[3]
        steps = self.source.epoch(self.engine, self.epoch, self.batch_size, self.seed,
                                  self._position)
        steps = itertools.islice(steps, self.epoch_step, None)  # resumed: skip what is done
        pending: list = []
        for chunk in _chunks(steps, self.steps_per_task):
            index = [i for _, i in chunk] if len(chunk) > 1 else chunk[0][1]
            pending.append((self.engine.run("train", index, chunk[0][0])["metrics"], chunk))
            if len(pending) > max(1, MAX_IN_FLIGHT // self.steps_per_task):
                self._collect(pending.pop(0))
            every = self.checkpoint_every
            submitted = self.step + sum(len(c) for _, c in pending)
            if every and submitted // every > self._saved_step // every:
                while pending:
                    self._collect(pending.pop(0))
                self.sums[3] = time.perf_counter() - start
                self.take_snapshot(save=True)
        while pending:
            self._collect(pending.pop(0))
        self._finish_epoch(epochs, time.perf_counter() - start)

    def _collect(self, item) -> None:
        bound, chunk = item
        values = self.engine.value(bound)
        for (loss, n_correct), (_, index) in zip(values if len(chunk) > 1 else [values], chunk):
            n = index.shape[-1]
            self.sums[0] += loss * n
            self.sums[1] += int(n_correct)
            self.sums[2] += n
        self.epoch_step += len(chunk)
        self.step += len(chunk)
        if self.bar is not None:
            self.bar.update(len(chunk))

    def _finish_epoch(self, epochs: int, seconds: float) -> None:
        n = max(self.sums[2], 1)
        row = {"epoch": self.epoch, "loss": self.sums[0] / n, "train_accuracy": self.sums[1] / n,
               "samples_per_s": self.sums[2] / max(seconds, 1e-9), "seconds": seconds,
               "steps": self.epoch_step}
        if self._n_test and (self.epoch % self.eval_every == 0 or self.epoch == epochs):
            row["test_loss"], row["test_accuracy"] = evaluate_engine(
                self.engine, "test", self._n_test, self.batch_size)
        self.rows.append(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['train_accuracy']:.3f}")
        self.epoch, self.epoch_step, self._position = self.epoch + 1, 0, None
        self.sums = [0.0, 0, 0, 0.0]
        if self.on_epoch is not None:
            self.on_epoch(row)
        if self.client is not None or self.checkpoints is not None:
            # what a lost worker rolls back to; on disk too when there is no step cadence
            self.take_snapshot(save=self.checkpoint_every is None)

    def _recover(self, exc: BaseException) -> None:
        params, opt_state, meta = self.snapshot
        event = {"event": "lost worker", "error": f"{type(exc).__name__}: {exc}"[:300],
                 "at_step": self.step, "resumed_from_step": meta["step"]}
        if sum(e["event"] == "lost worker" for e in self.events) >= MAX_RECOVERIES:
            raise RuntimeError(f"training lost workers {MAX_RECOVERIES + 1} times; last: "
                               f"{event['error']}. Check the workers' logs (memory limits, "
                               "crashes) before resuming with --resume") from exc
        try:
            self.engine.close()
        except Exception:  # the engine of a broken cluster may not close cleanly
            pass
        self.client.wait_for_workers(self.placement.mesh.size, timeout=RECOVERY_TIMEOUT)
        self.restore(params, opt_state, {**meta, "events": [*self.events, event]})
        if self.bar is not None:
            self.bar.write(f"lost a worker at step {event['at_step']}; resumed from step "
                           f"{event['resumed_from_step']}")


def _chunks(steps, k: int):
    """Runs of up to ``k`` consecutive steps on the same data and batch shape (one graph each)."""
    chunk: list = []
    for name, index in steps:
        index = np.asarray(index, dtype=np.int64)
        if chunk and (chunk[0][0] != name or chunk[0][1].shape != index.shape):
            yield chunk
            chunk = []
        chunk.append((name, index))
        if len(chunk) == k:  # submitted before the source is asked for more
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def evaluate_engine(engine: Engine, name: str, n: int, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over samples ``0..n-1`` of dataset ``name`` on the engine."""
    results = [engine.run("eval", np.arange(i, min(i + batch_size, n)), name)["metrics"]
               for i in range(0, n, batch_size)]
    total_loss = total_correct = 0.0
    for i, bound in zip(range(0, n, batch_size), results):
        loss, correct = engine.value(bound)
        total_loss += loss * (min(i + batch_size, n) - i)
        total_correct += correct
    return total_loss / n, total_correct / n
