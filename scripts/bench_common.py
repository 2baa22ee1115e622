"""Helpers shared by scripts/bench_pg.py and scripts/bench_train.py."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from hydra import compose, initialize_config_dir

from popgrad_cli.cli import conf_dir, register_resolvers, silence_launcher_schema_warning
from popgrad_cli.config import register_configs, validate_config


def prepare_hydra() -> None:
    """Register popgrad's schemas and resolvers, as `popgrad train` does before composing."""
    register_configs()
    register_resolvers()
    silence_launcher_schema_warning()


def compose_config(overrides: Sequence[str]):
    """Compose conf/config.yaml with `overrides`, as `popgrad train` would, and validate it."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate_config(cfg)
    return cfg


def synchronize(device: torch.device) -> None:
    # NOTE: the benchmarks have run on CPUs only so far; this CUDA path is untested.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu or --device auto")
    return torch.device(name)
