"""``popgrad reproduce``: the sweeps behind the tables of Sakai et al. (arXiv:2010.12260).

Stages run in order: the baseline learning-rate search (``lr_search``), the search for
PG's own settings (``pg_defaults``), the main grid (``main``), standard methods with and
without PG (``methods``) and the robustness axes (``robustness``). Each stage is a set
of ``popgrad train -m +experiment=<preset> ...`` sweeps, one per data set x model cell
(and per variant), each written to a fixed ``hydra.sweep.dir`` under the output folder,
so a rerun skips the jobs that completed. The best baseline rate of each cell, by mean
validation macro F1 over seeds, is passed to every arm of the later stages as
``optimizer.lr``.

The compute-matched baseline is ``method=baseline`` trained for P x the epochs with
the same learning rate: PG with shared batches costs P gradient evaluations per
example and step, so both then spend the same number of them.

Paired statistics come from ``popgrad_cli.collect.paired_statistics``, the function
behind collect's comparison.csv: the two-sided paired t-test (scipy.stats.ttest_rel)
over seeds and the 95% Student t interval of the mean difference.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import yaml

STAGES = ("lr_search", "pg_defaults", "main", "methods", "robustness")
PRESETS = {
    "lr_search": "paper_lr_search",
    "pg_defaults": "pg_defaults",
    "main": "paper_main",
    "methods": "paper_methods",
    "robustness": "paper_robustness",
}
LAUNCHERS = ("basic", "joblib", "submitit_slurm")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# Official training-split sizes, before dataset.val_fraction is held out. digits has
# no official split: popgrad's fixed 80/20 split leaves 1438 training images.
TRAIN_SPLIT_SIZES = {
    "digits": 1438,
    "mnist": 60000,
    "fashion_mnist": 60000,
    "cifar10": 50000,
    "cifar100": 50000,
    "svhn": 73257,
    "stl10": 5000,
}
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_EPOCHS = 10

# A claim is decided only from comparisons with at least this many paired seeds.
MIN_PAIRED_SEEDS = 3
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
MIXED = "mixed"
UNDECIDED = "undecided (too few seeds/too small a profile)"
# Paired differences within this distance of 0 count as ties, as in popgrad collect.
TIE_TOLERANCE = 1e-12

PLACEHOLDER_LR = "<best_lr>"


def experiment_dir() -> Path:
    from popgrad_cli.cli import conf_dir

    return conf_dir() / "experiment"


# ---------------------------------------------------------------------------
# Presets and sweep expansion


def split_sweep_values(text: str) -> List[str]:
    """Split a Hydra sweep value such as ``a,b,[c,d]`` at the commas outside brackets."""
    values, depth, current = [], 0, ""
    for character in str(text):
        if character in "[{(":
            depth += 1
        elif character in "]})":
            depth -= 1
        if character == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += character
    values.append(current.strip())
    return values


def load_preset(name: str) -> Dict[str, Any]:
    """Return the parsed YAML of conf/experiment/<name>.yaml."""
    path = experiment_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(file.stem for file in experiment_dir().glob("*.yaml")))
        raise ValueError(f"experiment preset {name!r} not found in {path.parent}; choose one of {known}")
    return yaml.safe_load(path.read_text()) or {}


def preset_axes(name: str) -> Dict[str, List[str]]:
    """Return the preset's ``hydra.sweeper.params`` as key -> list of values, in file order."""
    params = ((load_preset(name).get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return {str(key): split_sweep_values(value) for key, value in params.items()}


def preset_value(name: str, dotted_key: str, default: Any = None) -> Any:
    node: Any = load_preset(name)
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def merge_axes(axes: Dict[str, List[str]], overrides: Sequence[str]) -> Dict[str, List[str]]:
    """Apply command-line overrides to preset axes the way Hydra's BasicSweeper does.

    BasicSweeper appends the command-line overrides after the preset's params and keeps
    one entry per key, so a command-line value replaces the preset's for the same key
    while the key keeps the preset's position.
    """
    merged = {key: list(values) for key, values in axes.items()}
    for override in overrides:
        key, _, value = override.partition("=")
        merged[key] = split_sweep_values(value)
    return merged


def expand_jobs(axes: Dict[str, List[str]]) -> List[Dict[str, str]]:
    keys = list(axes)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(axes[key] for key in keys))]


def pg_population_default() -> int:
    from popgrad_cli.cli import conf_dir

    return int(yaml.safe_load((conf_dir() / "method" / "pg.yaml").read_text())["population_size"])


def training_examples(dataset: str, train_size: Any = None, val_fraction: Any = None) -> int:
    """Return the number of training examples a run of ``dataset`` sees per epoch."""
    if train_size not in (None, "null"):
        return int(train_size)
    split = TRAIN_SPLIT_SIZES.get(dataset)
    if split is None:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(TRAIN_SPLIT_SIZES)}")
    fraction = DEFAULT_VAL_FRACTION if val_fraction in (None, "null") else float(val_fraction)
    return split - int(math.ceil(fraction * split))


def job_cost(job: Dict[str, str], preset: str) -> int:
    """Return a job's estimated gradient evaluations: training examples x epochs x members."""
    epochs = int(job.get("trainer.epochs", preset_value(preset, "trainer.epochs", DEFAULT_EPOCHS)))
    examples = training_examples(job["dataset"], job.get("dataset.train_size"), job.get("dataset.val_fraction"))
    members = 1
    if job.get("method") in ("pg", "pg_swa"):
        members = int(job.get("method.population_size", pg_population_default()))
    return examples * epochs * members


# ---------------------------------------------------------------------------
# Profiles and the plan


@dataclass(frozen=True)
class Profile:
    """Grids of one profile; a None field keeps the preset's own value."""

    name: str
    datasets: Tuple[str, ...]
    models: Tuple[str, ...]
    seeds: Optional[int]
    epochs: Optional[int]
    learning_rates: Optional[Tuple[float, ...]]
    population_size: Optional[int]
    pg_search_cells: Tuple[Tuple[str, str], ...]
    pg_search_population: Optional[Tuple[int, ...]]
    pg_search_sigma: Optional[Tuple[float, ...]]
    methods_cells: Tuple[Tuple[str, str], ...]
    method_variants: Dict[str, Tuple[str, ...]]
    robustness_cells: Tuple[Tuple[str, str], ...]
    # axis name -> (override key, values); "lr" values are factors of the cell's rate.
    robustness_axes: Dict[str, Tuple[str, Tuple[Any, ...]]]
    dataset_overrides: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # Data set x model cells of lr_search and main to leave out.
    excluded_cells: Tuple[Tuple[str, str], ...] = ()
    # torch CPU threads for in-process runs; None keeps torch's default.
    torch_threads: Optional[int] = None
    # Seeds of the two search stages (lr_search, pg_defaults) when fewer than ``seeds``.
    search_seeds: Optional[int] = None
    notes: Tuple[str, ...] = ()


