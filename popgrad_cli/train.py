"""The training loop: one run from a composed config to its result files.

The training tensors stay on the training device: each epoch draws one
permutation, slices batches from it, and normalises and augments them there, so
no per-sample Python work happens inside the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from popgrad_cli import checkpoint
from popgrad_cli.data import BatchTransform, DataSplits, load_splits
from popgrad_cli.errors import Diverged, Interrupted
from popgrad_cli.methods import NormalisedBatches, build_weight_averaging
from popgrad_cli.metrics import accuracy_and_macro_f1, confusion_matrix
from popgrad_cli.models import build_model
from popgrad_cli.population import build_estimator

log = logging.getLogger(__name__)

# How many steps run between host-device synchronisations for the finiteness check
# and the progress bar; checking every step would stall the GPU queue each time.
SYNC_EVERY = 25


def resolve_device(name: str, job_number: Optional[int] = None) -> torch.device:
    """Return the training device; in a sweep, device=auto spreads jobs over the visible GPUs."""
    if name == "auto":
        if torch.cuda.is_available():
            index = 0 if job_number is None else job_number % torch.cuda.device_count()
            log.info("device=auto: using CUDA device %d (%s)", index, torch.cuda.get_device_name(index))
            return torch.device("cuda", index)
        log.info("device=auto: no CUDA device is available, using the CPU")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from popgrad_cli.config import ConfigError

            raise ConfigError(f"invalid value for device: {name!r}; no CUDA device is available, use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            from popgrad_cli.config import ConfigError

            raise ConfigError(
                f"invalid value for device: {name!r}; only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params, cfg: Any) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, epochs: int):
    """Return a scheduler that is stepped once per epoch."""
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.min_lr)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def make_autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    if str(precision) == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: BatchTransform,
    batch_size: int,
    num_classes: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[float, float]:
    """Return accuracy and macro F1 of ``model`` in eval mode on uint8 images."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=labels.device)
    for start in range(0, len(labels), batch_size):
        with autocast():
            logits = model(transform(images[start : start + batch_size], train=False))
        confusion += confusion_matrix(logits.argmax(dim=1), labels[start : start + batch_size], num_classes)
    model.train(was_training)
    return accuracy_and_macro_f1(confusion)


class SignalGuard:
    """Turn SIGINT and SIGTERM into a flag that the loop checks between steps.

    SLURM sends SIGTERM before preemption and at the time limit. Stopping at a step
    boundary lets the run save a consistent checkpoint instead of dying mid-update.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:
                # Not the main thread (some launchers): signals stay as they are.
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class Progress:
    """The run's position and results so far: the state that is not inside torch objects."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps completed
    history: List[Dict[str, Any]] = field(default_factory=list)
    gradient_evaluations: int = 0
    train_time_s: float = 0.0
    best_epoch: Optional[int] = None
    best_val_f1: float = -math.inf
    best_state: Optional[Dict[str, torch.Tensor]] = None
    # Inside an unfinished epoch: its permutation, the next batch and the loss so far.
    permutation: Optional[torch.Tensor] = None
    next_batch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_time_s: float = 0.0


