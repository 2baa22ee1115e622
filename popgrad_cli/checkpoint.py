"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, optimizer, scheduler, the gradient estimator's state
(fixed PG offsets), all RNG states, the epoch and the position inside it, and the
history so far. It is written to a temporary file and renamed, so a run killed
while saving leaves the previous checkpoint intact, and it is read back with
``torch.load(weights_only=True)``, which cannot execute code from the file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from omegaconf import OmegaConf

from popgrad_cli.errors import EXIT_INVALID_CONFIG, CheckpointError

CHECKPOINT_FILE = "checkpoint.pt"

# Keys that may change between the interrupted run and its resumption because
# they do not change the numbers a run produces.
RESUMABLE_DIFFERENCES = ("resume", "trainer.progress", "data.root", "data.download", "trainer.checkpoint_every")


def capture_rng_state() -> Dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # Stored as plain types and a tensor because weights_only loading rejects
        # numpy arrays.
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(position), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_for_comparison(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Return the dotted keys whose values differ, ignoring the ones safe to change."""
    old, new = _flatten(saved), _flatten(current)
    differing = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return [key for key in differing if not key.startswith(RESUMABLE_DIFFERENCES)]


def save_checkpoint(run_dir: Path, state: Dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT_FILE
    handle, temporary = tempfile.mkstemp(dir=run_dir, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(error).__name__}: {error}); "
            "delete it to start the run from scratch"
        ) from None


def check_checkpoint_config(run_dir: Path, cfg: Any) -> None:
    """Raise CheckpointError if the run directory's checkpoint was made with another config."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if path.exists():
        _check_config(path, _read(path), cfg)


def load_checkpoint(run_dir: Path, cfg: Any) -> Dict[str, Any]:
    """Load the run directory's checkpoint and check it was made with the same config."""
    path = Path(run_dir) / CHECKPOINT_FILE
    state = _read(path)
    _check_config(path, state, cfg)
    return state


def _check_config(path: Path, state: Dict[str, Any], cfg: Any) -> None:
    differences = config_differences(state.get("config", {}), config_for_comparison(cfg))
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was made with a different config; keys that differ: "
            + ", ".join(differences)
            + ". Rerun with the original values or use a new run directory",
            exit_code=EXIT_INVALID_CONFIG,
        )
