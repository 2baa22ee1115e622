"""Comparator methods for PG: Sharpness-Aware Minimization and Stochastic Weight Averaging.

``SharpnessAwareGradient`` is a gradient estimator with the interface of
``PlainGradient``, so the configured optimizer, weight decay, gradient clipping
and learning-rate schedule act on the SAM gradient as on any other gradient.

``WeightAveraging`` runs Stochastic Weight Averaging (SWA) around any estimator:
the trainer calls it at each epoch end, and it keeps the averaged model, the
SWALR schedule and the averaged model's BatchNorm statistics. Weight noise needs
no code here: it is the PG estimator with one member.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from popgrad_cli.config import WEIGHT_AVERAGING_METHODS, resolve_swa_start
from popgrad_cli.population import LossFn, cross_entropy


class SharpnessAwareGradient:
    """The SAM gradient (Foret et al., arXiv:2010.01412), or ASAM's with ``method.adaptive``.

    For weights w and the mini-batch gradient g = grad L(w), the step's gradient is
    grad L(w + e) with e = rho * g / ||g|| (SAM), or, with T = |w| elementwise,
    e = rho * T^2 g / ||T g|| (ASAM, Kwon et al., arXiv:2102.11600). The norm runs
    over all parameters together. ``backward`` adds grad L(w + e) to ``.grad`` and
    leaves the weights at w and the BatchNorm running statistics as one forward
    pass at w left them.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Any,
        autocast: Callable[[], Any] = nullcontext,
        loss_fn: LossFn = cross_entropy,
    ) -> None:
        self.model = model
        self.rho = float(method.rho)
        self.adaptive = bool(method.adaptive)
        self.autocast = autocast
        self.loss_fn = loss_fn

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        with self.autocast():
            logits = self.model(inputs)
        return self.loss_fn(logits, targets)

    def backward(self, inputs: Tensor, targets: Tensor, step: int) -> Tensor:
        """Add the SAM gradient to ``.grad`` and return the loss at the unperturbed weights."""
        params = [param for param in self.model.parameters() if param.requires_grad]
        loss = self._loss(inputs, targets)
        # autograd.grad leaves .grad alone, so it receives only the second pass's gradient.
        grads = torch.autograd.grad(loss, params, allow_unused=True)

        # The running statistics after the first pass are the ones the step keeps:
        # restoring them after the second pass updates them once per step. Setting
        # the BatchNorm momentum to 0 instead would still count num_batches_tracked
        # twice and would not cover momentum=None (a cumulative average).
        buffers = list(self.model.buffers())
        saved_buffers = [buffer.detach().clone() for buffer in buffers]
        saved_params = [param.detach().clone() for param in params]
        with torch.no_grad():
            for param, offset in zip(params, self.ascent_offsets(params, grads)):
                if offset is not None:
                    param.add_(offset)

        self._loss(inputs, targets).backward()

        with torch.no_grad():
            # Copying the saved weights back is exact, where subtracting e would round.
            for param, saved in zip(params, saved_params):
                param.copy_(saved)
            for buffer, saved in zip(buffers, saved_buffers):
                buffer.copy_(saved)
        return loss.detach()

    @torch.no_grad()
    def ascent_offsets(self, params: List[Tensor], grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """Return e for each parameter, or None for a parameter that got no gradient."""
        if self.adaptive:
            scaled = [None if grad is None else param.abs() * grad for param, grad in zip(params, grads)]
        else:
            scaled = list(grads)
        present = [tensor for tensor in scaled if tensor is not None]
        if not present:
            return [None] * len(params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(tensor.float()) for tensor in present]))
        # A zero gradient gives e = 0 rather than 0 / 0.
        factor = self.rho / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        offsets: List[Optional[Tensor]] = []
        for param, tensor in zip(params, scaled):
            if tensor is None:
                offsets.append(None)
            elif self.adaptive:
                offsets.append((param.abs() * tensor * factor).to(param.dtype))
            else:
                offsets.append((tensor * factor).to(param.dtype))
        return offsets

    def gradient_evaluations(self, batch_size: int) -> int:
        return 2 * batch_size

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class NormalisedBatches:
    """The training images in order, as normalised, unaugmented batches on their device.

    ``torch.optim.swa_utils.update_bn`` takes any iterable of input batches, and the
    training split is stored as uint8, so this yields ``transform(batch, train=False)``.
    """

    def __init__(self, images: Tensor, transform: Any, batch_size: int, channels_last: bool = False) -> None:
        self.images = images
        self.transform = transform
        self.batch_size = batch_size
        self.channels_last = channels_last

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, len(self.images), self.batch_size):
            batch = self.transform(self.images[start : start + self.batch_size], train=False)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            yield batch