PAPER_METHOD_VARIANTS = {
    "relu": ("model.activation=relu",),
    "batch_norm": ("model.batch_norm=true",),
    "xavier": ("model.init=xavier",),
    "dropout": ("model.dropout=0.2",),
    "cosine": ("schedule=cosine",),
    "step": ("schedule=step",),
    "adam": ("optimizer=adam", "optimizer.lr=0.001"),
}

PAPER_MODELS = ("densenet161", "mobilenet_v2", "resnet18", "resnet50", "shufflenet_v2")
PAPER_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "stl10", "svhn")


def paper_profile() -> Profile:
    return Profile(
        name="paper",
        datasets=PAPER_DATASETS,
        models=PAPER_MODELS,
        seeds=None,
        epochs=None,
        learning_rates=None,
        population_size=None,
        pg_search_cells=(("fashion_mnist", "cnn"), ("fashion_mnist", "resnet18"), ("cifar10", "cnn"), ("cifar10", "resnet18")),
        pg_search_population=None,
        pg_search_sigma=None,
        methods_cells=(("fashion_mnist", "mlp"), ("fashion_mnist", "cnn"), ("cifar10", "mlp"), ("cifar10", "cnn")),
        method_variants=dict(PAPER_METHOD_VARIANTS),
        robustness_cells=(("cifar10", "mlp"), ("cifar10", "cnn")),
        robustness_axes={
            "epochs": ("trainer.epochs", (25, 50, 200)),
            "width": ("model.width", (64, 1024)),
            "depth": ("model.depth", (1, 4)),
            "lr": ("optimizer.lr", (0.1, 0.3, 3.0, 10.0)),
            "batch_size": ("trainer.batch_size", (32, 512)),
            "train_size": ("dataset.train_size", (5000, 20000)),
        },
    )


def quick_profile(fashion_dir: Path = FASHION_MNIST_DEBIAN) -> Profile:
    """Build the smoke-level profile for a 2-core CPU: digits and a Fashion-MNIST subset."""
    notes = []
    datasets: Tuple[str, ...] = ("digits", "fashion_mnist")
    if not all((fashion_dir / name).is_file() for name in FASHION_MNIST_FILES):
        datasets = ("digits",)
        notes.append(
            f"Fashion-MNIST files not found in {fashion_dir} (apt-get install dataset-fashion-mnist): "
            "this quick profile ran on digits only."
        )
    return Profile(
        name="quick",
        datasets=datasets,
        models=("mlp", "cnn"),
        seeds=3,
        search_seeds=2,
        epochs=3,
        # On 2 cores shared with another training process, a digits epoch took 0.3 s with one
        # thread and 1.8 s with two, because the second thread waited for a busy core.
        torch_threads=1,
        # NOTE: cnn on Fashion-MNIST took 5 s an epoch (20 s with PG) on 2 shared cores, too slow for 20 minutes.
        excluded_cells=(("fashion_mnist", "cnn"),),
        learning_rates=(0.01, 0.1),
        population_size=4,
        pg_search_cells=(("digits", "mlp"),),
        pg_search_population=(2, 4),
        pg_search_sigma=(0.01, 0.05),
        methods_cells=(("digits", "mlp"), ("digits", "cnn")),
        method_variants={name: PAPER_METHOD_VARIANTS[name] for name in ("relu", "batch_norm", "xavier", "dropout", "cosine", "adam")},
        robustness_cells=(("digits", "mlp"),),
        robustness_axes={
            "epochs": ("trainer.epochs", (10,)),
            "width": ("model.width", (64,)),
            "depth": ("model.depth", (1,)),
            "lr": ("optimizer.lr", (0.3,)),
            "batch_size": ("trainer.batch_size", (32,)),
            "train_size": ("dataset.train_size", (400,)),
        },
        dataset_overrides={
            # 1000 training and 1200 validation images keep an epoch under a second on a CPU.
            "fashion_mnist": (f"dataset.raw_dir={fashion_dir}", "dataset.train_size=1000", "dataset.val_fraction=0.02"),
        },
        notes=tuple(notes),
    )


def tiny_profile(profile: Profile) -> Profile:
    """Shrink a profile to a test-sized run: one model, one variant per table, one lr."""
    return replace(
        profile,
        models=profile.models[:1],
        learning_rates=(0.1,),
        pg_search_cells=profile.pg_search_cells[:1],
        pg_search_population=(2,),
        pg_search_sigma=(0.01,),
        methods_cells=tuple(cell for cell in profile.methods_cells if cell[1] == profile.models[0])[:1],
        method_variants=dict(list(profile.method_variants.items())[:1]),
        robustness_cells=profile.robustness_cells[:1],
        robustness_axes=dict(list(profile.robustness_axes.items())[:1]),
        population_size=2,
    )


@dataclass
class Sweep:
    """One ``popgrad train -m`` command of a stage."""

    stage: str
    name: str
    preset: str
    overrides: List[str]
    dataset: str
    model: str
    variant: str = ""
    arm: str = ""  # "matched" marks the compute-matched baseline

    def jobs(self) -> List[Dict[str, str]]:
        return expand_jobs(merge_axes(preset_axes(self.preset), self.overrides))

    def directory(self, out: Path) -> Path:
        return Path(out) / "sweeps" / self.stage / self.name

    def arguments(self, out: Path, launcher: str, extra: Sequence[str] = ()) -> List[str]:
        arguments = ["-m", f"+experiment={self.preset}", *self.overrides, *extra, f"hydra.sweep.dir={self.directory(out)}"]
        # Tables are written once per stage, not after every sweep.
        arguments.append("hydra.callbacks.summary.collect=false")
        if launcher != "basic":
            arguments.append(f"hydra/launcher={launcher}")
        return arguments

    def command(self, out: Path, launcher: str, extra: Sequence[str] = ()) -> str:
        return shlex.join(["popgrad", "train", *self.arguments(out, launcher, extra)])