class Trainer:
    """Train one model with the configured gradient estimator and report its metrics."""

    def __init__(self, cfg: Any, run_dir: Path, device: torch.device, splits: DataSplits) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = device
        self.splits = splits
        self.transform = BatchTransform.from_config(cfg.dataset)
        self.autocast = make_autocast(device, cfg.trainer.precision)

        self.model = build_model(cfg.model, splits.input_shape, splits.num_classes).to(device)
        self.channels_last = device.type == "cuda" and len(splits.input_shape) == 3 and cfg.model.name != "mlp"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.trainer.epochs)
        self.steps_per_epoch = math.ceil(len(splits.train_labels) / cfg.trainer.batch_size)
        self.estimator = build_estimator(
            self.model, cfg.method, self.steps_per_epoch * cfg.trainer.epochs, self.autocast
        )
        # Built before compiling, because the averaged model is a deep copy of the model.
        self.weight_averaging = build_weight_averaging(
            self.model,
            self.optimizer,
            cfg.method,
            cfg.trainer.epochs,
            NormalisedBatches(splits.train_images, self.transform, cfg.trainer.batch_size, self.channels_last),
            self.autocast,
        )
        self.progress = Progress()
        self._compile_if_requested()

    def _compile_if_requested(self) -> None:
        if not self.cfg.trainer.compile:
            return
        try:
            self.model.compile()
        except Exception as error:  # any compiler failure means: run eagerly
            log.warning("torch.compile failed (%s: %s); training eagerly", type(error).__name__, error)

    # Checkpoints

    def state_dict(self) -> Dict[str, Any]:
        progress = self.progress
        state = {
            "config": checkpoint.config_for_comparison(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "estimator": self.estimator.state_dict(),
            "rng": checkpoint.capture_rng_state(),
            "progress": {
                key: getattr(progress, key)
                for key in Progress.__dataclass_fields__
            },
        }
        if self.weight_averaging is not None:
            state["weight_averaging"] = self.weight_averaging.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.estimator.load_state_dict(state["estimator"])
        if self.weight_averaging is not None:
            self.weight_averaging.load_state_dict(state["weight_averaging"])
        self.progress = Progress(**state["progress"])
        if self.progress.permutation is not None:
            self.progress.permutation = self.progress.permutation.to(self.device)
        checkpoint.restore_rng_state(state["rng"])

    def save(self) -> Path:
        return checkpoint.save_checkpoint(self.run_dir, self.state_dict())

    # The loop

    def fit(self, guard: SignalGuard) -> None:
        cfg = self.cfg.trainer
        while self.progress.epoch < cfg.epochs:
            self._train_epoch(guard)
            self._end_epoch()
            if self.progress.epoch % cfg.checkpoint_every == 0 or self.progress.epoch == cfg.epochs:
                self.save()

    def _train_epoch(self, guard: SignalGuard) -> None:
        progress = self.progress
        labels = self.splits.train_labels
        batch_size = self.cfg.trainer.batch_size
        if progress.permutation is None:
            progress.permutation = torch.randperm(len(labels), device=self.device)
            progress.next_batch = 0
            progress.epoch_loss_sum = 0.0
            progress.epoch_time_s = 0.0

        self.model.train()
        show_bar = self.cfg.trainer.progress
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=progress.next_batch,
            desc=f"epoch {progress.epoch + 1}/{self.cfg.trainer.epochs}",
            disable=not show_bar,
            leave=False,
        )
        pending: List[torch.Tensor] = []
        started = time.perf_counter()
        for batch in range(progress.next_batch, self.steps_per_epoch):
            if guard.received:
                self._interrupt(guard.received, batch, pending, started)
            index = progress.permutation[batch * batch_size : (batch + 1) * batch_size]
            loss, grad_norm = self._step(index)
            pending.append(torch.stack([loss, grad_norm]))
            progress.gradient_evaluations += self.estimator.gradient_evaluations(len(index))
            if len(pending) == SYNC_EVERY or batch == self.steps_per_epoch - 1:
                self._check_finite(pending, first_step=progress.step + 1 - len(pending))
                bar.update(len(pending))
                bar.set_postfix(loss=f"{progress.epoch_loss_sum / (batch + 1):.4f}")
                pending = []
            progress.step += 1
        bar.close()
        progress.epoch_time_s += time.perf_counter() - started

    def _step(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.transform(self.splits.train_images[index], train=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.estimator.backward(images, self.splits.train_labels[index], self.progress.step)
        max_norm = self.cfg.trainer.grad_clip if self.cfg.trainer.grad_clip is not None else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        return loss.detach().float(), grad_norm.detach().float()

    def _check_finite(self, pending: List[torch.Tensor], first_step: int) -> None:
        values = torch.stack(pending).cpu()
        # One addition per step, in step order, so the sum does not depend on where
        # the synchronisation points fell (they move when a run is resumed).
        for loss in values[:, 0].tolist():
            self.progress.epoch_loss_sum += loss
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            row, column = bad[0].tolist()
            quantity = "loss" if column == 0 else "gradient norm"
            raise Diverged(self.progress.epoch + 1, first_step + row + 1, quantity, float(values[row, column]))

    def _interrupt(self, signal_name: str, batch: int, pending: List[torch.Tensor], started: float) -> None:
        if pending:
            self._check_finite(pending, first_step=self.progress.step - len(pending))
        self.progress.next_batch = batch
        self.progress.epoch_time_s += time.perf_counter() - started
        self.save()
        raise Interrupted(signal_name)

    def _score(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        cfg = self.cfg.trainer
        return evaluate(model, images, labels, self.transform, cfg.eval_batch_size, self.splits.num_classes, self.autocast)

    def _end_epoch(self) -> None:
        progress = self.progress
        eval_model = self.model
        if self.weight_averaging is not None:
            eval_model = self.weight_averaging.end_epoch(progress.epoch + 1)
        val_accuracy, val_f1 = self._score(eval_model, self.splits.val_images, self.splits.val_labels)

        progress.epoch += 1
        progress.train_time_s += progress.epoch_time_s
        self._record_epoch(val_accuracy, val_f1)

        # Ties keep the earlier epoch, and an empty validation split (NaN F1) never wins.
        if self.cfg.trainer.select == "best_val" and val_f1 > progress.best_val_f1:
            progress.best_val_f1 = val_f1
            progress.best_epoch = progress.epoch
            progress.best_state = {key: value.detach().cpu().clone() for key, value in eval_model.state_dict().items()}

        if self.weight_averaging is not None:
            self.weight_averaging.step_schedule(self.scheduler, next_epoch=progress.epoch + 1)
        else:
            self.scheduler.step()
        progress.permutation = None

    def _record_epoch(self, val_accuracy: float, val_f1: float) -> None:
        progress = self.progress
        row = {
            "epoch": progress.epoch,
            "train_loss": progress.epoch_loss_sum / self.steps_per_epoch,
            "val_accuracy": val_accuracy,
            "val_f1": val_f1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "sigma": self._current_sigma(),
            "epoch_time_s": progress.epoch_time_s,
        }
        progress.history.append(row)
        log.info(
            "epoch %d/%d  train_loss %.4f  val_acc %.4f  val_f1 %.4f  lr %.4g  %.1f s",
            progress.epoch,
            self.cfg.trainer.epochs,
            row["train_loss"],
            val_accuracy,
            val_f1,
            row["lr"],
            progress.epoch_time_s,
        )

    def _current_sigma(self) -> Optional[float]:
        sigma_at = getattr(self.estimator, "sigma_at", None)
        return sigma_at(self.progress.step) if sigma_at else None

    def final_metrics(self) -> Dict[str, Any]:
        """Evaluate the selected model on the validation and test splits."""
        progress = self.progress
        model = self.model
        if self.cfg.trainer.select == "best_val" and progress.best_state is not None:
            # With weight averaging, best_state is the state of the model that was evaluated.
            self.model.load_state_dict(progress.best_state)
            best_epoch = progress.best_epoch
        else:
            best_epoch = progress.epoch
            if self.weight_averaging is not None:
                model = self.weight_averaging.model_for_evaluation()
        val_accuracy, val_f1 = self._score(model, self.splits.val_images, self.splits.val_labels)
        test_accuracy, test_f1 = self._score(model, self.splits.test_images, self.splits.test_labels)
        return {
            "test_accuracy": test_accuracy,
            "test_f1": test_f1,
            "val_accuracy": val_accuracy,
            "val_f1": val_f1,
            "best_epoch": best_epoch,
        }


def prepare_trainer(cfg: Any, run_dir: Path, job_number: Optional[int] = None) -> Trainer:
    """Seed, load the data and build everything a run needs, resuming from a checkpoint if one exists."""
    device = resolve_device(cfg.device, job_number)
    seed_everything(cfg.seed)
    splits = load_splits(cfg.dataset, cfg.data, cfg.seed, device)
    log.info(
        "data %s: %d train, %d validation, %d test samples of shape %s",
        cfg.dataset.name,
        len(splits.train_labels),
        len(splits.val_labels),
        len(splits.test_labels),
        tuple(splits.input_shape),
    )
    trainer = Trainer(cfg, run_dir, device, splits)
    if (Path(run_dir) / checkpoint.CHECKPOINT_FILE).exists():
        trainer.load_state_dict(checkpoint.load_checkpoint(run_dir, cfg))
        log.info(
            "resuming from %s at epoch %d, step %d",
            Path(run_dir) / checkpoint.CHECKPOINT_FILE,
            trainer.progress.epoch,
            trainer.progress.step,
        )
    return trainer
