"""The compiled (Numba) kernels against the NumPy reference kernels, in float32 and float64.

One test body covers every kernel. It calls the public, dispatching functions of
``rapydli.kernels`` either with the compiled path on (``impl="numba"``; the reference
functions are then patched to fail, so a silent fallback to NumPy is caught) or forced off
with ``RAPYDLI_KERNELS=numpy`` (``impl="reference"``), and compares every output (forward
values and gradients) with ``rapydli.kernels.reference`` run in float64. It also checks that
dtypes are kept and that no input is modified. The window ops (convolution, pooling) are
also run through the CUDA kernels (``impl="cuda"``, ``RAPYDLI_KERNELS=cuda``): on a GPU where
there is one, else on Numba's CUDA simulator (``tests/conftest.py`` turns it on).

Numba compiles each kernel once per dtype on first use and caches the machine code under
``__pycache__``: the first run after a kernel change pays the compilation (tens of seconds),
later runs take a few seconds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import rapydli.kernels as K
from rapydli.errors import ConfigError, ShapeError
from rapydli.kernels import _dispatch, activations, conv, losses, optim, pool
from rapydli.kernels import reference as R

pytestmark = pytest.mark.skipif(not _dispatch.numba_available(), reason="numba is not installed")


def _rnd(rng, *shape):
    return rng.standard_normal(shape)


def _distinct(rng, *shape):
    """No ties, none near 0, exactly ordered in float32 too (so argmax and relu agree)."""
    vals = (np.arange(math.prod(shape)) - math.prod(shape) // 2) * 0.1 + 0.05
    return rng.permutation(vals).reshape(shape)


def _conv(xs, ws, s, p, need_dx=True):
    def make(rng):
        x, w, b = _rnd(rng, *xs), _rnd(rng, *ws), _rnd(rng, ws[0])
        dy = _rnd(rng, *R.conv2d_forward(x, w, b, s, p).shape)
        return {"x": x, "w": w, "b": b, "dy": dy}

    def call(m, a):
        return (m.conv2d_forward(a["x"], a["w"], a["b"], s, p),
                m.conv2d_forward(a["x"], a["w"], None, s, p),
                *m.conv2d_backward(a["x"], a["w"], a["dy"], s, p, need_dx=need_dx))
    return call, make


def _pool(xs, size, stride):
    def make(rng):
        x = _distinct(rng, *xs)
        dy = _rnd(rng, *R.maxpool2d_forward(x, size, stride).shape)
        return {"x": x, "dy": dy}

    def call(m, a):
        x, dy = a["x"], a["dy"]
        y = m.maxpool2d_forward(x, size, stride)
        return (y, m.maxpool2d_backward(x, y, dy, size, stride), m.avgpool2d_forward(x, size, stride),
                m.avgpool2d_backward(x.shape, dy, size, stride, dy.dtype))
    return call, make


def _activation(kind):
    def make(rng):
        return {"x": _distinct(rng, 3, 4, 5), "dy": _rnd(rng, 3, 4, 5)}

    def call(m, a):
        y = m.activation_forward(kind, a["x"])
        return y, m.activation_backward(kind, y, a["dy"])
    return call, make


def _softmax(n, k):
    def make(rng):
        return {"logits": _rnd(rng, n, k) * 3, "labels": rng.integers(0, k, n)}

    def call(m, a):
        return m.softmax_cross_entropy(a["logits"], a["labels"], 1.0 / n)
    return call, make


def _mse(shape):
    def make(rng):
        return {"pred": _rnd(rng, *shape), "target": _rnd(rng, *shape)}

    def call(m, a):
        return m.mse(a["pred"], a["target"], 0.5)
    return call, make


def _sgd(shape, momentum, wd, nesterov, with_v):
    def make(rng):
        return {"w": _rnd(rng, *shape), "g": _rnd(rng, *shape), "v": _rnd(rng, *shape)}

    def call(m, a):
        return m.sgd_update(a["w"], a["g"], a["v"] if with_v else None, 0.1, momentum, wd, nesterov)
    return call, make


def _dense(n, i, o):
    def make(rng):
        return {"x": _rnd(rng, n, i), "w": _rnd(rng, o, i), "b": _rnd(rng, o), "dy": _rnd(rng, n, o)}

    def call(m, a):
        return m.dense_forward(a["x"], a["w"], a["b"]), *m.dense_backward(a["x"], a["w"], a["dy"])
    return call, make


CASES = {  # name -> (call(module, arrays) -> outputs, make(rng) -> float64 arrays)
    "conv-direct-s2-p1-odd": _conv((2, 3, 7, 6), (5, 3, 3, 2), 2, 1),
    "conv-direct-uncovered": _conv((2, 1, 6, 6), (2, 1, 3, 3), 2, 0),
    "conv-direct-batch1-nodx": _conv((1, 1, 9, 9), (6, 1, 5, 5), 1, 0, need_dx=False),
    "conv-direct-s1-p1-k3x7": _conv((2, 2, 9, 10), (3, 2, 3, 7), 1, 1),  # wide rows, 5 + 2 taps
    "conv-gemm-p1": _conv((1, 4, 9, 8), (6, 4, 3, 3), 1, 1),
    "conv-s1-k2x4-p12": _conv((2, 3, 6, 9), (5, 3, 2, 4), 1, (1, 2)),  # wide-row dx, < 5 taps
    "conv-gemm-s21-p01": _conv((3, 6, 8, 7), (7, 6, 3, 3), (2, 1), (0, 1)),
    "conv-s1-dw-blocks": _conv((19, 2, 10, 9), (5, 2, 5, 5), 1, 0),  # conv_dw_s1: 3 blocks, odd O
    "conv-gemm-s1-big-w": _conv((2, 8, 6, 6), (24, 8, 5, 5), 1, 2),  # w.size > _DIRECT_S1_MAX: GEMM
    "pool-2x2": _pool((2, 3, 6, 6), 2, 2),
    "pool-overlap": _pool((2, 2, 7, 7), 3, 2),
    "pool-rect-batch1": _pool((1, 2, 5, 8), (2, 3), (1, 2)),
    "pool-uncovered": _pool((1, 1, 7, 6), (3, 2), (2, 3)),
    **{f"act-{k}": _activation(k) for k in ("relu", "sigmoid", "tanh")},
    "softmax-ce": _softmax(7, 10),
    "softmax-ce-batch1": _softmax(1, 3),
    "mse": _mse((5, 6)),
    "sgd-nesterov-wd": _sgd((4, 3), 0.9, 0.01, True, True),
    "sgd-first-step": _sgd((7,), 0.9, 0.0, False, False),
    "sgd-plain": _sgd((2, 3, 2), 0.0, 0.01, False, False),
    "dense": _dense(5, 4, 3),
}

#: reference functions the public ones fall back to, by module: patched to fail under "numba"
_FALLBACKS = {
    activations: ["activation_forward_reference", "activation_backward_reference"],
    conv: ["conv2d_forward_reference", "conv2d_backward_reference"],
    losses: ["softmax_cross_entropy_reference", "mse_reference"],
    optim: ["sgd_update_reference"],
    pool: ["maxpool2d_forward_reference", "maxpool2d_backward_reference",
           "avgpool2d_forward_reference", "avgpool2d_backward_reference"],
}
_TOL = {np.float64: {"rtol": 1e-10, "atol": 1e-12}, np.float32: {"rtol": 2e-4, "atol": 2e-5}}


needs_cuda = pytest.mark.skipif(not _dispatch.cuda_available(),
                                reason="no CUDA device and no CUDA simulator")


def _use(impl, monkeypatch):
    """Point the dispatch at ``impl``: "numba" (the default), "reference" or "cuda"."""
    if impl == "cuda" and not _dispatch.cuda_available():
        pytest.skip("no CUDA device and no CUDA simulator")
    monkeypatch.setenv(_dispatch.ENV_VAR, {"numba": "", "reference": "numpy", "cuda": "cuda"}[impl])


def _no_fallback(*args, **kwargs):
    raise AssertionError("the compiled path fell back to the NumPy/CuPy reference")


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("layout", ["c", "readonly", "strided-readonly"])
@pytest.mark.parametrize("impl", ["numba", "reference"])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, dt, impl, layout, monkeypatch):
    _matches_reference(case, dt, impl, monkeypatch, layout)


@needs_cuda
@pytest.mark.parametrize("layout", ["c", "readonly", "strided-readonly"])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("conv", "pool", "sgd"))])
def test_cuda_kernel_matches_reference(case, dt, layout, monkeypatch):
    _matches_reference(case, dt, "cuda", monkeypatch, layout)


def _layout(a, layout):
    """``a``'s values read-only, C-contiguous or not (every other element of a wider array)."""
    if layout == "strided-readonly":
        wide = np.empty(a.shape + (2,), a.dtype)
        wide[..., 0] = a
        a = wide[..., 0]
        assert not a.flags.c_contiguous or a.size <= 1
    else:
        a = a.copy()
    a.flags.writeable = False
    return a


