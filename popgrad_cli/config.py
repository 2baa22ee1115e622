"""Typed configuration schema and the value checks run before any work starts.

Every config group has a dataclass registered in Hydra's ConfigStore, so a
misspelled key or a wrong type fails at composition. The checks in
`validate_config` cover what types cannot express (ranges, choices, cross-group
rules) and raise `ConfigError` with the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10")
MODEL_NAMES = ("mlp", "cnn", "resnet18", "resnet50", "densenet161", "mobilenet_v2", "shufflenet_v2")
METHOD_NAMES = ("baseline", "pg", "sam", "swa", "weight_noise", "pg_swa")
# Methods that average the weights once per epoch (Stochastic Weight Averaging).
WEIGHT_AVERAGING_METHODS = ("swa", "pg_swa")
OPTIMIZER_NAMES = ("sgd", "adam")
SCHEDULE_NAMES = ("constant", "step", "cosine")


class ConfigError(ValueError):
    """An invalid configuration value, reported before any work starts."""


@dataclass
class DatasetConfig:
    name: str = MISSING
    val_fraction: float = 0.1
    train_size: Optional[int] = None
    raw_dir: Optional[str] = None
    mean: List[float] = field(default_factory=lambda: [0.5])
    std: List[float] = field(default_factory=lambda: [0.5])
    crop_padding: int = 0
    horizontal_flip: bool = False


@dataclass
class ModelConfig:
    name: str = MISSING
    depth: int = 2
    width: int = 256
    activation: str = "relu"
    batch_norm: bool = False
    dropout: float = 0.0
    init: str = "default"


@dataclass
class MethodConfig:
    name: str = MISSING
    population_size: int = 1
    sigma: float = 0.0
    noise_scale: str = "absolute"
    antithetic: bool = False
    include_center: bool = False
    resample: str = "step"
    sigma_schedule: str = "constant"
    sigma_final: float = 0.0
    batch: str = "shared"
    engine: str = "vmap"
    chunk_size: Optional[int] = None
    # Sharpness-Aware Minimization (method=sam).
    rho: float = 0.05
    adaptive: bool = False
    # Stochastic Weight Averaging (method=swa and method=pg_swa). swa_start is an
    # epoch number >= 1 or a fraction in (0, 1) of trainer.epochs.
    swa_start: float = 0.75
    swa_lr: Optional[float] = None
    swa_anneal_epochs: int = 1
    swa_anneal_strategy: str = "cos"


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    name: str = MISSING
    step_size: int = 30
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1024
    select: str = "last"
    grad_clip: Optional[float] = None
    precision: str = "32"
    compile: bool = False
    checkpoint_every: int = 1
    progress: bool = True


@dataclass
class DataConfig:
    root: str = MISSING
    download: bool = False


@dataclass
class PopgradConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    # Free-form metadata that experiment presets attach to their runs.
    tags: List[str] = field(default_factory=list)
    experiment: Optional[Any] = None


def register_configs() -> None:
    """Register the schemas so each group's YAML files are validated against them."""
    store = ConfigStore.instance()
    store.store(name="popgrad_schema", node=PopgradConfig)
    for group, node in (
        ("dataset", DatasetConfig),
        ("model", ModelConfig),
        ("method", MethodConfig),
        ("optimizer", OptimizerConfig),
        ("schedule", ScheduleConfig),
        ("trainer", TrainerConfig),
    ):
        # Under schema/, not the group itself, so that `popgrad train --help` does not
        # list the schemas as options of the group.
        store.store(group="schema", name=group, node=node)


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"invalid value for {key}: {value!r}; expected {allowed}")


