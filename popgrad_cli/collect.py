"""``popgrad collect``: result tables, paired comparisons with the baseline, and plots.

A run folder is any folder with ``.hydra/`` or ``metrics.json`` in it, at any
depth below the given paths. The run's configuration is its Hydra overrides
(``.hydra/overrides.yaml``) without ``seed`` and without the keys in
``NON_RESULT_KEYS``, plus the dataset, model and method from ``metrics.json``.
Where some runs set a key that others leave at its default, the others take
the value from their resolved ``.hydra/config.yaml``. For a config group such
as ``optimizer`` the value is the choice recorded in ``.hydra/hydra.yaml``.
So an explicit ``trainer.epochs=10`` and the default 10 are one configuration.

Statistics:

* summary: mean, sample std (ddof=1) and the 95% Student t interval of the
  mean of each metric over the completed runs of a configuration.
* comparison: every configuration whose method is not the baseline against the
  baseline configuration with the same settings apart from ``method`` and the
  ``method.*`` keys. Runs are paired by seed. The paired test is the
  two-sided paired t-test (``scipy.stats.ttest_rel``) with its 95% interval of
  the mean difference. The Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
  two-sided, zero differences dropped) is reported beside it. Holm's method
  adjusts the t-test p-values over all comparisons in one table.

Each seed of a configuration counts once: when a configuration and seed were
run more than once, the newest completed run is used and the others are
listed as superseded.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from popgrad_cli.results import HISTORY_FILE, METRICS_FILE, STATUSES

# Metrics where higher is better. Only these can decide a comparison.
QUALITY_METRICS = ("test_f1", "test_accuracy", "val_f1", "val_accuracy")
SUMMARY_METRICS = QUALITY_METRICS + ("train_time_s", "gradient_evaluations")
NUMERIC_FIELDS = (
    "test_f1",
    "test_accuracy",
    "val_f1",
    "val_accuracy",
    "best_epoch",
    "epochs_completed",
    "train_time_s",
    "wall_time_s",
    "gradient_evaluations",
)
METRIC_LABELS = {
    "test_f1": "test F1",
    "test_accuracy": "test accuracy",
    "val_f1": "validation F1",
    "val_accuracy": "validation accuracy",
}

BASELINE_METHOD = "baseline"
CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
# Two metric values closer than this count as a tie. Distinct accuracies on N
# samples differ by at least 1/N and distinct macro F1 values by roughly 1/N**2,
# so up to about 10**5 test samples this only absorbs floating-point rounding.
TIE_TOLERANCE = 1e-12
# Below this many non-zero differences the exact two-sided Wilcoxon p-value is
# at least 2 / 2**5 = 0.0625, so the test cannot reach p < 0.05.
WILCOXON_MIN_USEFUL = 6

# Override keys that change where or how a run executes, not its result: the
# keys that conf/config.yaml leaves out of run folder names, and the evaluation
# batch size. They stay columns of runs.csv but split no configuration unless
# named with --by.
NON_RESULT_KEYS = frozenset(
    {"seed", "resume", "device", "trainer.progress", "trainer.eval_batch_size", "data.root", "data.download"}
)
IDENTITY_KEYS = ("dataset", "model", "method")

# Statuses for run folders whose metrics.json is absent or unusable, next to
# the statuses that training writes (results.STATUSES).
INCOMPLETE = "incomplete"
INVALID = "invalid"
ALL_STATUSES = tuple(STATUSES) + (INCOMPLETE, INVALID)

# Learning curves are drawn as panels, one per set of shared settings, twelve to
# a figure. A panel took about 0.1-0.2 s to draw on a shared 2-core machine, so
# the default cap keeps a sweep of a thousand runs collecting in seconds.
MAX_CURVE_PANELS = 12
PANELS_PER_FIGURE = 12
MAX_CURVES_PER_PANEL = 8

# Comparisons printed on the terminal; report.md lists all of them.
MAX_PRINTED_COMPARISONS = 10

CURVES_PREFIX = "curves_"
DIFFERENCE_PLOT = "difference.png"


class CollectError(ValueError):
    """A path or option that leaves nothing to collect."""


class _Missing:
    """The value of an override key that a run neither sets nor has in its config."""

    def __repr__(self) -> str:
        return "unset"


MISSING = _Missing()


@dataclass
class SkippedFolder:
    """A folder left out of the statistics or the learning curves, with the reason."""

    path: str
    status: str
    reason: str


@dataclass
class CollectResult:
    """The tables and files that one collection produced."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    comparison: pd.DataFrame
    status_counts: Dict[str, int]
    skipped: List[SkippedFolder]
    history_problems: List[SkippedFolder]
    out_dir: Path
    metric: str
    paths: List[Path]
    plots: List[Path] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class _Run:
    run_dir: str
    status: str
    mtime: float
    error: Optional[str] = None
    skip_reason: Optional[str] = None
    overrides: Optional[Dict[str, Any]] = None
    identity: Dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = None
    values: Dict[str, float] = field(default_factory=dict)
    device: Optional[str] = None
    versions: Dict[str, Any] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    history: Optional[Tuple[np.ndarray, np.ndarray]] = None
    history_problem: Optional[str] = None
    group: Optional[Tuple] = None
    superseded: bool = False
    config_cache: Optional[Dict[str, Any]] = None
    choices_cache: Optional[Dict[str, Any]] = None

    @property
    def usable(self) -> bool:
        return self.status == "completed" and self.skip_reason is None


# ---------------------------------------------------------------------------
# Finding and reading run folders


def find_run_folders(root: Path, exclude: Iterable[Path] = ()) -> Tuple[List[Path], List[SkippedFolder]]:
    """Return the run folders below ``root`` and the leaf folders below it that are not runs.

    The search does not descend into run folders, hidden folders, ``exclude``
    or earlier ``popgrad collect`` output (a folder with runs.csv and report.md).
    """
    excluded = {os.path.realpath(path) for path in exclude}
    runs: List[Path] = []
    others: List[SkippedFolder] = []
    visited = set()
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in visited or real in excluded:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as iterator:
                entries = list(iterator)
        except OSError as error:
            others.append(SkippedFolder(str(folder), "unreadable", f"cannot list the folder: {error.strerror}"))
            continue

        names = {entry.name for entry in entries}
        if ".hydra" in names or METRICS_FILE in names:
            runs.append(folder)
            continue
        if "runs.csv" in names and "report.md" in names:
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            try:
                if entry.is_dir():
                    subfolders.append(Path(entry.path))
            except OSError:
                continue
        if not subfolders and folder != Path(root):
            visible = [name for name in names if not name.startswith(".")]
            reason = "empty folder" if not visible else f"not a run folder: no .hydra/ or {METRICS_FILE}"
            others.append(SkippedFolder(str(folder), "not a run", reason))
        stack.extend(sorted(subfolders, reverse=True))
    runs.sort(key=_natural_key)
    others.sort(key=lambda item: _natural_key(Path(item.path)))
    return runs, others


