"""What a client computes, in pure torch (no Flower): a FedSGD batch gradient, FedAvg local
training, the global test evaluation. Tests and attacks' references share these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simulator.core.config import LrSchedule
from simulator.core.models import ModelSpec, log_task_loss, task_loss
from simulator.data.shards import Shard

# The loss-scaled schedule's alpha after a step that lowered the loss (times GROW, up to its
# bound) and after one that did not (the step is undone, alpha times SHRINK): adapted as Lyu
# and Li adapt theirs (these two factors are ours), keeping the step near the largest that
# still descends.
LOSS_SCALED_GROW = 1.1
LOSS_SCALED_SHRINK = 0.5


def batch_gradient(
    model: nn.Module, spec: ModelSpec, inputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradient of the mean training loss over one batch, per parameter name (FedSGD)."""
    model.zero_grad(set_to_none=True)
    task_loss(spec, model(inputs), labels).backward()
    return {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.grad is not None
    }


def local_train(
    model: nn.Module,
    spec: ModelSpec,
    shard: Shard,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    weight_decay: float = 0.0,
    lr_schedule: LrSchedule = "constant",
) -> float:
    """Plain SGD for ``epochs`` over shuffled mini-batches (last partial batch kept) (FedAvg).

    ``weight_decay`` adds ``weight_decay / 2 ||theta||^2`` to the loss (Buzaglo et al.'s route
    to a KKT point). Returns the mean training loss of the last epoch. ``lr_schedule =
    "loss-scaled"`` trains by :func:`loss_scaled_train` instead, with ``lr`` as its alpha and
    bound; it takes full-batch steps, so ``batch_size`` must cover the shard.
    """
    if lr_schedule == "loss-scaled":
        if batch_size < len(shard.labels):
            raise ValueError(
                f"lr_schedule 'loss-scaled' takes full-batch steps: batch_size {batch_size} is "
                f"below the client's {len(shard.labels)} examples"
            )
        schedule = LossScaled(alpha=lr, alpha_max=lr)
        return loss_scaled_train(model, spec, shard.inputs, shard.labels, epochs, schedule)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    last_epoch_losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(shard.labels), generator=generator)
        last_epoch_losses = []
        for batch in order.split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = task_loss(spec, model(shard.inputs[batch]), shard.labels[batch])
            loss.backward()
            optimizer.step()
            last_epoch_losses.append(loss.item())
    return float(np.mean(last_epoch_losses))


@dataclass
class LossScaled:
    """State of the loss-scaled schedule, carried from one :func:`loss_scaled_train` call to
    the next: alpha_t, its bound, and how many steps were undone."""

    alpha: float
    alpha_max: float
    undone: int = 0


def loss_scaled_train(
    model: nn.Module,
    spec: ModelSpec,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    schedule: LossScaled,
) -> float:
    """``epochs`` full-batch gradient steps of size ``eta_t = alpha_t / L(theta_t)`` (Lyu and
    Li, ICLR 2020: loss-based learning-rate scheduling). Returns the final training loss.

    Why: on separable data gradient descent drives the loss to 0 and converges in direction to
    a KKT point of margin maximisation, but with a constant step only logarithmically fast,
    because the gradient shrinks with the loss. Dividing by the loss keeps the step's length.
    ``eta_t grad L = alpha_t grad log L``: the step is taken on ``log L``
    (:func:`~simulator.core.models.log_task_loss`, float64), which stays finite after the loss
    itself underflows float32. ``alpha_t`` adapts (``LOSS_SCALED_GROW`` / ``_SHRINK``, never
    above ``schedule.alpha_max``): a step that does not lower the loss is undone. Every epoch
    is one step tried, one pass over the data.
    """
    params = list(model.parameters())

    def log_loss_and_gradient() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        log_loss = log_task_loss(spec, model(inputs), labels)
        log_loss.backward()
        gradient = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        return float(log_loss.detach()), gradient

    current, gradient = log_loss_and_gradient()
    for _ in range(epochs):
        before = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, gradient, strict=True):
                p.sub_(schedule.alpha * g)
        trial, trial_gradient = log_loss_and_gradient()
        if trial < current:  # NaN never is: a step that overflows is undone too
            current, gradient = trial, trial_gradient
            schedule.alpha = min(schedule.alpha * LOSS_SCALED_GROW, schedule.alpha_max)
        else:
            with torch.no_grad():
                for p, b in zip(params, before, strict=True):
                    p.copy_(b)
            schedule.alpha *= LOSS_SCALED_SHRINK
            schedule.undone += 1
    model.zero_grad(set_to_none=True)
    return math.exp(current)


@torch.no_grad()
def evaluate(
    model: nn.Module, spec: ModelSpec, test: Shard, chunk: int = 2500
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``test``; binary models are scored on parity."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for inputs, labels in zip(test.inputs.split(chunk), test.labels.split(chunk), strict=True):
        logits = model(inputs)
        loss_sum += float(task_loss(spec, logits, labels)) * len(labels)
        if logits.shape[-1] == 1:
            correct += int(((logits.squeeze(-1) > 0).long() == labels % 2).sum())
        else:
            correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    return loss_sum / len(test.labels), correct / len(test.labels)
