"""Shared fixtures: an in-process 3-worker Dask cluster for every distributed test."""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys

import pytest

# Without a GPU the CUDA kernels run on Numba's CUDA simulator (read when numba.cuda is first
# imported, so set before any test imports it); a machine with a GPU tests them on the device.
if not (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

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


@pytest.fixture(scope="module")
def process_client():
    """Two real worker processes under nannies (a killed one is restarted), per test module."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.CRITICAL)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="session")
def s3_options():
    """s3fs ``storage_options`` for a local moto S3 server that runs for the whole session.

    Tests make their own buckets (``s3fs.S3FileSystem(**s3_options).mkdir(name)``). Skips when
    ``s3fs`` or ``moto_server`` (``pip install 'moto[server]'``) is missing.
    """
    import os
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    pytest.importorskip("s3fs")
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server is not installed; pip install 'moto[server]'")
    with socket.socket() as sock:  # a free port; the server binds it a moment later
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing")
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"moto_server did not start on {url}")
                time.sleep(0.1)
        # no region_name: with one, moto refuses to create buckets
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url}}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
