"""Sparse autoencoders: the KL sparsity penalty through the lowered graph (values, gradients,
distributed equals single-worker), greedy pretraining, the patches data set, the unsupervised
report and ``rapydli visualize``."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from gradcheck import check_grad, numerical_grad
from test_equivalence import assert_same_as_single

import rapydli as rd
from rapydli.config import DataConfig, parse_config
from rapydli.graph.lower import lower
from rapydli.layers import from_config
from rapydli.storage.checkpoint import save_checkpoint
from rapydli.storage.datasets import load_dataset, patches
from rapydli.unsupervised import (
    SparsityPenalty,
    encode,
    localization,
    pretrain_stack,
    report_unsupervised,
    sparse_autoencoder,
    sparse_autoencoder_objective,
)
from rapydli.visualize import (
    add_visualize_parser,
    optimal_stimulus,
    unit_activation_and_grad,
    visualize_unit,
)

TARGET, BETA = 0.1, 3.0


def _batch(n=5, features=6, seed=0):
    return np.random.default_rng(seed).uniform(0.1, 0.9, (n, features))


def _reference(params, x, weight_decay=0.0):
    """The sparse-autoencoder objective written out in NumPy (UFLDL's, in rapydli's mse)."""
    a = 1 / (1 + np.exp(-(x @ params["0.weight"].T + params["0.bias"])))  # (N, hidden)
    h = 1 / (1 + np.exp(-(a @ params["2.weight"].T + params["2.bias"])))  # (N, features)
    rho_hat = a.mean(axis=0)
    kl = TARGET * np.log(TARGET / rho_hat) + (1 - TARGET) * np.log((1 - TARGET) / (1 - rho_hat))
    decay = 0.5 * weight_decay * sum((p ** 2).sum() for p in params.values())
    return np.mean((h - x) ** 2) + BETA * kl.sum() + decay


@pytest.fixture
def autoencoder():
    net = sparse_autoencoder(6, 4, TARGET, BETA)
    rng = np.random.default_rng(1)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in net.init(1, np.float64).items()}
    return net, params


# --- the objective: value and finite differences ------------------------------------------


def test_objective_value_matches_numpy(autoencoder):
    net, params = autoencoder
    x = _batch()
    loss, _ = rd.value_and_grad(net, params, x, x)
    assert loss == pytest.approx(_reference(params, x), rel=1e-12)
    value, _ = sparse_autoencoder_objective(net, params, x, weight_decay=0.01)
    assert value == pytest.approx(_reference(params, x, 0.01), rel=1e-12)
    assert rd.evaluate(net, params, x, x)[0] == pytest.approx(loss, rel=1e-12)  # eval counts it


def test_total_objective_gradients_match_finite_differences(autoencoder):
    net, params = autoencoder
    x = _batch()
    _, grads = sparse_autoencoder_objective(net, params, x, weight_decay=0.01)

    def f(**p):
        return sparse_autoencoder_objective(net, p, x, weight_decay=0.01)[0]

    check_grad(f, params, grads, eps=1e-6, rtol=1e-6, n_dirs=2)
    full = numerical_grad(lambda w: _reference({**params, "0.weight": w}, x, 0.01),
                          {"w": params["0.weight"]}, "w")  # the encoder, every coordinate
    np.testing.assert_allclose(grads["0.weight"], full, rtol=1e-6, atol=1e-9)


def test_penalty_layer_contract():
    layer = from_config({"type": "SparsityPenalty", "target": 0.05, "beta": 3.0})
    assert layer == SparsityPenalty(0.05, 3.0) and layer.output_shape((7,)) == (7,)
    assert from_config(layer.get_config()) == layer
    for bad in ({"target": 0.0}, {"target": 1.5}, {"beta": -1.0}):
        with pytest.raises(rd.ConfigError, match="SparsityPenalty"):
            SparsityPenalty(**bad)
    cfg = parse_config({"network": {"input_shape": [4], "loss": "mse", "layers": [
        {"type": "Dense", "units": 3, "activation": "sigmoid"},
        {"type": "SparsityPenalty", "target": 0.05}, {"type": "Dense", "units": 4}]}})
    assert isinstance(cfg.network.build().layers[1], SparsityPenalty)


# --- whole-batch statistics under every placement -----------------------------------------


CUT_UNITS = rd.model_parallel(3).with_tiling("1", rd.Tiling(features="model"))


@pytest.mark.parametrize("placement", [
    rd.data_parallel(2), rd.data_parallel(3), rd.model_parallel(2), rd.hybrid(3, 1), CUT_UNITS,
], ids=["dp2", "dp3", "mp2", "hy31", "penalty-units-cut-3"])
def test_distributed_equals_single(client, autoencoder, placement):
    net, params = autoencoder
    x = _batch(7)  # uneven over 2 and 3 batch tiles
    want = rd.value_and_grad(net, params, x, x)
    loss, grads = rd.value_and_grad(net, params, x, x, placement=placement, client=client)
    assert_same_as_single(loss, want[0], "float64", "objective")
    assert_same_as_single(grads, want[1], "float64", "grads")


def test_batch_and_units_cut_in_process(autoencoder):
    """Mesh(data=2, model=2) with the penalty cut both ways, run in-process (no cluster)."""
    from rapydli.scheduler.engine import Engine

    net, params = autoencoder
    x = _batch(7)
    placement = rd.hybrid(2, 2).with_tiling("1", rd.Tiling(batch="data", features="model"))
    engine = Engine(net, placement, None, None, "float64")
    engine.set_params(params)
    engine.set_data("b", x, x)
    out = engine.run("grad", np.arange(7), "b")
    want_loss, want = rd.value_and_grad(net, params, x, x)
    assert_same_as_single(engine.value(out["metrics"])[0], want_loss, "float64", "objective")
    for name, tiles in out["grads"].items():
        for region, bound in tiles:
            index = tuple(slice(a, b) for a, b in region)
            assert_same_as_single(engine.value(bound), want[name][index], "float64", name)
    assert len(out["grads"]) == 4
    engine.close()


def test_three_sgd_steps_data_parallel_equal_single(client, autoencoder):
    net, params = autoencoder
    x = _batch(15)
    kw = dict(optimizer=rd.SGD(lr=0.5, momentum=0.9, weight_decay=1e-3), epochs=1,
              batch_size=5, params=params, dtype="float64")
    want = rd.fit(net, x, x, **kw)
    got = rd.fit(net, x, x, placement=rd.data_parallel(2), client=client, **kw)
    assert_same_as_single(got.params, want.params, "float64", "params after 3 steps")
    assert_same_as_single(got["loss"], want["loss"], "float64", "epoch objective")


def test_unrolled_steps_count_the_penalty(autoencoder):
    net, params = autoencoder
    x = _batch(15)
    kw = dict(optimizer=rd.SGD(lr=0.5, momentum=0.9), epochs=1, batch_size=5, params=params,
              dtype="float64")
    want = rd.fit(net, x, x, **kw)
    got = rd.fit(net, x, x, steps_per_task=3, **kw)
    assert_same_as_single(got.params, want.params, "float64", "params after 3 steps")
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)


def test_data_parallel_moves_unit_sums_not_activations(autoencoder):
    """Under data_parallel(2) the penalty adds one all-reduce of the hidden units' sums."""
    net, _ = autoencoder
    g = lower(net, rd.data_parallel(2), batch=8, mode="grad", dtype="float64")
    g.validate()
    crossing = [(u, size) for u, v, size in g.crossing_edges() if u.startswith("1/")]
    assert sorted(size for _, size in crossing) == [4 * 8, 4 * 8]  # 4 units, float64, each way
    assert len(g.ops(kind="penalty")) == 2 + 2 + 2  # stats, penalty, dy+penalty per tile
    assert len(g.op("metrics").inputs) == 2 + 1  # two loss tiles, one penalty value