def _matches_reference(case, dt, impl, monkeypatch, layout="c"):
    call, make = CASES[case]
    args64 = make(np.random.default_rng(sorted(CASES).index(case)))
    want = _flat(call(R, args64))
    args = {k: v.astype(dt) if v.dtype.kind == "f" else v for k, v in args64.items()}
    if layout != "c":  # a kernel must take read-only and strided inputs, never writing into them
        args = {k: _layout(v, layout) for k, v in args.items()}
    before = {k: v.copy() for k, v in args.items()}
    _use(impl, monkeypatch)
    if impl != "reference":
        for module, names in _FALLBACKS.items():
            for name in names:
                monkeypatch.setattr(module, name, _no_fallback)
        if impl == "cuda":  # nor may it take the CPU-compiled kernels
            monkeypatch.setattr(_dispatch, "_load", lambda: None)
    got = _flat(call(K, args))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"output {i}"
        elif isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == dt and g.shape == w.shape, f"output {i}"
            assert g.flags.c_contiguous, f"output {i}"
            np.testing.assert_allclose(g, w, **_TOL[dt], err_msg=f"output {i}")
            assert not any(g is a for a in args.values()), f"output {i} is an input object"
        elif isinstance(w, float):
            assert isinstance(g, float) and g == pytest.approx(w, rel=_TOL[dt]["rtol"]), f"output {i}"
        else:
            assert type(g) is type(w) and g == w, f"output {i}"
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"input {k!r} was modified")


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    f32, f64 = np.zeros(2, np.float32), np.zeros(2)
    assert _dispatch.fast(f32, None) is not None and _dispatch.fast(f64) is not None
    assert _dispatch.fast(f32, f64) is None  # mixed dtypes
    assert _dispatch.fast(np.zeros(2, np.int64)) is None and _dispatch.fast([1.0]) is None
    monkeypatch.setenv(_dispatch.ENV_VAR, "numpy")
    assert _dispatch.fast(f32) is None