def _natural_key(path: Path) -> List[Any]:
    """Return a sort key that puts job folder 9_... before 10_..., as Hydra numbers them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def parse_value(text: str) -> Any:
    """Convert an override value to int, float, bool or None where it reads as one, else keep the string.

    Written by hand rather than with YAML because YAML 1.1 (PyYAML) reads
    ``1e-3`` as a string while Hydra reads it as a float.
    """
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    lowered = value.lower()
    if lowered in ("null", "~"):
        return None
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def parse_override(text: str) -> Tuple[str, Any]:
    """Split a Hydra override such as ``+method.sigma=0.05`` into key and parsed value."""
    deleted = text.startswith("~")
    key, separator, value = text.lstrip("+~").partition("=")
    key = key.strip()
    if deleted:
        return key, "<deleted>"
    return key, parse_value(value) if separator else None


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _read_overrides(folder: Path) -> Tuple[Optional[List[str]], Optional[str]]:
    path = folder / ".hydra" / "overrides.yaml"
    try:
        loaded = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        return None, ".hydra/overrides.yaml is missing"
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        return None, f".hydra/overrides.yaml is unreadable: {type(error).__name__}"
    if loaded is None:
        return [], None
    if not isinstance(loaded, list) or not all(isinstance(item, str) for item in loaded):
        return None, ".hydra/overrides.yaml is not a list of override strings"
    return loaded, None


def _read_metrics(folder: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    path = folder / METRICS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot read {METRICS_FILE}: {error}"
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as error:
        position = f"line {error.lineno}, column {error.colno}"
        return None, f"{METRICS_FILE} is not valid JSON (truncated or corrupt): {error.msg} ({position})"
    if not isinstance(metrics, dict):
        return None, f"{METRICS_FILE} does not contain a JSON object"
    return metrics, None


def _read_history(folder: Path) -> Tuple[Optional[Tuple[np.ndarray, np.ndarray]], Optional[str]]:
    """Return (epochs, val_f1) from history.csv, or None and the problem."""
    path = folder / HISTORY_FILE
    epochs: List[float] = []
    values: List[float] = []
    try:
        with open(path, newline="") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None:
                return None, f"{HISTORY_FILE} is empty"
            for column in ("epoch", "val_f1"):
                if column not in header:
                    return None, f"{HISTORY_FILE} has no {column} column"
            epoch_index, value_index = header.index("epoch"), header.index("val_f1")
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    return None, f"{HISTORY_FILE} line {line} has {len(row)} fields, expected {len(header)} (truncated?)"
                epoch, value = row[epoch_index], row[value_index]
                try:
                    epochs.append(float(epoch))
                    values.append(float(value) if value != "" else math.nan)
                except ValueError:
                    return None, f"{HISTORY_FILE} line {line} is not numeric: epoch={epoch!r}, val_f1={value!r}"
    except FileNotFoundError:
        return None, f"{HISTORY_FILE} is missing"
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return None, f"{HISTORY_FILE} is unreadable: {error}"
    if not epochs:
        return None, f"{HISTORY_FILE} has no rows"
    return (np.asarray(epochs), np.asarray(values)), None


def read_run(folder: Path, metric: str) -> _Run:
    """Read one run folder; a problem becomes its status or skip reason, never an exception."""
    metrics_path = folder / METRICS_FILE
    try:
        mtime = metrics_path.stat().st_mtime
    except OSError:
        try:
            mtime = folder.stat().st_mtime
        except OSError:
            mtime = 0.0

    metrics, metrics_problem = _read_metrics(folder)
    if metrics is None and metrics_problem is None:
        run = _Run(str(folder), INCOMPLETE, mtime, skip_reason=f"no {METRICS_FILE}: the run is still running or was killed")
    elif metrics is None:
        run = _Run(str(folder), INVALID, mtime, skip_reason=metrics_problem)
    elif metrics.get("status") not in STATUSES:
        run = _Run(str(folder), INVALID, mtime, skip_reason=f"unknown status {metrics.get('status')!r} in {METRICS_FILE}")
    else:
        run = _Run(str(folder), metrics["status"], mtime)
        error = metrics.get("error")
        run.error = None if error is None else str(error)
        if run.status != "completed":
            run.skip_reason = f"{run.status}: {run.error}" if run.error else run.status
    metrics = metrics or {}

    override_list, overrides_problem = _read_overrides(folder)
    if override_list is None and isinstance(metrics.get("overrides"), list):
        override_list = [str(item) for item in metrics["overrides"]]
    if override_list is not None:
        run.overrides = dict(parse_override(item) for item in override_list)
    elif run.skip_reason is None:
        run.skip_reason = f"configuration unknown: {overrides_problem} and {METRICS_FILE} lists no overrides"

    for key in IDENTITY_KEYS:
        value = metrics.get(key)
        if value is None and run.overrides is not None:
            value = run.overrides.get(key)
        run.identity[key] = value
    seed = metrics.get("seed")
    if seed is None and run.overrides is not None:
        seed = run.overrides.get("seed", None)
    run.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    for name in NUMERIC_FIELDS:
        run.values[name] = _number(metrics.get(name))
    run.device = metrics.get("device")
    if isinstance(metrics.get("versions"), dict):
        run.versions = metrics["versions"]

    if run.status == "completed" and run.skip_reason is None:
        if not math.isfinite(run.values[metric]):
            run.skip_reason = f"completed, but {metric} is missing or not finite"
        else:
            run.history, run.history_problem = _read_history(folder)
    return run


# ---------------------------------------------------------------------------
# Configurations


def _token(value: Any) -> Tuple:
    """Return a hashable, sortable form of a setting in which 1 and 1.0 match but 1 and True do not."""
    if value is MISSING:
        return ("~unset",)
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        number = float(value)
        return ("str", "nan") if math.isnan(number) else ("number", number)
    return ("str", str(value))


def format_value(value: Any) -> str:
    if value is MISSING:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _resolved_value(run: _Run, key: str) -> Any:
    """Return the value of ``key`` in the run's resolved config, or MISSING."""
    folder = Path(run.run_dir) / ".hydra"
    if run.config_cache is None:
        loaded = _load_yaml(folder / "config.yaml")
        run.config_cache = loaded if isinstance(loaded, dict) else {}
    node: Any = run.config_cache
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            node = MISSING
            break
    if node is MISSING or isinstance(node, dict):
        # A config group (method, optimizer, ...) resolves to a mapping; its
        # override value is the option name that Hydra records as a choice.
        if run.choices_cache is None:
            loaded = _load_yaml(folder / "hydra.yaml")
            choices = None
            if isinstance(loaded, dict):
                choices = loaded.get("hydra", {}).get("runtime", {}).get("choices")
            run.choices_cache = choices if isinstance(choices, dict) else {}
        value = run.choices_cache.get(key, MISSING)
        return value if value is MISSING or not isinstance(value, (dict, list)) else MISSING
    if isinstance(node, list):
        return MISSING
    return node


