"""One training run: epochs of steps from a source, snapshots, checkpoints, lost-worker recovery.

:func:`rapydli.training.fit` builds a :class:`Trainer`. The run's position is ``(epoch,
epoch_step)``; with the data order a function of ``(seed, epoch)``
(:func:`rapydli.storage.loader.epoch_rng`), a position plus the parameters and optimizer state is
everything needed to continue. The trainer keeps such a *snapshot* in memory at every checkpoint
and at the end of an epoch once :data:`SNAPSHOT_SECONDS` have passed since the last one, and
writes it to disk every ``checkpoint_every`` steps and at the end when
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
import math
import time

import numpy as np

from rapydli.errors import LostWorkerError
from rapydli.scheduler import heap
from rapydli.scheduler.engine import Engine

#: most training steps submitted ahead of the one whose metrics were last collected
MAX_IN_FLIGHT = 4
#: times a run rebuilds its engine after losing workers before it gives up
MAX_RECOVERIES = 3
#: seconds to wait for the cluster to have enough workers again
RECOVERY_TIMEOUT = 120
#: in-memory snapshots (what a lost worker rolls back to) are taken at the end of an epoch when
#: the last one is at least this old: each fetches the weights to the client, which for a small
#: network costs more than its epoch (200 epochs of the sparse autoencoder example: 14 s)
SNAPSHOT_SECONDS = 10.0
#: ``steps_per_task="auto"``: steps are unrolled into one task until it runs about this long.
#: Each submitted graph costs the scheduler and client some 10-20 ms of CPU (measured with
#: the MLP of benchmarks/overhead.py on a 1-worker LocalCluster), taken from the cores the
#: kernels run on, and with the direct exchange each task boundary holds every worker until
#: the slowest has its next task (the data-parallel MLP of benchmarks/scaling.py on 2 worker
#: processes: 23.06 ms a step at 16 steps a task, 22.50 at 64; about 13 ms a boundary). At
#: two seconds a task both are under 1%; results and progress still come every two seconds.
TASK_SECONDS = 2.0
#: the most steps ``"auto"`` puts in one task
MAX_STEPS_PER_TASK = 64


class TaskSize:
    """How many training steps go into the next task graph: a fixed number, or ``"auto"``.

    ``"auto"`` starts at one step and, from the measured seconds per step (the time between
    the arrivals of consecutive results while steps are pipelined), takes the largest power of
    two of steps that fits in :data:`TASK_SECONDS`, at most :data:`MAX_STEPS_PER_TASK`. The
    grouping never changes the numbers (an unrolled graph runs the same ops in the same
    order); in-process (no cluster, nothing to schedule) "auto" is one step.
    """

    def __init__(self, steps_per_task, distributed: bool):
        if steps_per_task != "auto" and not (isinstance(steps_per_task, int)
                                             and steps_per_task >= 1):
            raise ValueError(f"steps_per_task must be a positive integer or 'auto', "
                             f"got {steps_per_task!r}")
        self.auto = steps_per_task == "auto" and distributed
        self.steps = 1 if steps_per_task == "auto" else steps_per_task
        #: smoothed seconds per step ("auto"), None until measured
        self.per_step: float | None = None
        self._last: float | None = None

    def arrived(self, steps: int) -> None:
        """The results of a graph of ``steps`` steps arrived: re-size the next graphs."""
        now = time.perf_counter()
        if self.auto and self._last is not None:
            seconds = (now - self._last) / steps
            self.per_step = seconds if self.per_step is None else \
                0.7 * self.per_step + 0.3 * seconds
            fit = max(1.0, TASK_SECONDS / max(self.per_step, 1e-9))
            self.steps = min(MAX_STEPS_PER_TASK, 2 ** int(math.log2(fit)))
        self._last = now

    def pause(self) -> None:
        """Work other than steps follows (evaluation, snapshots): do not time across it."""
        self._last = None


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Exceptions by which Dask reports results lost with a worker."""
    errors: list[type[BaseException]] = [concurrent.futures.CancelledError, asyncio.CancelledError,
                                         LostWorkerError]
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
                 batch_size: int, seed: int, steps_per_task: int | str = 1,
                 exchange: str = "auto", validation=None,
                 eval_every: int = 1, checkpoints=None, checkpoint_every: int | None = None,
                 bar=None, on_epoch=None, on_checkpoint=None):
        self.network, self.source, self.placement = network, source, placement
        self.optimizer, self.client, self.dtype, self.fused = optimizer, client, dtype, fused
        self.batch_size, self.seed = batch_size, seed
        self.task_size = TaskSize(steps_per_task, client is not None)
        self.exchange = exchange
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
        self._snapshot_time = time.perf_counter()  #: when the last snapshot was taken

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
                             self.dtype, self.fused, exchange=self.exchange)
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
        self._snapshot_time = time.perf_counter()
        if save and self.checkpoints is not None:
            self._saved_step = self.step
            path = self.checkpoints.save(self.step, params, opt_state, meta)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, meta)

    # --- the loop ----------------------------------------------------------------------------

    def run(self, epochs: int) -> None:
        errors = _lost_worker_errors() if self.client is not None else ()
        with heap.settled():  # no full garbage collection walks this process's whole heap
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
        size = self.task_size
        size.pause()
        for chunk in _chunks(steps, lambda: size.steps):
            index = [i for _, i in chunk] if len(chunk) > 1 else chunk[0][1]
            pending.append((self.engine.run("train", index, chunk[0][0])["metrics"], chunk))
            if len(pending) > max(1, MAX_IN_FLIGHT // len(chunk)):
                self._collect(pending.pop(0))
            every = self.checkpoint_every
            submitted = self.step + sum(len(c) for _, c in pending)
            if every and submitted // every > self._saved_step // every:
                while pending:
                    self._collect(pending.pop(0))
                self.sums[3] = time.perf_counter() - start
                self.take_snapshot(save=True)
                size.pause()
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
        self.task_size.arrived(len(chunk))
        heap.settle()
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
        save = self.checkpoints is not None and self.checkpoint_every is None
        if save or (self.client is not None and
                    time.perf_counter() - self._snapshot_time >= SNAPSHOT_SECONDS):
            # what a lost worker rolls back to; on disk too when there is no step cadence
            self.take_snapshot(save=save)

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


def _chunks(steps, size):
    """Runs of up to ``size()`` consecutive steps on the same data and batch shape (one graph
    each; ``size`` is asked again for every run)."""
    chunk: list = []
    for name, index in steps:
        index = np.asarray(index, dtype=np.int64)
        if chunk and (chunk[0][0] != name or chunk[0][1].shape != index.shape):
            yield chunk
            chunk = []
        chunk.append((name, index))
        if len(chunk) >= size():  # submitted before the source is asked for more
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