@pytest.mark.parametrize("impl", ["numba", "reference", "cuda"])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,wd,nesterov,with_v", [(0.9, 0.01, True, True), (0.9, 0.0, False, False),
                                                        (0.0, 0.01, False, False)])
def test_inplace_sgd_equals_the_pure_step(impl, dt, momentum, wd, nesterov, with_v, monkeypatch):
    rng = np.random.default_rng(3)
    w, g, v = (_rnd(rng, 5, 3).astype(dt) for _ in range(3))
    want_w, want_v = R.sgd_update(w, g, v if with_v else None, 0.1, momentum, wd, nesterov)
    _use(impl, monkeypatch)
    if impl != "reference":  # the fast paths must not fall back
        monkeypatch.setattr(optim, "sgd_update_reference", _no_fallback)
    w2, v2 = w.copy(), (v.copy() if with_v else None)
    got_w, got_v = optim.sgd_update_(w2, g, v2, 0.1, momentum, wd, nesterov)
    assert got_w is w2 and (not with_v or got_v is v2)  # written in place
    np.testing.assert_allclose(got_w, want_w, **_TOL[dt])
    if momentum:
        np.testing.assert_allclose(got_v, want_v, **_TOL[dt])


@pytest.mark.parametrize("impl", ["numba", "reference", "cuda"])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,wd,nesterov", [(0.9, 0.01, True), (0.9, 0.0, False),
                                                  (0.0, 0.01, False)])
def test_inplace_sgd_of_two_gradients_is_the_step_of_their_sum_bit_for_bit(
        impl, dt, momentum, wd, nesterov, monkeypatch):
    """``g_add`` (a gradient sum fused into its update) gives the bits of summing first."""
    rng = np.random.default_rng(4)
    w, g, g_add, v = (_rnd(rng, 64, 33).astype(dt) for _ in range(4))
    _use(impl, monkeypatch)
    want_w, want_v = optim.sgd_update_(w.copy(), g + g_add, v.copy(), 0.1, momentum, wd,
                                       nesterov)
    if impl == "numba":  # the sum happens inside the kernel, not before it
        monkeypatch.setattr(optim, "sgd_update_reference", _no_fallback)
    got_w, got_v = optim.sgd_update_(w.copy(), g, v.copy(), 0.1, momentum, wd, nesterov,
                                     g_add=g_add)
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_v, want_v)
    with pytest.raises(ShapeError, match="gradient shape"):
        optim.sgd_update_(w, g, v, 0.1, momentum, wd, nesterov, g_add=g_add[:, 1:])


