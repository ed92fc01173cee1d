"""What a client computes, in pure torch (no Flower): a FedSGD batch gradient, FedAvg local
training, the global test evaluation. Tests and attacks' references share these functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from simulator.core.models import ModelSpec, task_loss
from simulator.data.shards import Shard


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
) -> float:
    """Plain SGD for ``epochs`` over shuffled mini-batches (last partial batch kept) (FedAvg).

    ``weight_decay`` adds ``weight_decay / 2 ||theta||^2`` to the loss (Buzaglo et al.'s route
    to a KKT point). Returns the mean training loss of the last epoch.
    """
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


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy named tensors into ``model`` (strict: every parameter must be present)."""
    model.load_state_dict(dict(weights), strict=True)
    return model