def _dedupe(overrides: Sequence[str]) -> List[str]:
    """Keep the last override of each key, in first-seen order, as Hydra would apply them."""
    by_key: Dict[str, str] = {}
    for override in overrides:
        by_key[override.partition("=")[0]] = override
    return list(by_key.values())


def _join(values: Sequence[Any]) -> str:
    return ",".join(str(value) for value in values)


class Planner:
    """Build each stage's sweeps from a profile and, for later stages, the chosen rates."""

    def __init__(self, profile: Profile, seeds: Optional[int] = None):
        self.profile = profile
        self.explicit_seeds = seeds
        self.seeds = seeds if seeds is not None else profile.seeds

    def common(self, dataset: str, search: bool = False) -> List[str]:
        overrides = []
        seeds = self.seeds
        if search and self.explicit_seeds is None and self.profile.search_seeds is not None:
            seeds = self.profile.search_seeds
        if seeds is not None:
            overrides.append(f"seed={_join(range(seeds))}")
        if self.profile.epochs is not None:
            overrides.append(f"trainer.epochs={self.profile.epochs}")
        overrides += list(self.profile.dataset_overrides.get(dataset, ()))
        return overrides

    def pg_overrides(self) -> List[str]:
        if self.profile.population_size is None:
            return []
        return [f"method.population_size={self.profile.population_size}"]

    def population_size(self) -> int:
        return self.profile.population_size or pg_population_default()

    def epochs(self, preset: str) -> int:
        if self.profile.epochs is not None:
            return self.profile.epochs
        return int(preset_value(preset, "trainer.epochs", DEFAULT_EPOCHS))

    def cells(self) -> List[Tuple[str, str]]:
        return [(dataset, model) for dataset in self.profile.datasets for model in self.profile.models
                if (dataset, model) not in self.profile.excluded_cells]

    def lr_search(self) -> List[Sweep]:
        sweeps = []
        for dataset, model in self.cells():
            overrides = [f"dataset={dataset}", f"model={model}", *self.common(dataset, search=True)]
            if self.profile.learning_rates is not None:
                overrides.append(f"optimizer.lr={_join(self.profile.learning_rates)}")
            sweeps.append(Sweep("lr_search", f"{dataset}-{model}", PRESETS["lr_search"], _dedupe(overrides), dataset, model))
        return sweeps

    def _rate(self, rates: Optional[Dict[Tuple[str, str], float]], dataset: str, model: str) -> List[str]:
        if rates is None:
            return [f"optimizer.lr={PLACEHOLDER_LR}"]
        rate = rates.get((dataset, model))
        return [] if rate is None else [f"optimizer.lr={rate}"]

    def pg_defaults(self, rates=None) -> List[Sweep]:
        sweeps = []
        for dataset, model in self.profile.pg_search_cells:
            overrides = [f"dataset={dataset}", f"model={model}", *self.common(dataset, search=True),
                         *self._rate(rates, dataset, model)]
            if self.profile.pg_search_population is not None:
                overrides.append(f"method.population_size={_join(self.profile.pg_search_population)}")
            if self.profile.pg_search_sigma is not None:
                overrides.append(f"method.sigma={_join(self.profile.pg_search_sigma)}")
            sweeps.append(Sweep("pg_defaults", f"{dataset}-{model}", PRESETS["pg_defaults"], _dedupe(overrides), dataset, model))
        return sweeps

    def _matched(self, stage: str, dataset: str, model: str, base: List[str], variant: str = "") -> Sweep:
        epochs = self.population_size() * self.epochs(PRESETS[stage])
        overrides = [*base, "method=baseline", f"trainer.epochs={epochs}"]
        name = f"{dataset}-{model}-{variant + '-' if variant else ''}matched"
        return Sweep(stage, name, PRESETS[stage], _dedupe(overrides), dataset, model, variant=variant, arm="matched")

    def main(self, rates=None) -> List[Sweep]:
        sweeps = []
        for dataset, model in self.cells():
            base = [f"dataset={dataset}", f"model={model}", *self.common(dataset), *self._rate(rates, dataset, model)]
            sweeps.append(Sweep("main", f"{dataset}-{model}", PRESETS["main"], _dedupe(base + self.pg_overrides()), dataset, model))
            sweeps.append(self._matched("main", dataset, model, base))
        return sweeps

    def methods(self, rates=None) -> List[Sweep]:
        sweeps = []
        for dataset, model in self.profile.methods_cells:
            base = [f"dataset={dataset}", f"model={model}", *self.common(dataset), *self._rate(rates, dataset, model)]
            sweeps.append(Sweep("methods", f"{dataset}-{model}-off", PRESETS["methods"], _dedupe(base + self.pg_overrides()), dataset, model, variant="off"))
            sweeps.append(self._matched("methods", dataset, model, base, variant="off"))
            for variant, overrides in self.profile.method_variants.items():
                sweeps.append(
                    Sweep("methods", f"{dataset}-{model}-{variant}", PRESETS["methods"],
                          _dedupe(base + self.pg_overrides() + list(overrides)), dataset, model, variant=variant)
                )
        return sweeps

    def robustness(self, rates=None) -> List[Sweep]:
        sweeps = []
        for dataset, model in self.profile.robustness_cells:
            rate_override = self._rate(rates, dataset, model)
            base = [f"dataset={dataset}", f"model={model}", *self.common(dataset), *rate_override, *self.pg_overrides()]
            sweeps.append(Sweep("robustness", f"{dataset}-{model}-reference", PRESETS["robustness"], _dedupe(base), dataset, model, variant="reference"))
            for axis, (key, values) in self.profile.robustness_axes.items():
                for value in values:
                    if axis == "lr":
                        value = self._scaled_rate(rates, dataset, model, value)
                    # Hydra's override parser rejects a second "=" in hydra.sweep.dir, so the folder uses "-".
                    sweeps.append(
                        Sweep("robustness", f"{dataset}-{model}-{axis}-{value}", PRESETS["robustness"],
                              _dedupe(base + [f"{key}={value}"]), dataset, model, variant=f"{axis}={value}")
                    )
        return sweeps

    def _scaled_rate(self, rates, dataset: str, model: str, factor: float) -> str:
        if rates is None:
            return f"{factor}x{PLACEHOLDER_LR.strip('<>')}"
        rate = rates.get((dataset, model), preset_value(PRESETS["robustness"], "optimizer.lr", 0.01))
        return f"{float(rate) * float(factor):.6g}"

    def stage(self, name: str, rates=None) -> List[Sweep]:
        if name == "lr_search":
            return self.lr_search()
        return getattr(self, name)(rates)


