"""popgrad reproduce: presets, the planner, dry-run counts, the claim verdicts and a tiny real run."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from popgrad_cli import reproduce
from popgrad_cli.reproduce import (
    MIXED,
    NOT_SUPPORTED,
    SUPPORTED,
    UNDECIDED,
    Planner,
    claims_checklist,
    expand_jobs,
    merge_axes,
    preset_axes,
    table_main,
    table_methods,
    table_robustness,
    verdict,
)

PRESET_NAMES = sorted(path.stem for path in reproduce.experiment_dir().glob("*.yaml"))


def hydra_job_count(params, overrides=()):
    """Count the jobs Hydra's BasicSweeper makes from sweeper params plus command-line overrides."""
    arguments = [f"{key}={value}" for key, value in params.items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))


def test_presets_exist():
    assert set(reproduce.PRESETS.values()) <= set(PRESET_NAMES)


@pytest.mark.parametrize("name", sorted(reproduce.PRESETS.values()))
def test_preset_composes(compose_config, name):
    from hydra import compose, initialize_config_dir

    from popgrad_cli.cli import conf_dir

    config = compose_config(f"+experiment={name}")
    assert config.experiment == name
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        full = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = dict(full.hydra.sweeper.params)
    assert params, f"{name} has no hydra.sweeper.params"
    planned = len(expand_jobs(preset_axes(name)))
    assert planned == math.prod(len(values) for values in preset_axes(name).values())
    assert planned == hydra_job_count(params)


@pytest.mark.parametrize("name", sorted(reproduce.PRESETS.values()))
def test_preset_lines_commented(name):
    path = reproduce.experiment_dir() / f"{name}.yaml"
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_"
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or re.fullmatch(r"[\w.]+:", stripped):
            continue
        assert "#" in stripped, f"{path.name}:{number} has no comment: {line}"


def test_command_line_replaces_preset_axis():
    axes = preset_axes("paper_main")
    overrides = ["method=baseline", "seed=0,1", "trainer.epochs=3"]
    merged = merge_axes(axes, overrides)
    assert merged["method"] == ["baseline"]
    assert merged["seed"] == ["0", "1"]
    expected = hydra_job_count({key: ",".join(values) for key, values in axes.items()}, overrides)
    assert len(expand_jobs(merged)) == expected == 5 * 5 * 1 * 2


def test_sweep_jobs_match_hydra():
    planner = Planner(reproduce.quick_profile(), seeds=3)
    for stage in reproduce.STAGES:
        for sweep in planner.stage(stage, rates={}):
            params = {key: ",".join(values) for key, values in preset_axes(sweep.preset).items()}
            assert len(sweep.jobs()) == hydra_job_count(params, sweep.overrides), sweep.name


def dry_run_counts(capsys, *arguments):
    assert reproduce.main([*arguments, "--dry-run"]) == 0
    output = capsys.readouterr().out
    counts = {name: (int(sweeps), int(jobs)) for name, sweeps, jobs in re.findall(r"stage (\w+): (\d+) sweeps, (\d+) jobs", output)}
    return counts, output


def test_dry_run_quick_counts(capsys):
    counts, output = dry_run_counts(capsys, "--profile", "quick")
    # digits x mlp and cnn, and Fashion-MNIST x mlp when its files are present.
    cells = 3 if len(reproduce.quick_profile().datasets) == 2 else 2
    seeds, search_seeds, rates = 3, 2, 2
    assert counts["lr_search"] == (cells, cells * rates * search_seeds)
    assert counts["pg_defaults"] == (1, 2 * 2 * search_seeds)
    # Per cell: baseline and PG, plus the compute-matched baseline.
    assert counts["main"] == (2 * cells, cells * 3 * seeds)
    # Per model: the all-off reference, its matched baseline and six methods.
    assert counts["methods"] == (2 * 8, 2 * (2 * seeds + seeds + 6 * 2 * seeds))
    # The reference point and one value on each of six axes.
    assert counts["robustness"] == (7, 7 * 2 * seeds)
    assert "gradient evaluations (estimate" in output
    assert "popgrad train -m +experiment=paper_main" in output


def test_dry_run_paper_counts(capsys):
    counts, _ = dry_run_counts(capsys, "--profile", "paper")
    assert counts["lr_search"] == (25, 25 * 5 * 3)
    assert counts["pg_defaults"] == (4, 4 * 4 * 5 * 3)
    assert counts["main"] == (50, 25 * (2 * 5 + 5))
    assert counts["methods"] == (4 * 9, 4 * (2 * 5 + 5 + 7 * 2 * 5))
    assert counts["robustness"] == (2 * (1 + 15), 2 * 16 * 2 * 5)