def _assign_settings(runs: List[_Run]) -> List[str]:
    """Fill each run's settings with every result key of the collection; return the keys."""
    keys = set()
    for run in runs:
        if run.overrides is not None:
            keys.update(key for key in run.overrides if _is_result_key(key))
    keys -= set(IDENTITY_KEYS)
    ordered = sorted(keys)
    for run in runs:
        if run.overrides is None:
            continue
        for key in IDENTITY_KEYS:
            if run.identity.get(key) is None:
                value = _resolved_value(run, key)
                run.identity[key] = None if value is MISSING else value
        for key in ordered:
            if key in run.overrides:
                run.settings[key] = run.overrides[key]
            else:
                run.settings[key] = _resolved_value(run, key)
    return ordered


def _is_result_key(key: str) -> bool:
    return key not in NON_RESULT_KEYS and not key.startswith("hydra")


def _is_method_key(key: str) -> bool:
    return key == "method" or key.startswith("method.")


def _run_value(run: _Run, key: str) -> Any:
    if key in IDENTITY_KEYS:
        value = run.identity.get(key)
        return MISSING if value is None else value
    if key in run.settings:
        return run.settings[key]
    if run.overrides is not None and key in run.overrides:
        return run.overrides[key]
    return MISSING


def _deduplicate(runs: List[_Run], full_keys: List[str]) -> None:
    """Mark all but one run of each (configuration, seed) as superseded.

    The run kept is the newest completed one, or the newest run when none of
    them completed. Newest means the latest metrics.json, then the last path.
    """
    by_identity: Dict[Tuple, List[_Run]] = {}
    for run in runs:
        if run.overrides is None or run.seed is None:
            continue
        identity = (tuple(_token(_run_value(run, key)) for key in full_keys), run.seed)
        by_identity.setdefault(identity, []).append(run)
    for duplicates in by_identity.values():
        if len(duplicates) < 2:
            continue
        usable = [run for run in duplicates if run.usable]
        pool = usable or duplicates
        newest = max(pool, key=lambda run: (run.mtime, run.run_dir))
        for run in duplicates:
            if run is newest:
                continue
            note = f"superseded by {newest.run_dir} (same configuration and seed {run.seed})"
            run.skip_reason = note if run.skip_reason is None else f"{run.skip_reason}; {note}"
            run.superseded = True


@dataclass
class _Group:
    key: Tuple
    values: Dict[str, Any]
    runs: List[_Run] = field(default_factory=list)
    label: str = ""
    is_baseline: bool = False

    @property
    def method(self) -> Any:
        return self.values.get("method")

    @property
    def completed(self) -> List[_Run]:
        return [run for run in self.runs if run.usable]

    @property
    def not_completed(self) -> List[_Run]:
        return [run for run in self.runs if not run.usable]


def _build_groups(runs: List[_Run], group_keys: List[str], baseline_method: str) -> List[_Group]:
    groups: Dict[Tuple, _Group] = {}
    for run in runs:
        if run.overrides is None or run.superseded:
            continue
        values = {key: _run_value(run, key) for key in group_keys}
        key = tuple(_token(values[name]) for name in group_keys)
        run.group = key
        if key not in groups:
            groups[key] = _Group(key, values, is_baseline=values["method"] == baseline_method)
        groups[key].runs.append(run)
    ordered = sorted(groups.values(), key=lambda group: _group_order(group, group_keys))
    _assign_labels(ordered, group_keys)
    return ordered


def _group_order(group: _Group, group_keys: List[str]) -> Tuple:
    shared = tuple(_token(group.values[key]) for key in group_keys if not _is_method_key(key))
    method_keys = tuple(_token(group.values[key]) for key in group_keys if key.startswith("method."))
    return shared, not group.is_baseline, _token(group.method), method_keys


def _varying_keys(groups: Sequence[_Group], keys: Iterable[str]) -> List[str]:
    return [key for key in keys if len({_token(group.values.get(key, MISSING)) for group in groups}) > 1]


def _short_names(keys: Sequence[str]) -> Dict[str, str]:
    short = {key: key.rsplit(".", 1)[-1] for key in keys}
    counts: Dict[str, int] = {}
    for name in short.values():
        counts[name] = counts.get(name, 0) + 1
    return {key: name if counts[name] == 1 else key for key, name in short.items()}


def _describe(values: Dict[str, Any], keys: Sequence[str], names: Dict[str, str]) -> str:
    """Return ``name=value`` pairs for the keys; a key the configuration leaves unset is omitted."""
    parts = []
    for key in keys:
        value = values.get(key, MISSING)
        if value is not MISSING:
            parts.append(f"{names[key]}={format_value(value)}")
    return ", ".join(parts)


def _assign_labels(groups: List[_Group], group_keys: List[str]) -> None:
    varying = _varying_keys(groups, [key for key in group_keys if key != "method"])
    names = _short_names(varying)
    seen: Dict[str, int] = {}
    for group in groups:
        details = _describe(group.values, varying, names)
        label = format_value(group.method)
        if details:
            label += f" ({details})"
        if label in seen:
            seen[label] += 1
            label += f" #{seen[label]}"
        else:
            seen[label] = 1
        group.label = label


# ---------------------------------------------------------------------------
# Statistics


@functools.lru_cache(maxsize=None)
def _t_quantile(probability: float, degrees_of_freedom: int) -> float:
    # scipy.stats.t.ppf took about 0.5 ms a call (scipy 1.17), and a sweep reuses a few degrees of freedom.
    return float(stats.t.ppf(probability, degrees_of_freedom))


def mean_std_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Tuple[float, float, float, float]:
    """Return mean, sample std (ddof=1) and the Student t confidence interval of the mean.

    Non-finite values are left out. The std and the interval are NaN with fewer than 2 values.
    """
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if len(data) == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(data.mean())
    if len(data) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(data.std(ddof=1))
    half_width = _t_quantile(0.5 + confidence / 2, len(data) - 1) * std / math.sqrt(len(data))
    return mean, std, mean - half_width, mean + half_width


