"""Gradient estimators: the plain empirical gradient and Population Gradients (PG).

A PG step, for central weights theta and a mini-batch B:

1. draw P offsets delta_k = sigma * s(theta) * eps_k with eps_k ~ N(0, I);
2. member k computes its loss L(theta + delta_k; B_k), where B_k is all of B
   (``batch=shared``) or the k-th of P equal parts of B (``batch=split``);
3. the population gradient g = (1/P) sum_k grad L(theta + delta_k; B_k) is written
   into the central model's ``.grad``, so any torch optimizer steps theta with it.

The offsets are constants in the backward pass: g is the mean of the gradients
taken at the perturbed points, not differentiated through s(theta). In expectation
g is the gradient of the Gaussian-smoothed loss E[L(theta + sigma * s * eps)].

Both engines share the noise and the batch split, and differ only in how the
members are evaluated: ``loop`` runs them one after another (the reference), and
``vmap`` runs a chunk of members in one batched call of ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.float(), targets)


class PlainGradient:
    """The empirical mini-batch gradient: one forward and backward pass of the model."""

    def __init__(self, model: nn.Module, autocast: Callable[[], Any] = nullcontext) -> None:
        self.model = model
        self.autocast = autocast

    def backward(self, inputs: Tensor, targets: Tensor, step: int) -> Tensor:
        with self.autocast():
            logits = self.model(inputs)
        loss = cross_entropy(logits, targets)
        loss.backward()
        return loss.detach()

    def gradient_evaluations(self, batch_size: int) -> int:
        return batch_size

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class PopulationGradient:
    """Population Gradients for any ``nn.Module``, configured by the ``method`` group.

    ``total_steps`` sets the length of the sigma schedule, and ``loss_fn`` maps a
    member's outputs and targets to its scalar loss. Random numbers come from
    torch's global generator, so a run seeded once draws the same population and a
    checkpoint of the global RNG state resumes it exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Any,
        total_steps: int,
        autocast: Callable[[], Any] = nullcontext,
        loss_fn: LossFn = cross_entropy,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.population_size = int(method.population_size)
        self.sigma = float(method.sigma)
        self.sigma_final = float(method.sigma_final)
        self.sigma_schedule = method.sigma_schedule
        self.noise_scale = method.noise_scale
        self.antithetic = bool(method.antithetic)
        self.include_center = bool(method.include_center)
        self.resample = method.resample
        self.batch = method.batch
        self.engine = method.engine
        self.chunk_size = int(method.chunk_size or self.population_size)
        self.total_steps = max(int(total_steps), 1)
        self.autocast = autocast
        self.fixed_noise: Optional[Dict[str, Tensor]] = None

    # Noise

    def sigma_at(self, step: int) -> float:
        """Return sigma after ``step`` optimisation steps under the sigma schedule."""
        if self.sigma_schedule == "constant":
            return self.sigma
        progress = min(step / self.total_steps, 1.0)
        if self.sigma_schedule == "linear":
            remaining = 1.0 - progress
        else:
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.sigma_final + (self.sigma - self.sigma_final) * remaining

    def _draw_standard_noise(self) -> Dict[str, Tensor]:
        """Draw eps_k for every member, with antithetic pairs and a zero centre if configured."""
        members = self.population_size - int(self.include_center)
        independent = members // 2 if self.antithetic else members
        noise = {}
        for name, param in self.model.named_parameters():
            eps = torch.randn((independent, *param.shape), device=param.device, dtype=param.dtype)
            if self.antithetic:
                eps = torch.cat([eps, -eps])
            if self.include_center:
                eps = torch.cat([torch.zeros_like(param).unsqueeze(0), eps])
            noise[name] = eps
        return noise

    def _scale(self, param: Tensor) -> Tensor:
        """Return s(theta) for one parameter tensor, broadcastable against it."""
        param = param.detach()
        if self.noise_scale == "absolute":
            return torch.ones((), device=param.device, dtype=param.dtype)
        if self.noise_scale == "filter" and param.dim() >= 2:
            # One scale per output filter or row: the norm over all other dims.
            norms = param.flatten(1).norm(dim=1)
            return norms.view(-1, *([1] * (param.dim() - 1)))
        # "layer", and "filter" for 1-D tensors (biases, norm parameters), which
        # have no filters: the RMS of the whole tensor. A tensor whose RMS is 0
        # (for example a zero-initialised bias) gets no noise from this rule.
        return param.pow(2).mean().sqrt()

    def offsets(self, step: int) -> Dict[str, Tensor]:
        """Return the offsets delta_k for this step, stacked along a new first dim of size P."""
        if self.resample == "fixed":
            if self.fixed_noise is None:
                self.fixed_noise = self._draw_standard_noise()
            noise = self.fixed_noise
        else:
            noise = self._draw_standard_noise()
        sigma = self.sigma_at(step)
        return {
            name: sigma * self._scale(param) * noise[name]
            for name, param in self.model.named_parameters()
        }

    # Batches

    def member_batches(self, inputs: Tensor, targets: Tensor):
        """Return the inputs and targets of each member, stacked along dim 0 for split batches."""
        if self.batch == "shared":
            return inputs, targets
        part = inputs.shape[0] // self.population_size
        if part == 0:
            raise ValueError(
                f"a batch of {inputs.shape[0]} samples cannot be split among "
                f"{self.population_size} members; use trainer.batch_size >= method.population_size"
            )
        # NOTE: the remainder of a batch that P does not divide is left out of the step.
        used = part * self.population_size
        shape = (self.population_size, part)
        return inputs[:used].reshape(*shape, *inputs.shape[1:]), targets[:used].reshape(shape)

    def gradient_evaluations(self, batch_size: int) -> int:
        if self.batch == "shared":
            return batch_size * self.population_size
        return (batch_size // self.population_size) * self.population_size

    # The step

    def backward(self, inputs: Tensor, targets: Tensor, step: int) -> Tensor:
        """Accumulate the population gradient into ``.grad`` and return the mean member loss."""
        offsets = self.offsets(step)
        member_inputs, member_targets = self.member_batches(inputs, targets)
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        # Every member normalises with its own batch statistics and updates its own
        # copy of the running statistics. Averaging the copies afterwards gives
        # (1 - m) * running + m * mean(batch statistics): one update per step, not P.
        member_buffers = {
            name: buf.unsqueeze(0).expand(self.population_size, *buf.shape).clone()
            for name, buf in buffers.items()
        }

        run_chunk = self._run_chunk_vmap if self.engine == "vmap" else self._run_chunk_loop
        total_loss = torch.zeros((), device=inputs.device)
        for start in range(0, self.population_size, self.chunk_size):
            members = slice(start, min(start + self.chunk_size, self.population_size))
            # Chunks bound peak memory: each chunk's graph is freed by its backward.
            losses = run_chunk(params, offsets, member_buffers, member_inputs, member_targets, members)
            (losses.sum() / self.population_size).backward()
            total_loss += losses.detach().sum()

        self._average_buffers_into(buffers, member_buffers)
        return total_loss / self.population_size

    def _member_data(self, member_inputs: Tensor, member_targets: Tensor, members: slice):
        if self.batch == "shared":
            return member_inputs, member_targets, None
        return member_inputs[members], member_targets[members], 0

    def _run_chunk_vmap(self, params, offsets, member_buffers, member_inputs, member_targets, members):
        count = members.stop - members.start
        stacked = {
            name: param.unsqueeze(0).expand(count, *param.shape) + offsets[name][members]
            for name, param in params.items()
        }
        chunk_buffers = {name: buf[members] for name, buf in member_buffers.items()}
        inputs, targets, data_dim = self._member_data(member_inputs, member_targets, members)

        def member_loss(member_params, member_buffer, x, y):
            with self.autocast():
                logits = functional_call(self.model, (member_params, member_buffer), (x,))
            return self.loss_fn(logits, y)

        losses = vmap(member_loss, in_dims=(0, 0, data_dim, data_dim), randomness="different")(
            stacked, chunk_buffers, inputs, targets
        )
        # The chunk's buffers are views of member_buffers, so the running
        # statistics that BatchNorm updated in place under vmap are already there.
        return losses

    def _run_chunk_loop(self, params, offsets, member_buffers, member_inputs, member_targets, members):
        losses: List[Tensor] = []
        for k in range(members.start, members.stop):
            member_params = {name: param + offsets[name][k] for name, param in params.items()}
            member_buffer = {name: buf[k] for name, buf in member_buffers.items()}
            if self.batch == "shared":
                x, y = member_inputs, member_targets
            else:
                x, y = member_inputs[k], member_targets[k]
            with self.autocast():
                logits = functional_call(self.model, (member_params, member_buffer), (x,))
            losses.append(self.loss_fn(logits, y))
        return torch.stack(losses)

    @staticmethod
    @torch.no_grad()
    def _average_buffers_into(buffers: Dict[str, Tensor], member_buffers: Dict[str, Tensor]) -> None:
        for name, buf in buffers.items():
            stacked = member_buffers[name]
            if buf.is_floating_point():
                buf.copy_(stacked.mean(dim=0))
            else:
                # num_batches_tracked: every member counted the same one step.
                buf.copy_(stacked[0])

    def state_dict(self) -> Dict[str, Any]:
        return {"fixed_noise": self.fixed_noise}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.fixed_noise = state.get("fixed_noise")


def build_estimator(model: nn.Module, method: Any, total_steps: int, autocast=nullcontext):
    """Return the gradient estimator that ``method.name`` selects.

    swa and pg_swa differ from baseline and pg only by the weight averaging that the
    trainer adds, and weight_noise is PG with one member (validate_config enforces it).
    """
    if method.name in ("baseline", "swa"):
        return PlainGradient(model, autocast)
    if method.name in ("pg", "weight_noise", "pg_swa"):
        return PopulationGradient(model, method, total_steps, autocast)
    if method.name == "sam":
        # Imported here because popgrad_cli.methods imports this module.
        from popgrad_cli.methods import SharpnessAwareGradient

        return SharpnessAwareGradient(model, method, autocast)
    raise ValueError(f"invalid method.name: {method.name!r}; expected baseline, pg, sam, swa, weight_noise or pg_swa")
