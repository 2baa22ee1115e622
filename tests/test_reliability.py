"""Checkpoints, exact resume, interrupts, divergence and corrupt files, through the real CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from popgrad_cli.errors import EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_CONFIG

# Small batches make each epoch long enough (a few tenths of a second) to stop a run inside it.
SLOW_RUN = ["method=pg", "method.population_size=2", "dataset.train_size=600", "trainer.batch_size=8", "trainer.epochs=3"]
TIME_COLUMNS = {"epoch_time_s"}
TIME_KEYS = {"train_time_s", "wall_time_s", "overrides"}


def popgrad_command(*arguments):
    return [str(Path(sys.executable).parent / "popgrad"), *arguments]


def environment(tmp_path):
    env = dict(os.environ)
    env["POPGRAD_DATA"] = str(tmp_path / "data")
    return env


def start(tmp_path, run_dir, *arguments):
    return subprocess.Popen(
        popgrad_command("train", *arguments, f"hydra.run.dir={run_dir}"),
        cwd=tmp_path,
        env=environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run(tmp_path, run_dir, *arguments):
    process = start(tmp_path, run_dir, *arguments)
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def results_without_times(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = pd.read_csv(run_dir / "history.csv").drop(columns=sorted(TIME_COLUMNS))
    return {key: value for key, value in metrics.items() if key not in TIME_KEYS}, history


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    run_dir = tmp_path / "run"
    code, output = run(tmp_path, run_dir, *SLOW_RUN)
    assert code == 0, output
    return results_without_times(run_dir)


def test_checkpoint_holds_full_state(tmp_path):
    run_dir = tmp_path / "run"
    code, output = run(tmp_path, run_dir, "method=pg", "method.resample=fixed", "trainer.epochs=1")
    assert code == 0, output
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "estimator", "rng", "progress", "config"):
        assert key in state, key
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["estimator"]["fixed_noise"] is not None
    assert state["progress"]["epoch"] == 1
    assert len(state["progress"]["history"]) == 1


def test_sigkill_then_resume_is_exact(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = start(tmp_path, run_dir, *SLOW_RUN)
    wait_for(run_dir / "checkpoint.pt", process)
    process.kill()
    process.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"

    code, output = run(tmp_path, run_dir, *SLOW_RUN)
    assert code == 0, output
    assert "resuming from" in output
    metrics, history = results_without_times(run_dir)
    expected_metrics, expected_history = uninterrupted
    assert metrics == expected_metrics
    pd.testing.assert_frame_equal(history, expected_history)


def test_sigterm_writes_interrupted_and_resumes_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = start(tmp_path, run_dir, *SLOW_RUN)
    wait_for(run_dir / "checkpoint.pt", process)
    time.sleep(0.1)  # stop inside the second epoch, not at its boundary
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert "SIGTERM" in metrics["error"]
    assert (run_dir / "checkpoint.pt").exists()

    code, output = run(tmp_path, run_dir, *SLOW_RUN)
    assert code == 0, output
    resumed_metrics, resumed_history = results_without_times(run_dir)
    expected_metrics, expected_history = uninterrupted
    assert resumed_metrics == expected_metrics
    pd.testing.assert_frame_equal(resumed_history, expected_history)


def test_rerun_of_completed_run_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    code, output = run(tmp_path, run_dir, "trainer.epochs=1")
    assert code == 0, output
    before = (run_dir / "metrics.json").read_bytes()
    code, output = run(tmp_path, run_dir, "trainer.epochs=1")
    assert code == 0, output
    assert "already completed" in output
    assert (run_dir / "metrics.json").read_bytes() == before


def test_resume_with_other_config_rejected(tmp_path):
    run_dir = tmp_path / "run"
    code, output = run(tmp_path, run_dir, "trainer.epochs=1")
    assert code == 0, output
    before = (run_dir / "metrics.json").read_bytes()
    code, output = run(tmp_path, run_dir, "trainer.epochs=1", "optimizer.lr=0.5", "seed=3")
    assert code == EXIT_INVALID_CONFIG, output
    assert "optimizer.lr" in output
    assert "seed" in output
    assert (run_dir / "metrics.json").read_bytes() == before


def test_corrupt_checkpoint_rejected(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, output = run(tmp_path, run_dir, "trainer.epochs=1")
    assert code == EXIT_FAILED, output
    assert str(run_dir / "checkpoint.pt") in output
    assert "Traceback" not in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed"


def test_huge_learning_rate_diverges(tmp_path):
    run_dir = tmp_path / "run"
    code, output = run(tmp_path, run_dir, "optimizer.lr=1e12", "trainer.epochs=3")
    assert code == EXIT_DIVERGED, output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    assert metrics["divergence"]["epoch"] == 1
    assert metrics["divergence"]["step"] >= 1
    assert metrics["divergence"]["quantity"] in ("loss", "gradient norm")
    assert metrics["test_f1"] is None
    assert "Traceback" not in output
