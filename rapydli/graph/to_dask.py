"""``TileGraph`` -> ``StepPlan``: fused Dask tasks pinned to mesh workers; no ``Client`` here.

A plan is built once per (network, placement, batch, mode) and instantiated per step: task
keys become ``(name, step)`` tuples, placeholders are bound to the resident values of the
previous step (futures) or to literals (batch indices), and each worker's tasks form one graph
layer annotated with that worker, so the placement decides where every task runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from dask._task_spec import Task, TaskRef
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from rapydli.graph.fuse import fuse, mail_sends, only_summed
from rapydli.graph.ops import (Ref, aligned, drop_plan, pick, run_fused, sum_task,
                               sum_update_task, update_task)


def _sums_into_updates(graph, program: list, keep: tuple) -> tuple:
    """``program`` with each gradient sum that only its weight's update reads fused into that
    update (:func:`rapydli.graph.ops.sum_update_task`): the same bits, without writing the
    sum out and reading it back (a data-parallel step sums and updates every weight)."""
    at = {entry[0]: i for i, entry in enumerate(program)}
    out = list(program)
    for i, (key, fn, slots, _, post) in enumerate(program):
        if fn is not sum_task or post or key in keep or len(slots) < 2:
            continue
        readers = list(graph.successors(key))
        if len(readers) != 1 or readers[0] not in at:
            continue
        j = at[readers[0]]
        ukey, ufn, uslots, ukwargs, upost = out[j]
        if ufn is not update_task or uslots[1] != (key, ()) or any(
                src == key for src, _ in (uslots[0], *uslots[2:])):
            continue
        out[j] = (ukey, sum_update_task, (uslots[0], *slots, *uslots[2:]),
                  {**ukwargs, "grads": len(slots)}, upost)
        out[i] = None
    return tuple(entry for entry in out if entry is not None)


@dataclass(frozen=True)
class FusedTask:
    """One Dask task: ``run_fused(program, keep, *externals)`` on ``worker``.

    ``externals`` are ``("task", name)`` (another task's output dict) or ``("ph", key)``
    (a placeholder bound per step). ``drops``: when the program lets go of each value
    (:func:`rapydli.graph.ops.drop_plan`), worked out once here rather than by every task
    that runs it. ``mail``: the task posts or takes tiles in a direct exchange, so it runs
    with its worker's :class:`~rapydli.scheduler.mailbox.Exchange`.
    """

    name: str
    worker: int | None
    program: tuple
    keep: tuple[str, ...]
    externals: tuple[tuple[str, str], ...]
    ops: tuple[str, ...]
    drops: tuple
    mail: bool = False

    def spec(self) -> tuple:
        """``(program, keep, drops)``: what :func:`run_task` runs, the same for every step."""
        return (self.program, self.keep, self.drops)


@dataclass(frozen=True)
class Loc:
    """Where a value of a step lives: output ``path`` of task ``task``."""

    task: str
    path: tuple
    #: the task outputs nothing else, so fetching all of it moves no extra bytes
    alone: bool = False


@dataclass(frozen=True)
class Bound:
    """A placeholder's value for one step: a literal, or a path into a resident task output."""

    value: object
    path: tuple = ()
    #: the value is all its task holds (cheap to fetch whole)
    alone: bool = False


def run_task(spec, prefixes, exchange, after, *values):
    """Entry point of every Dask task of a plan: pick bound values (realigned where they
    arrived misaligned, see :func:`aligned`), then run the ops of ``spec``, the task's
    ``(program, keep, drops)`` (see :meth:`FusedTask.spec`). ``exchange`` posts and takes
    the tiles of a direct exchange (``None`` in the graph exchange); a task that fails tells
    its peers through it, so none of them waits for tiles that will not come. ``after`` is
    the output of the same worker's previous direct-exchange task, unused: depending on it
    makes every worker run those tasks in the order they were submitted."""
    program, keep, drops = spec
    values = tuple(aligned(pick(v, p)) for v, p in zip(values, prefixes))
    if exchange is None:
        return run_fused(program, keep, *values, drops=drops)
    try:
        return run_fused(program, keep, *values, exchange=exchange, drops=drops)
    except BaseException as error:
        exchange.fail(error)
        raise


class StepPlan:
    """The Dask form of a tile graph: fused tasks, placeholders, and where outputs live.

    Attributes
    ----------
    tasks : dict of str to FusedTask
    placeholders : dict of str to tuple
        What each ``$`` key stands for (``("param", key, region, worker)``, ...).
    outputs : dict
        The tile graph's outputs with every :class:`Ref` turned into ``(task, path)``.
    """

    def __init__(self, graph, fused: bool = True, direct: bool = False):
        self.graph = graph
        self.meta = graph.graph["meta"]
        self.placeholders: dict = graph.graph["placeholders"]
        #: sends posted worker to worker inside tasks (a direct exchange), with their readers
        self.mail = mail_sends(graph) if direct and fused else set()
        groups = fuse(graph, enabled=fused, direct=bool(self.mail))
        self.task_of = {key: name for name, _, keys in groups for key in keys}
        wanted = self._wanted_keys(graph.graph["outputs"])
        self.tasks = {name: self._build(graph, name, worker, keys, wanted)
                      for name, worker, keys in groups}
        self.outputs = _map_refs(graph.graph["outputs"], self.locate)
        self._layer_of = {t.name: _layer_name(graph, t) for t in self.tasks.values()}
        self._layer_deps: dict[str, set[str]] = {name: set() for name in self._layer_of.values()}
        for t in self.tasks.values():
            for kind, ref in t.externals:
                if kind == "task" and self._layer_of[ref] != self._layer_of[t.name]:
                    self._layer_deps[self._layer_of[t.name]].add(self._layer_of[ref])

    def locate(self, ref: Ref) -> Loc:
        """The task and the path into its output that hold the value of ``ref``."""
        name = self.task_of[ref.key]
        return Loc(name, (ref.key, *ref.pick), self.tasks[name].keep == (ref.key,))

    @staticmethod
    def _wanted_keys(outputs) -> set[str]:
        keys: set[str] = set()
        _map_refs(outputs, lambda r: keys.add(r.key))
        return keys

    def _build(self, graph, name, worker, keys, wanted) -> FusedTask:
        members = set(keys)
        externals: list[tuple[str, str]] = []
        program = []
        for key in keys:
            op = graph.op(key)
            slots = []
            for ref in op.inputs:
                if ref.key in members:
                    slots.append((ref.key, ref.pick))
                    continue
                if ref.key in self.mail:  # posted here by the worker that computed it
                    slots.append((("mail", ref.key), ref.pick))
                    continue
                if ref.key in self.placeholders:
                    ext, path = ("ph", ref.key), ref.pick
                else:
                    ext, path = ("task", self.task_of[ref.key]), (ref.key, *ref.pick)
                if ext not in externals:
                    externals.append(ext)
                slots.append((externals.index(ext), path))
            post = ()
            if key in self.mail:  # (receiving workers, whether only sums read it)
                post = (tuple(sorted({graph.op(s).worker for s in graph.successors(key)})),
                        only_summed(graph, key))
            program.append((key, op.fn, tuple(slots), op.kwargs, post))
        keep = tuple(k for k in keys if k in wanted or (k not in self.mail and any(
            self.task_of.get(s) != name for s in graph.successors(k))))
        mail = any(k in self.mail for k in keys) or any(
            p in self.mail for k in keys for p in graph.predecessors(k))
        program = _sums_into_updates(graph, program, keep)
        return FusedTask(name, worker, program, keep, tuple(externals), tuple(keys),
                         drop_plan(program, keep), mail)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def instantiate(self, step, bindings: dict, workers: list[str], exchange=None,
                    after=None, specs=None):
        """A ``HighLevelGraph`` for one step. ``bindings`` maps placeholders to :class:`Bound`.

        ``workers[i]`` is the address of mesh worker ``i``; task keys are ``(name, step)``.
        ``exchange(i)``: the object mail tasks of mesh worker ``i`` post and take tiles
        through (needed when the plan has mail, see :mod:`rapydli.scheduler.mailbox`).
        ``after[i]``: what mesh worker ``i``'s mail task must wait for (its previous one).
        ``specs[name]``: what stands in the graph for task ``name``'s :meth:`FusedTask.spec`
        (a future of it, already on the task's worker, so that a step's graph and every
        record of it that Dask keeps carry a key instead of the program); a task not in it
        carries its own.
        Each graph's mail tasks are deadlock-free among themselves (one shared op order); two
        graphs in flight at once (evaluation steps, say) are only if every worker runs them
        in the same order, which this dependency enforces.
        """
        if self.mail and exchange is None:
            raise ValueError("this plan exchanges tiles directly: pass exchange=")
        layers: dict[str, dict] = {name: {} for name in self._layer_deps}
        for task in self.tasks.values():
            args, prefixes = [], []
            for kind, ref in task.externals:
                if kind == "task":
                    args.append(TaskRef((ref, step)))
                    prefixes.append(())
                else:
                    bound = bindings[ref]
                    args.append(bound.value)
                    prefixes.append(bound.path)
            mailer = exchange(task.worker) if task.mail else None
            before = (after or {}).get(task.worker) if task.mail else None
            spec = (specs or {}).get(task.name)
            layers[self._layer_of[task.name]][(task.name, step)] = Task(
                (task.name, step), run_task, task.spec() if spec is None else spec,
                tuple(prefixes), mailer, before, *args)
        hl_layers = {}
        for lname, tasks in layers.items():
            annotations = None
            if lname != "any":
                worker = int(lname[1:].split("/")[0])
                annotations = {"workers": [workers[worker]], "allow_other_workers": False}
                if lname.endswith("/send"):  # another worker waits for these: run them first
                    annotations["priority"] = 1
            hl_layers[lname] = MaterializedLayer(tasks, annotations=annotations)
        return HighLevelGraph(hl_layers, {k: set(v) for k, v in self._layer_deps.items()})

    def __repr__(self):
        by_worker: dict = {}
        for task in self.tasks.values():
            by_worker[task.worker] = by_worker.get(task.worker, 0) + 1
        meta = self.meta
        return (f"StepPlan(mode={meta['mode']}, batch={meta['batch']}, mesh={meta['mesh']!r}, "
                f"ops={self.graph.number_of_nodes()}, tasks={self.n_tasks}, "
                f"exchange={'direct' if self.mail else 'graph'}, "
                f"tasks per worker={dict(sorted(by_worker.items(), key=str))})")


def _layer_name(graph, task: FusedTask) -> str:
    """The graph layer of a task: its worker, with sends in a layer of their own."""
    if task.worker is None:
        return "any"
    sends = all(graph.op(k).kind == "send" for k in task.ops)
    return f"w{task.worker}/send" if sends else f"w{task.worker}"


def _map_refs(obj, fn):
    """Apply ``fn`` to every :class:`Ref` inside nested dicts, lists and tuples."""
    if isinstance(obj, Ref):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_refs(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_refs(v, fn) for v in obj)
    return obj


def to_dask(graph, fused: bool = True, direct: bool = False) -> StepPlan:
    """The :class:`StepPlan` of a tile graph."""
    return StepPlan(graph, fused=fused, direct=direct)
