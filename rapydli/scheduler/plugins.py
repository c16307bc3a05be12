"""Dask worker plugins rapydli registers on the clusters it starts."""
from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin


class BlasThreads(WorkerPlugin):
    """The worker's BLAS pools get ``n`` threads (one per Dask thread).

    Dask's nanny starts workers with single-threaded BLAS, and the environment alone does not
    undo that for NumPy's own OpenBLAS, which then runs matrix products at half speed.
    """

    name = "rapydli-blas-threads"

    def __init__(self, n: int):
        self.n = n

    def setup(self, worker):
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(limits=self.n, user_api="blas")
