"""Direct exchange: tiles sent worker to worker inside tasks, through one Dask actor per worker.

In the ``"graph"`` exchange every tile that changes worker is a Dask dependency: the producing
task finishes, tells the scheduler, which tells the consumer's worker, which fetches the tile;
on each exchange the step waits for two scheduler round trips. In the ``"direct"`` exchange a
plan fuses all of a worker's ops of a step (or of an unrolled group of steps) into one task;
a ``send`` op posts its tile to the receiving worker's :class:`Mailbox` (a Dask actor, called
over Dask's worker-to-worker comms, never through the scheduler) the moment it is computed,
and the consuming op takes it from its own worker's mailbox. Tiles still travel exactly as the
graph's send ops say; only the scheduler leaves the path of each exchange. Between worker
processes on one machine the tiles travel through shared memory and the message, carrying
only where they are, through the receiving mailbox's doorbell, a named pipe its waiting take
reads: neither worker's event loop handles it (:mod:`rapydli.scheduler.shared`).

Every worker runs its ops in one global topological order (see
:func:`rapydli.graph.fuse.mail_order`),
and posting never blocks, so the first op not yet run anywhere can always run: the tasks of a
step cannot deadlock. A take waits at most ``timeout`` seconds, and a task that fails posts
its error to its peers, so that no worker waits for a peer that will never send.
"""
from __future__ import annotations

import pickle
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from rapydli.errors import RapydliError
from rapydli.graph.ops import aligned
from rapydli.scheduler.shared import (BELL_MIN_BYTES, MIN_BYTES, Bell, Mappings, Segments,
                                      SharedTile, close_shared, kept_tile, make_probe,
                                      remove_files, whole)

#: seconds a take waits for a tile before giving up (a step that computes this long between
#: two exchanges is far beyond anything the engine plans)
TAKE_TIMEOUT = 600.0
#: the key under which a failed task posts its error to its peers, per step
FAILED = "__failed__"


class ExchangeError(RapydliError, RuntimeError):
    """A tile sent between workers did not arrive: the peer failed, was lost, or timed out."""


