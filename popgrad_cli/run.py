"""One training job inside Hydra: run it, map its end state to a status and an exit code.

A failing job lets no exception escape, so it does not stop the other jobs of a
sweep. An interrupt (SIGINT, SIGTERM) does stop the sweep, after the job has saved
its checkpoint. Every end state is recorded in ``metrics.json``, and ``completed`` is
written only after the test evaluation succeeded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from popgrad_cli import checkpoint, results
from popgrad_cli.config import ConfigError, unused_method_keys, validate_config
from popgrad_cli.data import DataError
from popgrad_cli.errors import (
    EXIT_COMPLETED,
    EXIT_DATA_ERROR,
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID_CONFIG,
    CheckpointError,
    Diverged,
    Interrupted,
)

log = logging.getLogger("popgrad_cli.run")


def _show_progress_bar(cfg: Any, multirun: bool) -> bool:
    return bool(cfg.trainer.progress) and not multirun and sys.stderr.isatty()


def _limit_threads_for_parallel_jobs(hydra_cfg: Any) -> None:
    """Give each of n_jobs parallel jobs an equal share of the CPU cores."""
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=None)
    if not n_jobs:
        return
    import torch

    cores = os.cpu_count() or 1
    running = cores if n_jobs < 0 else min(n_jobs, cores)
    torch.set_num_threads(max(1, cores // running))


def run_job(cfg: Any) -> int:
    """Train one model as configured and write its result files; return the exit code."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.perf_counter()

    previous = results.read_metrics(run_dir)
    if previous is not None and previous.get("status") == "completed":
        # A finished run is never overwritten, and a rerun with another config is an error.
        try:
            checkpoint.check_checkpoint_config(run_dir, cfg)
        except CheckpointError as error:
            log.error("%s; run directory %s", error, run_dir)
            return error.exit_code
        log.info("run %s already completed (test F1 %.4f); nothing to do", run_dir, previous.get("test_f1") or float("nan"))
        return EXIT_COMPLETED

    metrics = results.new_metrics(cfg, hydra_cfg.overrides.task)
    trainer = None
    exit_code = EXIT_FAILED
    try:
        validate_config(cfg)
        with open_dict(cfg):
            cfg.trainer.progress = _show_progress_bar(cfg, multirun)
        from popgrad_cli.train import SignalGuard, prepare_trainer

        ignored = unused_method_keys(cfg.method)
        if ignored:
            log.warning("method=%s ignores %s; they apply to method=pg and its variants", cfg.method.name, ", ".join(ignored))
        if multirun:
            _limit_threads_for_parallel_jobs(hydra_cfg)
        log.info("run %s: %s / %s / %s, seed %d", run_dir, cfg.dataset.name, cfg.model.name, cfg.method.name, cfg.seed)
        trainer = prepare_trainer(cfg, run_dir, job_number=hydra_cfg.job.num if multirun else None)
        metrics["device"] = str(trainer.device)
        with SignalGuard() as guard:
            trainer.fit(guard)
        metrics.update(trainer.final_metrics())
        metrics["status"] = "completed"
        exit_code = EXIT_COMPLETED
    except ConfigError as error:
        exit_code = _record(metrics, "failed", f"invalid config: {error}", EXIT_INVALID_CONFIG)
    except DataError as error:
        exit_code = _record(metrics, "failed", f"data error: {error}", EXIT_DATA_ERROR)
    except CheckpointError as error:
        exit_code = _record(metrics, "failed", str(error), error.exit_code)
        if previous is not None:
            # The earlier attempt's record stays: this attempt never started training.
            log.error("%s; run directory %s", error, run_dir)
            return exit_code
    except Diverged as error:
        exit_code = _record(metrics, "diverged", str(error), EXIT_DIVERGED)
        metrics["divergence"] = {"epoch": error.epoch, "step": error.step, "quantity": error.quantity, "value": error.value}
    except Interrupted as error:
        exit_code = _record(metrics, "interrupted", str(error), EXIT_INTERRUPTED)
    except Exception as error:  # a sweep must outlive any failure of one job
        log.exception("run %s failed with an unexpected error", run_dir)
        exit_code = _record(metrics, "failed", f"{type(error).__name__}: {error}", EXIT_FAILED)

    _finish(run_dir, metrics, trainer, started)
    if multirun and exit_code == EXIT_INTERRUPTED:
        # Ctrl-C or SIGTERM stops the whole sweep, not only the job that was running.
        raise SystemExit(exit_code)
    return exit_code


def _record(metrics: Dict[str, Any], status: str, message: str, exit_code: int) -> int:
    metrics["status"] = status
    metrics["error"] = message
    return exit_code


def _finish(run_dir: Path, metrics: Dict[str, Any], trainer: Optional[Any], started: float) -> None:
    if trainer is not None:
        progress = trainer.progress
        metrics["epochs_completed"] = progress.epoch
        metrics["gradient_evaluations"] = progress.gradient_evaluations
        metrics["train_time_s"] = progress.train_time_s
        if progress.history:
            results.write_history(run_dir, progress.history)
    metrics["wall_time_s"] = time.perf_counter() - started
    try:
        results.write_metrics(run_dir, metrics)
    except OSError as error:
        log.error("could not write %s: %s", Path(run_dir) / results.METRICS_FILE, error)

    if metrics["status"] == "completed":
        log.info(
            "completed: test F1 %.4f, test accuracy %.4f; run directory %s",
            metrics["test_f1"],
            metrics["test_accuracy"],
            run_dir,
        )
    else:
        log.error("%s: %s; run directory %s", metrics["status"], metrics["error"], run_dir)
