"""Kernel autotuning: parameter spaces, pruning, a timing harness and an on-disk cache.

A kernel declares a :class:`Space`: the choices of its parameters (tile and chunk sizes, the
algorithm), *hard* constraints that prune instantiations the hardware cannot run (memory,
divisibility) and ``make(config)``, which instantiates the kernel for one choice. :func:`tune`
enumerates the product of the choices, prunes by the hard constraints and then by the user's
*soft* ones, checks each remaining candidate computes the default's numbers (a candidate that
differs is rejected, never chosen), times each (a warm-up call, which may compile, then the
median of ``repeats`` calls) and stores the fastest in a :class:`Cache`, a JSON file keyed by op,
argument shapes, dtype and device. :func:`call` then runs the tuned instantiation, or the plain
kernel when the cache has no entry for those arguments (or autotuning is disabled with
``RAPYDLI_AUTOTUNE=0``).

Spaces are registered for ``conv2d_forward``, ``conv2d_backward`` (batch chunk size) and
``dense_forward`` (algorithm); they wrap the public kernels of :mod:`rapydli.kernels` and work
with whatever implementation those have.

Examples
--------
>>> import numpy as np
>>> from rapydli.kernels import autotune
>>> x, w = np.ones((4, 3)), np.ones((2, 3))
>>> autotune.call("dense_forward", x, w, None).shape   # no cache entry: the plain kernel
(4, 2)
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rapydli.kernels.backend import get_array_module

__all__ = [
    "Cache",
    "Space",
    "TuneResult",
    "call",
    "candidates",
    "choice",
    "clear_memo",
    "default_cache",
    "device_string",
    "enabled",
    "get_space",
    "memory_budget",
    "register",
    "search",
    "signature",
    "tunable_ops",
    "tune",
]

Config = dict[str, Any]
#: ``{argument name: shape}`` for array arguments, ``{argument name: value}`` for the others
Shapes = dict[str, Any]
Hard = Callable[[Config, Shapes, str, str], bool]

ENV_CACHE = "RAPYDLI_AUTOTUNE_CACHE"
ENV_ENABLE = "RAPYDLI_AUTOTUNE"
ENV_MEMORY = "RAPYDLI_AUTOTUNE_MEMORY_MB"
DEFAULT_CACHE = Path("~/.cache/rapydli/autotune.json")


# ----------------------------------------------------------------------------- spaces
@dataclass(frozen=True, eq=False)
class Space:
    """The parameter space of one tunable op.

    Parameters
    ----------
    op : str
        Name of the op, e.g. ``"conv2d_forward"``.
    params : dict of str to tuple
        The choices of each parameter; their product is the set of instantiations.
    make : callable
        ``make(config) -> kernel``: the kernel instantiated for ``config``, called with the
        op's arguments.
    hard : tuple of callables
        ``hard(config, shapes, dtype, device) -> bool``: False prunes ``config`` because the
        device cannot run it (memory budget, divisibility). ``shapes`` maps each argument name
        of ``reference`` to its shape (arrays) or its value (other arguments).
    default : dict, optional
        The configuration the plain kernel corresponds to (default: the first choice of each
        parameter). It is the correctness reference of :func:`tune` and never pruned from it.
    reference : callable, optional
        The plain kernel: what :func:`call` runs when nothing is tuned, and whose signature
        names the arguments (default: ``make(default)``).
    """

    op: str
    params: dict[str, tuple]
    make: Callable[[Config], Callable]
    hard: tuple[Hard, ...] = ()
    default: Config | None = None
    reference: Callable | None = None
    _signature: Any = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if not self.params or not all(isinstance(v, tuple) and v for v in self.params.values()):
            raise ValueError(f"Space {self.op!r}: params must map names to non-empty tuples")
        default = dict(self.default) if self.default is not None else {
            k: v[0] for k, v in self.params.items()}
        if set(default) != set(self.params) or any(default[k] not in self.params[k] for k in default):
            raise ValueError(f"Space {self.op!r}: default {default} is not a point of {self.params}")
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "hard", tuple(self.hard))
        reference = self.reference if self.reference is not None else self.make(default)
        object.__setattr__(self, "reference", reference)
        try:
            sig = inspect.signature(reference)
        except (TypeError, ValueError):
            sig = None
        object.__setattr__(self, "_signature", sig)

    def configs(self) -> list[Config]:
        """Every point of the space, default first."""
        names = list(self.params)
        points = [dict(zip(names, values)) for values in itertools.product(*self.params.values())]
        points.sort(key=lambda c: c != self.default)
        return points

    def valid(self, config: Mapping) -> bool:
        return set(config) == set(self.params) and all(config[k] in self.params[k] for k in config)


_REGISTRY: dict[str, Space] = {}
_LOCK = threading.Lock()


def register(op: str, space: Space) -> Space:
    """Register ``space`` as the tunable space of ``op`` (replacing any earlier one)."""
    if space.op != op:
        raise ValueError(f"register({op!r}): the space is for op {space.op!r}")
    with _LOCK:
        _REGISTRY[op] = space
        _MEMO.clear()
    return space


def tunable_ops() -> tuple[str, ...]:
    """Names of the registered ops."""
    return tuple(sorted(_REGISTRY))


def get_space(op: str) -> Space:
    try:
        return _REGISTRY[op]
    except KeyError:
        raise KeyError(f"autotune: no space registered for op {op!r}; "
                       f"registered: {', '.join(tunable_ops()) or 'none'}") from None


def enabled() -> bool:
    """False when the environment sets ``RAPYDLI_AUTOTUNE=0`` (or ``false``/``off``/``no``)."""
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


# ----------------------------------------------------------------------------- keys
def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _bind(space: Space, args: tuple, kwargs: Mapping) -> dict[str, Any]:
    if space._signature is None:
        bound = {f"arg{i}": a for i, a in enumerate(args)}
        bound.update(kwargs)
        return bound
    ba = space._signature.bind(*args, **kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


def _plain(value: Any) -> Any:
    """Arguments other than arrays, as JSON-able values (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def signature(op: str, args: tuple, kwargs: Mapping | None = None) -> tuple[Shapes, str, str]:
    """``(shapes, dtype, device)`` of a call of ``op``: what the cache keys on.

    ``shapes`` maps each argument name to the shape of an array argument or the value of any
    other (stride, padding, flags); ``dtype`` and ``device`` are those of the first array.
    """
    space = get_space(op)
    bound = _bind(space, tuple(args), kwargs or {})
    shapes = {k: (tuple(int(n) for n in v.shape) if _is_array(v) else _plain(v)) for k, v in bound.items()}
    first = next((v for v in bound.values() if _is_array(v)), None)
    dtype = str(np.dtype(first.dtype)) if first is not None else "none"
    return shapes, dtype, device_string(first)


def _key(op: str, shapes: Shapes, dtype: str, device: str) -> str:
    parts = []
    for name, value in shapes.items():
        if isinstance(value, tuple):
            parts.append(f"{name}=" + "x".join(map(str, value)))
        else:
            parts.append(f"{name}={json.dumps(value, separators=(',', ':'))}")
    return f"{op}|{','.join(parts)}|{dtype}|{device}"


_DEVICES: dict[Any, str] = {}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_string(x: Any = None) -> str:
    """The device ``x`` lives on, as a cache key part: the CPU model and core count, or the CUDA
    device name for a CuPy array."""
    module = type(x).__module__.split(".")[0] if x is not None else "numpy"
    if module == "cupy":
        dev = int(getattr(getattr(x, "device", None), "id", 0))
        key = ("cupy", dev)
        if key not in _DEVICES:
            try:
                import cupy

                name = cupy.cuda.runtime.getDeviceProperties(dev)["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # no driver, mocked arrays: still a stable string
                name = "unknown"
            _DEVICES[key] = f"cuda:{name}"
        return _DEVICES[key]
    if "cpu" not in _DEVICES:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        _DEVICES["cpu"] = f"cpu:{_cpu_model()} x{cores}"
    return _DEVICES["cpu"]


# ----------------------------------------------------------------------------- cache
class Cache:
    """Tuned choices in a JSON file: ``{"version": 1, "entries": {key: entry}}``.

    Parameters
    ----------
    path : str or Path, optional
        Default: ``$RAPYDLI_AUTOTUNE_CACHE``, else ``~/.cache/rapydli/autotune.json``.

    Writes go to a temporary file in the same folder, then ``os.replace`` (atomic); entries
    another process wrote meanwhile are kept. A corrupt or unreadable file gives a warning and
    an empty cache, never an error.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            path = os.environ.get(ENV_CACHE) or DEFAULT_CACHE
        self.path = Path(path).expanduser()
        self.name = str(self.path)
        self._entries: dict[str, dict] | None = None
        self._ops: frozenset | None = None
        self._lock = threading.Lock()

    def __repr__(self):
        return f"Cache({str(self.path)!r})"

    def _read(self) -> dict[str, dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            warnings.warn(f"autotune cache {self.path}: cannot be read ({exc}); starting empty",
                          RuntimeWarning, stacklevel=3)
            return {}
        try:
            data = json.loads(text)
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(
                    isinstance(e, dict) and isinstance(e.get("config"), dict) for e in entries.values()):
                raise ValueError("malformed entries")
        except (ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"autotune cache {self.path}: corrupt ({exc}); starting empty",
                          RuntimeWarning, stacklevel=3)
            return {}
        return entries

    @property
    def entries(self) -> dict[str, dict]:
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = self._read()
        return self._entries

    @property
    def ops(self) -> frozenset:
        """The ops with at least one entry (lets :func:`call` skip the lookup for the others)."""
        ops = self._ops
        if ops is None or self._entries is None:
            ops = self._ops = frozenset(k.split("|", 1)[0] for k in self.entries)
        return ops

    def reload(self) -> None:
        """Forget what was read; the next lookup reads the file again."""
        with self._lock:
            self._entries = self._ops = None
        _MEMO.clear()

    def get(self, op: str, shapes: Shapes, dtype: str, device: str) -> dict | None:
        """The entry (``config``, ``time``, ``default_time``, ...) for a key, or None."""
        return self.entries.get(_key(op, shapes, dtype, device))

    def put(self, op: str, shapes: Shapes, dtype: str, device: str, entry: dict) -> None:
        key = _key(op, shapes, dtype, device)
        with self._lock:
            merged = self._read() if self.path.exists() else {}
            if self._entries:
                merged = {**self._entries, **merged}
            merged[key] = dict(entry, op=op, shapes={k: _plain(v) for k, v in shapes.items()},
                               dtype=dtype, device=device)
            self._write(merged)
            self._entries, self._ops = merged, None
        _MEMO.clear()

    def _write(self, entries: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": self.VERSION, "entries": entries}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def __len__(self):
        return len(self.entries)


_CACHES: dict[str, Cache] = {}


def default_cache() -> Cache:
    """The process-wide cache of the path ``RAPYDLI_AUTOTUNE_CACHE`` names (or the default)."""
    raw = os.environ.get(ENV_CACHE) or ""
    cache = _CACHES.get(raw)  # keyed by the raw value: no path parsing on the hot path
    if cache is None:
        cache = _CACHES.setdefault(raw, Cache(raw or None))
    return cache


def _as_cache(cache: Cache | str | os.PathLike | None) -> Cache:
    if cache is None:
        return default_cache()
    return cache if isinstance(cache, Cache) else Cache(cache)


# ----------------------------------------------------------------------------- lookup and call
#: (cache path, op, fast key) -> config or None
_MEMO: dict[tuple, Config | None] = {}


def _fast_key(args: tuple, kwargs: Mapping) -> tuple:
    key: list = []
    for a in itertools.chain(args, *kwargs.items()) if kwargs else args:  # kwargs: name, value, ...
        shape = getattr(a, "shape", None)
        if shape is not None:
            key.append((a.__class__, shape, a.dtype.str))
        else:
            try:
                hash(a)
                key.append(a)
            except TypeError:
                key.append(repr(a))
    return tuple(key)


def choice(op: str, args: tuple, kwargs: Mapping | None = None, cache=None) -> Config | None:
    """The tuned configuration of ``op`` for these arguments, or None when none is cached.

    Cheap after the first lookup of a given signature: answers are memoised in-process.
    """
    kwargs = kwargs or {}
    cache = _as_cache(cache)
    memo_key = (cache.name, op, _fast_key(args, kwargs))
    try:
        return _MEMO[memo_key]
    except KeyError:
        pass
    except TypeError:  # something unhashable slipped through
        memo_key = None
    found = None
    if op in _REGISTRY:
        space = _REGISTRY[op]
        entry = cache.get(op, *signature(op, tuple(args), kwargs))
        if entry is not None and space.valid(entry["config"]):
            found = dict(entry["config"])
    if memo_key is not None:
        _MEMO[memo_key] = found
    return found


_MADE: dict[tuple, Callable] = {}


def _instance(space: Space, config: Config) -> Callable:
    key = (space.op, id(space), tuple(sorted(config.items(), key=lambda kv: kv[0])))
    fn = _MADE.get(key)
    if fn is None:
        fn = _MADE.setdefault(key, space.make(dict(config)))
    return fn


def call(op: str, *args, **kwargs):
    """Run ``op`` on ``args``: its tuned instantiation when the cache has one for these shapes,
    dtype and device, else the plain kernel (also when ``RAPYDLI_AUTOTUNE=0``)."""
    space = _REGISTRY[op]
    cache = default_cache()
    if op not in cache.ops or not enabled():  # nothing tuned for op: straight to the kernel
        return space.reference(*args, **kwargs)
    config = choice(op, args, kwargs, cache)
    if config is None or config == space.default:
        return space.reference(*args, **kwargs)
    return _instance(space, config)(*args, **kwargs)


# ----------------------------------------------------------------------------- the harness
def _soft_ok(config: Config, soft) -> bool:
    if soft is None:
        return True
    if callable(soft):
        return bool(soft(config))
    for name, excluded in soft.items():
        values = excluded if isinstance(excluded, (list, tuple, set, frozenset)) else (excluded,)
        if name in config and config[name] in values:
            return False
    return True


def candidates(op: str, args: tuple, kwargs: Mapping | None = None, soft=None
               ) -> tuple[list[Config], dict[str, int]]:
    """The configurations left after pruning, and how many each stage removed.

    ``soft`` is a predicate ``soft(config) -> bool`` (False excludes) or a dict of excluded
    values, ``{"chunk": 16}`` or ``{"chunk": (16, 32)}``. Returns ``(configs, counts)`` with
    ``counts = {"total", "hard", "soft", "left"}`` (``hard``/``soft``: how many they pruned).
    """
    space = get_space(op)
    shapes, dtype, device = signature(op, tuple(args), kwargs)
    points = space.configs()
    after_hard = [c for c in points if all(h(c, shapes, dtype, device) for h in space.hard)]
    after_soft = [c for c in after_hard if _soft_ok(c, soft)]
    return after_soft, {"total": len(points), "hard": len(points) - len(after_hard),
                        "soft": len(after_hard) - len(after_soft), "left": len(after_soft)}


def _sync(value) -> None:
    for leaf in _leaves(value):
        if type(leaf).__module__.split(".")[0] == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()
            return


def _leaves(value) -> list:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def _same(out, ref, rtol: float, atol: float) -> bool:
    a, b = _leaves(out), _leaves(ref)
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if u is None or v is None:
            if u is not v:
                return False
            continue
        if not _is_array(v):
            if u != v:
                return False
            continue
        if not _is_array(u) or tuple(u.shape) != tuple(v.shape) or u.dtype != v.dtype:
            return False
        xp = get_array_module(v)
        scale = float(xp.abs(v).max()) if v.size else 0.0
        if not bool(xp.allclose(u, v, rtol=rtol, atol=atol * max(scale, 1e-30), equal_nan=True)):
            return False
    return True


def _tolerances(dtype: str) -> tuple[float, float]:
    # relative to the largest magnitude of the reference: sums in another order round differently
    return (1e-4, 1e-5) if np.dtype(dtype).itemsize <= 4 else (1e-10, 1e-12)


@dataclass
class TuneResult:
    """What :func:`search` found: the chosen ``config``, its median ``time`` and the default's,
    the timings of every candidate, the rejected ones (with why) and the pruning counts."""

    op: str
    shapes: Shapes
    dtype: str
    device: str
    config: Config
    time: float
    default_time: float
    timings: list[tuple[Config, float]]
    rejected: list[tuple[Config, str]]
    counts: dict[str, int]

    @property
    def speedup(self) -> float:
        return self.default_time / self.time if self.time > 0 else float("inf")


def search(op: str, args: tuple, kwargs: Mapping | None = None, *, soft=None, repeats: int = 5,
           cache=None, store: bool = True, rtol: float | None = None, atol: float | None = None,
           min_gain: float = 0.03) -> TuneResult:
    """Tune ``op`` on ``args`` (see :func:`tune`) and return everything measured.

    A candidate replaces the default only when its median is at least ``min_gain`` (a fraction)
    below the default's, so timing noise does not pick a different kernel.
    """
    space = get_space(op)
    args, kwargs = tuple(args), dict(kwargs or {})
    shapes, dtype, device = signature(op, args, kwargs)
    d_rtol, d_atol = _tolerances(dtype) if dtype != "none" else (1e-7, 0.0)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    configs, counts = candidates(op, args, kwargs, soft)

    reference = space.reference
    expected = reference(*args, **kwargs)  # also the warm-up of the default
    _sync(expected)
    runners: list[tuple[Config, Callable]] = [(dict(space.default), reference)]
    rejected: list[tuple[Config, str]] = []
    for config in configs:
        if config == space.default:
            continue
        try:
            fn = space.make(dict(config))
            out = fn(*args, **kwargs)  # warm-up: may compile
            _sync(out)
        except Exception as exc:
            rejected.append((config, f"raised {type(exc).__name__}: {exc}"))
            continue
        if not _same(out, expected, rtol, atol):
            rejected.append((config, "output differs from the default's"))
            continue
        runners.append((config, fn))

    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(max(1, int(repeats))):
        for i, (_, fn) in enumerate(runners):  # interleaved: drift hits every candidate alike
            start = time.perf_counter()
            _sync(fn(*args, **kwargs))
            samples[i].append(time.perf_counter() - start)
    medians = [statistics.median(s) for s in samples]
    default_time = medians[0]
    # the default is always the reference and the baseline, but chosen only if not pruned
    allowed = {i for i, (c, _) in enumerate(runners) if c in configs} or {0}
    best = min(sorted(allowed), key=lambda i: medians[i])
    if 0 in allowed and medians[best] > default_time * (1.0 - min_gain):
        best = 0  # not faster than the default beyond the noise: keep the plain kernel
    result = TuneResult(op, shapes, dtype, device, dict(runners[best][0]), medians[best], default_time,
                        [(dict(c), t) for (c, _), t in zip(runners, medians)], rejected, counts)
    if store:
        _as_cache(cache).put(op, shapes, dtype, device, {
            "config": result.config, "time": result.time, "default_time": default_time,
            "repeats": int(repeats), "candidates": len(runners), "rejected": len(rejected),
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return result


def tune(op: str, args: tuple, *, kwargs: Mapping | None = None, soft=None, repeats: int = 5,
         cache=None) -> Config:
    """Choose the fastest correct instantiation of ``op`` for ``args`` and cache it.

    Enumerates the product of the space's choices, prunes by its hard constraints and then by
    ``soft`` (a predicate, False excludes, or a dict of excluded values), rejects candidates whose
    output is not ``allclose`` to the default's (or that raise), times the rest (one warm-up
    call, then the median of ``repeats`` calls, interleaved) and stores the fastest in ``cache``
    (a :class:`Cache`, a path, or None for :func:`default_cache`). Returns its configuration.
    """
    return search(op, args, kwargs, soft=soft, repeats=repeats, cache=cache).config


# ----------------------------------------------------------------------------- memory
def memory_budget(device: str) -> int:
    """Bytes one kernel's scratch buffer may take: ``$RAPYDLI_AUTOTUNE_MEMORY_MB`` if set, else a
    quarter of the free GPU memory (CUDA devices) or an eighth of the physical memory (CPU)."""
    env = os.environ.get(ENV_MEMORY)
    if env:
        return int(float(env) * 2**20)
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):
            import cupy

            return int(cupy.cuda.runtime.memGetInfo()[0] // 4)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
    return 2**30


# ----------------------------------------------------------------------------- kernel spaces
CHUNKS = ("all", 16, 32, 64, 128)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _conv_out(shapes: Shapes) -> tuple[int, int]:
    (_, _, h, w), (_, _, kh, kw) = shapes["x"], shapes["w"]
    (sh, sw), (ph, pw) = _pair(shapes["stride"]), _pair(shapes["padding"])
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _rows(config: Config, n: int) -> int:
    return n if config["chunk"] == "all" else min(int(config["chunk"]), n)


def _im2col_fits(config: Config, shapes: Shapes, dtype: str, device: str) -> bool:
    """The im2col buffer ``chunk*C*kh*kw*Ho*Wo*itemsize`` fits the memory budget."""
    n, c = shapes["x"][:2]
    kh, kw = shapes["w"][2:]
    ho, wo = _conv_out(shapes)
    need = _rows(config, n) * c * kh * kw * ho * wo * np.dtype(dtype).itemsize
    return need <= memory_budget(device)


def _chunk_below_batch(config: Config, shapes: Shapes, dtype: str, device: str) -> bool:
    """A chunk at least the batch is the unchunked kernel again: prune the duplicate."""
    return config["chunk"] == "all" or int(config["chunk"]) < shapes["x"][0]


def _make_conv_forward(config: Config) -> Callable:
    from rapydli.kernels import conv2d_forward

    if config["chunk"] == "all":
        return conv2d_forward
    size = int(config["chunk"])

    def conv2d_forward_chunked(x, w, b, stride=(1, 1), padding=(0, 0)):
        n = x.shape[0]
        if n <= size:
            return conv2d_forward(x, w, b, stride, padding)
        xp = get_array_module(x)
        parts = [conv2d_forward(x[i:i + size], w, b, stride, padding) for i in range(0, n, size)]
        return xp.concatenate(parts, axis=0)

    conv2d_forward_chunked.__name__ = f"conv2d_forward_chunk{size}"
    return conv2d_forward_chunked


def _make_conv_backward(config: Config) -> Callable:
    from rapydli.kernels import conv2d_backward

    if config["chunk"] == "all":
        return conv2d_backward
    size = int(config["chunk"])

    def conv2d_backward_chunked(x, w, dy, stride=(1, 1), padding=(0, 0), need_dx=True,
                                need_dw=True):
        n = x.shape[0]
        if n <= size:
            return conv2d_backward(x, w, dy, stride, padding, need_dx=need_dx, need_dw=need_dw)
        xp = get_array_module(x)
        dxs, dw, db = [], None, None
        for i in range(0, n, size):
            dx_i, dw_i, db_i = conv2d_backward(x[i:i + size], w, dy[i:i + size], stride, padding,
                                               need_dx=need_dx, need_dw=need_dw)
            dxs.append(dx_i)
            if need_dw:
                dw = dw_i if dw is None else dw + dw_i
                db = db_i if db is None else db + db_i
        dx = xp.concatenate(dxs, axis=0) if need_dx else None
        return dx, dw, db

    conv2d_backward_chunked.__name__ = f"conv2d_backward_chunk{size}"
    return conv2d_backward_chunked


def _make_dense_forward(config: Config) -> Callable:
    from rapydli.kernels import dense_forward

    if config["algorithm"] == "matmul":
        return dense_forward

    def dense_forward_einsum(x, w, b):
        xp = get_array_module(x)
        y = xp.einsum("ni,oi->no", x, w)  # (N, O)
        if b is not None:
            y = y + b
        return y.astype(x.dtype, copy=False)

    return dense_forward_einsum


def _register_builtin() -> None:
    from rapydli.kernels import conv2d_backward, conv2d_forward, dense_forward

    conv_hard = (_chunk_below_batch, _im2col_fits)
    register("conv2d_forward", Space("conv2d_forward", {"chunk": CHUNKS}, _make_conv_forward,
                                     conv_hard, reference=conv2d_forward))
    register("conv2d_backward", Space("conv2d_backward", {"chunk": CHUNKS}, _make_conv_backward,
                                      conv_hard, reference=conv2d_backward))
    register("dense_forward", Space("dense_forward", {"algorithm": ("matmul", "einsum")},
                                    _make_dense_forward, reference=dense_forward))


_register_builtin()


def clear_memo() -> None:
    """Forget memoised lookups (after another process rewrote the cache file)."""
    _MEMO.clear()
    for cache in _CACHES.values():
        cache._entries = cache._ops = None

