"""Checks that run before Hydra creates any folder or starts any job.

Every job of the command (each combination of a sweep) is composed and validated
first, so a typo in an override stops the command with one message instead of
failing each job, or failing the last job of a long sweep.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from popgrad_cli.config import ConfigError, validate_config

GROUPS = ("dataset", "model", "method", "optimizer", "schedule", "trainer", "data")
# Hydra flags after which no job runs (help, printing the config, completion).
INFORMATION_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "--shell-completion", "-sc", "-i")
# Flags that take the next argument as their value.
FLAGS_WITH_VALUE = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package")


def split_arguments(arguments: List[str]) -> tuple[List[str], List[str]]:
    """Split ``popgrad train`` arguments into Hydra flags and overrides."""
    flags, overrides = [], []
    expecting_value = False
    for argument in arguments:
        if expecting_value:
            flags.append(argument)
            expecting_value = False
        elif argument.startswith("-"):
            flags.append(argument)
            expecting_value = argument in FLAGS_WITH_VALUE
        else:
            overrides.append(argument)
    return flags, overrides


def job_overrides(overrides: List[str], multirun: bool) -> List[List[str]]:
    """Return the overrides of each job the command would run."""
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _output_folder(overrides: List[str], multirun: bool) -> Path:
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    for override in overrides:
        if override.startswith(key):
            return Path(override[len(key) :])
    return Path("outputs")


def _group_keys(config_dir: Path, group: str) -> List[str]:
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        node = compose(config_name="config").get(group)
    return sorted(node.keys()) if hasattr(node, "keys") else []


def describe_composition_error(config_dir: Path, error: Exception) -> str:
    """Turn Hydra's composition error into one message that names the value and the fix."""
    text = str(error).strip()
    unknown_key = re.match(r"Could not override '([\w.]+)'", text)
    if unknown_key:
        key = unknown_key.group(1)
        group = key.split(".")[0]
        if "." in key:
            valid = _group_keys(config_dir, group)
            listing = f"; valid keys of {group}: {', '.join(valid)}" if valid else ""
            return f"unknown config key {key!r}{listing}"
        owners = [name for name in GROUPS if key in _group_keys(config_dir, name)]
        hint = f"; did you mean {' or '.join(f'{owner}.{key}' for owner in owners)}?" if owners else ""
        return f"unknown config key {key!r}{hint}"

    missing_option = re.search(r"Could not find '(\w+)/(\w+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        available = sorted(path.stem for path in (config_dir / group).glob("*.yaml"))
        return f"unknown {group} {option!r}; available: {', '.join(available)}"

    # Hydra's merge errors keep the reason (a wrong type, say) in the cause.
    cause = error.__cause__ or error.__context__
    if cause is not None:
        reason = str(cause).strip().splitlines()[0]
        text = f"{text.splitlines()[0]}: {reason}"
    return text.split("\nConfig search path:")[0]


def check_job(config_dir: Path, overrides: List[str]) -> None:
    """Compose and validate one job's config; raise ConfigError with a message for the user."""
    # Hydra's own settings need the runtime that only a real launch provides.
    job = [override for override in overrides if not override.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=job)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(describe_composition_error(config_dir, error)) from None
    validate_config(cfg)
    device = str(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"invalid value for device: {device!r}; no CUDA device is available, use device=cpu or device=auto")


def check_command(config_dir: Path, arguments: List[str]) -> Optional[str]:
    """Return why the command cannot run, or None when every job is valid."""
    flags, overrides = split_arguments(arguments)
    if any(flag in INFORMATION_FLAGS or flag.startswith("--cfg=") for flag in flags):
        return None
    multirun = "-m" in flags or "--multirun" in flags
    try:
        jobs = job_overrides(overrides, multirun)
    except (HydraException, OmegaConfBaseException) as error:
        return f"invalid override: {str(error).strip()}"

    checked = set()
    for job in jobs:
        key = tuple(job)
        if key in checked:
            continue
        checked.add(key)
        try:
            check_job(config_dir, job)
        except ConfigError as error:
            prefix = f"job {' '.join(job)}: " if multirun else ""
            return f"{prefix}{error}"

    output = _nearest_existing(_output_folder(overrides, multirun))
    if not os.access(output, os.W_OK):
        return f"the output folder {output} is not writable; run from a writable folder or set hydra.run.dir / hydra.sweep.dir"
    return None