def count_jobs(sweeps: Sequence[Sweep]) -> int:
    return sum(len(sweep.jobs()) for sweep in sweeps)


def estimate_cost(sweeps: Sequence[Sweep]) -> int:
    return sum(job_cost(job, sweep.preset) for sweep in sweeps for job in sweep.jobs())


# ---------------------------------------------------------------------------
# Choosing rates and PG settings from finished stages


def best_rates(runs: pd.DataFrame, metric: str = "val_f1") -> Dict[Tuple[str, str], float]:
    """Return each (dataset, model)'s learning rate with the highest mean ``metric`` over seeds."""
    used = runs[runs["used"].astype(bool)] if len(runs) else runs
    rates: Dict[Tuple[str, str], float] = {}
    if not len(used):
        return rates
    means = used.groupby(["dataset", "model", "optimizer.lr"])[metric].mean().reset_index()
    for (dataset, model), group in means.groupby(["dataset", "model"]):
        best = group.sort_values([metric, "optimizer.lr"], ascending=[False, True]).iloc[0]
        rates[(dataset, model)] = float(best["optimizer.lr"])
    return rates


def lr_search_table(runs: pd.DataFrame, metric: str = "val_f1") -> pd.DataFrame:
    used = runs[runs["used"].astype(bool)]
    table = used.groupby(["dataset", "model", "optimizer.lr"])[metric].agg(["mean", "std", "count"]).reset_index()
    rates = best_rates(runs, metric)
    table["chosen"] = [rates.get((row.dataset, row.model)) == float(row._3) for row in table.itertuples()]
    return table.rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_std", "count": "n"})


def pg_search_table(runs: pd.DataFrame, metric: str = "val_f1") -> pd.DataFrame:
    """Return mean ``metric`` per (population size, sigma) over all cells and seeds, best first."""
    used = runs[runs["used"].astype(bool)]
    keys = ["method.population_size", "method.sigma"]
    table = used.groupby(keys)[metric].agg(["mean", "std", "count"]).reset_index()
    table = table.rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_std", "count": "n"})
    return table.sort_values(f"{metric}_mean", ascending=False).reset_index(drop=True)


# ---------------------------------------------------------------------------
# Tables (pure functions of labelled runs)


def _paired(method: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> Dict[str, Any]:
    from popgrad_cli.collect import paired_statistics

    left = method.groupby("seed")[metric].mean()
    right = baseline.groupby("seed")[metric].mean()
    seeds = sorted(set(left.index) & set(right.index))
    return paired_statistics([left[seed] for seed in seeds], [right[seed] for seed in seeds])


def _mean_std(frame: pd.DataFrame, metric: str) -> Tuple[float, float, int]:
    values = frame[metric].astype(float).to_numpy()
    if len(values) == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values)


def _comparison_columns(prefix: str, statistics: Dict[str, Any]) -> Dict[str, Any]:
    return {
        f"{prefix}diff": statistics["mean_diff"],
        f"{prefix}ci_low": statistics["ci_low"],
        f"{prefix}ci_high": statistics["ci_high"],
        f"{prefix}p": statistics["t_pvalue"],
        f"{prefix}n_pairs": statistics["n_pairs"],
    }


def table_main(runs: pd.DataFrame, metric: str = "test_f1") -> pd.DataFrame:
    """Table 1: baseline, compute-matched baseline and PG per data set x model.

    ``runs`` needs the columns dataset, model, arm (baseline, matched or pg), seed and ``metric``.
    """
    if len(runs) == 0:
        return pd.DataFrame()
    rows = []
    for (dataset, model), cell in runs.groupby(["dataset", "model"], sort=True):
        arms = {arm: cell[cell["arm"] == arm] for arm in ("baseline", "matched", "pg")}
        row: Dict[str, Any] = {"dataset": dataset, "model": model}
        for arm, frame in arms.items():
            row[f"{arm}_mean"], row[f"{arm}_std"], row[f"{arm}_n"] = _mean_std(frame, metric)
        row.update(_comparison_columns("", _paired(arms["pg"], arms["baseline"], metric)))
        row.update(_comparison_columns("vs_matched_", _paired(arms["pg"], arms["matched"], metric)))
        rows.append(row)
    return pd.DataFrame(rows)


def table_methods(runs: pd.DataFrame, metric: str = "test_f1") -> pd.DataFrame:
    """Table 2: each method's gain, PG's gain with every method off, and PG combined with the method.

    ``runs`` needs dataset, model, variant ("off" for the reference), arm (baseline,
    matched or pg), seed and ``metric``. Per variant:
    method gain = baseline with the method - baseline with all off;
    PG gain = PG - baseline, all off;
    PG with method = PG with the method - baseline with the method;
    PG gain - method gain = PG (all off) - baseline with the method, paired by seed.
    """
    if len(runs) == 0:
        return pd.DataFrame()
    rows = []
    for (dataset, model), cell in runs.groupby(["dataset", "model"], sort=True):
        reference = cell[cell["variant"] == "off"]
        base_off = reference[reference["arm"] == "baseline"]
        pg_off = reference[reference["arm"] == "pg"]
        matched_off = reference[reference["arm"] == "matched"]
        pg_gain = _paired(pg_off, base_off, metric)
        matched_gain = _paired(matched_off, base_off, metric)
        for variant in [name for name in dict.fromkeys(cell["variant"]) if name != "off"]:
            frame = cell[cell["variant"] == variant]
            base_on = frame[frame["arm"] == "baseline"]
            pg_on = frame[frame["arm"] == "pg"]
            row: Dict[str, Any] = {"dataset": dataset, "model": model, "method": variant}
            row["baseline_off_mean"] = _mean_std(base_off, metric)[0]
            row["baseline_on_mean"] = _mean_std(base_on, metric)[0]
            row["pg_on_mean"] = _mean_std(pg_on, metric)[0]
            row.update(_comparison_columns("method_gain_", _paired(base_on, base_off, metric)))
            row.update(_comparison_columns("pg_gain_", pg_gain))
            row.update(_comparison_columns("matched_gain_", matched_gain))
            row.update(_comparison_columns("pg_with_method_", _paired(pg_on, base_on, metric)))
            row.update(_comparison_columns("pg_minus_method_gain_", _paired(pg_off, base_on, metric)))
            rows.append(row)
    return pd.DataFrame(rows)


