"""Connecting to Dask: an embedded ``LocalCluster`` (default), a scheduler address, or a batch
system through dask-jobqueue; and binding a mesh's coordinates to worker addresses."""
from __future__ import annotations

import contextlib
import logging
import os

from rapydli.errors import ClusterError, PlacementError


#: glibc malloc settings for worker processes. The nanny's default MALLOC_TRIM_THRESHOLD_=65536
#: also freezes malloc's mmap threshold at 128 KiB: every activation or gradient array of a
#: step is then a fresh mmap, zeroed page by page, and returned at once (measured on the MLP
#: step of benchmarks/overhead.py inside a worker: 486k minor page faults per 90 steps against
#: 34k in a plain process, and 1.5x its time). Arrays up to 32 MiB come from the heap instead,
#: and only free space beyond 256 MiB at its top is returned to the system. One arena: the
#: task thread's own arena (glibc gives each thread one of up to 8 per core) is a chain of
#: 64 MiB heaps that glibc unmaps as they empty, so steps still faulted their arrays in page
#: by page, the more so the fewer steps a task holds (1-worker MLP of benchmarks/scaling.py:
#: 1,700-2,000 faults a step at 8 steps a task and 41 ms, 240-390 and 38 ms at 16-64; with
#: one arena 1-6 faults and 38 ms at every size).
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                 "MALLOC_ARENA_MAX": "1"}


#: Dask settings of the embedded cluster (its scheduler, nannies and workers). Every wake-up of
#: a worker's event loop takes the GIL from the thread running the kernels, and on a machine
#: whose cores all compute, any process's wake-up takes a core from one of them while its
#: peers wait for it at the next exchange:
#: - Dask's statistical profiler samples every thread's stack each 10 ms on the worker's event
#:   loop (benchmarks/overhead.py's MLP step on a 1-worker cluster: 68-74 ms with it off
#:   against 74-84 ms on, alternating runs); the dashboard's profile page stays empty;
#: - each server checks that its event loop is responsive every 20 ms (``tick``; here every
#:   200 ms: a blocked loop is still reported), takes system statistics for the dashboard
#:   every 500 ms (here every second) and, in workers and nannies, the memory use every
#:   100 ms (here 250 ms, still well inside the time a training takes to change its memory).
#: Data-parallel MLP of benchmarks/scaling.py on 2 worker processes and 2 cores, in separate
#: runs alternating: 21.46-21.74 ms a step against 22.66-22.72 with Dask's defaults.
CLUSTER_CONFIG = {"distributed.worker.profile.enabled": False,
                  "distributed.admin.tick.interval": "200ms",
                  "distributed.admin.system-monitor.interval": "1s",
                  "distributed.worker.memory.monitor-interval": "250ms"}


def worker_environ(threads: int) -> dict[str, str]:
    """Environment of a worker process with ``threads`` Dask threads: as many BLAS, OpenMP and
    Numba threads, idle pools that sleep rather than spin (the process shares its cores with
    the scheduler and client), and :data:`WORKER_MALLOC`.

    All of it is read when the process or a library starts, so it must be in place before the
    worker process is spawned (``distributed.nanny.pre-spawn-environ``), not set inside it.
    """
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env.update(WORKER_MALLOC, OMP_WAIT_POLICY="PASSIVE", OPENBLAS_THREAD_TIMEOUT="4")
    return env


def local_client(n_workers: int, threads_per_worker: int = 1, processes: bool = True):
    """An embedded ``LocalCluster`` with one worker process per mesh worker, each with
    ``threads_per_worker`` Dask threads, the environment of :func:`worker_environ` and the
    settings of :data:`CLUSTER_CONFIG`."""
    import dask
    from distributed import Client, LocalCluster

    env = worker_environ(threads_per_worker)
    with _pre_spawn(env if processes else {}), dask.config.set(CLUSTER_CONFIG):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=processes, dashboard_address=None,
                               scheduler_kwargs={"dashboard_address": ":0"},  # a free port
                               silence_logs=logging.ERROR)
    return Client(cluster)


