"""Shared helpers of the benchmark scripts: thread pinning, networks, synthetic data, timing of
pipelined steps, Dask clusters with a chosen BLAS thread count, kernel replay and tables.

Import this module before NumPy: :func:`pin_threads` may re-exec the script so that the BLAS
and OpenMP thread pools start with the requested size. NumPy, rapydli and dask are imported
lazily inside the helpers for that reason.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

#: environment variables that size the thread pools of BLAS / OpenMP / Numba at import time
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def pin_threads(threads: int) -> None:
    """Make sure this process runs with ``threads`` BLAS/OpenMP/Numba threads.

    The pools are sized when their libraries load, so when the environment disagrees the
    script is re-executed with the variables set (child processes, e.g. Dask workers started
    afterwards, inherit them too). Call before importing NumPy.
    """
    want = str(threads)
    # idle OpenMP threads sleep instead of spinning, for every library in the process: with
    # two peers alternating on 2 cores, one's spinning pool would otherwise slow the other
    if all(os.environ.get(v) == want for v in THREAD_VARS) and \
            os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" and \
            os.environ.get("OPENBLAS_THREAD_TIMEOUT") == "4":
        return
    if "numpy" in sys.modules:
        raise RuntimeError("pin_threads() must run before numpy is imported")
    # (rapydli sets these two too, but only when it is imported before NumPy)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OPENBLAS_THREAD_TIMEOUT="4",
               **{v: want for v in THREAD_VARS})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def blas_threads() -> str:
    """The thread count of each thread pool loaded in this process, e.g. ``openblas=2``."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return ", ".join(f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info())


def machine_line() -> str:
    import platform

    import dask
    import numpy as np

    return (f"{os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}, "
            f"NumPy {np.__version__}, dask {dask.__version__}; thread pools: {blas_threads()}")


# --- networks and data ------------------------------------------------------------------------


def mlp(widths=(784, 1024, 1024, 10)):
    """Dense ReLU network ``widths[0] -> ... -> widths[-1]``, softmax cross-entropy."""
    import rapydli as rd

    hidden = [rd.Dense(w, activation="relu") for w in widths[1:-1]]
    return rd.Sequential([*hidden, rd.Dense(widths[-1])], input_shape=(widths[0],))


def lenet():
    """LeNet-5 on 1x28x28 (ReLU, max pooling), softmax cross-entropy."""
    import rapydli as rd

    return rd.Sequential([
        rd.Conv2D(6, 5, activation="relu"), rd.MaxPool2D(2),
        rd.Conv2D(16, 5, activation="relu"), rd.MaxPool2D(2),
        rd.Flatten(), rd.Dense(120, activation="relu"), rd.Dense(84, activation="relu"),
        rd.Dense(10),
    ], input_shape=(1, 28, 28))


def autoencoder(n_in=196, n_hidden=1024):
    """Sparse-autoencoder shape ``196-1024-196``, sigmoid units, mse loss (no sparsity term)."""
    import rapydli as rd

    return rd.Sequential([rd.Dense(n_hidden, activation="sigmoid"),
                          rd.Dense(n_in, activation="sigmoid")],
                         input_shape=(n_in,), loss="mse")


