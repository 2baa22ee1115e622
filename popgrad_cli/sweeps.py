"""Sweep-level behaviour: resuming a sweep, and the summary and tables at its end.

The launchers themselves are Hydra's plugins (conf/hydra/launcher/); this module
only adds what happens around them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from popgrad_cli import results

log = logging.getLogger("popgrad_cli.sweeps")

DEFAULT_SWEEPS_ROOT = Path("outputs/sweeps")

# Set by the callback at the end of a sweep in this process, read by `popgrad train`.
last_sweep_summary: Optional[Dict[str, List[str]]] = None


def _task_overrides(arguments: List[str]) -> List[str]:
    """Return the overrides that define a sweep's jobs: no flags, no resume, no Hydra settings."""
    return sorted(
        argument
        for argument in arguments
        if not argument.startswith("-") and not argument.startswith(("resume=", "hydra.", "hydra/"))
    )


def find_previous_sweep(arguments: List[str], sweeps_root: Path = DEFAULT_SWEEPS_ROOT) -> Optional[Path]:
    """Return the newest sweep folder made by the same overrides, or None.

    A sweep folder records its command's overrides in ``multirun.yaml``; matching on
    them, with ``resume`` and Hydra settings left out, finds the sweep to continue.
    """
    wanted = _task_overrides(arguments)
    matches = []
    for record in sweeps_root.glob("*/*/multirun.yaml"):
        try:
            recorded = OmegaConf.load(record).hydra.overrides.task
        except Exception:  # an unreadable record only means: not this sweep
            continue
        if _task_overrides(list(recorded)) == wanted:
            matches.append(record.parent)
    return max(matches, key=lambda folder: folder.stat().st_mtime).resolve() if matches else None


def job_folders(sweep_dir: Path) -> List[Path]:
    return sorted(path.parent.parent for path in Path(sweep_dir).glob("*/.hydra/overrides.yaml"))


def summarise(sweep_dir: Path, started: float) -> Dict[str, List[str]]:
    """Group a sweep's job folders by end state; completed runs older than ``started`` were skipped."""
    summary: Dict[str, List[str]] = {
        "completed": [],
        "skipped": [],
        "diverged": [],
        "interrupted": [],
        "failed": [],
        "incomplete": [],
    }
    for folder in job_folders(sweep_dir):
        metrics = results.read_metrics(folder)
        if metrics is None:
            summary["incomplete"].append(str(folder))
            continue
        status = metrics.get("status")
        if status == "completed" and (folder / results.METRICS_FILE).stat().st_mtime < started:
            status = "skipped"
        summary.get(status, summary["failed"]).append(str(folder))
    return summary


def sweep_failed(summary: Dict[str, List[str]]) -> bool:
    return bool(summary["failed"] or summary["interrupted"] or summary["incomplete"])


class SweepCallback(Callback):
    """Print a summary of the sweep's end states and write its result tables."""

    def __init__(self, collect: bool = True) -> None:
        self.collect = collect
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global last_sweep_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarise(sweep_dir, self.started)
        last_sweep_summary = summary
        counts = ", ".join(
            f"{len(folders)} {'skipped (completed earlier)' if status == 'skipped' else status}"
            for status, folders in summary.items()
        )
        log.info("sweep %s finished: %s", sweep_dir, counts)
        if summary["skipped"]:
            log.info("skipped %d jobs that had completed in an earlier run of this sweep", len(summary["skipped"]))
        for status in ("diverged", "interrupted", "failed", "incomplete"):
            for folder in summary[status]:
                log.warning("%s: %s", status, folder)

        if self.collect and (summary["completed"] or summary["skipped"]):
            from popgrad_cli.collect import collect

            try:
                outcome = collect([sweep_dir], out_dir=sweep_dir / "collected")
                log.info("result tables: %s", outcome.out_dir)
            except Exception as error:  # the runs are safe on disk; only the tables failed
                log.error("collecting %s failed: %s: %s; rerun popgrad collect %s", sweep_dir, type(error).__name__, error, sweep_dir)