def test_dry_run_seeds_option(capsys):
    counts, _ = dry_run_counts(capsys, "--profile", "paper", "--seeds", "2")
    assert counts["main"] == (50, 25 * (2 * 2 + 2))
    assert counts["lr_search"] == (25, 25 * 5 * 2)


def test_dry_run_cost_estimate():
    sweep = Planner(reproduce.quick_profile(), seeds=1).main(rates={})[0]
    # digits: 1438 - ceil(0.1 x 1438) = 1294 examples, 3 epochs, baseline 1 member and PG 4.
    assert reproduce.estimate_cost([sweep]) == 1294 * 3 * (1 + 4)


def test_matched_baseline_epochs():
    sweeps = Planner(reproduce.quick_profile()).main(rates={("digits", "mlp"): 0.1})
    matched = [sweep for sweep in sweeps if sweep.arm == "matched" and sweep.dataset == "digits" and sweep.model == "mlp"]
    assert len(matched) == 1
    assert "trainer.epochs=12" in matched[0].overrides
    assert "method=baseline" in matched[0].overrides
    assert "optimizer.lr=0.1" in matched[0].overrides


def test_best_rates_uses_mean_val_f1():
    runs = pd.DataFrame({
        "used": [True] * 4,
        "dataset": ["digits"] * 4,
        "model": ["mlp"] * 4,
        "optimizer.lr": [0.01, 0.01, 0.1, 0.1],
        "val_f1": [0.9, 0.5, 0.8, 0.8],
    })
    assert reproduce.best_rates(runs) == {("digits", "mlp"): 0.1}


# ---------------------------------------------------------------------------
# Verdicts on fixture tables


def comparisons(differences_per_row):
    """Build a comparison table from per-seed differences, with the same statistics as collect."""
    from popgrad_cli.collect import paired_statistics

    rows = []
    for differences in differences_per_row:
        statistics = paired_statistics(np.asarray(differences) + 0.5, np.full(len(differences), 0.5))
        rows.append({"diff": statistics["mean_diff"], "ci_low": statistics["ci_low"], "ci_high": statistics["ci_high"],
                     "n_pairs": statistics["n_pairs"]})
    return pd.DataFrame(rows)


def test_verdict_clear_win():
    decision, evidence = verdict(comparisons([[0.05, 0.06, 0.04], [0.10, 0.12, 0.11]]))
    assert decision == SUPPORTED
    assert "2 with the 95% CI above 0" in evidence


def test_verdict_clear_loss():
    decision, _ = verdict(comparisons([[-0.05, -0.06, -0.04], [-0.10, -0.12, -0.11]]))
    assert decision == NOT_SUPPORTED


def test_verdict_tie_is_undecided():
    decision, _ = verdict(comparisons([[0.05, -0.05, 0.01], [-0.02, 0.03, -0.01]]))
    assert decision == UNDECIDED


def test_verdict_win_and_loss_is_mixed():
    decision, _ = verdict(comparisons([[0.05, 0.06, 0.04], [-0.05, -0.06, -0.04]]))
    assert decision == MIXED


def test_verdict_win_and_tie_is_mixed():
    decision, _ = verdict(comparisons([[0.05, 0.06, 0.04], [0.05, -0.05, 0.01]]))
    assert decision == MIXED


def test_verdict_two_seeds_undecided():
    decision, _ = verdict(comparisons([[0.05, 0.06], [0.10, 0.12]]))
    assert decision == UNDECIDED


def test_verdict_empty_undecided():
    decision, _ = verdict(pd.DataFrame())
    assert decision == UNDECIDED


def fixture_runs(pg_shift, method_shift=0.02, seeds=(0, 1, 2)):
    """Labelled runs where PG adds ``pg_shift`` and each method adds ``method_shift`` to F1."""
    noise = {0: 0.001, 1: -0.002, 2: 0.0015, 3: 0.0}
    main, methods, robustness = [], [], []
    for seed in seeds:
        base = 0.8 + noise[seed]
        for arm, value in (("baseline", base), ("matched", base + 0.005), ("pg", base + pg_shift)):
            main.append({"dataset": "digits", "model": "mlp", "arm": arm, "variant": "", "seed": seed, "test_f1": value})
            if arm != "matched":
                for variant in ("reference", "epochs=10"):
                    robustness.append({"dataset": "digits", "model": "mlp", "arm": arm, "variant": variant, "seed": seed,
                                       "test_f1": value})
        for variant, shift in (("off", 0.0), ("relu", method_shift)):
            for arm, value in (("baseline", base + shift), ("pg", base + shift + pg_shift)):
                methods.append({"dataset": "digits", "model": "mlp", "arm": arm, "variant": variant, "seed": seed,
                                "test_f1": value})
        methods.append({"dataset": "digits", "model": "mlp", "arm": "matched", "variant": "off", "seed": seed,
                        "test_f1": base + 0.005})
    return pd.DataFrame(main), pd.DataFrame(methods), pd.DataFrame(robustness)