def table_robustness(runs: pd.DataFrame, metric: str = "test_f1") -> pd.DataFrame:
    """Table 3: PG - baseline per robustness axis value; the reference point is listed under every axis.

    ``runs`` needs dataset, model, variant ("reference" or "axis=value"), arm, seed and ``metric``.
    """
    if len(runs) == 0:
        return pd.DataFrame()
    rows = []
    for (dataset, model), cell in runs.groupby(["dataset", "model"], sort=True):
        variants = list(dict.fromkeys(cell["variant"]))
        axes = list(dict.fromkeys(variant.split("=", 1)[0] for variant in variants if variant != "reference"))
        for axis in axes:
            for variant in ["reference"] + [name for name in variants if name.split("=", 1)[0] == axis]:
                frame = cell[cell["variant"] == variant]
                row: Dict[str, Any] = {
                    "dataset": dataset,
                    "model": model,
                    "axis": axis,
                    "value": "reference" if variant == "reference" else variant.split("=", 1)[1],
                    "baseline_mean": _mean_std(frame[frame["arm"] == "baseline"], metric)[0],
                    "pg_mean": _mean_std(frame[frame["arm"] == "pg"], metric)[0],
                }
                row.update(_comparison_columns("", _paired(frame[frame["arm"] == "pg"], frame[frame["arm"] == "baseline"], metric)))
                rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Claims


def classify_comparison(n_pairs: float, diff: float, ci_low: float, ci_high: float, min_pairs: int = MIN_PAIRED_SEEDS) -> str:
    """Return better, worse, tie or too_few for one paired comparison (difference = PG side - other side)."""
    if not (n_pairs >= min_pairs) or not np.isfinite(diff):
        return "too_few"
    if np.isfinite(ci_low) and np.isfinite(ci_high):
        if ci_low > 0:
            return "better"
        if ci_high < 0:
            return "worse"
        return "tie"
    # Zero variance: every paired difference is the same number.
    if abs(diff) <= TIE_TOLERANCE:
        return "tie"
    return "better" if diff > 0 else "worse"


def verdict(comparisons: pd.DataFrame, prefix: str = "", min_pairs: int = MIN_PAIRED_SEEDS) -> Tuple[str, str]:
    """Return (verdict, evidence) for a claim that PG's side is higher in every comparison.

    ``comparisons`` has columns ``<prefix>diff``, ``<prefix>ci_low``, ``<prefix>ci_high``
    and ``<prefix>n_pairs``. A comparison counts as better or worse only when its 95%
    interval excludes 0. The verdict is undecided when any comparison has fewer than
    ``min_pairs`` paired seeds or when every interval contains 0.
    """
    if comparisons is None or len(comparisons) == 0:
        return UNDECIDED, "no comparisons were run"
    outcomes = [
        classify_comparison(row[f"{prefix}n_pairs"], row[f"{prefix}diff"], row[f"{prefix}ci_low"], row[f"{prefix}ci_high"], min_pairs)
        for _, row in comparisons.iterrows()
    ]
    counts = {name: outcomes.count(name) for name in ("better", "tie", "worse", "too_few")}
    differences = comparisons[f"{prefix}diff"].astype(float)
    evidence = (
        f"{len(outcomes)} comparisons: {counts['better']} with the 95% CI above 0, {counts['tie']} containing 0, "
        f"{counts['worse']} below 0, {counts['too_few']} with fewer than {min_pairs} paired seeds; "
        f"mean difference {differences.mean():+.4f} (min {differences.min():+.4f}, max {differences.max():+.4f})"
    )
    if counts["too_few"]:
        return UNDECIDED, evidence
    if counts["better"] == 0 and counts["worse"] == 0:
        return UNDECIDED, evidence
    if counts["worse"] == 0 and counts["tie"] == 0:
        return SUPPORTED, evidence
    if counts["better"] == 0:
        return NOT_SUPPORTED, evidence
    return MIXED, evidence


CLAIMS = (
    ("1", "PG improves F1 across data sets, architectures, hyper-parameter values, training lengths and model sizes",
     "Table 1 (PG - baseline) and Table 3 (PG - baseline per axis value)"),
    ("2", "The gain holds when PG is combined with ReLU, batch norm, Xavier init, dropout, lr decay and Adam",
     "Table 2, PG with the method - the method alone"),
    ("3", "PG's F1 gain is as high as or higher than that of each of those methods",
     "Table 2, PG gain - method gain (PG with all off - baseline with the method, paired by seed)"),
)


def claims_checklist(main: pd.DataFrame, methods: pd.DataFrame, robustness: pd.DataFrame,
                     min_pairs: int = MIN_PAIRED_SEEDS) -> pd.DataFrame:
    """Return one row per claim with its verdict and the numbers behind it."""
    columns = ["diff", "ci_low", "ci_high", "n_pairs"]
    parts = [main[columns]] if len(main) else []
    if len(robustness):
        # Table 3 repeats the reference point under every axis, so only the changed values count here.
        parts.append(robustness[robustness["value"] != "reference"][columns])
    claim_one = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    verdicts = [
        verdict(claim_one, "", min_pairs),
        verdict(methods, "pg_with_method_", min_pairs) if len(methods) else verdict(pd.DataFrame()),
        verdict(methods, "pg_minus_method_gain_", min_pairs) if len(methods) else verdict(pd.DataFrame()),
    ]
    rows = []
    for (number, claim, source), (decision, evidence) in zip(CLAIMS, verdicts):
        rows.append({"claim": number, "statement": claim, "verdict": decision, "evidence": evidence, "source": source})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Running the stages


def label_runs(runs: pd.DataFrame, sweeps: Sequence[Sweep], out: Path) -> pd.DataFrame:
    """Add each run's sweep, variant and arm (baseline, matched or pg) to collect's runs.csv rows."""
    folders = {str(sweep.directory(out).resolve()): sweep for sweep in sweeps}
    labelled = []
    for _, row in runs.iterrows():
        sweep = folders.get(str(Path(row["run_dir"]).resolve().parent))
        if sweep is None:
            continue
        row = row.copy()
        row["sweep"] = sweep.name
        row["variant"] = sweep.variant
        row["arm"] = "matched" if sweep.arm == "matched" else row["method"]
        labelled.append(row)
    if not labelled:
        return pd.DataFrame(columns=[*runs.columns, "sweep", "variant", "arm"])
    frame = pd.DataFrame(labelled)
    return frame[frame["used"].astype(bool)]


