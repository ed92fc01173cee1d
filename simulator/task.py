"""What a client computes: its shard, a FedSGD batch gradient, FedAvg local training, and
the global test evaluation. Pure torch, no Flower, so tests and attacks' references share it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simulator.data import load_split, to_tensor
from simulator.models import ModelSpec, task_loss
from simulator.partition import partition, training_pool
from simulator.scenario import DataConfig


@dataclass(frozen=True)
class Shard:
    """One client's training data: images in [0, 1], shape (n, C, H, W), and labels."""

    inputs: torch.Tensor
    labels: torch.Tensor


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator whose state depends only on ``keys`` (seed, round, client...)."""
    state = np.random.SeedSequence([abs(k) for k in keys]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@functools.lru_cache(maxsize=4)
def _shard_indices(data: DataConfig, num_clients: int, seed: int) -> tuple[np.ndarray, ...]:
    _, all_labels = load_split(data.dataset, "train", data.dir or None)
    pool = training_pool(all_labels, data.train_examples, data.train_balance, seed)
    labels = all_labels[pool]
    shards = partition(
        labels,
        num_clients,
        data.partition,
        seed=seed,
        classes_per_client=data.classes_per_client,
        alpha=data.alpha,
    )
    if data.examples_per_client:
        shards = [s[: data.examples_per_client] for s in shards]
    return tuple(pool[s] for s in shards)


def load_shard(data: DataConfig, num_clients: int, seed: int, client_id: int) -> Shard:
    """Client ``client_id``'s shard, deterministic for (data config, number of clients, seed)."""
    images, labels = load_split(data.dataset, "train", data.dir or None)
    indices = _shard_indices(data, num_clients, seed)[client_id]
    return Shard(to_tensor(images[indices]), torch.as_tensor(labels[indices], dtype=torch.int64))


def shard_size(data: DataConfig, num_clients: int, seed: int, client_id: int) -> int:
    """How many training examples client ``client_id`` holds."""
    return len(_shard_indices(data, num_clients, seed)[client_id])


def load_test_set(data: DataConfig) -> Shard:
    """The global test split (capped at ``data.test_examples`` when that is set)."""
    images, labels = load_split(data.dataset, "test", data.dir or None)
    if data.test_examples:
        images, labels = images[: data.test_examples], labels[: data.test_examples]
    return Shard(to_tensor(images), torch.as_tensor(labels, dtype=torch.int64))


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
