"""``Engine``: runs step plans of one network and placement, weights resident on workers.

The engine caches one :class:`~rapydli.graph.to_dask.StepPlan` per (batch, mode), binds each
plan's placeholders to what already lives on the workers (weight and optimizer-state tiles,
datasets) and submits steps without waiting, so scheduling the next step overlaps computing
this one. Weights reach the client only when asked for (:meth:`Engine.get_params`).

On a cluster, tiles that change worker travel by the ``exchange`` the engine is given:
``"direct"`` (the default on a cluster with fused plans and more than one mesh worker) fuses
each worker's ops of a step into one task and posts tiles worker to worker inside the tasks
(:mod:`rapydli.scheduler.mailbox`); ``"graph"`` (the default elsewhere) makes every exchange
a Dask dependency, scheduled like any other. A worker runs the direct tasks of every engine
on one client in the order they were submitted (each waits for the worker's previous one),
which keeps steps in flight together, and engines sharing workers, from waiting on each
other in a cycle. Trainings on *other* clients (or processes) sharing these workers should
use ``"graph"``: their direct tasks are not ordered with these. One engine is driven from
one thread at a time (its resident weights move with each submitted step).

Without a client the engine runs in-process on Dask's synchronous scheduler, every mesh worker
being this process: with a one-worker placement that is the reference every placement is
compared with; with a larger mesh it runs that placement's exact plan without a cluster.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import uuid
import weakref

import dask
import numpy as np

from rapydli.errors import LostWorkerError, PlacementError
from rapydli.graph.lower import lower
from rapydli.graph.ops import aligned, pick
from rapydli.graph.tiles import relative
from rapydli.graph.to_dask import Bound, Loc, StepPlan
from rapydli.graph.unroll import unroll
from rapydli.placement import single
from rapydli.scheduler import heap
from rapydli.scheduler.cluster import bind_workers

#: engine phases and the transitions between them
TRANSITIONS = {"new": {"ready", "closed"}, "ready": {"ready", "closed"}, "closed": set()}
#: how tiles travel between workers (see the module doc); "auto": direct where it can run
EXCHANGES = ("auto", "direct", "graph")

#: Dask tasks of training steps submitted between two re-roots of an engine's resident values
#: (see :meth:`Engine.reroot`): about what each worker and the scheduler keep at most of the
#: steps before; each re-root drains the steps in flight once (a data-parallel step graph
#: holds a few tasks, so every thousand or so graphs; one of the graph exchange, dozens)
REROOT_TASKS = 4096

#: per (client, worker address): ``(engine token, future)`` of the last direct-exchange task
#: submitted there through that client; the next one, of whichever engine, waits for it.
#: Submissions hold the lock, so every worker sees the direct tasks in one order.
_LAST_DIRECT: dict[tuple[str, str], tuple[str, object]] = {}
_DIRECT_LOCK = threading.Lock()


def _release_chain(client_id: str, workers: list, token: str) -> None:
    """Drop the chain entries an engine (``token``) left, so that no task of it is held alive
    for the next one to wait on (at close, or when the engine is garbage-collected)."""
    with _DIRECT_LOCK:
        for address in workers:
            if _LAST_DIRECT.get((client_id, address), ("",))[0] == token:
                del _LAST_DIRECT[(client_id, address)]


class Engine:
    """Runs ``network`` under ``placement`` on ``client`` (``None``: in-process, one worker).

    ``workers``: the worker address of each mesh worker, to pin the engine to chosen workers
    of the cluster (default: bound by :func:`rapydli.scheduler.cluster.bind_workers`).
    ``shared_memory``: in the direct exchange, large tiles between worker processes on one
    machine travel through shared memory (:mod:`rapydli.scheduler.shared`); False sends every
    tile inside its message, over the cluster's comms.
    """

    def __init__(self, network, placement=None, optimizer=None, client=None,
                 dtype="float32", fused: bool = True, device: str = "auto",
                 exchange: str = "auto", workers=None, shared_memory: bool = True):
        self.network = network
        self.placement = placement or single()
        self.optimizer = optimizer
        self.client = client
        self.dtype = np.dtype(dtype)
        self.fused = fused
        #: how tiles travel between workers: "direct" or "graph"
        self.exchange = _exchange(exchange, client, fused, self.placement.mesh.size)
        self.shared_memory = bool(shared_memory)
        #: the direct exchange's mailbox actors (futures) and their addresses, once started
        self._mailboxes: list = []
        self._boxes: tuple = ()
        self._actors: list = []  #: the mailboxes' actor handles, to post failures from here
        #: worker address of each mesh worker (``None``: this process)
        if workers is not None and client is None:
            raise PlacementError(f"workers={workers!r} needs a client: worker addresses name "
                                 "workers of a Dask cluster; pass client= too, or no workers")
        self.workers: list = (bind_workers(client, self.placement.mesh, workers) if client
                              else [None] * self.placement.mesh.size)
        #: per mesh worker: does it compute on a GPU (CuPy arrays)?
        resources = _worker_resources(client)
        if client is not None:
            heap.register(client)  # no full garbage collection walks the workers' whole heap
        self.on_gpu: list[bool] = [_wants_gpu(device, resources.get(w, {})) for w in self.workers]
        #: step plans by (batch, mode)
        self.plans: dict[tuple[int, str], StepPlan] = {}
        #: resident values: placeholder key -> Bound (future or in-process value, path)
        self.resident: dict[str, Bound] = {}
        #: what each resident placeholder stands for (``("param", key, region, worker)``...)
        self.resident_info: dict[str, tuple] = {}
        #: full parameters and optimizer state the resident tiles are cut from, until sent
        self._source: dict[str, np.ndarray] = {}
        #: datasets on workers: (name, what, worker) -> Bound
        self.data: dict[tuple, Bound] = {}
        #: lifecycle phase, moved only through TRANSITIONS
        self.phase = "new"
        #: seed of :meth:`init_params` (tiles drawn on their workers), else ``None``
        self._init_seed: int | None = None
        self._steps = itertools.count()
        self._token = uuid.uuid4().hex[:8]
        #: tasks of training steps submitted since the resident values were last re-rooted
        self._since_reroot = 0
        #: per plan key, the futures of its pinned tasks' specs, shipped to their workers
        self._specs: dict[tuple, dict[str, object]] = {}

    def _move(self, phase: str) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"engine cannot go from {self.phase!r} to {phase!r}")
        self.phase = phase

    # --- plans -------------------------------------------------------------------------------

    def plan(self, batch: int, mode: str, steps: int = 1) -> StepPlan:
        """The plan for ``steps`` steps of ``batch`` samples in ``mode``, built once and cached."""
        key = (int(batch), mode, int(steps))
        if key not in self.plans:
            graph = lower(self.network, self.placement, int(batch), mode, self.optimizer,
                          self.dtype, shard_updates=self.exchange == "direct")
            if steps > 1:
                graph = unroll(graph, steps)
            self.plans[key] = StepPlan(graph, fused=self.fused,
                                       direct=self.exchange == "direct")
        return self.plans[key]

    # --- state on the workers ------------------------------------------------------------

    def set_params(self, params: dict, opt_state: dict | None = None) -> None:
        """Use ``params`` (full arrays) and optional optimizer state ``{"slot/param": array}``."""
        self.network.check_params(params)
        self._init_seed = None
        self.resident.clear()
        self.resident_info.clear()
        self._source = {k: np.asarray(v, dtype=self.dtype) for k, v in params.items()}
        for key, value in (opt_state or {}).items():
            self._source[f"state/{key}"] = np.asarray(value, dtype=self.dtype)
        # resident tiles are always copies: updates write into them in place
        self._move("ready")

    def init_params(self, seed: int) -> None:
        """Draw every weight tile on the worker that holds it (nothing passes through the
        client): for networks too large to initialise in one place. Tiles come from
        :meth:`Sequential.init_region`, seeded per tile, so they differ from
        :meth:`Sequential.init` but not between runs or placements of the same tiles.
        """
        self.resident.clear()
        self.resident_info.clear()
        self._source = {}
        self._init_seed = int(seed)
        self._move("ready")

    def set_data(self, name: str, x, y=None) -> None:
        """Place dataset ``name`` on every mesh worker once; steps pick batches by index."""
        self.network.check_inputs(x, y)
        x = np.ascontiguousarray(x, dtype=self.dtype)
        arrays = {"x": x}
        if y is not None:
            y = np.asarray(y)
            arrays["y"] = y.astype(np.int64) if self.network.loss.integer_labels else \
                np.ascontiguousarray(y, dtype=self.dtype)
        for what, array in arrays.items():
            for w in range(len(self.workers)):
                self.data[(name, what, w)] = Bound(self._put(array, w))

    def bind_data(self, name: str, per_worker: dict[int, tuple[Bound, Bound | None]]) -> None:
        """Use data already on the workers as dataset ``name``: ``{worker: (x, y)}``.

        Each mesh worker may hold different samples (shards it read itself); steps on such data
        take an index with one row per worker (see :func:`rapydli.graph.ops.load_region`).
        """
        for w in range(len(self.workers)):
            if w not in per_worker:
                raise ValueError(f"bind_data {name!r}: no data for mesh worker {w}; expected one "
                                 f"entry per worker 0..{len(self.workers) - 1}")
            x, y = per_worker[w]
            self.data[(name, "x", w)] = x
            if y is not None:
                self.data[(name, "y", w)] = y

    def drop_data(self, name: str) -> None:
        """Forget dataset ``name``; workers free it once no submitted step needs it."""
        for key in [k for k in self.data if k[0] == name]:
            del self.data[key]

    def batch_ranges(self, batch: int, mode: str = "train") -> list[set[tuple[int, int]]]:
        """Per mesh worker, the batch rows its step reads, as ``(start, stop)`` ranges."""
        ranges: list[set[tuple[int, int]]] = [set() for _ in self.workers]
        for op in self.plan(batch, mode).graph.ops(kind="load"):
            ranges[op.worker].add(tuple(op.kwargs["region"][0]))
        return ranges

    def _draw(self, info: tuple):
        """A resident tile drawn where it lives (optimizer state starts at zero)."""
        kind, pkey = info[0], info[1]
        region, worker = _region_worker(info)
        args = (_draw_tile, self.network, self._init_seed, pkey, region, self.dtype.str,
                kind != "param", self.on_gpu[worker])
        if self.client is None:
            return args[0](*args[1:])
        return self.client.submit(*args, workers=[self.workers[worker]], pure=False)

    def _put(self, array, worker: int):
        gpu, address = self.on_gpu[worker], self.workers[worker]
        if self.client is None:
            return to_device(array) if gpu else array
        future = self.client.scatter(array, workers=[address], hash=False)
        # settled on the worker itself: copied to the device (never through the client), or
        # to aligned memory (scattered arrays arrive as views into the received frame)
        return self.client.submit(to_device if gpu else aligned, future, workers=[address],
                                  pure=False)

    def _resident(self, key: str, info: tuple) -> Bound:
        if key not in self.resident and self._init_seed is not None:
            self.resident[key] = Bound(self._draw(info))
            self.resident_info[key] = info
        if key not in self.resident:
            kind, pkey = info[0], info[1]
            region, worker = _region_worker(info)
            if kind == "param":
                full = self._source[pkey]
            else:
                full = self._source.get(f"state/{info[2]}/{pkey}")
                if full is None:
                    full = np.zeros_like(self._source[pkey])
            tile = np.array(full[relative(region, ((0, n) for n in full.shape))], order="C",
                            copy=True)
            self.resident[key] = Bound(self._put(tile, worker))
            self.resident_info[key] = info
        return self.resident[key]

    # --- steps -------------------------------------------------------------------------------

    def run(self, mode: str, index, data: str = "train") -> dict:
        """Submit one step on the batch ``index`` of dataset ``data``; returns its outputs.

        ``index`` may be a list of equally long batches: they run as consecutive training
        steps in one unrolled graph, and ``metrics`` holds one ``(loss, n_correct)`` per step.
        ``mode="train"`` also makes the updated weights resident for the next step. The
        returned dict maps output roles to futures (values in-process).
        """
        if self.phase != "ready":
            raise RuntimeError("set_params(...) before running steps")
        batches = [np.asarray(i, dtype=np.int64) for i in index] if isinstance(index, list) \
            else [np.asarray(index, dtype=np.int64)]
        plan_key = (int(batches[0].shape[-1]), mode, len(batches))  # index: (batch,) or
        # (n_workers, batch) when each worker numbers its own samples
        plan = self.plan(*plan_key)
        specs = self._specs_for(plan_key)
        bindings = {}
        for key, info in plan.placeholders.items():
            if info[0] == "index":
                bindings[key] = Bound(batches[info[1] if len(info) > 1 else 0])
            elif info[0] == "data":
                bindings[key] = self.data[(data, info[1], info[2])]
            else:
                bindings[key] = self._resident(key, info)
        step = f"{self._token}-{next(self._steps)}"
        wanted = sorted({loc.task for loc in _leaves(plan.outputs)})
        if not plan.mail:
            graph = plan.instantiate(step, bindings, self.workers, None, {}, specs)
            values = dict(zip(wanted, self._compute(graph, [(t, step) for t in wanted])))
        else:
            values = self._submit_direct(plan, step, bindings, wanted, specs)
        outputs = _resolve(plan.outputs, values)
        if mode == "train":
            for key, bound in outputs.pop("new_values").items():
                self.resident[key] = bound
            self._since_reroot += plan.n_tasks
            if self._since_reroot >= REROOT_TASKS:
                self.reroot()
        return outputs

    def _specs_for(self, plan_key: tuple) -> dict:
        """Futures of the specs (program, keep, drops) of the tasks of plan ``plan_key``
        (:meth:`plan`'s key) pinned to a worker, scattered there on first use and kept while
        the engine lives.

        A step's graph then names its program instead of carrying it: the program of a
        worker's task grows with the ops and steps it holds (hundreds of kB unrolled), and
        Dask keeps the last thousand messages it sent each worker, and each worker the last
        thousand it received, with the graphs in them (2 MB a task graph held in the client
        process, data-parallel MLP at 64 steps a task). Sending it once also spares the
        client, scheduler and worker its serialization every step."""
        if self.client is None:
            return {}
        specs = self._specs.get(plan_key)
        if specs is None:
            specs = {}
            for t in self.plans[plan_key].tasks.values():
                if t.worker is None:
                    continue
                address = self.workers[t.worker]
                try:
                    specs[t.name] = self.client.scatter([t.spec()], workers=[address],
                                                        hash=False)[0]  # one value, not three
                except KeyError as exc:  # the scheduler no longer knows the worker
                    raise LostWorkerError(
                        f"worker {address} (mesh worker {t.worker}) left the cluster before "
                        "a step could be sent to it; fit resumes from its last snapshot, "
                        "other callers should rebuild the engine once the cluster has its "
                        "workers again") from exc
            self._specs[plan_key] = specs
        return specs

    def reroot(self) -> None:
        """Make the resident values (weights, optimizer state) the results of tasks with no
        dependencies, so that the workers forget the tasks of every step before.

        Each step's tasks read the results of the step before, so the steps of a training
        form one unbroken chain of Dask dependencies; and a Dask worker forgets a released
        task only once it holds no task that depends on it, so it would keep every step's
        task (its state and arguments: about 125 objects and 60 kB a task while the programs
        travelled inside the graphs) until the engine closes, a heap that grows for as long
        as the training runs.
        Here the steps in flight finish, then each task result the resident values point
        into is taken up, where it lies, by a new task with no dependencies
        (:func:`_held`, no data copied); the next steps read those, and the workers forget
        the chain. :meth:`run` does this every :data:`REROOT_TASKS` tasks of training steps.
        """
        self._since_reroot = 0
        if self.client is None:
            return
        from distributed import Future, wait

        held: dict[str, tuple[Future, int]] = {}  # future key -> (future, mesh worker)
        for key, bound in self.resident.items():
            if isinstance(bound.value, Future):
                held[bound.value.key] = (bound.value, _region_worker(self.resident_info[key])[1])
        futures = [f for f, _ in held.values()]
        wait(futures)
        if any(f.status != "finished" for f in futures):
            return  # a failed step: whoever collects its results raises, not this
        fresh = {k: self.client.submit(_held, k, workers=[self.workers[w]],
                                       allow_other_workers=False, pure=False)
                 for k, (_, w) in held.items()}
        wait(list(fresh.values()))
        if any(f.status != "finished" for f in fresh.values()):
            return  # a worker lost meanwhile: keep the chain, the next step fails over
        for key, bound in self.resident.items():
            if isinstance(bound.value, Future):
                self.resident[key] = dataclasses.replace(bound, value=fresh[bound.value.key])

    def _submit_direct(self, plan, step: str, bindings: dict, wanted: list,
                       specs: dict) -> dict:
        """Submit a direct-exchange step: each worker's task after the worker's previous
        direct task (:data:`_LAST_DIRECT`); a task that fails or is cancelled before it could
        tell its peers (a failed dependency) is reported to them from here. Returns the
        futures of the plan's tasks, by name."""
        exchange = self._exchange_for(step)  # mailboxes started outside the lock
        # every mail task runs, even one no output depends on in Dask's eyes (it only posts)
        mail = {t.name: t.worker for t in plan.tasks.values() if t.mail}
        keys = wanted + sorted(set(mail) - set(wanted))
        chain = [(self.client.id, address) for address in self.workers]
        with _DIRECT_LOCK:
            # a failed or cancelled task is no order to keep: depending on it would fail
            # nor is a finished one (and depending on it would chain every step to the last)
            after = {}
            for w, link in enumerate(chain):
                _, future = _LAST_DIRECT.get(link, (None, None))
                if future is not None and future.status == "pending":
                    after[w] = future
            graph = plan.instantiate(step, bindings, self.workers, exchange, after, specs)
            values = dict(zip(keys, self._compute(graph, [(t, step) for t in keys])))
            _LAST_DIRECT.update((chain[worker], (self._token, values[name]))
                                for name, worker in mail.items())
        for name, worker in mail.items():
            values[name].add_done_callback(_tell_peers_if_failed(self._actors, step, worker))
        return values

    def _exchange_for(self, step: str):
        """``mesh worker -> Exchange`` of one step, the mailboxes started on first use."""
        from rapydli.scheduler.mailbox import Exchange, start_mailboxes

        if not self._boxes:
            self._mailboxes, self._boxes = start_mailboxes(self.client, self.workers,
                                                           self._token)
            self._actors = [f.result() for f in self._mailboxes]
            weakref.finalize(self, _release_chain, self.client.id, list(self.workers),
                             self._token)
        return lambda worker: Exchange(step, worker, self._boxes, shared=self.shared_memory)

    def _compute(self, graph, keys):
        if self.client is None:
            return dask.get(dict(graph), keys, scheduler="sync")
        return self.client.get(graph, keys, sync=False)

    def value(self, bound: Bound):
        """The value a :class:`Bound` points at, brought to the client."""
        return self.values([bound])[0]

    def values(self, bounds: list[Bound]) -> list:
        """:meth:`value` of many bounds in one exchange with the scheduler, not one each.

        A bound that is all its task holds is fetched whole; any other is picked on its
        worker first, so only the part asked for travels."""
        if self.client is None:
            return [to_host(pick(b.value, b.path)) for b in bounds]
        futures = [b.value if b.alone else
                   self.client.submit(_fetch, b.value, b.path, pure=False) for b in bounds]
        results = self.client.gather(futures)
        return [to_host(pick(r, b.path)) if b.alone else r for r, b in zip(results, bounds)]

    def get_params(self) -> dict[str, np.ndarray]:
        """Full parameters assembled on the client from one replica of each weight tile."""
        return self._assemble("param")

    def get_opt_state(self) -> dict[str, np.ndarray]:
        """Optimizer state as ``{"slot/param": array}``."""
        return self._assemble("state")

    def _assemble(self, kind: str) -> dict[str, np.ndarray]:
        shapes = self.network.param_shapes()
        out: dict[str, np.ndarray] = {}
        done, wanted = set(), []
        for key in sorted(self.resident):
            info = self.resident_info[key]
            if info[0] != kind:
                continue
            name = info[1] if kind == "param" else f"{info[2]}/{info[1]}"
            region = _region_worker(info)[0]
            if (name, region) in done:
                continue
            done.add((name, region))
            wanted.append((name, info[1], region, self.resident[key]))
        for (name, pkey, region, _), value in zip(wanted, self.values([w[3] for w in wanted])):
            full = out.setdefault(name, np.zeros(shapes[pkey], self.dtype))
            full[relative(region, ((0, n) for n in full.shape))] = value
        if kind == "param":
            for name in shapes:
                if name not in out and name in self._source:  # in no plan run so far
                    out[name] = self._source[name].copy()
        return out

    def close(self) -> None:
        """Forget what lives on the workers; tasks still waiting for tiles fail at once.
        Closing a closed engine does nothing."""
        if self.phase == "closed":
            return
        if self._mailboxes:
            from rapydli.scheduler.mailbox import close_mailboxes

            close_mailboxes(self._mailboxes)
            self._mailboxes, self._boxes, self._actors = [], (), []
            _release_chain(self.client.id, self.workers, self._token)
        self.resident.clear()
        self.data.clear()
        self._specs.clear()
        self._move("closed")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tell_peers_if_failed(actors: list, step: str, worker: int):
    """A done-callback for mesh worker ``worker``'s direct task of ``step``: if it failed or
    was cancelled, post the failure to every mailbox. A task that raised has told its peers
    itself; one that never ran (its previous task failed, or it was cancelled) has not, and
    its peers would wait for its tiles until the take timeout."""
    from rapydli.scheduler.mailbox import post_failure

    def callback(future) -> None:
        if future.status in ("error", "cancelled"):
            post_failure(actors, step, f"mesh worker {worker}'s task {future.status} before it "
                         "could post its tiles (an earlier step of that worker failed, or it "
                         "was cancelled)")

    return callback


def to_device(array):
    """A CuPy copy of ``array`` on this process's current GPU."""
    import cupy

    return cupy.asarray(array)


def to_host(value):
    """NumPy arrays for CuPy arrays (inside tuples and lists too); anything else unchanged."""
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value.get() if type(value).__module__.split(".")[0] == "cupy" else value


def _region_worker(info: tuple) -> tuple:
    """``(region, mesh worker)`` of a resident placeholder's ``info``: ``("param", key,
    region, worker)`` or ``("state", key, slot, region, worker)``."""
    return (info[2], info[3]) if info[0] == "param" else (info[3], info[4])


def _held(key):
    """Task ``key``'s result, which this worker holds, returned as this task's own (the same
    object, not a copy; see :meth:`Engine.reroot`, which holds ``key`` until this is done)."""
    from distributed import get_worker

    return get_worker().data[key]


def _draw_tile(network, seed: int, key: str, region, dtype: str, zeros: bool, gpu: bool):
    shape = tuple(b - a for a, b in region)
    tile = (np.zeros(shape, dtype) if zeros else
            network.init_region(seed, key, region, dtype))
    return to_device(tile) if gpu else tile


def _fetch(value, path):
    return to_host(pick(value, path))


def _worker_resources(client) -> dict[str, dict]:
    """The Dask resources of every worker, by address (none in-process)."""
    if client is None:
        return {}
    from rapydli.scheduler.cluster import worker_info

    workers = worker_info(client)
    return {address: info.get("resources", {}) for address, info in workers.items()}


def _exchange(exchange: str, client, fused: bool, n_workers: int) -> str:
    """The exchange an engine uses, checked against its client: ``"auto"`` is direct on a
    cluster with fused plans and a mesh of more than one worker, else graph (in-process,
    unfused, or one worker: nothing to exchange)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange: expected one of {EXCHANGES}; received {exchange!r}")
    if exchange == "direct" and (client is None or not fused):
        raise ValueError("exchange='direct' needs a Dask client and fused plans (the tasks of "
                         "all workers must run at the same time); use exchange='graph' or "
                         "'auto' in-process or unfused")
    if exchange == "auto":
        return "direct" if client is not None and fused and n_workers > 1 else "graph"
    return exchange


def _wants_gpu(device: str, resources: dict) -> bool:
    """Whether a worker computes on its GPU: asked for, or it has the Dask resource ``GPU``."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'gpu'; received {device!r}")
    if device != "auto":
        return device == "gpu"
    return resources.get("GPU", 0) > 0


def _leaves(outputs):
    """Every :class:`Loc` inside nested plan outputs."""
    if isinstance(outputs, Loc):
        yield outputs
    elif isinstance(outputs, dict):
        yield from itertools.chain.from_iterable(_leaves(v) for v in outputs.values())
    elif isinstance(outputs, (list, tuple)):
        yield from itertools.chain.from_iterable(_leaves(v) for v in outputs)


def _resolve(outputs, values):
    """Plan outputs with each :class:`Loc` replaced by a :class:`Bound` on its value."""
    if isinstance(outputs, Loc):
        return Bound(values[outputs.task], outputs.path, outputs.alone)
    if isinstance(outputs, dict):
        return {k: _resolve(v, values) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_resolve(v, values) for v in outputs)
    return outputs
