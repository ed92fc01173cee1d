"""Shared pieces of the active-attack tests: digits, plans, and client updates computed the way
a client computes them (the federation's own ``batch_gradient`` / ``local_train``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from attacks.active.base import ActiveAttack, Plan
from simulator.core.config import FederationConfig
from simulator.core.models import ModelSpec, SentModel, build_model, model_spec, model_with_weights
from simulator.core.protocol import Observation, PublicData, PublicMeta
from simulator.data.datasets import load_split, to_tensor
from simulator.data.shards import Shard
from simulator.federation.training import batch_gradient, local_train
from simulator.scoring.metrics import match, psnr

SPEC = model_spec("mlp", widths=(64,))
Weights = dict[str, torch.Tensor]


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train, labels = load_split("mnist", "train")
    test, test_labels = load_split("mnist", "test")
    return (
        to_tensor(train[:4000]),
        torch.tensor(labels[:4000], dtype=torch.int64),
        to_tensor(test[:4000]),
        torch.tensor(test_labels[:4000], dtype=torch.int64),
    )


PRIVATE, LABELS, PUBLIC, PUBLIC_LABELS = _digits()
PUBLIC_DATA = PublicData(PUBLIC, PUBLIC_LABELS)
ActiveT = TypeVar("ActiveT", bound=ActiveAttack)


def armed(attack: ActiveT) -> ActiveT:
    """``attack`` holding the server's public data, as the malicious server hands it."""
    attack.public = PUBLIC_DATA
    return attack


def plan(
    clients: Sequence[int] = (0,),
    samples: int = 16,
    spec: ModelSpec = SPEC,
    protocol: str = "fedsgd",
    secure_aggregation: bool = False,
) -> Plan:
    weights = build_model(spec, seed=0).state_dict()
    federation = FederationConfig(protocol=protocol, batch_size=samples)  # type: ignore[arg-type]
    expected = dict.fromkeys(clients, samples)
    return Plan(
        1, tuple(clients), tuple(clients), spec, weights, federation, expected, secure_aggregation
    )


def fedsgd(
    offer: SentModel, images: torch.Tensor, labels: torch.Tensor, client: int = 0
) -> Observation:
    """The FedSGD observation of a client that trained the model it was sent."""
    model = model_with_weights(offer.spec, offer.weights)
    update = batch_gradient(model, offer.spec, images, labels)
    count = int(images.shape[0])
    return Observation(
        1, client, offer.spec, offer.weights, update, PublicMeta("fedsgd", count, 0.1, 1, count)
    )


def fedavg(
    offer: SentModel, images: torch.Tensor, labels: torch.Tensor, batch: int, epochs: int = 1
) -> Observation:
    model = model_with_weights(offer.spec, offer.weights)
    generator = torch.Generator().manual_seed(0)
    local_train(model, offer.spec, Shard(images, labels), epochs, batch, 0.1, generator)
    update = {k: v.detach().clone() for k, v in model.state_dict().items()}
    count = int(images.shape[0])
    meta = PublicMeta("fedavg", batch, 0.1, epochs, count)
    return Observation(1, 0, offer.spec, offer.weights, update, meta)


def psnrs(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """PSNR of each true image against its Hungarian partner (missing ones: grey)."""
    if images.shape[0] < truth.shape[0]:
        grey = torch.full((truth.shape[0] - images.shape[0], *images.shape[1:]), 0.5)
        images = torch.cat([images, grey])
    return psnr(images[match(images, truth)], truth).clamp(max=200)
