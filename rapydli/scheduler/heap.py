"""Keeping a process's long-lived heap out of Python's full garbage collections.

A full (generation 2) collection walks every container object the process holds. A Dask worker
that has run one step of a network holds about 175,000 of them (Dask's state, the modules, the
compiled kernels' dispatchers), and each full collection then stops the process for about
60 ms; the client process (client, scheduler and nannies of an embedded cluster) holds about
110,000 and stops for 25-80 ms. Training allocates steadily, so these collections come back
every few seconds, each time at a random point of a step: in data parallel the other workers
wait at the next gradient sum for the one collecting (a 64-step round of the data-parallel MLP
of ``benchmarks/scaling.py`` took 27.3 ms a step with one full collection in its workers,
25.3-25.8 ms without).

:func:`settle` collects once and moves every object alive into the permanent generation
(:func:`gc.freeze`), which later collections skip: a full collection of a settled worker walks
a few thousand objects (0.6 ms). It runs after a task, at most once per :data:`CHECK_SECONDS`,
and only when the heap outside the permanent generation grew past :data:`MAX_OBJECTS`: the
first step's kernels, a new network's. What the heap holds at steady state is unchanged, so
settled processes stay settled. The cost: an object frozen while alive that later becomes
unreachable within a reference cycle is never freed (one freed by its reference count goes as
usual). A settle happens only when the unfrozen heap grew by :data:`MAX_OBJECTS`; over 100 s
of data-parallel training in 4-step tasks a worker's frozen objects stayed between 170,000
and 205,000, its memory flat.

Workers settle through :class:`SettleHeap`, a Dask worker plugin an engine registers on its
client; the training loop settles the client process with :func:`settled`, which puts the
frozen objects back into the collector's care when training ends. ``RAPYDLI_SETTLE_HEAP=0`` in
the environment of the process that trains turns both off (workers already settling keep
their plugin until they restart): for a cluster whose worker processes hold objects of their
own that become cyclic garbage, or to compare.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
import weakref

#: objects outside the permanent generation above which a settle freezes them (a full
#: collection of this many takes about 7 ms)
MAX_OBJECTS = 20_000
#: seconds between two checks of the heap (each lists the oldest generation: well under 1 ms
#: at steady state), so that the heap a first step leaves is settled within about a second
CHECK_SECONDS = 1.0

#: the environment variable that turns settling off where it is "0"
ENV_VAR = "RAPYDLI_SETTLE_HEAP"

#: when this process last checked its heap (monotonic seconds; None: never)
_last_check: float | None = None


def enabled() -> bool:
    """Whether settling is on (``RAPYDLI_SETTLE_HEAP`` is not ``"0"``)."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


def settle(force: bool = False) -> bool:
    """Freeze the heap if it grew past :data:`MAX_OBJECTS` since the last settle; checked at
    most once per :data:`CHECK_SECONDS` unless ``force``. Returns whether it froze."""
    global _last_check
    if not force and not enabled():
        return False
    now = time.monotonic()
    if not force and _last_check is not None and now - _last_check < CHECK_SECONDS:
        return False
    _last_check = now
    if not force and len(gc.get_objects(generation=2)) < MAX_OBJECTS:
        return False
    gc.collect()  # what is garbage now must not be frozen
    gc.freeze()
    return True


@contextlib.contextmanager
def settled():
    """Settle this process as it goes (call :func:`settle` inside); afterwards the objects
    frozen here return to the collector, unless something else had frozen objects before."""
    ours = gc.get_freeze_count() == 0
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object


class SettleHeap(WorkerPlugin):
    """Dask worker plugin: :func:`settle` after each task that finished on the worker, in
    worker processes only (a worker inside the client's process, as in
    ``LocalCluster(processes=False)``, leaves that process to :func:`settled`)."""

    #: one per worker whatever the engines: registering again replaces it
    name = "rapydli-settle-heap"

    def __init__(self):
        #: the process that registered the plugin (the client's)
        self.client_pid = os.getpid()

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        if start == "executing" and finish == "memory" and os.getpid() != self.client_pid:
            settle()


def register(client) -> None:
    """Have every worker of ``client``'s cluster, and every worker joining it, settle its heap
    (see :class:`SettleHeap`); once per client, and not while settling is off."""
    if enabled() and client not in _registered:
        client.register_plugin(SettleHeap())
        _registered.add(client)


#: clients whose clusters have the plugin
_registered: weakref.WeakSet = weakref.WeakSet()