class Mailbox:
    """A Dask actor holding the tiles other workers posted to this worker, until taken.

    The engine starts one per mesh worker (``client.submit(Mailbox, name, actor=True)``).
    Peers call :meth:`put` through the actor (direct comms); tasks on this worker find the
    instance with :meth:`here` and :meth:`take` from it without any message.
    """

    #: the mailboxes living in this process, by name (held by their workers as actors: a
    #: released actor goes, and its shared memory with it)
    _here: ClassVar[weakref.WeakValueDictionary] = weakref.WeakValueDictionary()

    def __init__(self, name: str):
        #: unique per engine and mesh worker
        self.name = name
        #: posted tiles not yet taken, by ``(step, op key)``
        self.items: dict[tuple[str, str], object] = {}
        #: set by :meth:`close`: why no tile will come any more
        self.closed: str | None = None
        #: steps a peer reported failed: their tiles are dropped, now and as they arrive
        self.failed: set[str] = set()
        self._cond = threading.Condition()
        #: segments of shared memory holding the tiles this worker posted to its neighbours,
        #: and the mappings of those its neighbours posted here (see rapydli.scheduler.shared)
        self.segments = Segments(name)
        self.mappings = Mappings()
        #: the doorbell peers on this machine ring instead of calling put (None: no pipe here)
        self.bell = Bell.open(name)
        #: whether a take is reading the doorbell (the others wait on the condition)
        self._listening = False
        make_probe(name)  # after the doorbell: a sender that sees the probe finds the pipe
        #: deletes the probe and the segments: at close, when the worker lets go of the actor
        #: (an engine dropped without closing), or when the process exits
        self._remove_files = weakref.finalize(self, close_shared, name, self.segments,
                                              self.mappings)
        Mailbox._here[name] = self

    @classmethod
    def here(cls, name: str) -> Mailbox:
        try:
            return cls._here[name]
        except KeyError:
            raise ExchangeError(f"no mailbox {name!r} in this worker process: the engine that "
                                "started it was closed, or the worker restarted") from None

    async def put(self, items: list[tuple[tuple[str, str], object]]) -> None:
        """Store tiles ``[(key, value), ...]`` (run on this worker's event loop, as they arrive;
        one call carries every tile a peer had ready for this worker at once)."""
        with self._cond:
            self._store(items)
            self._cond.notify_all()
        if self.bell is not None:  # a take may be waiting on the doorbell, not the condition
            self.bell.wake()

    def _store(self, items) -> None:
        """Keep posted ``items`` (holding the condition)."""
        for key, value in items:
            if key[1] == FAILED:
                self._forget(key[0])
                self.items.setdefault(key, value)  # the first notice names the cause
                continue
            if key[0] in self.failed:
                self._drop(value)  # nothing of a failed step will be taken: hold none of it
                continue
            self.items[key] = value

    def forget(self, step: str) -> None:
        """``step`` failed on this worker: drop its tiles, now and as they arrive (those rung
        already are read from the doorbell now, so that their segments are freed at once)."""
        with self._cond:
            self._forget(step)
            if self.bell is not None and not self._listening:
                for items in self.bell.wait(0.0):
                    self._store(items)

    def _forget(self, step: str) -> None:
        self.failed.add(step)
        for key in [k for k in self.items if k[0] == step and k[1] != FAILED]:
            self._drop(self.items.pop(key))  # a failure notice stays, for takes still to come

    def _drop(self, value) -> None:
        if isinstance(value, SharedTile):  # its sender may reuse the segment
            self.mappings.release(value)

    def take(self, key: tuple[str, str], timeout: float = TAKE_TIMEOUT):
        """Wait for the tile ``key``, remove it and return it (in aligned memory)."""
        step = key[0]
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self.items:
                if step in self.failed:  # a peer's notice, or this worker's own failure
                    notice = self.items.get((step, FAILED))
                    if isinstance(notice, BaseException):  # the peer's own error, noted
                        raise notice
                    raise ExchangeError(f"step {step}: {notice}" if notice else
                                        f"step {step} failed on this worker")
                if self.closed is not None:
                    raise ExchangeError(f"mailbox {self.name} closed ({self.closed}) while "
                                        f"waiting for {key[1]!r} of step {step}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExchangeError(
                        f"mailbox {self.name}: {key[1]!r} of step {step} did not arrive in "
                        f"{timeout:.0f} s; the worker sending it may be stuck or lost (see its "
                        "log), or a step computes longer than the timeout between exchanges")
                if self.bell is None or self._listening:
                    self._cond.wait(left)  # put, close and the listening take notify
                    continue
                self._listening = True  # this take reads the doorbell for all of them
                self._cond.release()
                try:
                    rung = self.bell.wait(left)
                finally:
                    self._cond.acquire()
                    self._listening = False
                for items in rung:
                    self._store(items)
                self._cond.notify_all()
            value = self.items.pop(key)
        if isinstance(value, SharedTile):
            return self.mappings.open(value)
        return aligned(value)

    def close(self, reason: str = "engine closed", peers: tuple[str, ...] = ()) -> None:
        """Wake every waiting take with an error; nothing is held any more. The shared memory
        of ``peers`` (mailbox names) on this machine goes too: theirs may be a killed worker."""
        with self._cond:
            self.closed = reason
            self.items.clear()
            self._cond.notify_all()
        if self.bell is not None:
            self.bell.wake()
        Mailbox._here.pop(self.name, None)
        self._remove_files()
        for name in peers:
            remove_files(name)


