"""The `popgrad` console script end to end: real configs, real data, real result files."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from popgrad_cli.cli import main
from popgrad_cli.errors import EXIT_DATA_ERROR, EXIT_INVALID_CONFIG

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def run_dirs(tmp_path):
    return sorted((tmp_path / "outputs" / "runs").glob("*/*"))


def only_run_dir(tmp_path):
    folders = run_dirs(tmp_path)
    assert len(folders) == 1, folders
    return folders[0]


def read_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_version(popgrad):
    result = popgrad("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("popgrad ")


def test_help_lists_commands(popgrad):
    result = popgrad("--help")
    assert result.returncode == 0
    for command in ("train", "data list", "data prepare", "collect"):
        assert command in result.stdout


def test_train_help_is_hydra_help(popgrad):
    result = popgrad("train", "--help")
    assert result.returncode == 0
    assert "dataset" in result.stdout
    assert "method" in result.stdout


def test_train_cfg_job_prints_config(popgrad, tmp_path):
    result = popgrad("train", "--cfg", "job", "method=pg")
    assert result.returncode == 0
    assert "population_size" in result.stdout
    assert not run_dirs(tmp_path)


def test_train_digits_end_to_end(popgrad, tmp_path):
    result = popgrad("train")
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert metrics["test_f1"] > 0.9
    assert metrics["epochs_completed"] == 10
    assert metrics["error"] is None
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == list(range(1, 11))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    output = result.stdout + result.stderr
    assert f"test F1 {metrics['test_f1']:.4f}" in output
    assert str(run_dir.name) in output


def test_train_pg_counts_gradient_evaluations(popgrad, tmp_path):
    result = popgrad("train", "method=pg", "method.population_size=4", "trainer.epochs=2")
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(only_run_dir(tmp_path))
    assert metrics["status"] == "completed"
    assert metrics["method"] == "pg"
    assert metrics["test_f1"] > 0.5
    # digits: 1438 training images, 10% held out for validation.
    train_size = 1438 - 144
    assert metrics["gradient_evaluations"] == 2 * 4 * train_size


def test_data_prepare_then_list(popgrad, tmp_path):
    root = tmp_path / "prepared"
    result = popgrad("data", "prepare", "digits", "--root", str(root))
    assert result.returncode == 0, result.stderr
    listing = popgrad("data", "list", "--root", str(root))
    assert listing.returncode == 0, listing.stderr
    digits_line = next(line for line in listing.stdout.splitlines() if line.startswith("digits"))
    assert "missing" not in digits_line
    cifar_line = next(line for line in listing.stdout.splitlines() if line.startswith("cifar10 "))
    assert "missing" in cifar_line


def test_data_prepare_unknown_name(popgrad, tmp_path):
    result = popgrad("data", "prepare", "imagenet", "--root", str(tmp_path / "data"), "--no-download")
    assert result.returncode == EXIT_DATA_ERROR
    assert "imagenet" in result.stderr
    assert "cifar10" in result.stderr


def test_missing_data_set_stops_cleanly(popgrad, tmp_path):
    data_root = tmp_path / "empty-data"
    result = popgrad("train", "dataset=cifar10", f"data.root={data_root}")
    assert result.returncode == EXIT_DATA_ERROR
    message = result.stdout + result.stderr
    assert "cifar10" in message.lower()
    assert str(data_root) in message
    assert "data_batch_1" in message
    assert "popgrad data prepare" in message
    assert "Traceback" not in message
    metrics = read_metrics(only_run_dir(tmp_path))
    assert metrics["status"] == "failed"
    cached = list(data_root.rglob("*.pt")) if data_root.exists() else []
    assert cached == []


# (overrides, text expected in the message); each must exit with the invalid-config code.
BAD_INPUTS = [
    (["method=pg", "method.population_size=0"], "method.population_size"),
    (["method=pg", "method.population_size=2.5"], "population_size"),
    (["method=pg", "method.sigma=-0.1"], "method.sigma"),
    (["method=pg", "method.sigma=nan"], "method.sigma"),
    (["method=pg", "method.sigma=inf"], "method.sigma"),
    (["method=pg", "method.antithetic=true", "method.population_size=3"], "method.population_size"),
    (["method=pg", "method.batch=split", "method.population_size=8", "trainer.batch_size=4"], "trainer.batch_size"),
    (["method=pg", "method.noise_scale=global"], "method.noise_scale"),
    (["method=pg", "method.engine=jit"], "method.engine"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction"),
    (["dataset.val_fraction=-0.1"], "dataset.val_fraction"),
    (["dataset=imagenet"], "available: cifar10, cifar100, digits"),
    (["model=vgg16"], "available: cnn, densenet161"),
    (["method=adahessian"], "available: baseline"),
    (["optimizer=rmsprop"], "available: adam, sgd"),
    (["schedule=onecycle"], "available: constant, cosine, step"),
    (["optimizer.lerning_rate=0.1"], "optimizer.lerning_rate"),
    (["+trainer.epoch=3"], "trainer.epoch"),
    (["device=tpu"], "device"),
    (["device=cuda"], "no CUDA device"),
    (["trainer.select=best"], "trainer.select"),
    (["model.activation=gelu"], "model.activation"),
    (["seed=-1"], "seed"),
    (["lr=0.1"], "did you mean optimizer.lr?"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS, ids=[" ".join(case[0]) for case in BAD_INPUTS])
def test_bad_input_rejected_before_work(tmp_path, monkeypatch, capsys, overrides, expected):
    if "device=cuda" in overrides:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    monkeypatch.chdir(tmp_path)
    exit_code = main(["train", *overrides])
    captured = capsys.readouterr()
    assert exit_code == EXIT_INVALID_CONFIG, captured.err
    assert expected in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "outputs").exists()


def test_bad_input_exit_code_from_console_script(popgrad, tmp_path):
    result = popgrad("train", "optimizer.lr=-1")
    assert result.returncode == EXIT_INVALID_CONFIG
    assert "optimizer.lr" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dirs(tmp_path)


def test_train_size_larger_than_training_set(popgrad, tmp_path):
    result = popgrad("train", "dataset.train_size=100000")
    assert result.returncode == EXIT_DATA_ERROR
    assert "dataset.train_size" in result.stdout + result.stderr
    assert read_metrics(only_run_dir(tmp_path))["status"] == "failed"


def fashion_files_present():
    return all((FASHION_DIR / name).is_file() for name in FASHION_FILES)


def require_fashion_mnist():
    if fashion_files_present():
        return
    if os.environ.get("POPGRAD_REQUIRE_DATA"):
        pytest.fail(f"POPGRAD_REQUIRE_DATA is set but {FASHION_DIR} lacks the Fashion-MNIST files; apt-get install dataset-fashion-mnist")
    pytest.skip(f"Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")


def test_fashion_mnist_pg_real_data(popgrad, tmp_path):
    require_fashion_mnist()
    result = popgrad(
        "train",
        "method=pg",
        "method.population_size=4",
        "dataset=fashion_mnist",
        f"dataset.raw_dir={FASHION_DIR}",
        "dataset.train_size=20000",
        "optimizer.lr=0.05",
        "trainer.epochs=1",
    )
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(only_run_dir(tmp_path))
    assert metrics["status"] == "completed"
    assert metrics["test_f1"] >= 0.75
