"""Kernel tests: forward against naive loop references, float64 gradient checks, dtypes.

Every reference below is written with explicit Python loops, independently of
the vectorised kernels; gradients go through the shared ``check_grad`` helper.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_grad, numerical_grad
from hypothesis import given, settings
from hypothesis import strategies as st

from rapydli.errors import ConfigError, ShapeError
from rapydli.kernels import (
    ACTIVATIONS,
    LOSSES,
    activation_backward,
    activation_forward,
    available_backends,
    avgpool2d_backward,
    avgpool2d_forward,
    conv2d_backward,
    conv2d_forward,
    dense_backward,
    dense_forward,
    get_array_module,
    maxpool2d_backward,
    maxpool2d_forward,
    mse,
    sgd_update,
    softmax_cross_entropy,
)


def rnd(*shape: int, seed: int = 0, dtype: type = np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def distinct(*shape: int, seed: int = 0) -> np.ndarray:
    """Values with no ties and none near 0 (a shuffled grid ..., -0.05, 0.05, 0.15, ...)."""
    vals = (np.arange(math.prod(shape)) - math.prod(shape) // 2) * 0.1 + 0.05
    return np.random.default_rng(seed).permutation(vals).reshape(shape)  # (N, C, H, W)


def two(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


# ---------------------------------------------------------------- naive references (loops)
def ref_dense(x, w, b):
    y = np.zeros((x.shape[0], w.shape[0]))
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            y[n, o] = sum(x[n, i] * w[o, i] for i in range(x.shape[1])) + (0 if b is None else b[o])
    return y


def ref_conv2d(x, w, b, stride, padding):
    (sh, sw), (ph, pw) = two(stride), two(padding)
    n_, c_, h, wd = x.shape
    o_, _, kh, kw = w.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n_, o_, ho, wo))
    for n, o, r, t in np.ndindex(y.shape):
        acc = 0.0 if b is None else b[o]
        for c, i, j in np.ndindex(c_, kh, kw):
            row, col = r * sh - ph + i, t * sw - pw + j
            if 0 <= row < h and 0 <= col < wd:
                acc += x[n, c, row, col] * w[o, c, i, j]
        y[n, o, r, t] = acc
    return y


def ref_windows(x_shape, size, stride):
    """Yield (n, c, r, t, row-slice, col-slice) for every pooling window."""
    (kh, kw), (sh, sw) = two(size), two(stride)
    ho, wo = (x_shape[2] - kh) // sh + 1, (x_shape[3] - kw) // sw + 1
    for n, c, r, t in np.ndindex(x_shape[0], x_shape[1], ho, wo):
        yield n, c, r, t, slice(r * sh, r * sh + kh), slice(t * sw, t * sw + kw)


def ref_pool(kind, x, size, stride):
    (kh, kw), (sh, sw) = two(size), two(stride)
    out = np.zeros(x.shape[:2] + ((x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1))
    for n, c, r, t, rs, cs in ref_windows(x.shape, size, stride):
        vals = [float(v) for v in x[n, c, rs, cs].ravel()]
        out[n, c, r, t] = max(vals) if kind == "max" else sum(vals) / len(vals)
    return out


def ref_maxpool_backward(x, dy, size, stride):
    dx = np.zeros_like(x)
    for n, c, r, t, rs, cs in ref_windows(x.shape, size, stride):
        best = None
        for i in range(rs.start, rs.stop):  # row-major scan, strict '>' keeps the first max
            for j in range(cs.start, cs.stop):
                if best is None or x[n, c, i, j] > x[n, c, best[0], best[1]]:
                    best = (i, j)
        dx[n, c, best[0], best[1]] += dy[n, c, r, t]
    return dx


def ref_avgpool_backward(x_shape, dy, size, stride):
    dx = np.zeros(x_shape)
    k = math.prod(two(size))
    for n, c, r, t, rs, cs in ref_windows(x_shape, size, stride):
        dx[n, c, rs, cs] += dy[n, c, r, t] / k
    return dx


def ref_activation(kind, x):
    fns = {"relu": lambda v: max(v, 0.0), "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
           "tanh": math.tanh, None: lambda v: v, "linear": lambda v: v}
    return np.array([fns[kind](float(v)) for v in x.ravel()]).reshape(x.shape)  # x's shape


def ref_softmax_ce(logits, labels):
    loss, correct = 0.0, 0
    for row, lab in zip(logits, labels):
        m = max(row)
        loss += m + math.log(sum(math.exp(v - m) for v in row)) - row[lab]
        correct += int(max(range(len(row)), key=lambda k, r=row: r[k]) == lab)
    return loss, correct


# ---------------------------------------------------------------- dense
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,i,o", [(1, 1, 1), (4, 3, 5), (7, 6, 2)])
def test_dense_forward_matches_naive(n, i, o, bias):
    x, w, b = rnd(n, i, seed=1), rnd(o, i, seed=2), (rnd(o, seed=3) if bias else None)
    np.testing.assert_allclose(dense_forward(x, w, b), ref_dense(x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,i,o", [(1, 1, 1), (4, 3, 5), (7, 6, 2)])
def test_dense_gradients(n, i, o):
    x, w, b, r = rnd(n, i, seed=1), rnd(o, i, seed=2), rnd(o, seed=3), rnd(n, o, seed=4)
    dx, dw, db = dense_backward(x, w, r)
    check_grad(lambda x, w, b: float((dense_forward(x, w, b) * r).sum()),
               {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db})
    assert dense_backward(x, w, r, need_dx=False)[0] is None


# ---------------------------------------------------------------- conv2d
CONV_CASES = [  # x shape, w shape, stride, padding
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 0),
    ((2, 3, 7, 6), (4, 3, 3, 2), 2, 1),  # stride 2, padding 1, non-square kernel, odd size
    ((1, 2, 6, 7), (3, 2, 2, 3), (2, 1), (0, 1)),
    ((2, 1, 6, 6), (2, 1, 3, 3), 2, 0),  # last row and column covered by no window
    ((1, 2, 4, 5), (3, 2, 1, 1), (1, 2), 2),
    ((1, 1, 3, 3), (1, 1, 3, 3), 1, 0),  # 1x1 output
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("xs,ws,s,p", CONV_CASES)
def test_conv2d_forward_matches_naive(xs, ws, s, p, bias):
    x, w, b = rnd(*xs, seed=1), rnd(*ws, seed=2), (rnd(ws[0], seed=3) if bias else None)
    y = conv2d_forward(x, w, b, stride=s, padding=p)
    np.testing.assert_allclose(y, ref_conv2d(x, w, b, s, p), rtol=1e-12, atol=1e-12)
    assert y.flags.c_contiguous


@settings(max_examples=25, deadline=None)
@given(h=st.integers(3, 7), w=st.integers(3, 7), kh=st.integers(1, 3), kw=st.integers(1, 3),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2))
def test_conv2d_forward_any_geometry(h, w, kh, kw, sh, sw, ph, pw):
    x, wt = rnd(2, 2, h, w, seed=h * w), rnd(3, 2, kh, kw, seed=kh + kw)
    y = conv2d_forward(x, wt, None, stride=(sh, sw), padding=(ph, pw))
    np.testing.assert_allclose(y, ref_conv2d(x, wt, None, (sh, sw), (ph, pw)), atol=1e-12)


@pytest.mark.parametrize("xs,ws,s,p", CONV_CASES)
def test_conv2d_gradients(xs, ws, s, p):
    x, w, b = rnd(*xs, seed=1), rnd(*ws, seed=2), rnd(ws[0], seed=3)
    r = rnd(*conv2d_forward(x, w, b, s, p).shape, seed=4)
    dx, dw, db = conv2d_backward(x, w, r, stride=s, padding=p)
    check_grad(lambda x, w, b: float((conv2d_forward(x, w, b, s, p) * r).sum()),
               {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db})
    assert conv2d_backward(x, w, r, stride=s, padding=p, need_dx=False)[0] is None


def test_conv2d_uncovered_input_gets_zero_gradient():
    x, w = rnd(1, 1, 6, 6, seed=1), rnd(1, 1, 3, 3, seed=2)  # windows cover rows/cols 0..4
    dx = conv2d_backward(x, w, np.ones((1, 1, 2, 2)), stride=2)[0]
    assert np.all(dx[0, 0, 5, :] == 0) and np.all(dx[0, 0, :, 5] == 0)
    assert np.all(dx[0, 0, :5, :5] != 0)
    full = numerical_grad(lambda x: float(conv2d_forward(x, w, None, 2).sum()), {"x": x}, "x")
    np.testing.assert_allclose(dx, full, atol=1e-8)


@pytest.mark.parametrize("c,o,k,s,p,algo", [(1, 6, 5, 1, 0, "direct"), (16, 32, 3, 1, 1, "gemm"),
                                             (3, 8, 3, 2, 1, "direct"), (16, 32, 3, 2, 0, "gemm")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_backward_halves_equal_the_whole(c, o, k, s, p, algo, dtype):
    """``need_dw=False`` gives the input gradient alone and ``need_dx=False`` the weight
    gradients alone (a layer's two backward ops in data parallel), bit for bit the whole call's,
    on every algorithm and in the reference."""
    from rapydli.kernels.conv import _algo, conv2d_backward_reference

    assert _algo(c, o, (k, k), (s, s), o * c * k * k) == algo
    x, w = rnd(4, c, 11, 11, seed=1, dtype=dtype), rnd(o, c, k, k, seed=2, dtype=dtype)
    ho = (11 + 2 * p - k) // s + 1
    dy = rnd(4, o, ho, ho, seed=3, dtype=dtype)
    for backward in (conv2d_backward, conv2d_backward_reference):
        dx, dw, db = backward(x, w, dy, s, p)
        dx_alone, none_w, none_b = backward(x, w, dy, s, p, need_dw=False)
        none_x, dw_alone, db_alone = backward(x, w, dy, s, p, need_dx=False)
        assert none_w is None and none_b is None and none_x is None
        np.testing.assert_array_equal(dx_alone, dx)
        np.testing.assert_array_equal(dw_alone, dw)
        np.testing.assert_array_equal(db_alone, db)


def test_conv2d_bad_shapes_raise():
    with pytest.raises(ShapeError, match="same C"):
        conv2d_forward(rnd(1, 2, 5, 5), rnd(1, 3, 3, 3), None)
    with pytest.raises(ShapeError, match="larger than the padded input"):
        conv2d_forward(rnd(1, 1, 2, 2), rnd(1, 1, 3, 3), None)
    with pytest.raises(ConfigError, match="stride"):
        conv2d_forward(rnd(1, 1, 5, 5), rnd(1, 1, 3, 3), None, stride=0)


# ---------------------------------------------------------------- pooling
POOL_CASES = [  # x shape, size, stride
    ((2, 3, 6, 6), 2, 2),
    ((2, 2, 7, 7), 3, 2),  # overlapping windows
    ((1, 2, 5, 8), (2, 3), (1, 2)),
    ((1, 1, 7, 6), (3, 2), (2, 3)),  # uncovered rows/cols
    ((1, 2, 4, 4), 2, 1),
]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("xs,size,stride", POOL_CASES)
def test_pool_forward_matches_naive(kind, xs, size, stride):
    x = rnd(*xs, seed=5)
    fwd = maxpool2d_forward if kind == "max" else avgpool2d_forward
    np.testing.assert_allclose(fwd(x, size, stride), ref_pool(kind, x, size, stride), atol=1e-12)


@pytest.mark.parametrize("xs,size,stride", POOL_CASES)
def test_pool_backward_matches_naive(xs, size, stride):
    x = distinct(*xs, seed=6)
    y = maxpool2d_forward(x, size, stride)
    dy = rnd(*y.shape, seed=7)
    np.testing.assert_allclose(maxpool2d_backward(x, y, dy, size, stride),
                               ref_maxpool_backward(x, dy, size, stride), atol=1e-12)
    np.testing.assert_allclose(avgpool2d_backward(xs, dy, size, stride, np.float64),
                               ref_avgpool_backward(xs, dy, size, stride), atol=1e-12)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("xs,size,stride", POOL_CASES)
def test_pool_gradients(kind, xs, size, stride):
    x = distinct(*xs, seed=8)
    fwd = maxpool2d_forward if kind == "max" else avgpool2d_forward
    y = fwd(x, size, stride)
    r = rnd(*y.shape, seed=9)
    if kind == "max":
        dx = maxpool2d_backward(x, y, r, size, stride)
    else:
        dx = avgpool2d_backward(x.shape, r, size, stride, np.float64)
    check_grad(lambda x: float((fwd(x, size, stride) * r).sum()), {"x": x}, {"x": dx})


def test_maxpool_ties_go_to_first_max():
    x = np.array([[1.0, 3.0, 3.0], [3.0, 0.0, 3.0], [2.0, 2.0, 2.0]]).reshape(1, 1, 3, 3)
    dx = maxpool2d_backward(x, None, np.array([10.0, 20.0, 30.0, 40.0]).reshape(1, 1, 2, 2), 2, 1)
    # windows (0,0) and (0,1) both pick (0,1): 10 + 20; (1,0) picks (1,0); (1,1) picks (1,2)
    expected = [[0.0, 30.0, 0.0], [30.0, 0.0, 40.0], [0.0, 0.0, 0.0]]
    np.testing.assert_array_equal(dx[0, 0], expected)
    np.testing.assert_array_equal(dx, ref_maxpool_backward(x, np.arange(1.0, 5).reshape(1, 1, 2, 2)
                                                           * 10, 2, 1))


# ---------------------------------------------------------------- activations
@pytest.mark.parametrize("kind", [*ACTIVATIONS, None, "linear"])
def test_activation_forward_and_gradient(kind):
    x = distinct(3, 5, seed=10)  # no value within 0.05 of the relu kink
    y = activation_forward(kind, x)
    np.testing.assert_allclose(y, ref_activation(kind, x), rtol=1e-13, atol=1e-15)
    r = rnd(3, 5, seed=11)
    dx = activation_backward(kind, y, r)
    check_grad(lambda x: float((activation_forward(kind, x) * r).sum()), {"x": x}, {"x": dx})


def test_sigmoid_is_stable_for_extreme_inputs():
    x = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        y = activation_forward("sigmoid", x)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, [0.0, 4.248354e-18, 0.5, 1.0, 1.0], rtol=1e-6)


def test_float32_sigmoid_matches_the_exact_one_over_its_whole_range():
    """The float32 path computes exp with a polynomial (no libm call, so it vectorises)."""
    x = np.linspace(-120, 120, 480_001, dtype=np.float32)
    y = activation_forward("sigmoid", x)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    big = exact > 1e-30
    assert np.max(np.abs(y[big] - exact[big]) / exact[big]) < 1e-6
    assert np.max(np.abs(y - exact)) < 2e-7 and y[0] == 0.0 and y[-1] == 1.0
    assert np.all(np.diff(y) >= 0), "monotone"


@pytest.mark.parametrize("bad", ["relux", "ReLU", "softmax", ""])
def test_unknown_activation_raises_config_error(bad):
    msg = rf"unknown activation '{bad}'; expected one of 'relu', 'sigmoid', 'tanh' or None"
    with pytest.raises(ConfigError, match=msg):
        activation_forward(bad, np.zeros(2))
    with pytest.raises(ConfigError, match="unknown activation"):
        activation_backward(bad, np.zeros(2), np.zeros(2))


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("n,k", [(1, 2), (6, 4), (9, 10)])
def test_softmax_cross_entropy(n, k, scale):
    logits = rnd(n, k, seed=12) * 3
    labels = np.random.default_rng(13).integers(0, k, n)
    labels[: n // 2] = logits[: n // 2].argmax(axis=1)  # make some predictions correct
    loss, dlogits, n_correct = softmax_cross_entropy(logits, labels, scale)
    ref_loss, ref_correct = ref_softmax_ce(logits, labels)
    assert isinstance(loss, float) and isinstance(n_correct, int)
    assert loss == pytest.approx(scale * ref_loss, rel=1e-12)
    assert n_correct == ref_correct >= n // 2
    check_grad(lambda logits: softmax_cross_entropy(logits, labels, scale)[0],
               {"logits": logits}, {"logits": dlogits})


def test_softmax_cross_entropy_is_stable():
    logits = np.array([[1000.0, 0.0, -1000.0], [-500.0, -500.0, -500.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise"):
        loss, d, n_correct = softmax_cross_entropy(logits, np.array([1, 0]), 1.0)
    assert loss == pytest.approx(1000.0 + math.log(3.0), rel=1e-6)
    assert d.dtype == np.float32 and np.all(np.isfinite(d)) and n_correct == 1


@pytest.mark.parametrize("shape,expect_counted", [((5, 3), True), ((5, 1), False), ((5,), False)])
def test_mse(shape, expect_counted):
    pred, target = rnd(*shape, seed=14), rnd(*shape, seed=15)
    target[:2] = pred[:2] * 2  # same argmax on the first two rows
    loss, dpred, n_correct = mse(pred, target, 0.5)
    assert loss == pytest.approx(0.5 * sum(float(v) ** 2 for v in (pred - target).ravel()))
    if expect_counted:
        ref = sum(int(np.argmax(p) == np.argmax(t)) for p, t in zip(pred, target))
        assert n_correct == ref >= 2
    else:
        assert n_correct == 0
    check_grad(lambda pred: mse(pred, target, 0.5)[0], {"pred": pred}, {"pred": dpred})
    assert LOSSES == ("softmax_cross_entropy", "mse")


# ---------------------------------------------------------------- optimiser
@pytest.mark.parametrize("nesterov,expected", [  # worked by hand in the comments of the test
    (False, ([0.949, -2.008], [0.922151, -2.043192], [0.26849, 0.35192])),
    (True, ([0.9031, -2.0152], [0.89807411, -2.07485112], [0.268031, 0.351848])),
])
def test_sgd_two_steps_by_hand(nesterov, expected):
    # lr=0.1, momentum=0.9, wd=0.01. Step 1: g2 = g + 0.01 w = [0.51, 0.08] = v1.
    # plain: w1 = w - 0.1 v1; nesterov: step = g2 + 0.9 v1 = [0.969, 0.152].
    # Step 2: g2 = g' + 0.01 w1; v2 = 0.9 v1 + g2; step = v2 or g2 + 0.9 v2.
    w0, v0 = np.array([1.0, -2.0]), None
    w1, v1 = sgd_update(w0, np.array([0.5, 0.1]), v0, 0.1, 0.9, 0.01, nesterov)
    w2, v2 = sgd_update(w1, np.array([-0.2, 0.3]), v1, 0.1, 0.9, 0.01, nesterov)
    np.testing.assert_allclose(w1, expected[0], rtol=1e-12)
    np.testing.assert_allclose(w2, expected[1], rtol=1e-12)
    np.testing.assert_allclose(v2, expected[2], rtol=1e-12)
    np.testing.assert_array_equal(w0, [1.0, -2.0])  # inputs untouched


def test_sgd_without_momentum():
    w = np.array([1.0, -2.0], dtype=np.float32)
    w_new, v_new = sgd_update(w, np.array([0.5, 0.1], dtype=np.float32), None, lr=0.1,
                              weight_decay=0.01)
    assert v_new is None and w_new.dtype == np.float32
    np.testing.assert_allclose(w_new, [0.949, -2.008], rtol=1e-6)


# ---------------------------------------------------------------- dtypes and purity
def _calls(dt: type) -> dict[str, tuple]:
    """name -> (kernel, positional args) with floating inputs of dtype ``dt``."""
    x2, w2, dy2 = rnd(4, 3, dtype=dt), rnd(5, 3, dtype=dt), rnd(4, 5, dtype=dt)
    x4, w4, b4 = rnd(2, 3, 7, 6, dtype=dt), rnd(4, 3, 3, 2, dtype=dt), rnd(4, dtype=dt)
    dyc, dyp = rnd(2, 4, 4, 4, dtype=dt), rnd(2, 3, 3, 2, dtype=dt)
    return {
        "dense_forward": (dense_forward, (x2, w2, rnd(5, dtype=dt))),
        "dense_backward": (dense_backward, (x2, w2, dy2)),
        "conv2d_forward": (conv2d_forward, (x4, w4, b4, 2, 1)),
        "conv2d_backward": (conv2d_backward, (x4, w4, dyc, 2, 1)),
        "maxpool2d_forward": (maxpool2d_forward, (x4, 3, 2)),
        "maxpool2d_backward": (maxpool2d_backward, (x4, dyp, dyp, 3, 2)),
        "avgpool2d_forward": (avgpool2d_forward, (x4, 3, 2)),
        "avgpool2d_backward": (avgpool2d_backward, (x4.shape, dyp, 3, 2, dt)),
        **{f"activation_forward-{k}": (activation_forward, (k, x2)) for k in (*ACTIVATIONS, None)},
        **{f"activation_backward-{k}": (activation_backward, (k, x2, x2 * 2))
           for k in (*ACTIVATIONS, None)},
        "softmax_cross_entropy": (softmax_cross_entropy, (dy2, np.array([0, 4, 2, 1]), 0.5)),
        "mse": (mse, (dy2, dy2 * 0.5, 0.5)),
        "sgd_update": (sgd_update, (x2, x2 * 0.1, x2 * 0.2, 0.1, 0.9, 0.01, True)),
    }


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(_calls(np.float64)))
def test_dtype_kept_and_inputs_untouched(name, dt):
    fn, args = _calls(dt)[name]
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    out = fn(*args)
    arrays = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, np.ndarray)]
    assert arrays, f"{name} returned no array"
    assert all(a.dtype == dt for a in arrays), [a.dtype for a in arrays]
    for old, new in zip(before, args):
        if isinstance(old, np.ndarray):
            np.testing.assert_array_equal(old, new, err_msg=f"{name} modified its input")
    assert not any(o is a for o in arrays for a in args), f"{name} returned an input object"


# ---------------------------------------------------------------- backends
def test_backend_dispatch():
    assert get_array_module(np.zeros(2)) is np and get_array_module([1.0]) is np
    assert available_backends()[0] == "numpy"


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=[pytest.mark.gpu] if b == "cupy" else []) for b in available_backends()
])
def test_conv2d_forward_on_each_backend(backend):
    xp = __import__(backend)
    x, w, b = rnd(2, 3, 7, 6, seed=20), rnd(4, 3, 3, 2, seed=21), rnd(4, seed=22)
    y = conv2d_forward(*(xp.asarray(a, dtype=xp.float32) for a in (x, w, b)), stride=2, padding=1)
    assert get_array_module(y) is xp and y.dtype == xp.float32
    y_host = y.get() if backend == "cupy" else y
    np.testing.assert_allclose(y_host, ref_conv2d(x, w, b, 2, 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the gradient checker itself
def test_check_grad_catches_errors():
    x, w, r = rnd(4, 3, seed=1), rnd(5, 3, seed=2), rnd(4, 5, seed=3)
    _, dw, _ = dense_backward(x, w, r)

    def f(x, w):
        return float((dense_forward(x, w, None) * r).sum())

    check_grad(f, {"x": x, "w": w}, {"w": dw})
    off = dw.copy()
    off[1, 2] += 1e-4
    with pytest.raises(AssertionError, match="gradient mismatch for 'w'"):
        check_grad(f, {"x": x, "w": w}, {"w": off})
    with pytest.raises(AssertionError, match="shape"):
        check_grad(f, {"x": x, "w": w}, {"w": dw.T})

    def mutating(x, w):
        x *= 2
        return f(x, w)

    with pytest.raises(AssertionError, match="modified argument 'x'"):
        check_grad(mutating, {"x": x, "w": w}, {"w": dw})