# --- greedy layer-wise pretraining ------------------------------------------------------


def test_pretrain_stack_trains_each_stage_and_stacks():
    x = load_dataset(DataConfig("digits", n_samples=300), "float64").x_train  # in [0, 1]
    stack = pretrain_stack([16, 8], x, target=0.1, beta=0.1, epochs=8, batch_size=20,
                           optimizer=rd.SGD(lr=2.0, momentum=0.9), dtype="float64")
    assert [e["weight"].shape for e in stack.encoders] == [(16, 64), (8, 16)]
    for before, after in stack.errors:
        assert after < 0.5 * before
    net = stack.network()
    x = x.reshape(len(x), 64)
    codes = rd.predict(net, stack.params(), x)
    np.testing.assert_allclose(codes, encode(stack.encoders[1], encode(stack.encoders[0], x)),
                               rtol=1e-12)
    clf = stack.network(head=[rd.Dense(3)])  # a classifier on top keeps the encoders
    params = stack.params(clf)
    assert np.array_equal(params["1.weight"], stack.encoders[1]["weight"])
    assert params["2.weight"].shape == (3, 8)


# --- data -----------------------------------------------------------------------------


def test_patches_are_seeded_whitened_and_in_range():
    pytest.importorskip("skimage")
    a, b, c = patches(2000, seed=0), patches(2000, seed=0), patches(2000, seed=1)
    assert a.shape == (2000, 64) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a.mean(axis=1)).max() < 1e-9  # each patch's mean removed
    strongest = np.linalg.eigvalsh(np.cov(a.T))[-5:]  # var / (var + epsilon): 1 at most
    assert 0.6 < strongest.min() and strongest.max() < 1
    raw = patches(2000, seed=0, epsilon=1e9)  # epsilon dwarfs every eigenvalue: no whitening
    spread = [np.linalg.eigvalsh(np.cov(z.T))[1:] for z in (a, raw)]  # drop the DC direction
    assert spread[0].max() / spread[0].min() < 0.2 * spread[1].max() / spread[1].min()
    squashed = patches(2000, seed=0, rescale=True)  # for sigmoid outputs: same, in [0.1, 0.9]
    assert squashed.min() >= 0.1 and squashed.max() <= 0.9
    off = np.abs(squashed.mean(axis=1) - 0.5)  # each patch's mean removed (but for clipped ones)
    assert np.median(off) < 1e-9 and off.max() < 0.15
    inside = np.abs(a) < 3 * a.std()  # unclipped values: an affine map of the whitened ones
    assert np.corrcoef(a[inside], squashed[inside])[0, 1] > 1 - 1e-12
    ds = load_dataset(DataConfig("patches", n_samples=500, patch_size=6))
    assert ds.x_train.shape == (400, 36) and ds.targets and ds.n_classes == 0
    assert np.array_equal(ds.x_train, ds.y_train)
    with pytest.raises(rd.ConfigError, match="patch_size"):
        DataConfig("patches", patch_size=1)


