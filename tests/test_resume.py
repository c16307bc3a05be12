"""Checkpoints every N steps, resume where a run stopped, and runs that survive a killed worker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import rapydli as rd
from rapydli.storage.checkpoint import Checkpoints, load_checkpoint
from rapydli.storage.datasets import synthetic


class Stop(Exception):
    """Stands for a run interrupted right after writing a checkpoint."""


@pytest.fixture(scope="module")
def problem():
    x, y = synthetic(200, seed=3)
    net = rd.Sequential([rd.Conv2D(4, 3, padding=1, activation="relu"), rd.MaxPool2D(2),
                         rd.Flatten(), rd.Dense(10)], input_shape=(1, 8, 8))
    return net, x, y


def _fit(net, x, y, directory, **kwargs):
    kwargs = {"optimizer": rd.SGD(lr=0.1, momentum=0.9), "epochs": 3, "batch_size": 32,
              "seed": 1, "dtype": "float64", "checkpoints": Checkpoints(directory, keep=2),
              "checkpoint_every": 5, **kwargs}
    return rd.fit(net, x, y, **kwargs)


def _stop_at(n):
    seen = []

    def on_checkpoint(path, meta):
        seen.append(meta["step"])
        if len(seen) == n:
            raise Stop(path)
    return on_checkpoint


def test_checkpoints_every_n_steps_keep_the_last_k(problem, tmp_path):
    net, x, y = problem
    history = _fit(net, x, y, tmp_path)
    paths = Checkpoints(tmp_path).paths()
    # 200 samples / 32 = 7 steps per epoch, 21 in all: checkpoints at 5, 10, 15, 20 and the end
    assert [p.name for p in paths] == ["ckpt-000000020.npz", "ckpt-000000021.npz"]
    params, state, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 21 and meta["epoch"] == 4 and meta["epoch_step"] == 0
    for name, value in history.params.items():
        np.testing.assert_array_equal(params[name], value)
    assert set(state) == {f"velocity/{k}" for k in history.params}


def test_resumed_run_ends_with_the_same_weights_bitwise(problem, tmp_path):
    """Interrupted mid-epoch 2 (after the checkpoint at step 10) and resumed from disk."""
    net, x, y = problem
    full = _fit(net, x, y, tmp_path / "full")
    with pytest.raises(Stop):
        _fit(net, x, y, tmp_path / "cut", on_checkpoint=_stop_at(2))
    params, state, meta = load_checkpoint(tmp_path / "cut")
    assert (meta["step"], meta["epoch"], meta["epoch_step"]) == (10, 2, 3)
    resumed = _fit(net, x, y, tmp_path / "cut", resume=(params, state, meta))
    for name, value in full.params.items():
        np.testing.assert_array_equal(resumed.params[name], value)
    assert resumed["epoch"] == [1, 2, 3]
    np.testing.assert_allclose(resumed["loss"], full["loss"], rtol=1e-12)
    np.testing.assert_array_equal(resumed["train_accuracy"], full["train_accuracy"])


def test_checkpoint_from_one_topology_resumes_on_another(problem, tmp_path, client):
    """Saved on 2 workers (data parallel), resumed on 3 (model parallel): parameters are stored
    whole, so the numbers match the uninterrupted 2-worker run up to float reassociation."""
    net, x, y = problem
    two = rd.data_parallel(2)
    full = _fit(net, x, y, tmp_path / "full", placement=two, client=client)
    with pytest.raises(Stop):
        _fit(net, x, y, tmp_path / "cut", placement=two, client=client, on_checkpoint=_stop_at(1))
    resumed = _fit(net, x, y, tmp_path / "cut", placement=rd.model_parallel(3), client=client,
                   resume=load_checkpoint(tmp_path / "cut"))
    for name, value in full.params.items():
        np.testing.assert_allclose(resumed.params[name], value, rtol=1e-9, atol=1e-11)


KILL_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from rapydli.storage.checkpoint import Checkpoints
    ckpts = Checkpoints(sys.argv[1], keep=2)
    step = 0
    while True:
        step += 1
        ckpts.save(step, {"w": np.full(4_000_000, step, np.float32)}, {}, {"step": step})
""")


def test_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it while a temporary file is being written
            if Checkpoints(tmp_path).paths() and any(p.suffix == ".tmp" for p in tmp_path.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("the writer never got to a second checkpoint")
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.suffix == ".tmp" for p in tmp_path.iterdir()), "killed outside a write"
    params, _, meta = load_checkpoint(tmp_path)
    assert meta["step"] >= 1
    assert params["w"].shape == (4_000_000,) and np.all(params["w"] == meta["step"])


def test_training_survives_a_killed_worker(problem, process_client):
    """A worker SIGKILLed mid-run: the run resumes from its last snapshot on the restarted
    worker and ends with the weights (and accuracy) of an undisturbed run."""
    net, x, y = problem
    kwargs = dict(placement=rd.data_parallel(2), client=process_client, epochs=3, batch_size=32,
                  seed=2, optimizer=rd.SGD(lr=0.1, momentum=0.9), validation_data=(x, y))
    calm = rd.fit(net, x, y, **kwargs)
    assert calm.events == []

    def kill_one(row):
        if row["epoch"] == 2 and not killed:
            pid = next(iter(process_client.run(os.getpid).values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killed: list = []
    hurt = rd.fit(net, x, y, on_epoch=kill_one, **kwargs)
    assert killed and [e["event"] for e in hurt.events] == ["lost worker"]
    assert hurt.events[0]["resumed_from_step"] <= hurt.events[0]["at_step"]
    assert hurt["epoch"] == [1, 2, 3]
    for name, value in calm.params.items():
        np.testing.assert_array_equal(hurt.params[name], value)
    assert hurt["test_accuracy"][-1] == calm["test_accuracy"][-1]


def test_a_worker_gone_before_its_step_was_sent_is_a_lost_worker(problem, client, monkeypatch):
    """The scheduler forgot a worker between the steps that ran on it and a new plan's
    programs being sent there: the engine says a worker was lost (not a KeyError from the
    scheduler), and fit resumes from its snapshot with the weights of an undisturbed run."""
    net, x, y = problem
    kwargs = dict(placement=rd.data_parallel(2), client=client, epochs=2, batch_size=32, seed=2,
                  optimizer=rd.SGD(lr=0.1, momentum=0.9), steps_per_task="auto")
    calm = rd.fit(net, x, y, **kwargs)
    real, sent = client.scatter, []

    def scatter(data, **kw):
        if isinstance(data, list) and isinstance(data[0], tuple):  # a plan's program
            sent.append(kw["workers"][0])
            if len(sent) == 3:  # the second plan's first program: its worker just left
                raise KeyError(kw["workers"][0])
        return real(data, **kw)

    monkeypatch.setattr(client, "scatter", scatter)
    hurt = rd.fit(net, x, y, **kwargs)
    assert len(sent) > 3 and [e["event"] for e in hurt.events] == ["lost worker"]
    assert "LostWorkerError" in hurt.events[0]["error"]
    for name, value in calm.params.items():
        np.testing.assert_array_equal(hurt.params[name], value)
