"""``popgrad collect`` on hand-built run folders with known numbers.

Expected statistics are computed here with numpy and scipy directly, not with
the functions under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from scipy import stats

from popgrad_cli import collect as collect_module
from popgrad_cli.collect import (
    TIE_TOLERANCE,
    CollectError,
    collect,
    describe_comparison,
    holm_adjust,
    main,
    markdown_table,
    mean_std_ci,
    paired_statistics,
    parse_override,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BASELINE_F1 = [0.80, 0.82, 0.81]
PG_SMALL_F1 = [0.83, 0.84, 0.80]  # sigma 0.05: differences +0.03, +0.02, -0.01
PG_LARGE_F1 = [0.85, 0.86, 0.84]  # sigma 0.1: differences +0.05, +0.04, +0.03


def metrics_record(overrides: Sequence[str], test_f1: Optional[float], status: str = "completed", **fields) -> Dict:
    settings = dict(item.lstrip("+").split("=", 1) for item in overrides)
    record = {
        "status": status,
        "dataset": settings.get("dataset", "digits"),
        "model": settings.get("model", "mlp"),
        "method": settings.get("method", "baseline"),
        "seed": int(settings.get("seed", 0)),
        "overrides": list(overrides),
        "test_accuracy": None if test_f1 is None else test_f1 + 0.01,
        "test_f1": test_f1,
        "val_accuracy": None if test_f1 is None else test_f1 + 0.02,
        "val_f1": None if test_f1 is None else test_f1 + 0.015,
        "best_epoch": 3,
        "epochs_completed": 3,
        "train_time_s": 4.0,
        "wall_time_s": 6.0,
        "gradient_evaluations": 1000,
        "device": "cpu",
        "versions": {"popgrad_cli": "0.1.0", "torch": "2.5.0", "torchvision": "0.20.0", "python": "3.11.0"},
        "error": None,
    }
    record.update(fields)
    return record


def write_run(
    folder: Path,
    overrides: Sequence[str],
    test_f1: Optional[float] = None,
    status: str = "completed",
    history: Optional[List[float]] = None,
    write_history: bool = True,
    **fields,
) -> Path:
    """Write a run folder; ``test_f1=None`` with status completed writes no metrics.json (a running job)."""
    hydra = folder / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    # Hydra records the chosen option of every config group, also for a job that has not finished.
    method = dict(item.split("=", 1) for item in overrides).get("method", "baseline")
    choices = f"dataset: digits\n      model: mlp\n      method: {method}\n"
    (hydra / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      {choices}")
    if test_f1 is not None or status != "completed":
        (folder / "metrics.json").write_text(json.dumps(metrics_record(overrides, test_f1, status, **fields)))
    if write_history and test_f1 is not None:
        values = history if history is not None else [test_f1 - 0.1, test_f1 - 0.05, test_f1]
        lines = ["epoch,train_loss,val_accuracy,val_f1,lr,sigma,epoch_time_s"]
        lines += [f"{epoch},0.5,{value},{value},0.1,0.0,1.0" for epoch, value in enumerate(values, start=1)]
        (folder / "history.csv").write_text("\n".join(lines) + "\n")
    return folder


def write_sweep(root: Path) -> Path:
    """Write a sweep: baseline, pg sigma=0.05 and pg sigma=0.1 over seeds 0, 1, 2."""
    sweep = root / "sweeps" / "2026-12-04" / "19-40-00"
    number = 0
    for seed in range(3):
        for overrides, values in (
            (["method=baseline"], BASELINE_F1),
            (["method=pg", "method.sigma=0.05"], PG_SMALL_F1),
            (["method=pg", "method.sigma=0.1"], PG_LARGE_F1),
        ):
            items = [*overrides, f"seed={seed}", "trainer.epochs=3"]
            write_run(sweep / f"{number}_{','.join(items)}", items, values[seed])
            number += 1
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def row_for(table: pd.DataFrame, config: str) -> Dict:
    rows = table[table["config"] == config]
    assert len(rows) == 1, f"{config!r} not in {table['config'].tolist()}"
    return rows.iloc[0].to_dict()


@pytest.fixture
def swept(tmp_path):
    sweep = write_sweep(tmp_path)
    return collect([sweep], out_dir=tmp_path / "out", plots=False)


# Parsing


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("method.sigma=0.05", "method.sigma", 0.05),
        ("optimizer.lr=1e-3", "optimizer.lr", 0.001),
        ("trainer.epochs=3", "trainer.epochs", 3),
        ("model.batch_norm=true", "model.batch_norm", True),
        ("trainer.grad_clip=null", "trainer.grad_clip", None),
        ("+tags='pilot'", "tags", "pilot"),
        ("++dataset=mnist", "dataset", "mnist"),
        ("model=resnet18", "model", "resnet18"),
    ],
)
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


# Summary


def test_summary_means(swept):
    for label, values in (
        ("baseline", BASELINE_F1),
        ("pg (sigma=0.05)", PG_SMALL_F1),
        ("pg (sigma=0.1)", PG_LARGE_F1),
    ):
        row = row_for(swept.summary, label)
        assert row["n"] == 3
        assert row["test_f1_mean"] == pytest.approx(np.mean(values), abs=1e-15)
        assert row["test_f1_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-15)


def test_summary_confidence_interval(swept):
    values = np.array(PG_SMALL_F1)
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
    row = row_for(swept.summary, "pg (sigma=0.05)")
    assert row["test_f1_ci_low"] == pytest.approx(values.mean() - half, abs=1e-14)
    assert row["test_f1_ci_high"] == pytest.approx(values.mean() + half, abs=1e-14)


def test_summary_other_metrics(swept):
    row = row_for(swept.summary, "baseline")
    assert row["test_accuracy_mean"] == pytest.approx(np.mean(BASELINE_F1) + 0.01, abs=1e-14)
    assert row["val_f1_mean"] == pytest.approx(np.mean(BASELINE_F1) + 0.015, abs=1e-14)
    assert row["train_time_s_mean"] == 4.0
    assert row["train_time_s_std"] == 0.0
    assert row["gradient_evaluations_mean"] == 1000


def test_summary_single_seed_has_nan_spread():
    mean, std, low, high = mean_std_ci([0.5])
    assert mean == 0.5
    assert math.isnan(std)
    assert math.isnan(low)
    assert math.isnan(high)


def test_summary_keys_are_columns(swept):
    row = row_for(swept.summary, "pg (sigma=0.1)")
    assert row["method"] == "pg"
    assert row["method.sigma"] == 0.1
    assert row["trainer.epochs"] == 3
    assert row["dataset"] == "digits"
    assert row["seeds"] == "0 1 2"


# Comparison


def test_comparison_paired_difference(swept):
    row = row_for(swept.comparison, "pg (sigma=0.05)")
    differences = np.array(PG_SMALL_F1) - np.array(BASELINE_F1)
    half = stats.t.ppf(0.975, 2) * differences.std(ddof=1) / np.sqrt(3)
    assert row["baseline_config"] == "baseline"
    assert row["n_pairs"] == 3
    assert row["baseline_mean"] == pytest.approx(np.mean(BASELINE_F1), abs=1e-15)
    assert row["method_mean"] == pytest.approx(np.mean(PG_SMALL_F1), abs=1e-15)
    assert row["mean_diff"] == pytest.approx(differences.mean(), abs=1e-15)
    assert row["ci_low"] == pytest.approx(differences.mean() - half, abs=1e-14)
    assert row["ci_high"] == pytest.approx(differences.mean() + half, abs=1e-14)


def test_comparison_tests_match_scipy(swept):
    row = row_for(swept.comparison, "pg (sigma=0.05)")
    expected_t = stats.ttest_rel(PG_SMALL_F1, BASELINE_F1)
    expected_w = stats.wilcoxon(np.array(PG_SMALL_F1) - np.array(BASELINE_F1))
    assert row["t_statistic"] == pytest.approx(expected_t.statistic, rel=1e-12)
    assert row["t_pvalue"] == pytest.approx(expected_t.pvalue, rel=1e-12)
    assert row["wilcoxon_pvalue"] == pytest.approx(expected_w.pvalue, rel=1e-12)


def test_comparison_wins_ties_losses(swept):
    small = row_for(swept.comparison, "pg (sigma=0.05)")
    large = row_for(swept.comparison, "pg (sigma=0.1)")
    assert (small["wins"], small["ties"], small["losses"]) == (2, 0, 1)
    assert (large["wins"], large["ties"], large["losses"]) == (3, 0, 0)


def test_comparison_holm_column(swept):
    table = swept.comparison
    pvalues = table["t_pvalue"].to_numpy()
    smaller, larger = sorted(pvalues)
    expected = {smaller: min(1.0, 2 * smaller), larger: max(min(1.0, 2 * smaller), larger)}
    for p, adjusted in zip(pvalues, table["t_pvalue_holm"]):
        assert adjusted == pytest.approx(expected[p], rel=1e-12)


def test_holm_adjust_by_hand():
    adjusted = holm_adjust([0.01, 0.04, np.nan, 0.03])
    assert adjusted[0] == pytest.approx(0.03)
    assert adjusted[3] == pytest.approx(0.06)
    assert adjusted[1] == pytest.approx(0.06)
    assert math.isnan(adjusted[2])


def test_ties_within_tolerance():
    baseline = [0.3, 0.5, 0.7, 0.2]
    method = [0.1 + 0.2, 0.5 + TIE_TOLERANCE / 2, 0.75, 0.1]
    result = paired_statistics(method, baseline)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 1)


def test_wilcoxon_drops_ties():
    result = paired_statistics([0.5, 0.6, 0.9, 0.4], [0.5, 0.5, 0.7, 0.1])
    expected = stats.wilcoxon([0.1, 0.2, 0.3]).pvalue
    assert result["wilcoxon_pvalue"] == pytest.approx(expected, rel=1e-12)
    assert "cannot reach p < 0.05" in result["wilcoxon_note"]


def test_single_pair_has_no_test():
    result = paired_statistics([0.9], [0.8])
    assert result["n_pairs"] == 1
    assert result["mean_diff"] == pytest.approx(0.1)
    assert math.isnan(result["t_pvalue"])
    assert math.isnan(result["ci_low"])
    assert math.isnan(result["wilcoxon_pvalue"])
    assert "only 1 paired seed" in result["t_note"]


def test_identical_runs_are_ties():
    result = paired_statistics([0.8, 0.9, 0.7], [0.8, 0.9, 0.7])
    assert result["ties"] == 3
    assert math.isnan(result["t_pvalue"])
    assert "zero variance" in result["t_note"]
    assert "ties" in result["wilcoxon_note"]


def test_unpaired_seeds_are_left_out(tmp_path):
    for seed, value in enumerate([0.80, 0.82, 0.81]):
        write_run(tmp_path / f"b{seed}", ["method=baseline", f"seed={seed}"], value)
    for seed, value in ((1, 0.85), (2, 0.83), (3, 0.90)):
        write_run(tmp_path / f"p{seed}", ["method=pg", f"seed={seed}"], value)
    result = collect([tmp_path], plots=False)
    row = row_for(result.comparison, "pg")
    assert row["n_pairs"] == 2
    assert row["seeds"] == "1 2"
    assert row["mean_diff"] == pytest.approx(np.mean([0.85 - 0.82, 0.83 - 0.81]), abs=1e-15)
    assert "seeds without a completed baseline run: 3" in row["note"]
    assert "seeds without a completed pg run: 0" in row["note"]


def test_other_methods_are_compared(tmp_path):
    for seed in range(2):
        write_run(tmp_path / f"b{seed}", ["method=baseline", f"seed={seed}"], 0.8 + seed / 100)
        write_run(tmp_path / f"s{seed}", ["method=sam", f"seed={seed}", "method.rho=0.05"], 0.82 + seed / 50)
    result = collect([tmp_path], plots=False)
    row = row_for(result.comparison, "sam (rho=0.05)")
    assert row["n_pairs"] == 2
    assert row["mean_diff"] == pytest.approx(np.mean([0.02, 0.03]), abs=1e-15)


def test_no_baseline_is_reported(tmp_path):
    for seed in range(2):
        write_run(tmp_path / f"p{seed}", ["method=pg", f"seed={seed}"], 0.9)
    result = collect([tmp_path], plots=False)
    row = row_for(result.comparison, "pg")
    assert row["n_pairs"] == 0
    assert "no baseline configuration" in row["note"]


def test_baseline_must_share_settings(tmp_path):
    for seed in range(2):
        write_run(tmp_path / f"b{seed}", ["method=baseline", f"seed={seed}", "optimizer.lr=0.1"], 0.8)
        write_run(tmp_path / f"p{seed}", ["method=pg", f"seed={seed}", "optimizer.lr=0.01"], 0.9)
    result = collect([tmp_path], plots=False)
    assert result.comparison["n_pairs"].tolist() == [0]


def test_exact_method_settings_preferred(tmp_path):
    for seed in range(2):
        for sigma, value in ((0.01, 0.80), (0.05, 0.70)):
            write_run(tmp_path / f"b{sigma}_{seed}", ["method=baseline", f"method.sigma={sigma}", f"seed={seed}"], value + seed / 100)
            write_run(tmp_path / f"p{sigma}_{seed}", ["method=pg", f"method.sigma={sigma}", f"seed={seed}"], value + 0.05)
    result = collect([tmp_path], plots=False)
    row = row_for(result.comparison, "pg (sigma=0.05)")
    assert row["baseline_config"] == "baseline (sigma=0.05)"
    assert row["baseline_mean"] == pytest.approx(0.705, abs=1e-15)


def test_ambiguous_baseline_is_not_guessed(tmp_path):
    for seed in range(2):
        for sigma in (0.01, 0.05):
            write_run(tmp_path / f"b{sigma}_{seed}", ["method=baseline", f"method.sigma={sigma}", f"seed={seed}"], 0.8)
        write_run(tmp_path / f"p{seed}", ["method=pg", "method.sigma=0.1", f"seed={seed}"], 0.9)
    result = collect([tmp_path], plots=False)
    row = row_for(result.comparison, "pg (sigma=0.1)")
    assert row["n_pairs"] == 0
    assert "2 baseline configurations match" in row["note"]


def test_default_matches_explicit_value(tmp_path):
    for seed in range(2):
        baseline = write_run(tmp_path / f"b{seed}", ["method=baseline", f"seed={seed}"], 0.8)
        (baseline / ".hydra" / "config.yaml").write_text("seed: 0\ntrainer:\n  epochs: 10\n  batch_size: 128\n")
        write_run(tmp_path / f"p{seed}", ["method=pg", f"seed={seed}", "trainer.epochs=10"], 0.9)
    result = collect([tmp_path], plots=False)
    row = row_for(result.comparison, "pg")
    assert row["n_pairs"] == 2
    assert row_for(result.summary, "baseline")["trainer.epochs"] == 10


def test_group_default_from_hydra_choices(tmp_path):
    for seed in range(2):
        baseline = write_run(tmp_path / f"b{seed}", ["method=baseline", f"seed={seed}"], 0.8)
        (baseline / ".hydra" / "config.yaml").write_text("optimizer:\n  name: sgd\n  lr: 0.01\n")
        (baseline / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      optimizer: sgd\n")
        write_run(tmp_path / f"p{seed}", ["method=pg", f"seed={seed}", "optimizer=sgd"], 0.9)
    result = collect([tmp_path], plots=False)
    assert row_for(result.comparison, "pg")["n_pairs"] == 2


def test_duplicate_seed_counts_once(tmp_path):
    old = write_run(tmp_path / "a_old", ["method=baseline", "seed=0"], 0.5)
    new = write_run(tmp_path / "b_new", ["method=baseline", "seed=0"], 0.9)
    write_run(tmp_path / "c", ["method=baseline", "seed=1"], 0.7)
    result = collect([tmp_path], plots=False)
    row = row_for(result.summary, "baseline")
    assert row["n"] == 2
    assert row["test_f1_mean"] == pytest.approx(0.8)
    reasons = {item.path: item.reason for item in result.skipped}
    assert f"superseded by {new}" in reasons[str(old)]


def test_non_result_keys_do_not_split(tmp_path):
    write_run(tmp_path / "a", ["method=baseline", "seed=0", "device=cpu"], 0.5)
    write_run(tmp_path / "b", ["method=baseline", "seed=1", "device=cuda", "resume=true"], 0.7)
    result = collect([tmp_path], plots=False)
    assert result.summary["n"].tolist() == [2]
    assert result.runs["device"].tolist() == ["cpu", "cpu"]


# --by


def write_two_learning_rates(root: Path) -> None:
    for seed in range(3):
        for lr in (0.1, 0.01):
            base = ["trainer.epochs=3", f"optimizer.lr={lr}", f"seed={seed}"]
            write_run(root / f"b_{lr}_{seed}", ["method=baseline", *base], 0.80 + seed / 100 + lr)
            write_run(root / f"p_{lr}_{seed}", ["method=pg", "method.sigma=0.05", *base], 0.82 + seed / 50 + lr)


def test_by_pools_other_keys(tmp_path):
    write_two_learning_rates(tmp_path)
    result = collect([tmp_path], by=["method.sigma"], plots=False)
    assert sorted(result.summary["config"]) == ["baseline", "pg (sigma=0.05)"]
    assert result.summary["n"].tolist() == [6, 6]
    assert list(result.summary.columns[:3]) == ["config", "method", "method.sigma"]


def test_by_pairs_within_settings(tmp_path):
    write_two_learning_rates(tmp_path)
    result = collect([tmp_path], by=["method.sigma"], plots=False)
    row = result.comparison.iloc[0].to_dict()
    differences = [(0.82 + seed / 50 + lr) - (0.80 + seed / 100 + lr) for lr in (0.1, 0.01) for seed in range(3)]
    assert row["n_pairs"] == 6
    assert row["mean_diff"] == pytest.approx(np.mean(differences), abs=1e-14)
    assert row["t_pvalue"] == pytest.approx(stats.ttest_1samp(differences, 0.0).pvalue, rel=1e-9)


def test_default_groups_split_keys(tmp_path):
    write_two_learning_rates(tmp_path)
    result = collect([tmp_path], plots=False)
    assert len(result.summary) == 4
    assert result.comparison["n_pairs"].tolist() == [3, 3]


def test_by_unknown_key_rejected(tmp_path):
    write_two_learning_rates(tmp_path)
    with pytest.raises(CollectError, match="optimizer.lrr"):
        collect([tmp_path], by=["optimizer.lrr"], plots=False)


# Broken and unfinished runs


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "outputs"
    for seed in range(2):
        write_run(root / f"b{seed}", ["method=baseline", f"seed={seed}"], 0.8 + seed / 100)
        write_run(root / f"p{seed}", ["method=pg", f"seed={seed}"], 0.85 + seed / 100)
    corrupt = write_run(root / "corrupt", ["method=pg", "seed=5"], write_history=False)
    (corrupt / "metrics.json").write_text("{this is not json")
    truncated = write_run(root / "truncated", ["method=pg", "seed=6"], write_history=False)
    (truncated / "metrics.json").write_text(json.dumps(metrics_record(["method=pg", "seed=6"], 0.9))[:40])
    write_run(root / "running", ["method=pg", "seed=2"])
    write_run(root / "failed", ["method=pg", "seed=3"], status="failed", error="RuntimeError: CUDA out of memory")
    write_run(root / "diverged", ["method=pg", "seed=4"], status="diverged", error="non-finite loss nan at epoch 2, step 7")
    no_history = write_run(root / "p_nohist", ["method=baseline", "seed=7"], 0.8, write_history=False)
    bad_history = write_run(root / "p_badhist", ["method=baseline", "seed=8"], 0.8)
    (bad_history / "history.csv").write_text("epoch,val_f1\n1,abc\n")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("x")
    result = collect([root])
    reasons = {Path(item.path).name: (item.status, item.reason) for item in result.skipped}
    problems = {Path(item.path).name: item.reason for item in result.history_problems}
    return result, reasons, problems, no_history


def test_corrupt_json_listed(messy):
    _, reasons, _, _ = messy
    assert reasons["corrupt"][0] == "invalid"
    assert "not valid JSON" in reasons["corrupt"][1]


def test_truncated_json_listed(messy):
    _, reasons, _, _ = messy
    assert reasons["truncated"][0] == "invalid"
    assert "truncated or corrupt" in reasons["truncated"][1]


def test_running_job_listed(messy):
    _, reasons, _, _ = messy
    assert reasons["running"] == ("incomplete", "no metrics.json: the run is still running or was killed")


def test_empty_and_stray_folders_listed(messy):
    _, reasons, _, _ = messy
    assert reasons["empty"] == ("not a run", "empty folder")
    assert reasons["notes"][0] == "not a run"


def test_failed_runs_counted(messy):
    result, reasons, _, _ = messy
    assert result.status_counts == {
        "completed": 6,
        "diverged": 1,
        "failed": 1,
        "interrupted": 0,
        "incomplete": 1,
        "invalid": 2,
    }
    assert reasons["failed"] == ("failed", "failed: RuntimeError: CUDA out of memory")
    assert "non-finite loss" in reasons["diverged"][1]


def test_failed_runs_stay_out_of_means(messy):
    result, _, _, _ = messy
    row = row_for(result.summary, "pg")
    assert row["n"] == 2
    assert row["n_not_completed"] == 5
    assert row["not_completed"] == "1 diverged, 1 failed, 1 incomplete, 2 invalid"


def test_comparison_mentions_failures(messy):
    result, _, _, _ = messy
    note = row_for(result.comparison, "pg")["note"]
    assert "5 pg run(s) did not complete" in note


def test_history_problems_listed(messy):
    result, _, problems, _ = messy
    assert problems["p_nohist"] == "history.csv is missing"
    assert "not numeric" in problems["p_badhist"]
    assert row_for(result.summary, "baseline")["n"] == 4


def test_report_lists_problems(messy):
    result, _, _, _ = messy
    report = (result.out_dir / "report.md").read_text()
    for name in ("corrupt", "truncated", "running", "failed", "diverged", "empty", "notes", "p_nohist"):
        assert f"/{name} |" in report, name
    assert "| incomplete | 1 |" in report


def test_runs_csv_has_every_folder(messy):
    result, _, _, _ = messy
    runs = pd.read_csv(result.out_dir / "runs.csv")
    assert len(runs) == 11
    assert set(runs.columns) >= {"run_dir", "status", "method", "seed", "test_f1", "train_time_s", "gradient_evaluations", "error"}
    failed = runs[runs["run_dir"].str.endswith("failed")].iloc[0]
    assert failed["error"] == "RuntimeError: CUDA out of memory"
    assert not failed["used"]


def test_plots_are_png(messy):
    result, _, _, _ = messy
    plots_dir = result.out_dir / "plots"
    names = sorted(path.name for path in plots_dir.iterdir())
    assert "difference.png" in names
    assert any(name.startswith("curves_01") for name in names)
    for path in plots_dir.iterdir():
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        assert mpimg.imread(path).shape[0] > 100, path


def test_rerun_skips_output(messy, tmp_path):
    result, _, _, _ = messy
    again = collect(result.paths, out_dir=tmp_path / "again", plots=False)
    assert len(again.runs) == len(result.runs)
    assert len(again.skipped) == len(result.skipped)


def test_completed_without_metric_skipped(tmp_path):
    write_run(tmp_path / "a", ["seed=0"], 0.8)
    write_run(tmp_path / "b", ["seed=1"], 0.8)
    broken = tmp_path / "b" / "metrics.json"
    record = json.loads(broken.read_text())
    record["test_f1"] = None
    broken.write_text(json.dumps(record))
    result = collect([tmp_path], plots=False)
    reasons = {Path(item.path).name: item.reason for item in result.skipped}
    assert "test_f1 is missing or not finite" in reasons["b"]
    assert row_for(result.summary, "baseline")["n"] == 1


# Report wording


def comparison_row(low: float, high: float, holm: float = math.nan) -> Dict:
    return {
        "config": "pg",
        "baseline_config": "baseline",
        "n_pairs": 3,
        "seeds": "0 1 2",
        "mean_diff": (low + high) / 2,
        "ci_low": low,
        "ci_high": high,
        "t_pvalue": 0.09,
        "t_pvalue_holm": holm,
        "wilcoxon_pvalue": 0.25,
        "wins": 3,
        "ties": 0,
        "losses": 0,
        "note": "",
    }


def test_wording_ci_containing_zero():
    text = describe_comparison(comparison_row(-0.003, 0.027), "test_f1", 1)
    assert text.startswith("pg vs baseline: no significant difference in test F1: +0.0120 [95% CI -0.0030, +0.0270]")
    assert "3 wins / 0 ties / 0 losses over 3 seeds" in text


def test_wording_significant_gain():
    text = describe_comparison(comparison_row(0.003, 0.021), "test_f1", 1)
    assert text.startswith("pg beats baseline by +0.0120 test F1 [95% CI +0.0030, +0.0210], paired t-test p = 0.090")


def test_wording_significant_loss():
    text = describe_comparison(comparison_row(-0.021, -0.003), "test_f1", 1)
    assert text.startswith("pg is worse than baseline by -0.0120 test F1")


def test_wording_holm_not_significant():
    text = describe_comparison(comparison_row(0.003, 0.021, holm=0.12), "test_f1", 4)
    assert "beats" not in text
    assert "not significant after Holm correction over 4 comparisons (adjusted p = 0.120)" in text


def test_report_names_the_tests(swept):
    report = (swept.out_dir / "report.md").read_text()
    assert "two-sided paired t-test (scipy.stats.ttest_rel)" in report
    assert "Wilcoxon signed-rank test (scipy.stats.wilcoxon)" in report
    assert "Metric compared: `test_f1`" in report


def test_markdown_table_escapes_pipes():
    table = markdown_table(["a", "b"], [["x|y", 0.5]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.5000 |"]


# Command line


def test_main_success(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    assert main([str(sweep), "--no-plots"]) == 0
    assert (sweep / "collected" / "report.md").is_file()
    assert "collected 9 run folders (9 completed)" in capsys.readouterr().out


def test_main_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(missing)]) == 2
    error = capsys.readouterr().err
    assert f"path '{missing}' does not exist" in error


def test_main_no_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path)]) == 2
    assert "no run folders below" in capsys.readouterr().err


def test_main_unknown_metric(tmp_path):
    write_sweep(tmp_path)
    assert main([str(tmp_path), "--metric", "loss"]) == 2


def test_main_by_and_metric(tmp_path):
    write_two_learning_rates(tmp_path)
    assert main([str(tmp_path), "--by", "method.sigma", "--metric", "val_f1", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    comparison = pd.read_csv(tmp_path / "o" / "comparison.csv")
    assert comparison["metric"].tolist() == ["val_f1"]
    assert comparison["n_pairs"].tolist() == [6]


def test_main_help(capsys):
    assert main(["--help"]) == 0
    assert "popgrad collect" in capsys.readouterr().out


def test_library_rejects_unknown_metric(tmp_path):
    write_sweep(tmp_path)
    with pytest.raises(CollectError, match="unknown metric 'loss'"):
        collect([tmp_path], metric="loss")


# Large sweeps


def test_thousand_runs(tmp_path):
    rng = np.random.default_rng(0)
    sweep = tmp_path / "big"
    sigmas = [0.01, 0.02, 0.05, 0.1]
    learning_rates = [0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001]
    seeds = range(20)
    expected_baseline: Dict[float, List[float]] = {}
    number = 0
    for lr in learning_rates:
        for seed in seeds:
            for method, sigma in [("baseline", None), *(("pg", sigma) for sigma in sigmas)]:
                overrides = [f"method={method}", f"optimizer.lr={lr}", f"seed={seed}"]
                if sigma is not None:
                    overrides.insert(1, f"method.sigma={sigma}")
                value = float(rng.uniform(0.7, 0.9))
                if method == "baseline":
                    expected_baseline.setdefault(lr, []).append(value)
                write_run(sweep / f"{number}_run", overrides, value, history=[value - 0.05, value])
                number += 1
    assert number == 1000

    result = collect([sweep], plots=False)
    assert result.status_counts["completed"] == 1000
    assert result.skipped == []
    assert result.history_problems == []
    assert len(result.summary) == 50
    assert result.summary["n"].eq(20).all()
    assert len(result.comparison) == 40
    assert result.comparison["n_pairs"].eq(20).all()
    baseline = result.summary[(result.summary["method"] == "baseline") & (result.summary["optimizer.lr"] == 0.001)]
    assert baseline["test_f1_mean"].iloc[0] == pytest.approx(np.mean(expected_baseline[0.001]), abs=1e-14)


def test_panels_split_into_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(collect_module, "PANELS_PER_FIGURE", 2)
    for seed in range(2):
        for lr in range(3):
            write_run(tmp_path / f"b{lr}_{seed}", ["method=baseline", f"optimizer.lr={lr + 1}", f"seed={seed}"], 0.8)
    result = collect([tmp_path])
    curves = sorted(path.name for path in (result.out_dir / "plots").glob("curves_*.png"))
    assert curves == ["curves_01_digits_mlp.png", "curves_02_digits_mlp.png"]


def test_panel_cap_noted(tmp_path):
    write_two_learning_rates(tmp_path)
    result = collect([tmp_path], max_panels=1)
    assert len(list((result.out_dir / "plots").glob("curves_*.png"))) == 1
    assert result.notes == [
        "Learning curves: drew the first 1 of 2 settings; raise the cap with --max-panels (each panel adds about 0.1-0.2 s)."
    ]


def test_main_unwritable_out(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(sweep), "--no-plots", "--out", str(blocker / "sub")]) == 1
    assert "pass a writable folder with --out" in capsys.readouterr().err


def test_main_path_is_file(tmp_path, capsys):
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    assert main([str(target)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_main_custom_baseline(tmp_path):
    for seed in range(2):
        write_run(tmp_path / f"s{seed}", ["method=sgd_plain", f"seed={seed}"], 0.8)
        write_run(tmp_path / f"p{seed}", ["method=pg", f"seed={seed}"], 0.9)
    assert main([str(tmp_path), "--baseline", "sgd_plain", "--no-plots"]) == 0
    comparison = pd.read_csv(tmp_path / "collected" / "comparison.csv")
    assert comparison["baseline_config"].tolist() == ["sgd_plain"]
    assert comparison["mean_diff"].iloc[0] == pytest.approx(0.1)


# Files written


def test_csv_files_match_result(swept):
    summary = pd.read_csv(swept.out_dir / "summary.csv")
    comparison = pd.read_csv(swept.out_dir / "comparison.csv")
    assert summary["test_f1_ci_low"].tolist() == pytest.approx(swept.summary["test_f1_ci_low"].tolist(), abs=1e-15)
    assert comparison["t_pvalue"].tolist() == pytest.approx(swept.comparison["t_pvalue"].tolist(), abs=1e-15)


def test_runs_in_job_order(tmp_path):
    for number in (10, 9, 2):
        write_run(tmp_path / f"{number}_job", ["method=baseline", f"seed={number}"], 0.8)
    result = collect([tmp_path], plots=False)
    names = [Path(path).name for path in result.runs["run_dir"]]
    assert names == ["2_job", "9_job", "10_job"]


def test_report_has_plain_sentences(swept):
    report = (swept.out_dir / "report.md").read_text()
    assert "- pg (sigma=0.05) vs baseline: no significant difference in test F1: +0.0133" in report
    assert "2 wins / 0 ties / 1 loss over 3 seeds" in report


def test_wording_by_counts_pairs(tmp_path):
    write_two_learning_rates(tmp_path)
    result = collect([tmp_path], by=["method.sigma"], plots=False)
    row = result.comparison.iloc[0].to_dict()
    assert "over 6 pairs" in describe_comparison(row, "test_f1", 1)


def test_wording_mentions_left_out_runs():
    row = comparison_row(-0.003, 0.027)
    row["n_method_not_completed"] = 1
    text = describe_comparison(row, "test_f1", 1)
    assert text.endswith("; 1 method run did not complete and was left out (see the note).")


def test_by_non_result_key(tmp_path):
    for seed in range(2):
        for device in ("cpu", "cuda"):
            write_run(tmp_path / f"b{device}{seed}", ["method=baseline", f"seed={seed}", f"device={device}"], 0.8)
            write_run(tmp_path / f"p{device}{seed}", ["method=pg", f"seed={seed}", f"device={device}"], 0.9)
    result = collect([tmp_path], by=["device"], plots=False)
    expected = ["baseline (device=cpu)", "baseline (device=cuda)", "pg (device=cpu)", "pg (device=cuda)"]
    assert sorted(result.summary["config"]) == expected
    assert result.comparison["n_pairs"].tolist() == [2, 2]


# Unusual files


def test_overrides_from_metrics_when_yaml_broken(tmp_path):
    run = write_run(tmp_path / "a", ["method=pg", "seed=0", "method.sigma=0.2"], 0.8)
    (run / ".hydra" / "overrides.yaml").write_text("[unclosed")
    result = collect([tmp_path], plots=False)
    assert result.summary["method.sigma"].tolist() == [0.2]


def test_unknown_status_invalid(tmp_path):
    write_run(tmp_path / "a", ["seed=0"], 0.8, status="finished")
    write_run(tmp_path / "b", ["seed=1"], 0.8)
    result = collect([tmp_path], plots=False)
    reasons = {Path(item.path).name: (item.status, item.reason) for item in result.skipped}
    assert reasons["a"] == ("invalid", "unknown status 'finished' in metrics.json")


def test_metrics_not_an_object(tmp_path):
    write_run(tmp_path / "a", ["seed=0"], 0.8)
    (tmp_path / "a" / "metrics.json").write_text("[1, 2]")
    write_run(tmp_path / "b", ["seed=1"], 0.8)
    result = collect([tmp_path], plots=False)
    assert result.status_counts["invalid"] == 1


def test_single_epoch_curves(tmp_path):
    for seed in range(2):
        write_run(tmp_path / f"b{seed}", ["method=baseline", f"seed={seed}"], 0.8, history=[0.8 + seed / 100])
        write_run(tmp_path / f"p{seed}", ["method=pg", f"seed={seed}"], 0.9, history=[0.9])
    result = collect([tmp_path])
    curves = list((result.out_dir / "plots").glob("curves_*.png"))
    assert len(curves) == 1
    assert curves[0].read_bytes()[:8] == PNG_SIGNATURE


def test_difference_chart_cap(tmp_path):
    from popgrad_cli import plots

    count = plots.MAX_DIFFERENCE_BARS + 5
    bars_drawn = plots.plot_differences(
        tmp_path / "d.png", [f"c{i}" for i in range(count)], [0.01] * count, [0.0] * count, [0.02] * count, [3] * count, "test F1"
    )
    assert bars_drawn == plots.MAX_DIFFERENCE_BARS
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG_SIGNATURE


def test_mixed_versions_warned(tmp_path):
    write_run(tmp_path / "a", ["seed=0"], 0.8)
    write_run(tmp_path / "b", ["seed=1"], 0.8, versions={"popgrad_cli": "0.1.0", "torch": "2.6.0"})
    result = collect([tmp_path], plots=False)
    report = (result.out_dir / "report.md").read_text()
    assert "Warning: the runs used mix more than one torch version: 2.5.0, 2.6.0." in report


def test_runs_csv_integer_counts(swept):
    runs = pd.read_csv(swept.out_dir / "runs.csv", dtype=str)
    assert runs["gradient_evaluations"].iloc[0] == "1000"
    assert runs["seed"].iloc[0] == "0"


def test_truncated_history_listed(tmp_path):
    run = write_run(tmp_path / "a", ["seed=0"], 0.8)
    (run / "history.csv").write_text("epoch,train_loss,val_accuracy,val_f1\n1,0.5,0.7,0.7\n2,0.4\n")
    result = collect([tmp_path], plots=False)
    assert result.history_problems[0].reason == "history.csv line 3 has 2 fields, expected 4 (truncated?)"
    assert result.summary["n"].tolist() == [1]


def test_overlapping_paths_count_once(tmp_path):
    sweep = write_sweep(tmp_path)
    result = collect([tmp_path, sweep], out_dir=tmp_path / "out", plots=False)
    assert len(result.runs) == 9
    assert result.summary["n"].tolist() == [3, 3, 3]