def _require_choice(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, value, "one of " + ", ".join(choices))


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(cfg: Any) -> None:
    """Check value ranges and cross-group rules that the typed schema cannot express.

    Raises ConfigError naming the first offending key, its value and what is allowed.
    """
    _reject_unknown_keys(cfg)
    _require_choice("dataset.name", cfg.dataset.name, DATASET_NAMES)
    _require_choice("model.name", cfg.model.name, MODEL_NAMES)
    _require_choice("method.name", cfg.method.name, METHOD_NAMES)
    _require_choice("optimizer.name", cfg.optimizer.name, OPTIMIZER_NAMES)
    _require_choice("schedule.name", cfg.schedule.name, SCHEDULE_NAMES)

    dataset = cfg.dataset
    _require(0 <= dataset.val_fraction < 1, "dataset.val_fraction", dataset.val_fraction, "a number in [0, 1)")
    if dataset.train_size is not None:
        _require(dataset.train_size >= 1, "dataset.train_size", dataset.train_size, "null or an integer >= 1")
    _require(dataset.crop_padding >= 0, "dataset.crop_padding", dataset.crop_padding, "an integer >= 0")
    _require(
        len(dataset.mean) == len(dataset.std),
        "dataset.std",
        list(dataset.std),
        f"as many values as dataset.mean ({len(dataset.mean)})",
    )
    _require(all(s > 0 for s in dataset.std), "dataset.std", list(dataset.std), "values > 0")

    model = cfg.model
    _require(model.depth >= 1, "model.depth", model.depth, "an integer >= 1")
    _require(model.width >= 1, "model.width", model.width, "an integer >= 1")
    _require_choice("model.activation", model.activation, ("relu", "sigmoid", "tanh"))
    _require_choice("model.init", model.init, ("default", "xavier", "kaiming"))
    _require(0 <= model.dropout < 1, "model.dropout", model.dropout, "a number in [0, 1)")

    _validate_method(cfg.method, cfg.trainer.batch_size, cfg.trainer.epochs)

    optimizer = cfg.optimizer
    _require(_is_finite_number(optimizer.lr) and optimizer.lr > 0, "optimizer.lr", optimizer.lr, "a finite number > 0")
    _require(0 <= optimizer.momentum < 1, "optimizer.momentum", optimizer.momentum, "a number in [0, 1)")
    _require(optimizer.weight_decay >= 0, "optimizer.weight_decay", optimizer.weight_decay, "a number >= 0")
    _require(
        len(optimizer.betas) == 2 and all(0 <= b < 1 for b in optimizer.betas),
        "optimizer.betas",
        list(optimizer.betas),
        "two numbers in [0, 1)",
    )

    schedule = cfg.schedule
    _require(schedule.step_size >= 1, "schedule.step_size", schedule.step_size, "an integer >= 1")
    _require(0 < schedule.gamma <= 1, "schedule.gamma", schedule.gamma, "a number in (0, 1]")
    _require(schedule.min_lr >= 0, "schedule.min_lr", schedule.min_lr, "a number >= 0")

    trainer = cfg.trainer
    _require(trainer.epochs >= 1, "trainer.epochs", trainer.epochs, "an integer >= 1")
    _require(trainer.batch_size >= 1, "trainer.batch_size", trainer.batch_size, "an integer >= 1")
    _require(trainer.eval_batch_size >= 1, "trainer.eval_batch_size", trainer.eval_batch_size, "an integer >= 1")
    _require_choice("trainer.select", trainer.select, ("last", "best_val"))
    _require_choice("trainer.precision", str(trainer.precision), ("32", "bf16"))
    _require(trainer.checkpoint_every >= 1, "trainer.checkpoint_every", trainer.checkpoint_every, "an integer >= 1")
    if trainer.grad_clip is not None:
        _require(
            _is_finite_number(trainer.grad_clip) and trainer.grad_clip > 0,
            "trainer.grad_clip",
            trainer.grad_clip,
            "null or a finite number > 0",
        )

    _require(
        isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32, "seed", cfg.seed, "an integer in [0, 2**32 - 1]"
    )
    _require(
        cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
        "device",
        cfg.device,
        "auto, cpu, cuda or cuda:N",
    )


# method keys that only the population-based methods read.
POPULATION_KEYS = (
    "population_size", "sigma", "noise_scale", "antithetic", "include_center", "resample",
    "sigma_schedule", "sigma_final", "batch", "engine", "chunk_size",
)


def unused_method_keys(method: Any) -> List[str]:
    """Return the method.* keys set away from their defaults that ``method.name`` ignores.

    A sweep such as ``method=baseline,pg method.population_size=4`` sets them on the
    baseline too, so they are reported, not rejected.
    """
    if method.name in ("pg", "weight_noise", "pg_swa"):
        return []
    defaults = MethodConfig()
    return [f"method.{key}={method[key]}" for key in POPULATION_KEYS if method[key] != getattr(defaults, key)]


def _reject_unknown_keys(cfg: Any) -> None:
    """Reject keys added with ``+key=value`` that no schema defines, which would be silently ignored."""
    schemas = {
        "": PopgradConfig,
        "dataset.": DatasetConfig,
        "model.": ModelConfig,
        "method.": MethodConfig,
        "optimizer.": OptimizerConfig,
        "schedule.": ScheduleConfig,
        "trainer.": TrainerConfig,
        "data.": DataConfig,
    }
    for prefix, schema in schemas.items():
        node = cfg if not prefix else cfg.get(prefix[:-1])
        if node is None:
            continue
        known = set(schema.__dataclass_fields__)
        for key in node.keys():
            if key not in known:
                scope = f" of {prefix[:-1]}" if prefix else ""
                raise ConfigError(
                    f"unknown config key '{prefix}{key}'; valid keys{scope}: " + ", ".join(sorted(known))
                )