@dataclass
class Exchange:
    """What one fused task needs to post and take tiles: its step, its mesh worker, the
    mailboxes ``(worker address, actor key, name)`` of every mesh worker; and, while the task
    runs, the tiles it queued (outbox) and the posts not yet known delivered. ``shared``: large
    tiles for workers on this machine travel through shared memory (False: in the message)."""

    step: str
    me: int
    boxes: tuple[tuple[str, str, str], ...]
    timeout: float = TAKE_TIMEOUT
    shared: bool = True
    _posted: list = field(default_factory=list, init=False, compare=False, repr=False)
    _outbox: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def post(self, key: str, value, dests: tuple[int, ...], to_sum: bool = False) -> None:
        """Queue ``value`` (op ``key``'s output) for the mailboxes of mesh workers ``dests``;
        ``to_sum``: only gradient sums read it, which run once the peer's own gradients are
        done, so it may wait for this task's next message (see :meth:`flush`)."""
        for dest in dests:
            self._outbox.setdefault(dest, []).append(((self.step, key), value, to_sum))

    def flush(self, urgent_only: bool = False) -> None:
        """Send what :meth:`post` queued, one message per receiving worker; returns at once
        (this worker's event loop sends them while the task computes on).

        ``urgent_only`` (between two ops): a worker's tiles wait for the next message when
        all of them go to sums and travel through shared memory, for only the message's few
        bytes are then left to send, and each message costs both workers' event loops CPU
        time that the kernels would otherwise have (data parallel MLP, 2 worker processes on
        2 cores: 26.8 ms a step against 28.1 ms with a message per layer). Tiles a peer may
        be waiting for, and large ones travelling inside the message, leave at once, so that
        their transfer overlaps what this worker computes next. The simulator states the same
        rule from a cluster spec (:func:`rapydli.scheduler.replay._deferred`): change both.
        """
        if not self._outbox:
            return
        mine = Mailbox._here.get(self.boxes[self.me][2]) if self.shared else None
        for dest in list(self._outbox):
            items = self._outbox[dest]
            shared = mine is not None and mine.segments.shares_with(self.boxes[dest][2])
            if urgent_only and all(to_sum and (shared or _nbytes(value) < MIN_BYTES)
                                   for _, value, to_sum in items):
                continue
            del self._outbox[dest]
            if shared:  # a short record of handles through the peer's doorbell, if it fits
                items = [(key, mine.segments.pack(value, BELL_MIN_BYTES) or value)
                         for key, value, _ in items]
                if mine.segments.ring(self.boxes[dest][2], items):
                    continue
            else:
                items = [(key, value) for key, value, _ in items]
            self._posted.append(_proxy(self.boxes[dest]).put(items))

    def allocate(self, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """An empty array in this worker's shared memory for a tile about to be posted to
        peers on this machine, computed in place so that posting it copies nothing; None
        where tiles do not go through shared memory (then the kernel allocates as usual)."""
        mine = self._sharing()
        return None if mine is None else mine.segments.allocate(shape, dtype)

    def keep(self, array) -> np.ndarray | None:
        """``array`` copied into shared memory that peers on this machine can open and use
        as their own (:meth:`rapydli.scheduler.shared.Segments.keep`); None where tiles do not
        go through shared memory."""
        mine = self._sharing()
        return None if mine is None else mine.segments.keep(array)

    @staticmethod
    def kept(array) -> bool:
        """Whether ``array`` lies in shared memory made by :meth:`keep` (here or by a peer)."""
        return isinstance(array, np.ndarray) and kept_tile(array) is not None

    @staticmethod
    def whole(part, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """The kept array of ``shape`` and ``dtype`` that ``part`` (a tile a peer posted)
        is a block of, as this process maps it; None if it is no such block."""
        return whole(part, shape, dtype)

    def _sharing(self):
        """This worker's mailbox, where some peer shares its memory; else None."""
        mine = Mailbox._here.get(self.boxes[self.me][2]) if self.shared and self.me >= 0 \
            else None
        if mine is None or not any(mine.segments.shares_with(box[2])
                                   for i, box in enumerate(self.boxes) if i != self.me):
            return None
        return mine

    def take(self, key: str):
        """The output of op ``key`` that another mesh worker posted here for this step."""
        self.flush()  # never wait with tiles a peer may be waiting for still unsent
        return Mailbox.here(self.boxes[self.me][2]).take((self.step, key), self.timeout)

    def finish(self) -> None:
        """Wait until every post was delivered (a lost peer raises here, not silently)."""
        self.flush()
        posted, self._posted[:] = list(self._posted), []
        for future in posted:
            future.result(timeout=self.timeout)

    def fail(self, error: BaseException) -> None:
        """Tell every peer that this task failed, so none waits for its tiles. The notice is
        the error itself where it can travel: a peer waiting for this task's tiles raises it,
        so the step fails with its cause whichever worker's failure reaches the user first."""
        mine = Mailbox._here.get(self.boxes[self.me][2]) if self.me >= 0 else None
        if mine is not None:
            mine.forget(self.step)
        post_failure([_proxy(box) for dest, box in enumerate(self.boxes) if dest != self.me],
                     self.step, _notice(error, self.me))


def _notice(error: BaseException, me: int):
    """What a failed task posts to its peers: a copy of ``error`` noting where it was raised,
    or a message where it cannot be copied. A peer's error raised here is passed on as is."""
    message = f"mesh worker {me} failed: {type(error).__name__}: {error}"[:2000]
    if isinstance(error, ExchangeError) or not isinstance(error, Exception):
        return message
    if any(note.startswith(_NOTE) for note in getattr(error, "__notes__", ())):
        return error  # the cause, from the peer that raised it first
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:
        return message
    copy.add_note(f"{_NOTE} {me} of this step; the other workers' tasks stopped waiting for "
                  "its tiles)")
    return copy


#: how the note on a peer's error begins
_NOTE = "(raised on mesh worker"


def _nbytes(value) -> int:
    return int(getattr(value, "nbytes", 0))


def post_failure(mailboxes: list, step: str, message: str) -> None:
    """Post ``message`` as ``step``'s failure notice to each mailbox (actor handles); returns
    at once (the event loop sends them). A lost worker cannot be told: its tasks fail anyway."""
    for box in mailboxes:
        try:
            box.put([((step, FAILED), message)])
        except Exception:
            pass


#: actor proxies of this process, by (address, actor key): one each, reused by every task
_PROXIES: dict[tuple[str, str], object] = {}


def _proxy(box: tuple[str, str, str]):
    address, key, _ = box
    proxy = _PROXIES.get((address, key))
    if proxy is None:
        from distributed.actor import Actor

        proxy = _PROXIES[(address, key)] = Actor(Mailbox, address, key)
    return proxy


def start_mailboxes(client, workers: list[str], token: str,
                    timeout: float = 60.0) -> tuple[list, tuple]:
    """One :class:`Mailbox` actor per mesh worker; returns ``(futures, boxes)`` where
    ``boxes`` is what :class:`Exchange` takes."""
    from distributed import wait

    names = [f"rapydli-{token}-w{i}" for i in range(len(workers))]
    futures = [client.submit(Mailbox, name, actor=True, workers=[address],
                             allow_other_workers=False, key=name)
               for name, address in zip(names, workers)]
    try:  # the actors exist before any task posts to them
        wait(futures, timeout=timeout)
    except TimeoutError:
        missing = [w for w, f in zip(workers, futures) if not f.done()]
        client.cancel(futures)
        raise ExchangeError(
            f"the direct exchange's mailboxes did not start on {missing} in {timeout:.0f} s: "
            "the worker is gone or busy; check the cluster (client.scheduler_info()), or use "
            "exchange='graph'") from None
    client.gather(futures)  # raises here if an actor failed to start
    boxes = tuple((address, f.key, name) for address, f, name in zip(workers, futures, names))
    return futures, boxes


def close_mailboxes(futures: list, timeout: float = 10.0) -> None:
    """Close every mailbox still reachable (waiting takes fail at once); errors ignored. Each
    also deletes what its peers left in shared memory on its machine."""
    calls = []
    names = tuple(future.key for future in futures)
    for future in futures:
        try:
            calls.append(future.result(timeout=timeout).close(peers=names))
        except Exception:  # the worker holding it is gone: nothing waits there
            pass
    for call in calls:
        try:
            call.result(timeout=timeout)
        except Exception:
            pass
