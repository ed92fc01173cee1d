"""Victim training for dataset-reconstruction studies: models trained to a KKT-like point.

Haim et al. (2022) reconstruct training data from a homogeneous ReLU MLP trained by full-batch
gradient descent on the logistic loss from a small initialisation, which converges (slowly) to a
KKT point of margin maximisation. Buzaglo et al. (2023) add weight decay: every stationary point
of ``mean logistic loss + wd / 2 ||theta||^2`` satisfies
``theta = (1 / (n wd)) sum_i -l'(y_i f(x_i)) y_i grad f(x_i)`` exactly, and gradient descent
reaches it in far fewer steps, with *every* training point carrying a positive coefficient.

Data convention: images are [0, 1]; the victim's spec has ``centre_inputs``, so the network
itself maps them to ``2 x - 1`` (the paper's inputs are centred too, and its reconstruction
depends on it). The attack reads that from the spec and maps candidates back to [0, 1], so SSIM
is always computed on [0, 1] images.

Studies:

* toy: 10 all-red and 10 all-blue 3x16x16 images (16x16 is the smallest power of two on which
  the 11x11 SSIM window fits), labels red = 1, blue = 0.
* MNIST odd/even: ``per_class`` odd and ``per_class`` even digits chosen by seed, label = digit
  (binary models learn parity through :func:`simulator.models.task_targets`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.func import functional_call

from attacks.observation import Observation, PublicMeta
from simulator.data import RED_BLUE_SIZE, load_split, red_blue, to_tensor
from simulator.models import ModelSpec, build_model, is_binary
from simulator.partition import training_pool


def toy_red_blue(
    per_class: int = 10, size: int = RED_BLUE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` all-red then ``per_class`` all-blue (3, size, size) images; red = 1."""
    images, labels = red_blue(per_class, size)
    return to_tensor(images), torch.as_tensor(labels)


def mnist_odd_even(
    per_class: int = 250, seed: int = 0, data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` odd and ``per_class`` even MNIST training digits, chosen by ``seed``.

    Returns images (2 per_class, 1, 28, 28) in [0, 1] and their digit labels, odd ones first:
    the pool a scenario with ``train_examples = 2 per_class``, ``train_balance = "parity"``
    trains on.
    """
    raw, labels = load_split("mnist", "train", data_dir)
    chosen = training_pool(labels, 2 * per_class, "parity", seed)
    return to_tensor(raw[chosen]), torch.as_tensor(labels[chosen], dtype=torch.int64)


def homogeneous_spec(
    input_shape: tuple[int, int, int],
    widths: tuple[int, ...] = (1000, 1000),
    init_scale: float = 1e-2,
    num_classes: int = 1,
) -> ModelSpec:
    """Spec of the paper's victim: ReLU MLP, bias on the first layer only, small init, inputs
    centred by the network."""
    return ModelSpec(
        kind="homogeneous-mlp",
        widths=widths,
        input_shape=input_shape,
        num_classes=num_classes,
        init_scale=init_scale,
        centre_inputs=True,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Full-batch gradient descent on the logistic loss (cross-entropy when multiclass)."""

    steps: int = 2000
    lr: float = 0.5
    weight_decay: float = 0.0
    log_every: int = 100
    # Fraction of the steps, at the end, over which the step size decays to 0 (cosine). With
    # ReLU, many pre-activations settle on the kink and constant-step GD chatters around the
    # stationary point; annealing lets it settle, which the KKT attack needs.
    anneal: float = 0.5


@dataclass
class TrainedVictim:
    """Trained weights, the model spec and the training history."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def observation(self, num_examples: int, config: TrainConfig) -> Observation:
        """The weights as a FedAvg observation (``update`` = returned weights, full batch)."""
        return Observation(
            round=0,
            client_id=0,
            model=self.spec,
            global_weights={k: v.clone() for k, v in self.initial.items()},
            update={k: v.clone() for k, v in self.weights.items()},
            meta=PublicMeta(
                protocol="fedavg",
                batch_size=num_examples,
                lr=config.lr,
                local_epochs=config.steps,
                num_examples=num_examples,
            ),
        )


def _loss(spec: ModelSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if is_binary(spec):
        signs = (labels % 2).to(logits.dtype) * 2 - 1
        return torch.nn.functional.softplus(-signs * logits.squeeze(-1)).mean()
    return torch.nn.functional.cross_entropy(logits, labels)


def _margins(spec: ModelSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if is_binary(spec):
        return ((labels % 2).to(logits.dtype) * 2 - 1) * logits.squeeze(-1)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], -math.inf).amax(1)
    return own - other


def train_victim(
    spec: ModelSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    seed: int = 0,
    initial: dict[str, torch.Tensor] | None = None,
) -> TrainedVictim:
    """Train ``spec`` on [0, 1] ``images`` by full-batch GD; starts from ``initial`` if given.

    The history records loss, minimum margin and train accuracy every ``log_every`` steps.
    """
    start = time.perf_counter()
    model = build_model(spec, seed=seed)
    if initial is None:
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in initial.items()}
    optimizer = torch.optim.SGD(list(weights.values()), lr=config.lr)
    decay_from = config.steps * (1 - config.anneal)

    def factor(step: int) -> float:
        if step < decay_from or config.steps <= decay_from:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - decay_from) / (config.steps - decay_from)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    history: list[dict[str, float]] = []
    for step in range(config.steps + 1):
        logits = functional_call(model, weights, (images,))
        loss = _loss(spec, logits, labels)
        if step % config.log_every == 0 or step == config.steps:
            margins = _margins(spec, logits.detach(), labels)
            history.append(
                {
                    "step": float(step),
                    "loss": float(loss.detach()),
                    "min_margin": float(margins.min()),
                    "accuracy": float((margins > 0).double().mean()),
                    "seconds": time.perf_counter() - start,
                }
            )
        if step == config.steps:
            break
        if config.weight_decay:
            loss = loss + config.weight_decay / 2 * sum((w**2).sum() for w in weights.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return TrainedVictim(
        spec=spec,
        weights={k: v.detach().clone() for k, v in weights.items()},
        initial=initial,
        history=history,
        seconds=time.perf_counter() - start,
    )


def fedavg_client_update(
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: ModelSpec,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    client_id: int = 0,
) -> Observation:
    """One FedAvg client's round, run by the clients' own code (:func:`simulator.task.local_train`).

    The server sends ``build_model(spec, seed)``; the client trains ``epochs`` epochs of
    shuffled mini-batch SGD with weight decay on its images and sends its weights back: the
    Observation the server receives (round 1).
    """
    from simulator.task import Shard, local_train, seeded_generator

    model = build_model(spec, seed=seed)
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = seeded_generator(seed, 1, client_id)
    shard = Shard(images, labels)
    local_train(model, spec, shard, epochs, batch_size, lr, generator, weight_decay)
    return Observation(
        round=1,
        client_id=client_id,
        model=spec,
        global_weights=sent,
        update={k: v.detach().clone() for k, v in model.state_dict().items()},
        meta=PublicMeta("fedavg", batch_size, lr, epochs, num_examples=int(images.shape[0])),
    )