@dataclass
class StageOutcome:
    name: str
    sweeps: List[Sweep]
    jobs: int
    seconds: float
    exit_codes: List[int]
    runs: pd.DataFrame
    status_counts: Dict[str, int] = field(default_factory=dict)


def run_sweep(sweep: Sweep, out: Path, launcher: str, log: Callable[[str], None], extra: Sequence[str] = ()) -> int:
    """Run one sweep in this process through ``popgrad train`` and return its exit code.

    In-process runs save the 15-20 s that importing torch took per subprocess on a
    loaded 2-core machine; Hydra and the launcher still run each job as usual.
    """
    from popgrad_cli.cli import main as popgrad_main

    log(f"$ {sweep.command(out, launcher, extra)}")
    try:
        return popgrad_main(["train", *sweep.arguments(out, launcher, extra)])
    except SystemExit as error:  # Hydra exits on composition errors; the next sweep still runs
        return int(error.code or 1)


def collect_stage(name: str, sweeps: Sequence[Sweep], out: Path, plots: bool) -> Tuple[pd.DataFrame, Dict[str, int]]:
    from popgrad_cli.collect import CollectError, collect

    folders = [sweep.directory(out) for sweep in sweeps if sweep.directory(out).is_dir()]
    if not folders:
        return label_runs(pd.DataFrame(columns=["run_dir", "used", "method"]), sweeps, out), {}
    try:
        result = collect(folders, out_dir=Path(out) / "collected" / name, plots=plots)
    except CollectError as error:
        print(f"popgrad reproduce: collecting stage {name} failed: {error}", file=sys.stderr)
        return label_runs(pd.DataFrame(columns=["run_dir", "used", "method"]), sweeps, out), {}
    return label_runs(result.runs, sweeps, out), result.status_counts


def run_stage(name: str, sweeps: List[Sweep], out: Path, launcher: str, plots: bool, log, extra: Sequence[str] = ()) -> StageOutcome:
    started = time.perf_counter()
    log(f"== stage {name}: {len(sweeps)} sweeps, {count_jobs(sweeps)} jobs")
    codes = [run_sweep(sweep, out, launcher, log, extra) for sweep in sweeps]
    runs, counts = collect_stage(name, sweeps, out, plots)
    seconds = time.perf_counter() - started
    log(f"== stage {name} finished in {seconds:.0f} s: {len(runs)} completed runs")
    return StageOutcome(name, sweeps, count_jobs(sweeps), seconds, codes, runs, counts)


# ---------------------------------------------------------------------------
# Report


def hardware() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": f"{cpu} ({os.cpu_count()} logical cores)", "gpu": "none"}
    import torch

    if torch.cuda.is_available():
        info["gpu"] = ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count()))
    return info


