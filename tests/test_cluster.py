"""The embedded cluster: worker processes start with the environment rapydli asks for."""
from __future__ import annotations

import os
import sys

import pytest

from rapydli.scheduler.cluster import CLUSTER_CONFIG, local_client, worker_environ


def _profiling(dask_worker) -> tuple[bool, bool]:
    """(profiler setting, profiler callback running) inside a worker."""
    import dask

    return (dask.config.get("distributed.worker.profile.enabled"),
            "profile" in dask_worker.periodic_callbacks)


def _wake_ups(dask_worker=None, dask_scheduler=None) -> dict[str, float]:
    """Milliseconds between the wake-ups of a server's periodic callbacks, by name."""
    server = dask_worker or dask_scheduler
    return {name: pc.callback_time for name, pc in server.periodic_callbacks.items()}


def _start_environ() -> dict[str, str]:
    """This process's environment as it was when the process started (what glibc's malloc,
    OpenMP and OpenBLAS read), not as Python code changed it since."""
    raw = open(f"/proc/{os.getpid()}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_start_with_malloc_thread_and_profiler_settings_the_client_keeps_its_own():
    want = worker_environ(2)
    before = {name: os.environ.get(name) for name in want}
    client = local_client(1, threads_per_worker=2)
    try:
        assert {name: os.environ.get(name) for name in want} == before
        (started,) = client.run(_start_environ).values()
        # set before the process was spawned, not inside it: glibc reads MALLOC_* and OpenMP
        # reads OMP_WAIT_POLICY once, when they start
        assert {name: started.get(name) for name in want} == want
        assert want["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
        assert want["MALLOC_ARENA_MAX"] == "1"  # one arena: no heaps unmapped and faulted back
        assert want["OMP_NUM_THREADS"] == want["OPENBLAS_NUM_THREADS"] == "2"
        # Dask's stack-sampling profiler is off in the workers, and only there
        import dask

        assert CLUSTER_CONFIG["distributed.worker.profile.enabled"] is False
        assert list(client.run(_profiling).values()) == [(False, False)]
        assert dask.config.get("distributed.worker.profile.enabled") is True
        # the servers wake up less often than Dask's defaults have them (see CLUSTER_CONFIG)
        (worker,) = client.run(_wake_ups).values()
        scheduler = client.run_on_scheduler(_wake_ups)
        assert worker["tick"] == scheduler["tick"] == 200 and worker["monitor"] == 1000
        assert worker["memory_monitor"] == 250
        assert dask.config.get("distributed.admin.tick.interval") == "20ms"  # here, as it was
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()

