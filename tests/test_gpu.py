"""The GPU path: CuPy arrays on workers that have the Dask resource ``GPU``.

The numerical tests need CuPy and a CUDA device and skip cleanly without them; the plumbing
(which worker counts as a GPU worker) is tested everywhere.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

import rapydli as rd
from rapydli.kernels import available_backends
from rapydli.scheduler.engine import Engine, _wants_gpu, _worker_resources, to_host

needs_gpu = pytest.mark.skipif("cupy" not in available_backends(),
                               reason="needs CuPy and a CUDA device")


def test_workers_with_the_gpu_resource_compute_on_it():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        (address,) = client.scheduler_info()["workers"]
        resources = _worker_resources(client)[address]
        assert _wants_gpu("auto", resources)
        assert not _wants_gpu("cpu", resources)
    assert not _wants_gpu("auto", {}) and _wants_gpu("gpu", {})
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'gpu'"):
        _wants_gpu("tpu", {})


def test_to_host_leaves_numpy_alone():
    value = (np.ones(2), [np.zeros(1)], 3.0)
    out = to_host(value)
    assert out[0] is value[0] and out[1][0] is value[1][0] and out[2] == 3.0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("placement", [None, rd.hybrid(1, 1)])
def test_gpu_step_equals_cpu_step(placement, monkeypatch):
    from rapydli.kernels import _cuda

    launched = []  # the window ops must take the CUDA kernels, not CuPy's reference code
    launch = _cuda._launch
    monkeypatch.setattr(_cuda, "_launch", lambda k, *a, **kw: launched.append(k) or launch(k, *a, **kw))
    net = rd.Sequential([rd.Conv2D(4, 3, padding=1, activation="relu"), rd.MaxPool2D(2),
                         rd.Conv2D(4, 3, stride=2), rd.AvgPool2D(2, stride=1),
                         rd.Flatten(), rd.Dense(10)], input_shape=(1, 12, 12))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1, 12, 12)).astype("float32")
    y = rng.integers(0, 10, 6)
    results = []
    for device in ("cpu", "gpu"):
        engine = Engine(net, placement, None, None, "float32", device=device)
        engine.set_params(net.init(0))
        engine.set_data("b", x, y)
        out = engine.run("grad", np.arange(6), "b")
        results.append({k: engine.value(t[0][1]) for k, t in out["grads"].items()})
    for key, value in results[0].items():
        np.testing.assert_allclose(results[1][key], value, rtol=1e-4, atol=1e-5)
    names = {getattr(k, "__name__", None) or k.py_func.__name__ for k in launched}
    assert names == {"_im2col_kernel", "_col2im_kernel", "_maxpool_kernel", "_avgpool_kernel",
                     "_pool_back_kernel"}


@pytest.mark.gpu
@needs_gpu
def test_cupy_arrays_take_the_cuda_kernels(monkeypatch):
    import cupy

    from rapydli.kernels import _cuda, _dispatch

    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    on_gpu = cupy.zeros((2, 3), cupy.float32)
    assert _dispatch.gpu(on_gpu, None) is _cuda and not _cuda.simulated()
    assert _dispatch.gpu(on_gpu, cupy.zeros(2, cupy.float64)) is None  # mixed dtypes
    # the SGD step on the device, against the NumPy reference
    from rapydli.kernels import optim

    rng = np.random.default_rng(1)
    w, g, v = (rng.normal(size=(3, 4)).astype("float32") for _ in range(3))
    want_w, want_v = optim.sgd_update_reference(w, g, v, 0.1, 0.9, 0.01, True)
    got_w, got_v = optim.sgd_update_(cupy.asarray(w), cupy.asarray(g), cupy.asarray(v), 0.1, 0.9,
                                     0.01, True)
    np.testing.assert_allclose(cupy.asnumpy(got_w), want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cupy.asnumpy(got_v), want_v, rtol=1e-5, atol=1e-6)