def test_gpu_dispatch_rules(monkeypatch):
    f32, f64 = np.zeros(2, np.float32), np.zeros(2)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert _dispatch.gpu(f32) is None  # NumPy arrays stay on the CPU
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    assert _dispatch.fast(f32) is None  # the CPU kernels step aside
    assert _dispatch.gpu(f32, f64) is None and _dispatch.gpu(np.zeros(2, np.int64)) is None
    if _dispatch.cuda_available():
        assert _dispatch.gpu(f32, None).__name__ == "rapydli.kernels._cuda"
    monkeypatch.setattr(_dispatch, "_cuda_module", False)  # as where numba.cuda finds no device
    with pytest.raises(ConfigError, match="NUMBA_ENABLE_CUDASIM=1"):
        _dispatch.gpu(f32)
    monkeypatch.setenv(_dispatch.ENV_VAR, "numpy")
    assert _dispatch.gpu(f32) is None


@pytest.mark.parametrize("impl", ["numba", "reference", "cuda"])
def test_inplace_sgd_rejects_mismatched_shapes_before_any_kernel_runs(impl, monkeypatch):
    _use(impl, monkeypatch)
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ShapeError, match=r"gradient shape \(3, 4\) differs from weight shape"):
        optim.sgd_update_(w, np.ones((3, 4), np.float32), None, 0.1)
    with pytest.raises(ShapeError, match=r"momentum buffer shape \(12,\) differs"):
        optim.sgd_update_(w, np.ones((4, 3), np.float32), np.zeros(12, np.float32), 0.1, 0.9)
    np.testing.assert_array_equal(w, 1.0)  # untouched


class _FakeCupyArray:
    """Stands for a CuPy array in the dispatch rules (only its module and dtype are read)."""
    __module__ = "cupy._core.core"
    dtype = np.dtype(np.float32)


@needs_cuda
def test_gpu_dispatch_keeps_device_arrays_off_the_simulator(monkeypatch):
    from rapydli.kernels import _cuda

    if not _cuda.simulated():
        pytest.skip("a real CUDA device: the simulator is off")
    on_gpu = _FakeCupyArray()
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert _dispatch.gpu(on_gpu, None) is None  # CuPy's reference kernels, on the device
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    with pytest.raises(ConfigError, match="CuPy arrays cannot run on the CUDA simulator"):
        _dispatch.gpu(on_gpu)
    with pytest.raises(ConfigError, match="unset NUMBA_ENABLE_CUDASIM"):
        _dispatch.gpu(np.zeros(2, np.float32), on_gpu)


def test_cuda_kernels_that_cannot_run_fall_back_with_a_warning(monkeypatch):
    pytest.importorskip("numba.cuda")
    from rapydli.kernels import _cuda

    def broken():
        raise RuntimeError("PTX was compiled with an unsupported toolchain")

    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_dispatch, "_cuda_module", None)  # not tried yet
    monkeypatch.setattr(_cuda, "probe", broken)
    monkeypatch.setattr(_cuda, "simulated", lambda: False)
    monkeypatch.setattr(_cuda.cuda, "is_available", lambda: True)  # a device is visible
    with pytest.warns(RuntimeWarning, match="unsupported toolchain.*CuPy reference kernels"):
        assert not _dispatch.cuda_available()
    assert _dispatch._cuda_module is False  # tried once, not on every call
    assert _dispatch.gpu(_FakeCupyArray()) is None


@needs_cuda
def test_cuda_probe_runs_a_kernel():
    from rapydli.kernels import _cuda

    _cuda.probe()  # raises unless the kernel wrote 1..4


@needs_cuda
def test_cuda_window_gradients_match_finite_differences(monkeypatch):
    from gradcheck import check_grad

    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    rng = np.random.default_rng(7)
    x, w, b = _rnd(rng, 2, 2, 6, 5), _rnd(rng, 3, 2, 3, 2), _rnd(rng, 3)
    r = _rnd(rng, *K.conv2d_forward(x, w, b, 2, 1).shape)
    dx, dw, db = K.conv2d_backward(x, w, r, 2, 1)
    check_grad(lambda x, w, b: float((K.conv2d_forward(x, w, b, 2, 1) * r).sum()),
               {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db})
    x = _distinct(rng, 1, 2, 7, 7)  # no ties: the max is differentiable
    for kind in ("max", "avg"):
        fwd = getattr(K, f"{kind}pool2d_forward")
        y = fwd(x, 3, 2)  # overlapping windows
        r = _rnd(rng, *y.shape)
        got = (K.maxpool2d_backward(x, y, r, 3, 2) if kind == "max"
               else K.avgpool2d_backward(x.shape, r, 3, 2, x.dtype))
        check_grad(lambda x, fwd=fwd, r=r: float((fwd(x, 3, 2) * r).sum()), {"x": x}, {"x": got})