def synthetic(net, n: int, seed: int = 0):
    """``(x, y)`` float32 inputs in [0, 1) and labels (classifiers) or ``y = x`` (mse)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((n, *net.input_shape), dtype=np.float32)
    if net.loss.integer_labels:
        y = rng.integers(0, net.output_shape[0], n)
    else:
        y = x.reshape(n, -1)[:, : net.output_shape[0]].copy()
    return x, y


def batches(n: int, batch: int, count: int, start: int = 0):
    """``count`` consecutive batch index arrays cycling through ``n`` samples."""
    import numpy as np

    per_epoch = n // batch
    return [np.arange(((start + i) % per_epoch) * batch, ((start + i) % per_epoch + 1) * batch)
            for i in range(count)]


# --- timing ---------------------------------------------------------------------------------


def run_steps(engine, indices, data: str = "train", max_in_flight: int | None = None,
              steps_per_task=1) -> float:
    """Seconds for training steps on ``indices``, submitted ahead like ``rapydli.fit`` does.

    Up to ``rapydli.trainer.MAX_IN_FLIGHT`` steps are in flight beyond the one whose metrics
    are collected next; the clock stops when the last step's metrics are on the client.
    As in ``fit``, this process's heap is settled as results arrive (see
    :mod:`rapydli.scheduler.heap`). ``steps_per_task`` steps are unrolled into one graph, as
    ``fit(steps_per_task=...)`` does; pass a :class:`rapydli.trainer.TaskSize` to size the
    graphs as ``"auto"`` does (it keeps what it measured from one call to the next).
    """
    from rapydli.scheduler import heap
    from rapydli.trainer import MAX_IN_FLIGHT, TaskSize

    size = steps_per_task if isinstance(steps_per_task, TaskSize) else \
        TaskSize(steps_per_task, distributed=True)
    limit = MAX_IN_FLIGHT if max_in_flight is None else max_in_flight
    size.pause()  # other runs came between this call and the last: time none of it
    pending: list = []
    start = time.perf_counter()
    i = 0
    while i < len(indices):
        k = min(size.steps, len(indices) - i)
        group = indices[i:i + k] if k > 1 else indices[i]
        pending.append((engine.run("train", group, data)["metrics"], k))
        i += k
        if len(pending) > max(1, limit // k):
            bound, n = pending.pop(0)
            engine.value(bound)
            size.arrived(n)
            heap.settle()
    for bound, n in pending:
        engine.value(bound)
        size.arrived(n)
        heap.settle()
    return time.perf_counter() - start


def make_engine(net, placement=None, client=None, fused=True, lr=0.01, momentum=0.9,
                n_samples=2048, seed=0, exchange="auto", workers=None, shared_memory=True):
    """An :class:`Engine` with SGD(lr, momentum), fresh params and a synthetic ``train`` set."""
    import rapydli as rd
    from rapydli.scheduler.engine import Engine

    engine = Engine(net, placement, rd.SGD(lr=lr, momentum=momentum), client, "float32", fused,
                    exchange=exchange, workers=workers, shared_memory=shared_memory)
    engine.set_params(net.init(seed))
    engine.set_data("train", *synthetic(net, n_samples, seed))
    return engine


def median(xs):
    return statistics.median(xs)


# --- clusters -------------------------------------------------------------------------------


def cluster_client(n_workers: int, threads_per_worker: int):
    """``rapydli.scheduler.cluster.local_client`` (workers get as many BLAS, OpenMP and Numba
    threads as Dask threads), logs quietened, all workers up."""
    import logging

    from rapydli.scheduler.cluster import local_client

    logging.getLogger("distributed").setLevel(logging.ERROR)
    client = local_client(n_workers, threads_per_worker=threads_per_worker)
    client.wait_for_workers(n_workers)
    return client


def worker_blas_threads(client) -> str:
    """Thread pools of each worker, as :func:`blas_threads` prints them."""
    out = client.run(blas_threads)
    return "; ".join(f"{v}" for _, v in sorted(out.items()))


def close_client(client) -> None:
    cluster = client.cluster
    client.close()
    cluster.close()


# --- kernels of one step, replayed directly ---------------------------------------------------


def capture_ops(engine, index, data: str = "train"):
    """Run one in-process training step and record every op call it makes.

    Returns ``[(op key, worker, fn, args, kwargs)]`` in run order. Needs ``client=None``.
    Kernels are pure (they never modify their inputs), so the calls can be replayed.
    ``capture_ops.seconds`` is then ``{op key: seconds}`` of each call inside that step.
    """
    import dataclasses

    plan = engine.plan(len(index), "train")
    records = []
    seconds: dict[str, float] = {}
    capture_ops.seconds = seconds

    def wrap(key, fn, worker):
        def recorded(*args, **kwargs):
            records.append((key, worker, fn, args, kwargs))
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds[key] = time.perf_counter() - start
            return out
        return recorded

    original = plan.tasks
    plan.tasks = {name: dataclasses.replace(task, program=tuple(
        (key, wrap(key, fn, task.worker), slots, kwargs, post)
        for key, fn, slots, kwargs, post in task.program))
        for name, task in original.items()}
    try:
        engine.value(engine.run("train", index, data)["metrics"])
    finally:
        plan.tasks = original
    return records


def _fresh(value):
    """A copy of every array inside ``value`` (tuples and lists followed)."""
    if hasattr(value, "copy") and hasattr(value, "shape"):
        return value.copy()
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    return value


def replay_ops(records, repeats: int = 5) -> dict:
    """Median seconds of each recorded op call, called directly (no Dask), by op key.

    Each repeat calls the ops on fresh copies of their recorded arguments (copied before the
    clock starts): arrays left untouched since the captured step can be much slower to read on
    this VM than freshly written ones, which would overstate kernel time.
    """
    times: dict[str, list[float]] = {key: [] for key, *_ in records}
    for _ in range(repeats):
        calls = [(key, fn, _fresh(args), kwargs) for key, _, fn, args, kwargs in records]
        for key, fn, args, kwargs in calls:
            start = time.perf_counter()
            fn(*args, **kwargs)
            times[key].append(time.perf_counter() - start)
    return {key: median(ts) for key, ts in times.items()}


def in_process_engine(net, placement, fused=True, n_samples=2048, seed=0):
    """An in-process engine (Dask sync scheduler, no client) running a multi-worker
    ``placement``'s plan, every mesh worker being this process: its per-worker ops can be
    captured and replayed (kernel time per worker)."""
    return make_engine(net, placement, None, fused=fused, n_samples=n_samples, seed=seed)


# --- output ---------------------------------------------------------------------------------


def table(headers, rows, align=None) -> str:
    """A Markdown table (so it pastes straight into RESULTS.md); numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ["<"] + [">"] * (len(headers) - 1)
    lines = ["| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells[0], align, widths)) + " |",
             "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else ("-" * (w + 2))
                            for a, w in zip(align, widths)) + "|"]
    for row in cells[1:]:
        lines.append("| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths))
                     + " |")
    return "\n".join(lines)


def goal_line(text: str, met: bool) -> str:
    return f"goal ({text}): {'met' if met else 'NOT met'}"
