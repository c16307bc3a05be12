"""The command shell end to end: plan output and drawing, a short training run, errors."""
from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest

from rapydli.cli import main
from rapydli.storage.checkpoint import load_checkpoint

TINY = textwrap.dedent("""
    data: {name: synthetic, n_samples: 240, seed: 0}
    network:
      input_shape: [1, 8, 8]
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: 1, activation: relu}
        - {type: MaxPool2D, pool_size: 2}
        - {type: Flatten}
        - {type: Dense, units: 16, activation: relu}
        - {type: Dense, units: 10}
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
    train: {epochs: 3, batch_size: 32, seed: 0}
    placement: {preset: hybrid, mesh: {data: 1, model: 2}}
""")


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_plan_prints_counts_and_draws(tiny_config, tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["plan", str(tiny_config), "--draw", str(png)]) == 0
    out = capsys.readouterr().out
    tasks = int(re.search(r"dask tasks per step: (\d+) fused \((\d+) unfused\)", out).group(1))
    assert 0 < tasks
    assert re.search(r"worker 0 -> worker 1: [\d,]+ bytes", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_mesh_override_changes_the_plan(tiny_config, capsys):
    main(["plan", str(tiny_config)])
    two = capsys.readouterr().out
    main(["plan", str(tiny_config), "--mesh", "data=2,model=2"])
    four = capsys.readouterr().out
    assert "Mesh(data=2, model=2)" in four and "worker 3" in four and "worker 3" not in two


def test_train_writes_metrics_checkpoint_and_curve(tiny_config, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(tiny_config), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("loss", "train_accuracy", "test_accuracy", "samples_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    params, state, meta = load_checkpoint(out)
    assert params["3.weight"].shape == (16, 64) and params["0.weight"].shape == (4, 1, 3, 3)
    assert set(state) == {f"velocity/{k}" for k in params}
    assert (meta["epoch"], meta["epoch_step"], len(meta["history"])) == (4, 0, 3)  # next to run
    assert (out / "loss.png").exists()


def test_bad_config_exits_with_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.replace("type: Flatten", "type: Flaten"))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Flaten" in err and "Flatten" in err


def test_unreachable_scheduler_is_named(tiny_config, capsys):
    assert main(["train", str(tiny_config), "--scheduler", "tcp://127.0.0.1:9",
                 "--no-progress"]) == 2
    assert "tcp://127.0.0.1:9" in capsys.readouterr().err


def exchange_choices(command):
    """The ``--exchange`` choices of ``rapydli COMMAND``, read off the real parser."""
    import argparse

    from rapydli.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (option,) = [a for a in sub.choices[command]._actions if a.dest == "exchange"]
    return tuple(option.choices)


def test_exchange_choices_are_the_ones_the_engine_and_the_simulator_run():
    from rapydli.scheduler.engine import EXCHANGES

    # the documented choices of `rapydli train --exchange`; "auto" lets the engine pick
    assert exchange_choices("train") == ("auto", "direct", "graph")
    assert set(EXCHANGES) == {"auto", "direct", "graph"}
    # the simulator models every exchange the engine can run, and no other
    assert set(exchange_choices("simulate")) == set(EXCHANGES) - {"auto"}


@pytest.mark.slow
def test_main_job_reaches_97_percent(tmp_path):
    """The README's main job: digits CNN, hybrid placement on 2 worker processes."""
    out = tmp_path / "digits"
    assert main(["train", "examples/digits_cnn.yaml", "--out", str(out), "--no-progress"]) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_accuracy"] >= 0.97


def test_train_on_an_existing_scheduler(tiny_config, tmp_path, monkeypatch):
    """``--scheduler ADDR`` uses a running cluster instead of starting one."""
    from distributed import LocalCluster

    import rapydli.scheduler.cluster as cluster_mod

    def no_local_cluster(*args, **kwargs):
        raise AssertionError("started an embedded cluster although --scheduler was given")

    monkeypatch.setattr(cluster_mod, "local_client", no_local_cluster)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                      protocol="tcp") as cluster:
        out = tmp_path / "run"
        assert main(["train", str(tiny_config), "--scheduler", cluster.scheduler_address,
                     "--out", str(out), "--no-progress", "--epochs", "1",
                     "--steps-per-task", "2", "--exchange", "graph"]) == 0
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


STORE_CONFIG = textwrap.dedent("""
    data: {{store: {store}, test_fraction: 0.2, seed: 0, distribution: balanced}}
    network:
      input_shape: [1, 8, 8]
      layers:
        - {{type: Flatten}}
        - {{type: Dense, units: 32, activation: relu}}
        - {{type: Dense, units: 10}}
    optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
    train: {{epochs: 3, batch_size: 64, seed: 0, checkpoint_every: 10, keep_checkpoints: 2}}
    placement: {{preset: single}}
""")


def test_data_import_inspect_train_from_the_store_and_export(tmp_path, capsys):
    """The storage path end to end on the command line: digits -> LMDB shards -> a run that
    reads them -> report.json -> an ONNX model whose outputs match rapydli.predict."""
    onnxruntime = pytest.importorskip("onnxruntime")
    store = tmp_path / "digits-lmdb"
    assert main(["data", "import", "digits", str(store), "--format", "lmdb", "--shards", "3",
                 "--partition", "round_robin"]) == 0
    assert main(["data", "inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "1797" in out and "shard-00002" in out and "lmdb" in out
    config = tmp_path / "store.yaml"
    config.write_text(STORE_CONFIG.format(store=store))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["n_skipped"] == 0 and report["events"] == []
    assert report["final"]["test_accuracy"] > 0.85
    assert len(list(run.glob("ckpt-*.npz"))) == 2  # keep_checkpoints
    assert main(["export", str(run), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0

    import rapydli as rd
    from rapydli.storage.export import network_from_config

    params, _, meta = load_checkpoint(run)
    net = network_from_config(meta["network"])
    x = np.random.default_rng(0).random((50, 1, 8, 8), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    (onnx_out,) = session.run(None, {"input": x})
    np.testing.assert_allclose(onnx_out, rd.predict(net, params, x), atol=1e-5)


def test_bad_store_location_is_named(tmp_path, capsys):
    config = tmp_path / "store.yaml"
    config.write_text(STORE_CONFIG.format(store=tmp_path / "nowhere"))
    assert main(["train", str(config), "--no-progress"]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


RESUME_CONFIG = TINY.replace("train: {epochs: 3, batch_size: 32, seed: 0}",
                             "train: {epochs: 3, batch_size: 32, seed: 0, dtype: float64, "
                             "checkpoint_every: 4}").replace(
    "placement: {preset: hybrid, mesh: {data: 1, model: 2}}", "placement: {preset: single}")


def test_train_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    """A real SIGKILL of `rapydli train` after its first checkpoint, then `--resume`: the final
    weights equal an uninterrupted run's bit for bit (one worker, float64)."""
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "resume.yaml"
    config.write_text(RESUME_CONFIG)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", str(config), "--out", str(whole), "--no-progress"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "rapydli.cli", "train", str(config), "--out",
                             str(cut), "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(cut.glob("ckpt-*.npz")) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    _, _, meta = load_checkpoint(cut)
    assert meta["step"] < 18, "the run finished before it could be killed"
    assert main(["train", str(config), "--resume", str(cut), "--no-progress"]) == 0
    done, _, done_meta = load_checkpoint(cut)
    reference, _, ref_meta = load_checkpoint(whole)
    assert done_meta["step"] == ref_meta["step"] == 18  # 192 train samples / 32 * 3 epochs
    for name, value in reference.items():
        np.testing.assert_array_equal(done[name], value)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