@needs_cuda
def test_cnn_gradients_through_the_cuda_kernels_equal_the_cpu_ones(monkeypatch):
    import rapydli as rd

    net = rd.Sequential([rd.Conv2D(3, 3, padding=1, activation="relu"), rd.MaxPool2D(2),
                         rd.Conv2D(4, 3, stride=2), rd.AvgPool2D(2, stride=1), rd.Flatten(),
                         rd.Dense(5)], input_shape=(2, 10, 10))
    params = net.init(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 2, 10, 10)).astype("float32"), rng.integers(0, 5, 3)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    cpu_loss, cpu_grads = rd.value_and_grad(net, params, x, y)
    from rapydli.kernels import _cuda

    launched = []
    launch = _cuda._launch
    monkeypatch.setattr(_cuda, "_launch", lambda k, *a, **kw: launched.append(k) or launch(k, *a, **kw))
    monkeypatch.setattr(_dispatch, "_load", lambda: None)  # no CPU-compiled kernels
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    loss, grads = rd.value_and_grad(net, params, x, y)
    kernels = {k.__name__ if hasattr(k, "__name__") else k.py_func.__name__ for k in launched}
    assert kernels == {"_im2col_kernel", "_col2im_kernel", "_maxpool_kernel", "_avgpool_kernel",
                       "_pool_back_kernel"}
    assert loss == pytest.approx(cpu_loss, rel=1e-5)
    assert grads.keys() == cpu_grads.keys()
    for key, value in grads.items():
        np.testing.assert_allclose(value, cpu_grads[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("impl", ["numba", "cuda"])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2), ((2, 3), (1, 2))])
def test_max_pooling_ties_and_nan_follow_the_reference(impl, dt, size, stride, monkeypatch):
    """Ties go to the first maximum in row-major window order and a NaN wins its windows
    (the first NaN, where there are several), in the forward values and in the gradient's
    routing, whether windows tile the input or overlap; planes without NaN beside planes
    with one."""
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, (3, 2, 7, 8)).astype(dt)  # few values: many ties
    x[0, 1, 2, 3] = x[0, 1, 3, 5] = x[2, 0, 0, 0] = np.nan
    x[1, 0, 4:6, 4:6] = -np.inf
    expected_y = R.maxpool2d_forward(x, size, stride)
    dy = rng.standard_normal(expected_y.shape).astype(dt)
    expected_dx = R.maxpool2d_backward(x, expected_y, dy, size, stride)
    assert np.isnan(expected_y).any() and not np.isnan(expected_y[1]).any()
    _use(impl, monkeypatch)
    monkeypatch.setattr(pool, "maxpool2d_forward_reference", _no_fallback)
    monkeypatch.setattr(pool, "maxpool2d_backward_reference", _no_fallback)
    y = K.maxpool2d_forward(x, size, stride)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_allclose(K.maxpool2d_backward(x, y, dy, size, stride), expected_dx,
                               rtol=1e-6 if dt == np.float32 else 1e-12)


def test_dense_weight_gradients_go_where_the_caller_wants_them_with_the_same_bits():
    from rapydli.kernels.backend import outputs_from
    from rapydli.kernels.dense import dense_backward_params

    rng = np.random.default_rng(5)
    x, dy = _rnd(rng, 32, 96).astype(np.float32), _rnd(rng, 32, 48).astype(np.float32)
    want_w, want_b = dense_backward_params(x, dy, np.float32)
    given = []

    def allocate(shape, dtype):
        given.append(np.empty(shape, dtype))
        return given[-1]

    with outputs_from(allocate):
        got_w, got_b = dense_backward_params(x, dy, np.float32)
    assert len(given) == 1 and got_w is given[0]
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_b, want_b)
    with outputs_from(allocate):  # another dtype than the inputs': allocated as usual
        got64, _ = dense_backward_params(x, dy, np.float64)
    assert len(given) == 1 and got64.dtype == np.float64
    with outputs_from(lambda shape, dtype: None):  # nothing to give: as usual
        np.testing.assert_array_equal(dense_backward_params(x, dy, np.float32)[0], want_w)