def test_train_command_on_patches(client, tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    import rapydli.scheduler.cluster as cluster_mod
    from rapydli.cli import main

    monkeypatch.setattr(cluster_mod, "connect", lambda *args, **kwargs: client)  # ours stays open

    config = tmp_path / "ae.yaml"
    config.write_text("""
data: {name: patches, n_samples: 400}
network:
  input_shape: [64]
  loss: mse
  layers:
    - {type: Dense, units: 16, activation: sigmoid}
    - {type: SparsityPenalty, target: 0.05, beta: 0.1}
    - {type: Dense, units: 64, activation: sigmoid}
optimizer: {lr: 1.0, momentum: 0.9}
train: {epochs: 2, batch_size: 40}
""")
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress",
                 "--scheduler", "tcp://fixture:1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["test_loss"]) for r in rows)


@pytest.mark.slow
def test_example_learns_localized_filters(tmp_path):
    """examples/sparse_autoencoder.yaml (about a minute): its filters are localized edges,
    clearly more so than random filters by the reported figure."""
    pytest.importorskip("skimage")
    from rapydli.cli import main

    out = tmp_path / "ae"
    assert main(["train", "examples/sparse_autoencoder.yaml", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "unsupervised.json").read_text())
    loc = report["localization"]
    assert loc["learned"] >= 0.75 and loc["learned"] >= loc["random"] + 0.1
    assert abs(report["mean_activation"] - report["target"]) < 0.02


# --- the report and visualize ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny sparse autoencoder trained on patches for a few epochs, and its run directory."""
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    x = patches(600, seed=3).astype("float32")
    net = sparse_autoencoder(64, 16, 0.05, 0.1, output_activation=None)  # whitened: linear out
    history = rd.fit(net, x, x, optimizer=rd.SGD(lr=2.0, momentum=0.9), epochs=6,
                     batch_size=20)
    run = tmp_path_factory.mktemp("ae")
    save_checkpoint(run, history.params, history.opt_state, {"network": net.get_config()})
    return net, history.params, x, run


def test_report_unsupervised(trained, capsys):
    net, params, x, run = trained
    report = report_unsupervised(run, net, params, x)
    assert (run / "filters.png").stat().st_size > 0
    assert json.loads((run / "unsupervised.json").read_text()) == report
    assert report["target"] == 0.05 and 0 < report["mean_activation"] < 0.2
    assert 0 < report["reconstruction_error"] < np.var(x, axis=0).mean()
    loc = report["localization"]
    assert 0.2 <= loc["learned"] <= 1 and 0.55 < loc["random"] < 0.72
    assert "localization" in capsys.readouterr().out
    assert report_unsupervised(run, rd.Sequential([rd.Dense(3)], input_shape=(4,)), {}, x) is None
    assert localization(np.eye(25)) > 0.9


def test_optimal_stimulus_beats_top_k_and_is_the_weight_direction(trained, tmp_path):
    net, params, x, _ = trained
    unit = 3
    result = visualize_unit(net, params, "0", unit, x.astype(np.float64), top_k=8,
                            path=tmp_path / "unit.png", steps=200)
    assert (tmp_path / "unit.png").stat().st_size > 0
    assert np.linalg.norm(result["stimulus"]) == pytest.approx(1.0, abs=1e-12)
    assert result["stimulus_activation"] >= result["top_activations_norm1"].max()
    w = params["0.weight"][unit].astype(np.float64)  # sigmoid(w.x + b): best is w / |w|
    assert result["stimulus"] @ w / np.linalg.norm(w) > 0.999
    assert list(result["top_activations"]) == sorted(result["top_activations"], reverse=True)


def test_input_gradient_through_padded_conv_and_pool():
    net = rd.Sequential([rd.Conv2D(2, 3, padding=1, activation="tanh"), rd.MaxPool2D(2),
                         rd.Flatten(), rd.Dense(3, activation="sigmoid")], input_shape=(1, 6, 6))
    params = net.init(0, np.float64)
    x = np.random.default_rng(0).normal(size=(2, 1, 6, 6))
    act, grad = unit_activation_and_grad(net, params, x, 3, 1)
    np.testing.assert_allclose(act, rd.predict(net, params, x)[:, 1], rtol=1e-12)
    full = numerical_grad(lambda x: float(unit_activation_and_grad(net, params, x, 3, 1)[0]
                                          .sum()), {"x": x}, "x")
    np.testing.assert_allclose(grad, full, rtol=1e-5, atol=1e-9)
    stim, best = optimal_stimulus(net, params, "1", 5, x, steps=100)
    assert stim.shape == (1, 6, 6) and np.linalg.norm(stim) == pytest.approx(1.0)
    norm1 = x / np.linalg.norm(x.reshape(2, -1), axis=1)[:, None, None, None]
    starts, _ = unit_activation_and_grad(net, params, norm1, 1, 5)
    assert best >= starts.max() and best == pytest.approx(
        unit_activation_and_grad(net, params, stim[None], 1, 5)[0][0])


def test_visualize_command(trained, tmp_path, capsys):
    from rapydli.visualize import cmd_visualize

    _, _, _, run = trained
    parser = argparse.ArgumentParser(prog="rapydli")
    add_visualize_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "u.png"
    args = parser.parse_args(["visualize", str(run), "--layer", "1", "--unit", "2", "--data",
                              "patches", "--top-k", "4", "--steps", "50", "-o", str(out)])
    assert args.func is cmd_visualize and args.func(args) == 0
    assert out.stat().st_size > 0 and "optimal norm-1 stimulus" in capsys.readouterr().out
    bad = parser.parse_args(["visualize", str(run), "--layer", "9", "--unit", "0"])
    with pytest.raises(rd.ConfigError, match="no layer named '9'"):
        cmd_visualize(bad)