def paired_statistics(method_values: Sequence[float], baseline_values: Sequence[float]) -> Dict[str, Any]:
    """Compare paired values (one pair per seed): mean difference, its 95% CI, t-test, Wilcoxon, wins.

    Differences are method - baseline. A difference within ``TIE_TOLERANCE`` of
    zero is a tie, and it counts as zero in the Wilcoxon test, which drops zeros.
    Undefined statistics are NaN, and ``t_note`` and ``wilcoxon_note`` give the reason.
    """
    method = np.asarray(method_values, dtype=float)
    baseline = np.asarray(baseline_values, dtype=float)
    differences = method - baseline
    n = len(differences)
    wins = int(np.sum(differences > TIE_TOLERANCE))
    losses = int(np.sum(differences < -TIE_TOLERANCE))
    result: Dict[str, Any] = {
        "n_pairs": n,
        "baseline_mean": float(baseline.mean()) if n else math.nan,
        "method_mean": float(method.mean()) if n else math.nan,
        "mean_diff": float(differences.mean()) if n else math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "t_statistic": math.nan,
        "t_pvalue": math.nan,
        "wilcoxon_pvalue": math.nan,
        "wins": wins,
        "ties": n - wins - losses,
        "losses": losses,
        "t_note": "",
        "wilcoxon_note": "",
    }
    if n < 2:
        reason = "no paired seeds" if n == 0 else "only 1 paired seed"
        result["t_note"] = f"{reason}: a test needs at least 2"
        result["wilcoxon_note"] = result["t_note"]
        return result

    if np.ptp(differences) <= TIE_TOLERANCE:
        result["t_note"] = "all paired differences are equal (zero variance): the t-test and its interval are undefined"
    else:
        _, _, low, high = mean_std_ci(differences)
        result["ci_low"], result["ci_high"] = low, high
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.ttest_rel(method, baseline)
        result["t_statistic"] = float(test.statistic)
        result["t_pvalue"] = float(test.pvalue)

    signed = np.where(np.abs(differences) <= TIE_TOLERANCE, 0.0, differences)
    nonzero = int(np.count_nonzero(signed))
    if nonzero == 0:
        result["wilcoxon_note"] = "all differences are ties: the Wilcoxon test is undefined"
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result["wilcoxon_pvalue"] = float(stats.wilcoxon(signed, zero_method="wilcox").pvalue)
        except ValueError as error:
            result["wilcoxon_note"] = f"Wilcoxon test failed: {error}"
            return result
    if nonzero < WILCOXON_MIN_USEFUL:
        result["wilcoxon_note"] = (
            f"only {nonzero} non-zero differences: the Wilcoxon test cannot reach p < 0.05 below {WILCOXON_MIN_USEFUL}"
        )
    return result


def holm_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Return Holm step-down adjusted p-values; NaN entries stay NaN and do not count as tests."""
    values = np.asarray(pvalues, dtype=float)
    adjusted = np.full(len(values), np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    m = len(finite)
    order = finite[np.argsort(values[finite], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def _summary_table(groups: List[_Group], group_keys: List[str]) -> pd.DataFrame:
    rows = []
    for group in groups:
        completed = group.completed
        failed = group.not_completed
        row: Dict[str, Any] = {"config": group.label}
        for key in group_keys:
            value = group.values[key]
            row[key] = None if value is MISSING else value
        row["n"] = len(completed)
        row["n_not_completed"] = len(failed)
        row["not_completed"] = _status_phrase(failed)
        row["seeds"] = " ".join(str(seed) for seed in sorted({run.seed for run in completed if run.seed is not None}))
        for name in SUMMARY_METRICS:
            mean, std, low, high = mean_std_ci([run.values[name] for run in completed])
            row[f"{name}_mean"] = mean
            row[f"{name}_std"] = std
            row[f"{name}_ci_low"] = low
            row[f"{name}_ci_high"] = high
        rows.append(row)
    columns = ["config", *group_keys, "n", "n_not_completed", "not_completed", "seeds"]
    for name in SUMMARY_METRICS:
        columns += [f"{name}_mean", f"{name}_std", f"{name}_ci_low", f"{name}_ci_high"]
    return pd.DataFrame(rows, columns=columns)


def _status_phrase(runs: Sequence[_Run]) -> str:
    counts: Dict[str, int] = {}
    for run in runs:
        status = run.status if run.status != "completed" else "unusable"
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


def _match_key(group: _Group, group_keys: List[str]) -> Tuple:
    return tuple(_token(group.values[key]) for key in group_keys if not _is_method_key(key))


def _method_settings(group: _Group, group_keys: List[str]) -> Tuple:
    return tuple(_token(group.values[key]) for key in group_keys if key.startswith("method."))


def _unit_values(runs: Sequence[_Run], unit_keys: List[str], metric: str) -> Dict[Tuple, Tuple[float, int]]:
    """Return (mean metric, run count) per pairing unit: the seed and the settings outside the grouping.

    Without --by every unit contains one run. With --by, runs that differ only in
    ``method.*`` keys outside the grouping share a unit and are averaged, so
    that one baseline run is never paired twice.
    """
    collected: Dict[Tuple, List[float]] = {}
    for run in runs:
        if run.seed is None:
            continue
        unit = (run.seed, tuple(_token(_run_value(run, key)) for key in unit_keys))
        collected.setdefault(unit, []).append(run.values[metric])
    return {unit: (float(np.mean(values)), len(values)) for unit, values in collected.items()}


def _find_baseline(
    group: _Group, baselines: List[_Group], group_keys: List[str], baseline_method: str
) -> Tuple[Optional[_Group], str]:
    # NOTE: runs that pick their method through a preset (experiment=pg_x against
    # experiment=baseline_x) differ in that key, so they match only when --by leaves it out.
    match = _match_key(group, group_keys)
    candidates = [candidate for candidate in baselines if _match_key(candidate, group_keys) == match]
    if not candidates:
        return None, f"no {baseline_method} configuration with the same settings"
    if len(candidates) == 1:
        return candidates[0], ""
    settings = _method_settings(group, group_keys)
    exact = [candidate for candidate in candidates if _method_settings(candidate, group_keys) == settings]
    if len(exact) == 1:
        return exact[0], ""
    names = "; ".join(candidate.label for candidate in candidates)
    return None, (
        f"{len(candidates)} {baseline_method} configurations match ({names}) and none has the same method.* "
        "values: run the baseline with those values, or pool them with --by"
    )


def _comparison_table(
    groups: List[_Group], group_keys: List[str], full_keys: List[str], metric: str, baseline_method: str
) -> pd.DataFrame:
    baselines = [group for group in groups if group.is_baseline]
    unit_keys = [key for key in full_keys if not _is_method_key(key) and key not in group_keys]
    rows = []
    for group in groups:
        if group.is_baseline:
            continue
        baseline, problem = _find_baseline(group, baselines, group_keys, baseline_method)
        row: Dict[str, Any] = {"config": group.label, "baseline_config": baseline.label if baseline else ""}
        for key in group_keys:
            value = group.values[key]
            row[key] = None if value is MISSING else value
        row["metric"] = metric

        notes: List[str] = []
        method_units = _unit_values(group.completed, unit_keys, metric)
        baseline_units = _unit_values(baseline.completed, unit_keys, metric) if baseline else {}
        paired = sorted(set(method_units) & set(baseline_units), key=lambda unit: (unit[0], unit[1]))
        statistics = paired_statistics(
            [method_units[unit][0] for unit in paired], [baseline_units[unit][0] for unit in paired]
        )
        row.update({name: value for name, value in statistics.items() if not name.endswith("_note")})
        row["n_method_not_completed"] = len(group.not_completed)
        row["n_baseline_not_completed"] = len(baseline.not_completed) if baseline else 0
        row["seeds"] = " ".join(str(seed) for seed in sorted({unit[0] for unit in paired}))
        if problem:
            notes.append(problem)
        if baseline is not None:
            notes += _pairing_notes(group, baseline, method_units, baseline_units, paired)
        for name in ("t_note", "wilcoxon_note"):
            if statistics[name] and statistics[name] not in notes:
                notes.append(statistics[name])
        row["note"] = "; ".join(notes)
        rows.append(row)

    columns = ["config", "baseline_config", *group_keys, "metric", "n_pairs", "seeds", "baseline_mean", "method_mean",
               "mean_diff", "ci_low", "ci_high", "t_statistic", "t_pvalue", "t_pvalue_holm", "wilcoxon_pvalue",
               "wins", "ties", "losses", "n_method_not_completed", "n_baseline_not_completed", "note"]
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        table["t_pvalue_holm"] = holm_adjust(table["t_pvalue"].to_numpy(dtype=float))
    return table


def _pairing_notes(group: _Group, baseline: _Group, method_units: Dict, baseline_units: Dict, paired: List) -> List[str]:
    notes = []
    method_name = format_value(group.method)
    paired_units = set(paired)
    only_method = sorted({unit[0] for unit in method_units if unit not in paired_units})
    only_baseline = sorted({unit[0] for unit in baseline_units if unit not in paired_units})
    if only_method:
        notes.append(f"seeds without a completed baseline run: {' '.join(map(str, only_method))}")
    if only_baseline:
        notes.append(f"seeds without a completed {method_name} run: {' '.join(map(str, only_baseline))}")
    for side, side_group in ((method_name, group), ("baseline", baseline)):
        failed = side_group.not_completed
        if failed:
            seeds = " ".join(str(run.seed) for run in sorted(failed, key=lambda run: (run.seed is None, run.seed or 0)))
            notes.append(f"{len(failed)} {side} run(s) did not complete ({_status_phrase(failed)}; seeds {seeds}) and are left out")
    averaged = sum(1 for unit in paired if method_units[unit][1] > 1 or baseline_units[unit][1] > 1)
    if averaged:
        notes.append(
            f"{averaged} of {len(paired)} pairs average several runs that differ only in method.* keys outside --by"
        )
    return notes


# ---------------------------------------------------------------------------
# Writing the report


def _format_number(value: Any, digits: int = 4) -> str:
    """Format a table cell: integers as they are, floats with ``digits`` decimals, NaN and None as blank."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def format_pvalue(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if value < 0.001:
        return "< 0.001"
    return f"{value:.3f}"


