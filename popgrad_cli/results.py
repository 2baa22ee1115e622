"""One run's result files: ``metrics.json`` and ``history.csv``, written atomically.

A reader (``popgrad collect``, a resumed sweep) never sees a half-written file:
each file is written to a temporary name in the same folder and renamed over the
old one, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import pandas as pd

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"

STATUSES = ("completed", "diverged", "failed", "interrupted")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def versions() -> Dict[str, str]:
    """Return the versions that a result depends on."""
    import torch
    import torchvision

    from popgrad_cli import __version__

    return {
        "popgrad_cli": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def new_metrics(cfg: Any, overrides: Iterable[str]) -> Dict[str, Any]:
    """Return a metrics record with every schema key, before any result is known."""
    return {
        "status": "failed",
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "seed": int(cfg.seed),
        "overrides": list(overrides),
        "test_accuracy": None,
        "test_f1": None,
        "val_accuracy": None,
        "val_f1": None,
        "best_epoch": None,
        "epochs_completed": 0,
        "train_time_s": 0.0,
        "wall_time_s": 0.0,
        "gradient_evaluations": 0,
        "device": None,
        "versions": versions(),
        "error": None,
    }


def write_metrics(run_dir: Path, metrics: Dict[str, Any]) -> None:
    text = json.dumps(metrics, indent=2, allow_nan=True) + "\n"
    atomic_write_text(Path(run_dir) / METRICS_FILE, text)


def read_metrics(run_dir: Path) -> Optional[Dict[str, Any]]:
    """Return a run's metrics, or None when the file is missing or unreadable."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_history(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    atomic_write_text(Path(run_dir) / HISTORY_FILE, pd.DataFrame(history).to_csv(index=False))