@contextlib.contextmanager
def _pre_spawn(env: dict[str, str]):
    """Nannies created inside set ``env`` before they spawn (and respawn) their worker.

    A nanny takes the names in ``distributed.nanny.pre-spawn-environ`` and, for each, the value
    of this process's environment where it has one, else the configured one; so both are set
    here while the nannies are made, and this process's environment is put back after."""
    import dask

    merged = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **env}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": merged}):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cuda_client(n_workers: int):
    """One worker per GPU through dask-cuda's ``LocalCUDACluster``; each worker gets the Dask
    resource ``GPU`` so the engine computes there with CuPy."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterError("--cluster local-cuda needs dask-cuda and CuPy: "
                           "pip install 'rapydli[gpu]'") from None
    from distributed import Client

    cluster = LocalCUDACluster(n_workers=n_workers, threads_per_worker=1,
                               resources={"GPU": 1}, dashboard_address=None,
                               silence_logs=logging.ERROR)
    return Client(cluster)


#: embedded cluster kinds for ``connect(cluster=...)`` / ``--cluster``
CLUSTERS = ("local", "local-cuda", "slurm", "pbs")


def connect(address: str | None = None, n_workers: int = 1, timeout: float = 10.0,
            cluster: str = "local"):
    """A ``Client``: to the scheduler at ``address``, or to a new cluster of kind ``cluster``.

    Addresses look like ``tcp://10.0.0.5:8786`` (or ``ucx://...`` where UCX is installed).
    ``cluster`` is ``local`` (worker processes here), ``local-cuda`` (one worker per GPU),
    ``slurm`` or ``pbs`` (workers submitted as batch jobs through dask-jobqueue).
    """
    from distributed import Client

    if cluster not in CLUSTERS:
        raise ClusterError(f"--cluster: unknown kind {cluster!r}; expected one of "
                           f"{', '.join(map(repr, CLUSTERS))}")
    if address is None:
        if cluster == "local-cuda":
            return cuda_client(n_workers)
        if cluster in ("slurm", "pbs"):
            return jobqueue_client(cluster, n_workers)
        return local_client(n_workers)
    if "://" not in address and ":" not in address:
        raise ClusterError(f"scheduler address {address!r} is not of the form "
                           "tcp://HOST:PORT; pass --scheduler tcp://host:8786")
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address!r} within {timeout:g}s "
                           f"({exc}); check that it is running (dask scheduler) and the "
                           "address and port are right") from None


def jobqueue_client(system: str, n_workers: int, **kwargs):
    """A ``Client`` on Slurm or PBS workers started through dask-jobqueue."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError("batch systems need dask-jobqueue: pip install 'rapydli[hpc]'") from None
    from distributed import Client

    classes = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}
    if system not in classes:
        raise ClusterError(f"unknown batch system {system!r}; expected one of 'slurm', 'pbs'")
    cluster = classes[system](processes=1, cores=kwargs.pop("cores", 1),
                              memory=kwargs.pop("memory", "4GiB"), **kwargs)
    cluster.scale(n_workers)
    client = Client(cluster)
    client.wait_for_workers(n_workers)
    return client


def bind_workers(client, mesh, workers=None) -> list[str]:
    """Worker addresses for mesh workers ``0 .. mesh.size-1``, repeatable and locality-aware.

    Mesh workers are numbered row-major (the ``model`` axis varies fastest), so the tiles that
    exchange halos and activations are consecutive numbers. Workers are therefore taken host
    by host (then by port): consecutive mesh workers share a node where they can, and the
    border exchange between neighbouring tiles stays inside it. ``workers`` (addresses, one
    per mesh worker) binds them explicitly instead; each must be a worker of the cluster.
    """
    known = sorted(worker_info(client), key=_host_and_port)
    if workers is not None:
        workers = list(workers)
        if len(workers) != mesh.size or len(set(workers)) != len(workers):
            raise PlacementError(
                f"workers={workers!r}: the mesh {mesh!r} needs {mesh.size} distinct worker "
                "addresses, one per mesh worker; pass that many, or none to bind automatically")
        missing = [w for w in workers if w not in known]
        if missing:
            raise PlacementError(
                f"worker address(es) {missing} are not in the cluster; its workers are "
                f"{known}: pick from these (client.scheduler_info()['workers'])")
        return workers
    if mesh.size > len(known):
        raise PlacementError(
            f"placement needs {mesh.size} workers for {mesh!r} but the cluster has "
            f"{len(known)}; start more workers or choose a smaller mesh (e.g. --mesh "
            f"data={max(len(known), 1)})")
    return known[: mesh.size]


def _host_and_port(address: str) -> tuple:
    """``tcp://10.0.0.2:4001`` -> ``("10.0.0.2", 4001)``; other forms sort as text."""
    from distributed.comm import parse_address, parse_host_port

    try:
        host, port = parse_host_port(parse_address(address)[1])
    except (ValueError, TypeError):
        return (address, 0)
    return (host, int(port or 0))


def worker_info(client) -> dict[str, dict]:
    """Every worker's address and info, fetched from the scheduler now.

    ``Client.scheduler_info()`` returns a cached identity that a periodic refresh may replace,
    between the fetch and the return, with one listing no workers; asking the scheduler
    directly has no such window.
    """
    if getattr(client, "asynchronous", False) or not hasattr(client, "scheduler"):
        return dict(client.scheduler_info(n_workers=-1)["workers"])
    return dict(client.sync(client.scheduler.identity, n_workers=-1)["workers"])
