"""Real sweeps through Hydra's launchers: folders, summaries, tables, failures and resume."""

import json
import os

import pandas as pd
import pytest

SWEEP = ["-m", "method=baseline,pg", "method.population_size=2", "seed=0,1", "trainer.epochs=1"]


def sweep_dirs(tmp_path):
    return sorted((tmp_path / "outputs" / "sweeps").glob("*/*"))


def job_dirs(sweep_dir):
    return sorted(path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir())


def status_of(job_dir):
    return json.loads((job_dir / "metrics.json").read_text())["status"]


def check_sweep_results(tmp_path, result, jobs):
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep_dir,) = sweep_dirs(tmp_path)
    folders = job_dirs(sweep_dir)
    assert len(folders) == jobs
    assert len({folder.name for folder in folders}) == jobs
    for number, folder in enumerate(folders):
        assert folder.name.startswith(f"{number}_"), folder.name
        assert status_of(folder) == "completed"
        assert (folder / "train.log").read_text().strip(), f"{folder} has an empty log"
    collected = sweep_dir / "collected"
    runs = pd.read_csv(collected / "runs.csv")
    assert len(runs) == jobs
    assert set(runs["method"]) == {"baseline", "pg"}
    assert (collected / "summary.csv").is_file()
    comparison = pd.read_csv(collected / "comparison.csv")
    assert len(comparison) == 1
    assert (collected / "report.md").is_file()
    assert list((collected / "plots").glob("*.png"))
    return sweep_dir


def test_basic_launcher_sweep(popgrad, tmp_path):
    result = popgrad("train", *SWEEP)
    check_sweep_results(tmp_path, result, jobs=4)
    assert "4 completed" in result.stdout + result.stderr


@pytest.mark.slow
def test_joblib_launcher_sweep(popgrad, tmp_path):
    result = popgrad("train", *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    check_sweep_results(tmp_path, result, jobs=4)


@pytest.mark.slow
def test_submitit_local_launcher_sweep(popgrad, tmp_path):
    result = popgrad("train", *SWEEP, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    check_sweep_results(tmp_path, result, jobs=4)


def test_failing_job_does_not_stop_sweep(popgrad, tmp_path):
    # The second job asks for more training images than digits has, which fails
    # when its data is loaded, after the sweep has started.
    result = popgrad("train", "-m", "dataset.train_size=200,100000", "trainer.epochs=1")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    (sweep_dir,) = sweep_dirs(tmp_path)
    first, second = job_dirs(sweep_dir)
    assert status_of(first) == "completed"
    assert status_of(second) == "failed"
    assert "dataset.train_size" in json.loads((second / "metrics.json").read_text())["error"]
    assert "dataset.train_size" in (second / "train.log").read_text()
    assert "1 completed" in output
    assert "1 failed" in output
    assert str(second) in output


def test_diverging_job_does_not_stop_sweep(popgrad, tmp_path):
    result = popgrad("train", "-m", "optimizer.lr=1e12,0.01", "trainer.epochs=1")
    (sweep_dir,) = sweep_dirs(tmp_path)
    diverging, healthy = job_dirs(sweep_dir)
    assert status_of(diverging) == "diverged"
    assert status_of(healthy) == "completed"
    assert "1 diverged" in result.stdout + result.stderr


def test_resume_skips_completed_jobs(popgrad, tmp_path):
    arguments = ["train", "-m", "method=baseline,pg", "method.population_size=2", "trainer.epochs=1"]
    first = popgrad(*arguments)
    assert first.returncode == 0, first.stdout + first.stderr
    (sweep_dir,) = sweep_dirs(tmp_path)
    kept, lost = job_dirs(sweep_dir)
    kept_before = (kept / "metrics.json").stat().st_mtime_ns
    # A job killed before it finished has no metrics.json.
    os.remove(lost / "metrics.json")
    os.remove(lost / "checkpoint.pt")

    second = popgrad(*arguments, "resume=true")
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert sweep_dirs(tmp_path) == [sweep_dir]
    assert f"continuing the sweep in {sweep_dir}" in output
    assert "skipped 1 jobs" in output
    assert (kept / "metrics.json").stat().st_mtime_ns == kept_before
    assert status_of(lost) == "completed"
    # Exactly one training ran in the second command.
    assert output.count("device=auto") == 1


def test_auto_device_spreads_jobs_over_gpus(monkeypatch):
    import torch

    from popgrad_cli.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"fake GPU {index}")
    assert resolve_device("auto", job_number=4) == torch.device("cuda", 1)
    assert resolve_device("auto", job_number=None) == torch.device("cuda", 0)
    assert resolve_device("cuda:2", job_number=4) == torch.device("cuda", 2)


def test_parallel_jobs_share_the_cores(monkeypatch):
    import torch
    from omegaconf import OmegaConf

    from popgrad_cli import run

    monkeypatch.setattr(run.os, "cpu_count", lambda: 16)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    run._limit_threads_for_parallel_jobs(OmegaConf.create({"launcher": {"n_jobs": 4}}))
    run._limit_threads_for_parallel_jobs(OmegaConf.create({"launcher": {"n_jobs": -1}}))
    run._limit_threads_for_parallel_jobs(OmegaConf.create({"launcher": {}}))
    assert threads == [4, 1]