class WeightAveraging:
    """Stochastic Weight Averaging (Izmailov et al., arXiv:1803.05407) around any gradient estimator.

    Epochs ``start_epoch`` to the last form the averaging phase. At the end of each
    of them the averaged model takes in the current weights. With ``method.swa_lr``
    set, SWALR sets the learning rate of every epoch of the phase, in place of the
    configured schedule. With ``swa_lr`` null, the configured schedule keeps running.
    Once averaging has started, evaluation uses the averaged model, whose BatchNorm
    statistics are first recomputed with ``update_bn`` over ``batches``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        method: Any,
        epochs: int,
        batches: NormalisedBatches,
        autocast: Callable[[], Any] = nullcontext,
    ) -> None:
        self.model = model
        self.start_epoch = resolve_swa_start(method.swa_start, epochs)
        self.batches = batches
        self.autocast = autocast
        # update_parameters copies the buffers from the live model, and update_bn then
        # replaces the BatchNorm statistics with ones that match the averaged weights.
        self.averaged = AveragedModel(model)
        self.swalr: Optional[SWALR] = None
        if method.swa_lr is not None:
            # SWALR (PyTorch 2.14) leaves the learning rate unchanged when built with anneal_epochs >= 1.
            self.swalr = SWALR(
                optimizer,
                swa_lr=float(method.swa_lr),
                anneal_epochs=int(method.swa_anneal_epochs),
                anneal_strategy=method.swa_anneal_strategy,
            )
            if self.start_epoch == 1:
                # The first epoch is already in the averaging phase, so it gets SWALR's rate.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                    self.swalr.step()
        # The n_averaged value at the last BatchNorm refresh, or -1 before the first.
        self.refreshed_at = -1

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    def end_epoch(self, epoch: int) -> nn.Module:
        """Average in the weights if ``epoch`` (1-based, just finished) is in the phase, and return the model to evaluate."""
        if epoch >= self.start_epoch:
            self.averaged.update_parameters(self.model)
        return self.model_for_evaluation()

    def model_for_evaluation(self) -> nn.Module:
        """Return the live model before averaging starts, else the averaged model with fresh BatchNorm statistics."""
        if self.n_averaged == 0:
            return self.model
        if self.refreshed_at != self.n_averaged:
            # One forward pass over the training split. torch's update_bn runs it in
            # train mode, so dropout is active and draws from the global RNG.
            with self.autocast():
                update_bn(self.batches, self.averaged.module)
            self.refreshed_at = self.n_averaged
        return self.averaged.module

    def step_schedule(self, scheduler: Any, next_epoch: int) -> None:
        """Step SWALR if ``next_epoch`` is in the averaging phase and swa_lr is set, else the configured schedule."""
        if self.swalr is not None and next_epoch >= self.start_epoch:
            self.swalr.step()
        else:
            scheduler.step()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "averaged_model": self.averaged.state_dict(),
            "swalr": None if self.swalr is None else self.swalr.state_dict(),
            "refreshed_at": self.refreshed_at,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged_model"])
        if self.swalr is not None:
            self.swalr.load_state_dict(state["swalr"])
        self.refreshed_at = int(state["refreshed_at"])


def build_weight_averaging(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Any,
    epochs: int,
    batches: NormalisedBatches,
    autocast: Callable[[], Any] = nullcontext,
) -> Optional[WeightAveraging]:
    """Return the weight averaging for ``method.name``, or None for a method without it."""
    if method.name not in WEIGHT_AVERAGING_METHODS:
        return None
    return WeightAveraging(model, optimizer, method, epochs, batches, autocast)