def versions() -> Dict[str, str]:
    import torch

    from popgrad_cli import __version__

    return {"popgrad": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _cell(value: Any, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _pm(mean: Any, std: Any) -> str:
    if not np.isfinite(mean):
        return ""
    return f"{mean:.4f} ± {std:.4f}" if np.isfinite(std) else f"{mean:.4f}"


def _ci(low: Any, high: Any) -> str:
    return f"[{low:+.4f}, {high:+.4f}]" if np.isfinite(low) and np.isfinite(high) else "n/a"


def _p(value: Any) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _stats(row, prefix: str = "") -> List[str]:
    return [_cell(row[f"{prefix}diff"], signed=True), _ci(row[f"{prefix}ci_low"], row[f"{prefix}ci_high"]),
            _p(row[f"{prefix}p"]), str(row[f"{prefix}n_pairs"])]


def render_report(context: Dict[str, Any], tables: Dict[str, pd.DataFrame]) -> str:
    lines = [f"# Reproduction of Sakai et al. (arXiv:2010.12260): profile `{context['profile']}`", ""]
    lines += [
        f"- hardware: CPU {context['hardware']['cpu']}; GPU {context['hardware']['gpu']}",
        f"- versions: popgrad {context['versions']['popgrad']}, torch {context['versions']['torch']}, python {context['versions']['python']}",
        f"- profile: `{context['profile']}`; seeds: {context['seeds']}; launcher: {context['launcher']}; "
        f"torch CPU threads: {context['threads']}",
        f"- data sets: {', '.join(context['datasets'])}; models: {', '.join(context['models'])}; epochs: {context['epochs']}",
        *([f"- data set x model cells left out of lr_search and main: {context['excluded']}"] if context.get("excluded") else []),
        f"- PG: population size {context['population_size']}, the other settings from conf/method/pg.yaml; "
        f"compute-matched baseline: method=baseline for {context['population_size']} x the epochs at the same learning rate",
        f"- total time of this invocation: {context['seconds']:.0f} s ({context['seconds'] / 60:.1f} min); "
        f"jobs: {context['jobs']} ({context['completed']} completed runs collected)",
        f"- command: `{context['command']}`",
        "",
    ]
    for note in context.get("notes", ()):
        lines += [f"> {note}", ""]
    lines += [
        "F1 is the test macro F1. Differences are PG side - other side, paired by seed; the interval is the "
        "95% Student t interval of the mean difference and p is the two-sided paired t-test "
        "(scipy.stats.ttest_rel, through popgrad collect's paired_statistics). n is the number of paired seeds.",
        "",
    ]
    if context["profile"] != "paper":
        lines += [
            "This profile is a smoke-level check: small data, few epochs and few seeds. "
            "It cannot confirm or refute the paper.",
            "",
        ]

    stage_rows = [[name, outcome["sweeps"], outcome["jobs"], outcome["completed"], f"{outcome['seconds']:.0f}"]
                  for name, outcome in context["stages"].items()]
    lines += ["## Stages", "", markdown(["stage", "sweeps", "jobs", "completed runs", "seconds"], stage_rows), ""]

    lr = tables.get("lr_search")
    if lr is not None and len(lr):
        chosen = lr[lr["chosen"]]
        rows = [[row.dataset, row.model, _cell(row._3, 4), _cell(row.val_f1_mean)] for row in chosen.itertuples()]
        lines += ["## Learning rate per data set x model (baseline, best mean validation F1)", "",
                  markdown(["dataset", "model", "lr", "val F1"], rows), ""]

    pg = tables.get("pg_defaults")
    if pg is not None and len(pg):
        rows = [[int(row[0]), row[1], _pm(row[2], row[3]), int(row[4])] for row in pg.itertuples(index=False)]
        best = pg.iloc[0]
        lines += ["## PG settings search (mean validation F1 over cells and seeds, best first)", "",
                  markdown(["population size", "sigma", "val F1", "n"], rows), "",
                  f"Best: population size {int(best.iloc[0])}, sigma {best.iloc[1]}. The other tables use population "
                  f"size {context['population_size']} and conf/method/pg.yaml's sigma, so they do not depend on this search.", ""]

    main = tables.get("table1_main")
    lines += ["## Table 1: baseline, compute-matched baseline and PG", ""]
    if main is not None and len(main):
        rows = [[row["dataset"], row["model"], _pm(row["baseline_mean"], row["baseline_std"]),
                 _pm(row["matched_mean"], row["matched_std"]), _pm(row["pg_mean"], row["pg_std"]),
                 *_stats(row), _cell(row["vs_matched_diff"], signed=True), _ci(row["vs_matched_ci_low"], row["vs_matched_ci_high"]),
                 _p(row["vs_matched_p"])] for _, row in main.iterrows()]
        lines += [markdown(["dataset", "model", "baseline", "matched baseline", "PG", "PG - baseline", "95% CI", "p", "n",
                            "PG - matched", "95% CI", "p"], rows), ""]
    else:
        lines += ["No completed runs.", ""]

    methods = tables.get("table2_methods")
    lines += ["## Table 2: standard methods and PG", "",
              "Method gain is the baseline with the method minus the baseline with every method off. "
              "PG gain is PG minus the baseline, both with every method off. "
              "PG with method is PG with the method minus the baseline with the method. "
              "PG - method gain is PG gain minus method gain, computed as PG with all off minus the baseline "
              "with the method. Matched gain is the compute-matched baseline minus the baseline, all off.", ""]
    if methods is not None and len(methods):
        rows = [[row["dataset"], row["model"], row["method"],
                 _cell(row["method_gain_diff"], signed=True), _ci(row["method_gain_ci_low"], row["method_gain_ci_high"]),
                 _cell(row["pg_gain_diff"], signed=True), _ci(row["pg_gain_ci_low"], row["pg_gain_ci_high"]),
                 _cell(row["pg_with_method_diff"], signed=True), _ci(row["pg_with_method_ci_low"], row["pg_with_method_ci_high"]),
                 _p(row["pg_with_method_p"]),
                 _cell(row["pg_minus_method_gain_diff"], signed=True),
                 _ci(row["pg_minus_method_gain_ci_low"], row["pg_minus_method_gain_ci_high"]),
                 _cell(row["matched_gain_diff"], signed=True), str(row["pg_with_method_n_pairs"])]
                for _, row in methods.iterrows()]
        lines += [markdown(["dataset", "model", "method", "method gain", "95% CI", "PG gain", "95% CI", "PG with method",
                            "95% CI", "p", "PG - method gain", "95% CI", "matched gain", "n"], rows), ""]
    else:
        lines += ["No completed runs.", ""]

    robustness = tables.get("table3_robustness")
    lines += ["## Table 3: robustness (PG - baseline per axis value)", ""]
    if robustness is not None and len(robustness):
        rows = [[row["dataset"], row["model"], row["axis"], row["value"], _cell(row["baseline_mean"]), _cell(row["pg_mean"]),
                 *_stats(row)] for _, row in robustness.iterrows()]
        lines += [markdown(["dataset", "model", "axis", "value", "baseline", "PG", "PG - baseline", "95% CI", "p", "n"], rows), ""]
    else:
        lines += ["No completed runs.", ""]

    claims = tables.get("claims")
    lines += ["## Claims checklist", "",
              f"A comparison counts for or against a claim only when its 95% interval excludes 0. A claim is "
              f"`{UNDECIDED}` when a comparison has fewer than {MIN_PAIRED_SEEDS} paired seeds or every interval contains 0. "
              f"A verdict describes only the runs in this report (profile `{context['profile']}`), not the paper's setting.", ""]
    rows = [[row["claim"], row["statement"], f"**{row['verdict']}**", row["evidence"], row["source"]] for _, row in claims.iterrows()]
    lines += [markdown(["claim", "statement", "verdict", "numbers", "from"], rows), ""]
    failed = context.get("not_completed") or {}
    if any(count for counts in failed.values() for count in counts.values()):
        lines += ["## Runs that did not complete", ""]
        lines += [f"- {stage}: {', '.join(f'{count} {status}' for status, count in counts.items() if count)}"
                  for stage, counts in failed.items() if any(counts.values())]
        lines += [""]
    lines += [f"Per-stage result tables, plots and collect's own reports: `{context['out']}/collected/<stage>/`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popgrad reproduce",
        description="Run the sweeps behind the tables of Sakai et al. (arXiv:2010.12260) and write OUT/report.md.",
    )
    parser.add_argument("--profile", choices=("quick", "paper"), default="quick",
                        help="quick: digits and a Fashion-MNIST subset on a CPU in minutes; paper: the full grids")
    parser.add_argument("--out", help="output folder (default: outputs/reproduce/<profile>)")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1) for every stage, instead of the profile's")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="basic", help="Hydra launcher (hydra/launcher=...)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages, job counts, estimated cost and commands; run nothing")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: all, in that order)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every sweep, e.g. hydra.launcher.partition=gpu; repeatable")
    parser.add_argument("--no-plots", action="store_true", help="skip collect's plots")
    # Test-sized runs: smaller grids than any profile.
    parser.add_argument("--datasets", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return parser


def make_profile(args: argparse.Namespace) -> Profile:
    profile = quick_profile() if args.profile == "quick" else paper_profile()
    if args.tiny:
        profile = tiny_profile(profile)
    if args.datasets:
        datasets = tuple(name for name in args.datasets.split(",") if name)
        unknown = [name for name in datasets if name not in TRAIN_SPLIT_SIZES]
        if unknown:
            raise ValueError(f"--datasets: unknown data set {', '.join(unknown)}; choose from {', '.join(TRAIN_SPLIT_SIZES)}")
        keep = lambda cells: tuple(cell for cell in cells if cell[0] in datasets) or tuple((datasets[0], cell[1]) for cell in cells[:1])
        profile = replace(profile, datasets=datasets, pg_search_cells=keep(profile.pg_search_cells),
                          methods_cells=keep(profile.methods_cells), robustness_cells=keep(profile.robustness_cells))
    if args.models:
        models = tuple(name for name in args.models.split(",") if name)
        profile = replace(profile, models=models)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs {args.epochs}: must be at least 1")
        profile = replace(profile, epochs=args.epochs)
    return profile


def selected_stages(text: Optional[str]) -> List[str]:
    if not text:
        return list(STAGES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return [name for name in STAGES if name in names]


def dry_run(planner: Planner, stages: Sequence[str], out: Path, launcher: str, extra: Sequence[str] = ()) -> Dict[str, Dict[str, int]]:
    """Print each stage's job count, estimated cost and commands; return the counts."""
    counts: Dict[str, Dict[str, int]] = {}
    total_jobs = total_cost = 0
    for name in stages:
        sweeps = planner.stage(name)
        jobs, cost = count_jobs(sweeps), estimate_cost(sweeps)
        counts[name] = {"sweeps": len(sweeps), "jobs": jobs, "cost": cost}
        total_jobs += jobs
        total_cost += cost
        print(f"stage {name}: {len(sweeps)} sweeps, {jobs} jobs, about {cost:.3g} gradient evaluations (estimate)")
        for sweep in sweeps:
            print(f"  {sweep.command(out, launcher, extra)}")
    print(f"total: {total_jobs} jobs, about {total_cost:.3g} gradient evaluations (estimate: training examples x epochs "
          "x members summed over jobs; evaluation passes and the lr factors of later stages are not counted)")
    if any(name != "lr_search" for name in stages):
        print(f"{PLACEHOLDER_LR} stands for each data set x model's best baseline rate from the lr_search stage")
    return counts


def reproduce(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profile = make_profile(args)
        stages = selected_stages(args.stages)
    except ValueError as error:
        parser.error(str(error))
    bad = [item for item in args.override if "=" not in item]
    if bad:
        parser.error(f"--override {bad[0]!r}: expected KEY=VALUE, e.g. hydra.launcher.partition=gpu")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be at least 1")
    out = Path(args.out or Path("outputs") / "reproduce" / args.profile).absolute()
    planner = Planner(profile, seeds=args.seeds)
    if args.dry_run:
        dry_run(planner, stages, out, args.launcher, args.override)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log_path = out / "reproduce.log"

    def log(message: str) -> None:
        print(message, flush=True)
        with open(log_path, "a") as file:
            file.write(message + "\n")

    log(f"popgrad reproduce --profile {profile.name} into {out}")
    if profile.torch_threads is not None and args.launcher == "basic":
        import torch

        torch.set_num_threads(profile.torch_threads)
        log(f"torch CPU threads: {profile.torch_threads}")
    for note in profile.notes:
        log(f"note: {note}")
    outcomes: Dict[str, StageOutcome] = {}
    rates: Dict[Tuple[str, str], float] = {}
    tables: Dict[str, pd.DataFrame] = {}
    for name in stages:
        if name != "lr_search" and "lr_search" not in outcomes:
            rates = _rates_from_disk(planner, out)
        outcome = run_stage(name, planner.stage(name, rates), out, args.launcher, not args.no_plots, log, args.override)
        outcomes[name] = outcome
        if name == "lr_search" and len(outcome.runs):
            rates = best_rates(outcome.runs)
            tables["lr_search"] = lr_search_table(outcome.runs)
            log("best rates: " + ", ".join(f"{dataset}/{model} {rate}" for (dataset, model), rate in sorted(rates.items())))
        if name == "pg_defaults" and len(outcome.runs):
            tables["pg_defaults"] = pg_search_table(outcome.runs)

    empty = pd.DataFrame(columns=["dataset", "model", "variant", "arm", "seed", "test_f1"])
    tables["table1_main"] = table_main(outcomes["main"].runs if "main" in outcomes else empty)
    tables["table2_methods"] = table_methods(outcomes["methods"].runs if "methods" in outcomes else empty)
    tables["table3_robustness"] = table_robustness(outcomes["robustness"].runs if "robustness" in outcomes else empty)
    tables["claims"] = claims_checklist(tables["table1_main"], tables["table2_methods"], tables["table3_robustness"])

    table_dir = out / "tables"
    table_dir.mkdir(exist_ok=True)
    for name, table in tables.items():
        table.to_csv(table_dir / f"{name}.csv", index=False)

    seconds = time.perf_counter() - started
    context = {
        "profile": profile.name,
        "hardware": hardware(),
        "versions": versions(),
        "seeds": planner.seeds if planner.seeds is not None else "each preset's own",
        "launcher": args.launcher,
        "threads": _torch_threads(),
        "datasets": profile.datasets,
        "models": profile.models,
        "excluded": ", ".join(f"{dataset} x {model}" for dataset, model in profile.excluded_cells),
        "epochs": profile.epochs if profile.epochs is not None else "each preset's own (100)",
        "population_size": planner.population_size(),
        "seconds": seconds,
        "jobs": sum(outcome.jobs for outcome in outcomes.values()),
        "completed": sum(len(outcome.runs) for outcome in outcomes.values()),
        "command": shlex.join(["popgrad", "reproduce", *(argv if argv is not None else sys.argv[1:])]),
        "notes": profile.notes,
        "out": out,
        "stages": {name: {"sweeps": len(outcome.sweeps), "jobs": outcome.jobs, "completed": len(outcome.runs),
                          "seconds": outcome.seconds} for name, outcome in outcomes.items()},
        "not_completed": {name: {status: count for status, count in outcome.status_counts.items() if status != "completed"}
                          for name, outcome in outcomes.items()},
    }
    report = render_report(context, tables)
    (out / "report.md").write_text(report)
    log(f"report: {out / 'report.md'} ({seconds:.0f} s)")
    for _, row in tables["claims"].iterrows():
        log(f"claim {row['claim']}: {row['verdict']}")
    failed = any(code != 0 for outcome in outcomes.values() for code in outcome.exit_codes)
    return 1 if failed else 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _rates_from_disk(planner: Planner, out: Path) -> Dict[Tuple[str, str], float]:
    """Read the best rates from an earlier lr_search stage in ``out``, when this invocation skipped it."""
    sweeps = planner.lr_search()
    if not any(sweep.directory(out).is_dir() for sweep in sweeps):
        return {}
    runs, _ = collect_stage("lr_search", sweeps, out, plots=False)
    return best_rates(runs) if len(runs) else {}


def main(argv: Optional[List[str]] = None) -> int:
    return reproduce(argv)