def checklist_for(pg_shift, method_shift=0.02, seeds=(0, 1, 2)):
    main, methods, robustness = fixture_runs(pg_shift, method_shift, seeds)
    return claims_checklist(table_main(main), table_methods(methods), table_robustness(robustness))


def test_checklist_pg_wins():
    claims = checklist_for(pg_shift=0.05).set_index("claim")["verdict"]
    assert claims["1"] == SUPPORTED
    assert claims["2"] == SUPPORTED
    assert claims["3"] == SUPPORTED


def test_checklist_pg_loses():
    claims = checklist_for(pg_shift=-0.05).set_index("claim")["verdict"]
    assert claims["1"] == NOT_SUPPORTED
    assert claims["2"] == NOT_SUPPORTED
    assert claims["3"] == NOT_SUPPORTED


def test_checklist_pg_ties():
    claims = checklist_for(pg_shift=0.0, method_shift=0.0).set_index("claim")["verdict"]
    assert claims["1"] == UNDECIDED
    assert claims["2"] == UNDECIDED
    assert claims["3"] == UNDECIDED


def test_checklist_pg_below_method_gain():
    # PG helps, but less than the method: claims 1 and 2 hold, claim 3 does not.
    claims = checklist_for(pg_shift=0.01, method_shift=0.05).set_index("claim")["verdict"]
    assert claims["1"] == SUPPORTED
    assert claims["3"] == NOT_SUPPORTED


def test_checklist_two_seeds_undecided():
    claims = checklist_for(pg_shift=0.05, seeds=(0, 1)).set_index("claim")["verdict"]
    assert set(claims) == {UNDECIDED}


def test_checklist_without_runs():
    empty = pd.DataFrame(columns=["run_dir", "used", "method"])
    claims = claims_checklist(table_main(empty), table_methods(empty), table_robustness(empty))
    assert set(claims["verdict"]) == {UNDECIDED}


def test_table_main_columns():
    main, _, _ = fixture_runs(pg_shift=0.05)
    table = table_main(main)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["diff"] == pytest.approx(0.05)
    assert row["vs_matched_diff"] == pytest.approx(0.045)
    assert row["n_pairs"] == 3
    assert row["baseline_n"] == 3


def test_table_robustness_lists_reference():
    _, _, robustness = fixture_runs(pg_shift=0.05)
    table = table_robustness(robustness)
    assert list(table["value"]) == ["reference", "10"]
    assert set(table["axis"]) == {"epochs"}


# ---------------------------------------------------------------------------
# A real run


def capture_log(out):
    return "\n".join(path.read_text() for path in out.glob("sweeps/main/*/*/train.log"))


@pytest.mark.slow
def test_tiny_profile_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("POPGRAD_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    arguments = ["--profile", "quick", "--tiny", "--datasets", "digits", "--epochs", "1", "--seeds", "2", "--out", str(out),
                 "--no-plots"]
    assert reproduce.main(arguments) == 0
    for name in ("table1_main", "table2_methods", "table3_robustness", "claims", "lr_search", "pg_defaults"):
        assert (out / "tables" / f"{name}.csv").is_file(), name
    report = (out / "report.md").read_text()
    for heading in ("## Table 1", "## Table 2", "## Table 3", "## Claims checklist"):
        assert heading in report
    claims = pd.read_csv(out / "tables" / "claims.csv")
    assert set(claims["verdict"]) == {UNDECIDED}
    robustness = pd.read_csv(out / "tables" / "table3_robustness.csv")
    assert len(robustness) == 2

    assert len(list(out.glob("sweeps/*/*/*/metrics.json"))) == 28

    # A rerun trains nothing: every job folder already has a completed metrics.json.
    before = {path: path.stat().st_mtime_ns for path in out.glob("sweeps/main/*/*/metrics.json")}
    assert len(before) == 6
    assert reproduce.main([*arguments, "--stages", "main"]) == 0
    after = {path: path.stat().st_mtime_ns for path in out.glob("sweeps/main/*/*/metrics.json")}
    assert after == before
    assert "already completed" in capture_log(out)