def _format_signed(value: float) -> str:
    return f"{value:+.4f}" if math.isfinite(value) else "n/a"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Return a GitHub-flavoured markdown table; cells are escaped so that ``|`` cannot split them."""

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else _format_number(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(header) for header in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(value) for value in row) + " |")
    return "\n".join(lines)


def describe_comparison(row: Dict[str, Any], metric: str, n_comparisons: int) -> str:
    """Return one plain sentence for a comparison row that claims no more than its interval shows."""
    label = METRIC_LABELS.get(metric, metric)
    method = row["config"]
    baseline = row["baseline_config"] or BASELINE_METHOD
    n = int(row["n_pairs"])
    if not row["baseline_config"]:
        return f"{method}: not compared ({row['note']})."
    if n == 0:
        return f"{method} vs {baseline}: no seed has a completed run of both, so there is nothing to compare{_left_out(row)}."
    seeds = str(row.get("seeds", "")).split()
    # With --by, one seed can give several pairs (one per setting outside the grouping).
    unit = "seed" if len(seeds) == n else "pair"
    record = (
        f"{_count(row['wins'], 'win')} / {_count(row['ties'], 'tie')} / {_count(row['losses'], 'loss')} "
        f"over {_count(n, unit)}"
    )
    difference = _format_signed(row["mean_diff"])
    if n < 2:
        return (
            f"{method} vs {baseline}: only 1 pair, so no test is possible; difference {difference} {label} "
            f"({record}){_left_out(row)}."
        )
    if not math.isfinite(row["ci_low"]):
        if row["ties"] == n:
            return f"{method} vs {baseline}: identical {label} in every pair ({record}); no test is possible{_left_out(row)}."
        return (
            f"{method} vs {baseline}: difference {difference} {label} in every pair, so the t-test is undefined "
            f"(zero variance); Wilcoxon p = {format_pvalue(row['wilcoxon_pvalue'])}, {record}{_left_out(row)}."
        )

    interval = f"[95% CI {_format_signed(row['ci_low'])}, {_format_signed(row['ci_high'])}]"
    tests = f"paired t-test p = {format_pvalue(row['t_pvalue'])}, Wilcoxon p = {format_pvalue(row['wilcoxon_pvalue'])}"
    evidence = f"{difference} {label} {interval}, {tests}, {record}"
    holm = row.get("t_pvalue_holm", math.nan)
    if row["ci_low"] <= 0.0 <= row["ci_high"]:
        return (
            f"{method} vs {baseline}: no significant difference in {label}: "
            f"{difference} {interval}, {tests}, {record}{_left_out(row)}."
        )
    verb = "beats" if row["mean_diff"] > 0 else "is worse than"
    if n_comparisons > 1 and math.isfinite(holm) and holm >= ALPHA:
        direction = "higher" if row["mean_diff"] > 0 else "lower"
        return (
            f"{method} scores {direction} than {baseline} by {evidence}; this is not significant after Holm "
            f"correction over {n_comparisons} comparisons (adjusted p = {format_pvalue(holm)}){_left_out(row)}."
        )
    suffix = ""
    if n_comparisons > 1 and math.isfinite(holm):
        suffix = f"; Holm-adjusted p = {format_pvalue(holm)} over {n_comparisons} comparisons"
    return f"{method} {verb} {baseline} by {evidence}{suffix}{_left_out(row)}."


def _count(number: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{number} {noun if number == 1 else plural}"


def _left_out(row: Dict[str, Any]) -> str:
    """Return a clause about runs that did not complete, which the means above leave out."""
    parts = []
    for side, column in (("method", "n_method_not_completed"), ("baseline", "n_baseline_not_completed")):
        count = int(row.get(column, 0) or 0)
        if count:
            parts.append(_count(count, f"{side} run"))
    if not parts:
        return ""
    verb = "was" if len(parts) == 1 and parts[0].startswith("1 ") else "were"
    return f"; {' and '.join(parts)} did not complete and {verb} left out (see the note)"


def _report(result: CollectResult, group_keys: List[str], plot_lines: List[str], environment_notes: List[str]) -> str:
    metric = result.metric
    label = METRIC_LABELS.get(metric, metric)
    lines = ["# popgrad collect", ""]
    lines.append("Paths: " + ", ".join(f"`{path}`" for path in result.paths))
    lines.append("")
    total = sum(result.status_counts.values())
    used = int(result.runs["used"].sum()) if len(result.runs) else 0
    lines.append(f"Metric compared: `{metric}` ({label}, higher is better). Run folders: {total}, used in the statistics: {used}.")
    others = sum(1 for item in result.skipped if item.status in ("not a run", "unreadable"))
    if others:
        lines.append(f"Folders below the paths that are not run folders: {others} (listed at the end).")
    lines.append("")
    lines.append(markdown_table(["status", "runs"], [(status, count) for status, count in result.status_counts.items()]))
    lines.append("")
    lines.append(
        "`incomplete`: no metrics.json (still running, or killed). `invalid`: metrics.json unreadable or with an unknown status."
    )
    lines += ["", *environment_notes] if environment_notes else []

    lines += ["", "## Comparisons with the baseline", ""]
    comparison = result.comparison
    if len(comparison) == 0:
        lines.append("No configuration with a method other than the baseline was found, so there is nothing to compare.")
    else:
        lines += [
            "Differences are method - baseline in "
            f"{label}, over the seeds with a completed run of both (paired by seed). "
            "CI: 95% Student t interval of the mean paired difference. "
            "t-test: two-sided paired t-test (scipy.stats.ttest_rel) on the same pairs; its p < 0.05 exactly when the CI excludes 0. "
            "Wilcoxon: two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) on the paired differences, ties dropped. "
            f"A tie is a difference within {TIE_TOLERANCE:g}. "
            "Holm: t-test p-values adjusted with Holm's method over all comparisons in this table. "
            "Baseline and method means here are over the paired seeds only.",
            "",
        ]
        records = comparison.to_dict("records")
        for row in records:
            lines.append(f"- {describe_comparison(row, metric, len(records))}")
        lines.append("")
        headers = ["config", "baseline", "pairs", "baseline mean", "method mean", "difference", "95% CI",
                   "t-test p", "Holm p", "Wilcoxon p", "W/T/L", "note"]
        table_rows = []
        for row in records:
            interval = ""
            if math.isfinite(row["ci_low"]):
                interval = f"[{_format_signed(row['ci_low'])}, {_format_signed(row['ci_high'])}]"
            table_rows.append(
                [row["config"], row["baseline_config"], row["n_pairs"], row["baseline_mean"], row["method_mean"],
                 _format_signed(row["mean_diff"]) if row["n_pairs"] else "", interval,
                 format_pvalue(row["t_pvalue"]), format_pvalue(row["t_pvalue_holm"]), format_pvalue(row["wilcoxon_pvalue"]),
                 f"{row['wins']}/{row['ties']}/{row['losses']}", row["note"]]
            )
        lines.append(markdown_table(headers, table_rows))

    lines += ["", "## Summary over seeds", ""]
    lines.append(
        "Completed runs per configuration: mean ± sample std (ddof=1) and the 95% Student t interval of the mean. "
        "`not completed` counts the runs of the configuration that failed, diverged, were interrupted or have not finished; "
        "they are not in the means. All columns are in summary.csv."
    )
    lines.append("")
    summary_rows = []
    for row in result.summary.to_dict("records"):
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        spread = f"{_format_number(mean)} ± {_format_number(std)}" if math.isfinite(std) else _format_number(mean)
        interval = ""
        if math.isfinite(row[f"{metric}_ci_low"]):
            interval = f"[{_format_number(row[f'{metric}_ci_low'])}, {_format_number(row[f'{metric}_ci_high'])}]"
        others = [row[f"{name}_mean"] for name in QUALITY_METRICS if name != metric]
        summary_rows.append(
            [row["config"], row["n"], row["not_completed"], spread, interval, *others,
             _format_number(row["train_time_s_mean"], 1), _format_number(row["gradient_evaluations_mean"], 0)]
        )
    other_headers = [f"{METRIC_LABELS[name]} mean" for name in QUALITY_METRICS if name != metric]
    lines.append(
        markdown_table(
            ["config", "n", "not completed", f"{label} mean ± std", "95% CI", *other_headers,
             "train time (s)", "gradient evaluations"],
            summary_rows,
        )
    )
    lines += ["", "Configuration keys: " + ", ".join(f"`{key}`" for key in group_keys) + "."]
    lines.append(
        "Not configuration keys: `seed` (the statistics run over it) and "
        + ", ".join(f"`{key}`" for key in sorted(NON_RESULT_KEYS - {"seed"}))
        + " and `hydra.*` (they change where or how a run executes, not its result), unless named with --by."
    )

    lines += ["", "## Plots", ""]
    lines += plot_lines or ["No plots were written."]

    lines += ["", "## Skipped and incomplete folders", ""]
    if result.skipped:
        lines.append(markdown_table(["folder", "status", "reason"], [(s.path, s.status, s.reason) for s in result.skipped]))
    else:
        lines.append("None: every run folder completed and is used.")
    if result.history_problems:
        lines += ["", "Runs used in the statistics but left out of the learning curves:", ""]
        lines.append(markdown_table(["folder", "problem"], [(s.path, s.reason) for s in result.history_problems]))
    lines.append("")
    return "\n".join(lines)


def _environment_notes(runs: List[_Run]) -> List[str]:
    """Return a warning for each environment property that differs among the runs used."""
    used = [run for run in runs if run.usable]
    notes = []
    for name, read in (
        ("popgrad_cli version", lambda run: run.versions.get("popgrad_cli")),
        ("torch version", lambda run: run.versions.get("torch")),
        ("device", lambda run: run.device),
    ):
        values = sorted({str(read(run)) for run in used if read(run) is not None})
        if len(values) > 1:
            notes.append(f"Warning: the runs used mix more than one {name}: {', '.join(values)}.")
    return notes


# ---------------------------------------------------------------------------
# Plots


def _write_plots(
    plots_dir: Path,
    groups: List[_Group],
    group_keys: List[str],
    comparison: pd.DataFrame,
    metric: str,
    max_panels: int,
) -> Tuple[List[Path], List[str], List[str]]:
    """Write the learning-curve figures and the difference chart; return the files, report lines and cap notes."""
    from popgrad_cli import plots

    plots_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(plots_dir.glob(f"{CURVES_PREFIX}*.png")) + [plots_dir / DIFFERENCE_PLOT]:
        stale.unlink(missing_ok=True)

    written: List[Path] = []
    lines: List[str] = []
    notes: List[str] = []
    common, panels = _curve_panels(groups, group_keys)
    drawn = panels[:max_panels]
    figure_count = math.ceil(len(drawn) / PANELS_PER_FIGURE)
    for index in range(figure_count):
        members = drawn[index * PANELS_PER_FIGURE:(index + 1) * PANELS_PER_FIGURE]
        figure_panels = [
            plots.Panel(
                title,
                [
                    plots.Curve(label, [run.history for run in group.completed if run.history is not None], group.is_baseline)
                    for label, group in curves
                ],
            )
            for title, curves in members
        ]
        title = f"Validation F1 per epoch: {common}" if common else "Validation F1 per epoch"
        if figure_count > 1:
            title += f" (figure {index + 1} of {figure_count})"
        path = plots_dir / f"{CURVES_PREFIX}{index + 1:02d}_{_slug(common)}.png"
        plots.plot_learning_curves(path, title, figure_panels)
        written.append(path)
        settings = "; ".join(panel_title for panel_title, _ in members)
        lines.append(f"- [{path.name}](plots/{path.name}): learning curves for {settings}")
    if len(panels) > max_panels:
        notes.append(
            f"Learning curves: drew the first {max_panels} of {len(panels)} settings; "
            "raise the cap with --max-panels (each panel adds about 0.1-0.2 s)."
        )

    drawable = comparison[comparison["n_pairs"] > 0] if len(comparison) else comparison
    if len(drawable):
        path = plots_dir / DIFFERENCE_PLOT
        bars_drawn = plots.plot_differences(
            path,
            drawable["config"].tolist(),
            drawable["mean_diff"].tolist(),
            drawable["ci_low"].tolist(),
            drawable["ci_high"].tolist(),
            drawable["n_pairs"].astype(int).tolist(),
            METRIC_LABELS.get(metric, metric),
        )
        written.append(path)
        if bars_drawn < len(drawable):
            notes.append(f"Difference chart: shows the first {bars_drawn} of {len(drawable)} comparisons.")
        lines.insert(0, f"- [{DIFFERENCE_PLOT}](plots/{DIFFERENCE_PLOT}): difference from the baseline with 95% CI")
    return written, lines + [f"- {note}" for note in notes], notes


def _curve_panels(groups: List[_Group], group_keys: List[str]) -> Tuple[str, List[Tuple[str, List[Tuple[str, _Group]]]]]:
    """Return the settings shared by all panels and one panel per set of settings.

    A panel contains the configurations that differ only in ``method`` and the
    ``method.*`` keys, baseline first, each with a label from those keys.
    Panels with more than ``MAX_CURVES_PER_PANEL`` curves are split, and every
    part keeps the baselines.
    """
    with_history = [group for group in groups if any(run.history is not None for run in group.completed)]
    setting_keys = [key for key in group_keys if not _is_method_key(key)]
    varying_settings = _varying_keys(with_history, setting_keys)
    setting_names = _short_names(varying_settings)
    varying_method = _varying_keys(with_history, [key for key in group_keys if key.startswith("method.")])
    method_names = _short_names(varying_method)

    constant = [key for key in setting_keys if key not in varying_settings]
    shown_constant = [key for key in ("dataset", "model") if key in constant]
    common = " / ".join(format_value(with_history[0].values[key]) for key in shown_constant) if with_history else ""

    by_setting: Dict[Tuple, List[_Group]] = {}
    for group in with_history:
        by_setting.setdefault(_match_key(group, group_keys), []).append(group)
    panels = []
    for members in by_setting.values():
        title = _describe(members[0].values, varying_settings, setting_names) or "all runs"
        curves = []
        for group in members:
            details = _describe(group.values, varying_method, method_names)
            label = format_value(group.method) + (f" ({details})" if details else "")
            curves.append((label, group))
        baselines = [curve for curve in curves if curve[1].is_baseline]
        others = [curve for curve in curves if not curve[1].is_baseline]
        room = max(1, MAX_CURVES_PER_PANEL - len(baselines))
        chunks = [others[start:start + room] for start in range(0, len(others), room)] or [[]]
        for number, chunk in enumerate(chunks, start=1):
            suffix = f", part {number} of {len(chunks)}" if len(chunks) > 1 else ""
            panels.append((title + suffix, baselines + chunk))
    return common, panels


def _slug(text: str, limit: int = 60) -> str:
    cleaned = "".join(character if character.isalnum() or character in "-." else "_" for character in text)
    while "__" in cleaned:
        cleaned = cleaned.replace("__", "_")
    return cleaned.strip("_")[:limit] or "runs"


# ---------------------------------------------------------------------------
# Entry points


def _runs_table(runs: List[_Run], result_keys: List[str], labels: Dict[Tuple, str]) -> pd.DataFrame:
    override_keys = sorted({key for run in runs if run.overrides for key in run.overrides} - set(IDENTITY_KEYS) - {"seed"})
    fixed = ["run_dir", "status", "used", "skip_reason", "config", *IDENTITY_KEYS, "seed", *NUMERIC_FIELDS, "device",
             "popgrad_cli_version", "torch_version", "error"]
    renamed = {key: (key if key not in fixed else f"override.{key}") for key in override_keys}
    rows = []
    for run in runs:
        row: Dict[str, Any] = {
            "run_dir": run.run_dir,
            "status": run.status,
            "used": run.usable,
            "skip_reason": run.skip_reason or "",
            "config": labels.get(run.group, "") if run.group is not None else "",
            **{key: run.identity.get(key) for key in IDENTITY_KEYS},
            "seed": run.seed,
        }
        for key in override_keys:
            value = run.overrides.get(key, MISSING) if run.overrides else MISSING
            if value is MISSING and key in run.settings and key in result_keys:
                value = run.settings[key]
            row[renamed[key]] = None if value is MISSING else value
        row.update(run.values)
        row["device"] = run.device
        row["popgrad_cli_version"] = run.versions.get("popgrad_cli")
        row["torch_version"] = run.versions.get("torch")
        row["error"] = run.error
        rows.append(row)
    columns = fixed[:5] + [*IDENTITY_KEYS, "seed"] + [renamed[key] for key in override_keys] + fixed[9:]
    table = pd.DataFrame(rows, columns=columns)
    # Counts stay integers in runs.csv (3, not 3.0), with a blank where a run has none.
    for column in ("seed", "best_epoch", "epochs_completed", "gradient_evaluations"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        finite = numbers.dropna()
        if (finite == finite.round()).all():
            table[column] = numbers.astype("Int64")
    return table


def collect(
    paths: Sequence[os.PathLike | str],
    out_dir: Optional[os.PathLike | str] = None,
    metric: str = "test_f1",
    by: Optional[Sequence[str]] = None,
    plots: bool = True,
    baseline: str = BASELINE_METHOD,
    max_panels: int = MAX_CURVE_PANELS,
) -> CollectResult:
    """Collect the runs below ``paths`` and write runs.csv, summary.csv, comparison.csv, report.md and plots/.

    Raises CollectError when a path does not exist or contains no run folder, or
    when ``metric`` or a ``by`` key is unknown.
    """
    if metric not in QUALITY_METRICS:
        raise CollectError(f"unknown metric {metric!r}: choose one of {', '.join(QUALITY_METRICS)}")
    roots = [Path(path) for path in paths]
    if not roots:
        raise CollectError("no path given: pass the folder of a run or a sweep, e.g. outputs/sweeps")
    out = Path(out_dir) if out_dir is not None else roots[0] / "collected"

    if max_panels < 0:
        raise CollectError(f"--max-panels must be 0 or more, not {max_panels}")

    folders: List[Path] = []
    seen_folders = set()
    skipped: List[SkippedFolder] = []
    for root in roots:
        if not root.exists():
            raise CollectError(f"path {str(root)!r} does not exist: pass the folder of a run or a sweep, e.g. outputs/sweeps")
        if not root.is_dir():
            raise CollectError(f"path {str(root)!r} is not a folder: pass the folder that contains the run folders")
        found, others = find_run_folders(root, exclude=[out])
        if not found:
            raise CollectError(
                f"no run folders below {str(root)!r}: a run folder contains .hydra/ or {METRICS_FILE}; "
                "pass the folder of a run or a sweep, e.g. outputs/sweeps"
            )
        # Overlapping paths (outputs/ and outputs/sweeps/) must not count a run twice.
        for folder in found:
            real = os.path.realpath(folder)
            if real not in seen_folders:
                seen_folders.add(real)
                folders.append(folder)
        skipped += [item for item in others if item not in skipped]

    runs = [read_run(folder, metric) for folder in folders]
    result_keys = _assign_settings(runs)
    full_keys = [*IDENTITY_KEYS, *result_keys]
    if by:
        known = set(full_keys) | {key for run in runs if run.overrides for key in run.overrides}
        for key in by:
            if key == "seed":
                raise CollectError("--by seed is not allowed: the statistics are computed over seeds")
            if key not in known:
                raise CollectError(f"--by key {key!r} is not set in any run: choose from {', '.join(sorted(known - {'seed'}))}")
        group_keys = ["method", *[key for key in dict.fromkeys(by) if key != "method"]]
        for run in runs:
            for key in group_keys:
                if key not in IDENTITY_KEYS and key not in run.settings and run.overrides is not None:
                    run.settings[key] = run.overrides.get(key, MISSING)
    else:
        group_keys = full_keys

    # A --by key outside the configuration (such as device) still distinguishes runs.
    _deduplicate(runs, full_keys + [key for key in group_keys if key not in full_keys])
    groups = _build_groups(runs, group_keys, baseline)
    labels = {group.key: group.label for group in groups}
    summary = _summary_table(groups, group_keys)
    comparison = _comparison_table(groups, group_keys, full_keys, metric, baseline)

    skipped = [SkippedFolder(run.run_dir, run.status, run.skip_reason) for run in runs if run.skip_reason] + skipped
    history_problems = [
        SkippedFolder(run.run_dir, run.status, run.history_problem) for run in runs if run.usable and run.history_problem
    ]
    status_counts = {status: 0 for status in ALL_STATUSES}
    for run in runs:
        status_counts[run.status] += 1

    result = CollectResult(
        runs=_runs_table(runs, result_keys, labels),
        summary=summary,
        comparison=comparison,
        status_counts=status_counts,
        skipped=skipped,
        history_problems=history_problems,
        out_dir=out,
        metric=metric,
        paths=roots,
    )

    out.mkdir(parents=True, exist_ok=True)
    result.runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    comparison.to_csv(out / "comparison.csv", index=False)
    plot_lines: List[str] = []
    if plots:
        result.plots, plot_lines, result.notes = _write_plots(
            out / "plots", groups, group_keys, comparison, metric, max_panels
        )
    (out / "report.md").write_text(_report(result, group_keys, plot_lines, _environment_notes(runs)))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popgrad collect",
        description=(
            "Write runs.csv, summary.csv, comparison.csv, report.md and plots/ for every run folder below the "
            "given paths, and compare each method with the baseline, paired by seed."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folder of a run, a sweep or a whole outputs/ tree")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: FIRST_PATH/collected)")
    parser.add_argument(
        "--metric",
        default="test_f1",
        choices=QUALITY_METRICS,
        help="metric compared with the baseline, higher is better (default: test_f1)",
    )
    parser.add_argument(
        "--by",
        action="append",
        metavar="KEY",
        help=(
            "group only by this override key, plus method (repeatable); default: every override key except seed "
            "and the keys that do not change results (" + ", ".join(sorted(NON_RESULT_KEYS - {"seed"})) + ")"
        ),
    )
    parser.add_argument(
        "--baseline",
        default=BASELINE_METHOD,
        metavar="METHOD",
        help="method that the others are compared with (default: baseline)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--max-panels",
        type=int,
        default=MAX_CURVE_PANELS,
        metavar="N",
        help=(
            f"maximum number of learning-curve panels, one per set of settings and {PANELS_PER_FIGURE} per figure "
            f"(default: {MAX_CURVE_PANELS})"
        ),
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``popgrad collect``; return 0 when the tables were written, 2 for a bad path or option, 1 when writing failed."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    try:
        result = collect(
            args.paths,
            out_dir=args.out,
            metric=args.metric,
            by=args.by,
            plots=not args.no_plots,
            baseline=args.baseline,
            max_panels=args.max_panels,
        )
    except CollectError as error:
        print(f"popgrad collect: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"popgrad collect: cannot write the results: {error}; pass a writable folder with --out", file=sys.stderr)
        return 1

    counts = ", ".join(f"{count} {status}" for status, count in result.status_counts.items() if count)
    print(f"collected {len(result.runs)} run folders ({counts}) into {result.out_dir}")
    records = result.comparison.to_dict("records")
    for row in records[:MAX_PRINTED_COMPARISONS]:
        print("  " + describe_comparison(row, result.metric, len(records)))
    if len(records) > MAX_PRINTED_COMPARISONS:
        print(f"  ... {len(records) - MAX_PRINTED_COMPARISONS} more comparisons in {result.out_dir / 'report.md'}")
    if result.skipped:
        print(f"  {len(result.skipped)} folders skipped or left out; see {result.out_dir / 'report.md'}")
    return 0
