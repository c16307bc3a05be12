"""Shared fixtures: an in-process 3-worker Dask cluster for every distributed test."""
from __future__ import annotations

import logging
import pathlib
import sys

import pytest

# tests/ is not a package; make ``from gradcheck import check_grad`` work under any runner
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session")
def client():
    """A ``distributed.Client`` on 3 single-threaded in-process workers, for the whole session."""
    from distributed import Client, LocalCluster

    # no dashboard; the scheduler's bare HTTP server takes a free port, not a busy 8787
    cluster = LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                           dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                           silence_logs=logging.ERROR)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()