def _validate_method(method: Any, batch_size: int, epochs: Optional[int] = None) -> None:
    _require(
        isinstance(method.population_size, int) and method.population_size >= 1,
        "method.population_size",
        method.population_size,
        "an integer >= 1",
    )
    _require(_is_finite_number(method.sigma) and method.sigma >= 0, "method.sigma", method.sigma, "a finite number >= 0")
    _require(
        _is_finite_number(method.sigma_final) and method.sigma_final >= 0,
        "method.sigma_final",
        method.sigma_final,
        "a finite number >= 0",
    )
    _require_choice("method.noise_scale", method.noise_scale, ("absolute", "layer", "filter"))
    _require_choice("method.resample", method.resample, ("step", "fixed"))
    _require_choice("method.sigma_schedule", method.sigma_schedule, ("constant", "linear", "cosine"))
    _require_choice("method.batch", method.batch, ("shared", "split"))
    _require_choice("method.engine", method.engine, ("vmap", "loop"))
    if method.chunk_size is not None:
        _require(method.chunk_size >= 1, "method.chunk_size", method.chunk_size, "null (all members) or an integer >= 1")

    population = method.population_size
    if method.antithetic:
        random_members = population - 1 if method.include_center else population
        _require(
            random_members % 2 == 0,
            "method.population_size",
            population,
            "an even number of perturbed members with method.antithetic=true"
            + (" (population_size - 1 must be even with include_center=true)" if method.include_center else ""),
        )
    if method.batch == "split":
        _require(
            batch_size >= population,
            "trainer.batch_size",
            batch_size,
            f"at least method.population_size ({population}) with method.batch=split",
        )
    if method.name == "weight_noise":
        _validate_weight_noise(method)
    _validate_sam(method)
    _validate_weight_averaging(method, epochs)


def _validate_weight_noise(method: Any) -> None:
    """Keep weight noise what it is named: exactly one perturbed copy on the whole batch."""
    _require(
        method.population_size == 1,
        "method.population_size",
        method.population_size,
        "1 with method=weight_noise (one noisy copy per step); use method=pg for larger populations",
    )
    _require(
        method.batch == "shared",
        "method.batch",
        method.batch,
        "shared with method=weight_noise (the single copy sees the whole batch)",
    )
    _require(
        not method.include_center,
        "method.include_center",
        method.include_center,
        "false with method=weight_noise, where the only member would be the unperturbed network",
    )


def _validate_sam(method: Any) -> None:
    _require(_is_finite_number(method.rho) and method.rho > 0, "method.rho", method.rho, "a finite number > 0")


def resolve_swa_start(swa_start: float, epochs: int) -> int:
    """Return the first epoch (1-based) of the weight-averaging phase.

    An integer value >= 1 is that epoch. A fraction f in (0, 1) lets floor(f * epochs)
    epochs run before averaging starts, so the phase starts at floor(f * epochs) + 1.
    """
    if swa_start < 1:
        return math.floor(swa_start * epochs) + 1
    return int(swa_start)


def _validate_weight_averaging(method: Any, epochs: Optional[int]) -> None:
    start = method.swa_start
    _require(
        _is_finite_number(start) and start > 0 and (start < 1 or float(start).is_integer()),
        "method.swa_start",
        start,
        "a fraction in (0, 1) of trainer.epochs or an integer epoch number >= 1",
    )
    if method.swa_lr is not None:
        _require(
            _is_finite_number(method.swa_lr) and method.swa_lr > 0,
            "method.swa_lr",
            method.swa_lr,
            "null (keep the configured schedule) or a finite number > 0",
        )
    _require(
        method.swa_anneal_epochs >= 1,
        "method.swa_anneal_epochs",
        method.swa_anneal_epochs,
        "an integer >= 1",
    )
    _require_choice("method.swa_anneal_strategy", method.swa_anneal_strategy, ("cos", "linear"))
    if method.name in WEIGHT_AVERAGING_METHODS and epochs is not None:
        _require(
            resolve_swa_start(start, epochs) <= epochs,
            "method.swa_start",
            start,
            f"an epoch number <= trainer.epochs ({epochs}), or a fraction in (0, 1)",
        )
