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
                     "--steps-per-task", "2"]) == 0
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
