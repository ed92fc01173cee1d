"""What a real FL server receives from one client in one round, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from simulator.models import ModelSpec

Protocol = Literal["fedsgd", "fedavg"]


@dataclass(frozen=True)
class PublicMeta:
    """Protocol settings a server knows because it sent them (or the client reports them)."""

    protocol: Protocol
    batch_size: int
    lr: float
    local_epochs: int
    num_examples: int


@dataclass(frozen=True)
class Observation:
    """One intercepted client update.

    ``update`` holds, per parameter name, the gradient (fedsgd) or the client's new weights
    (fedavg), exactly as the client sent them. ``global_weights`` is what the server sent.
    """

    round: int
    client_id: int
    model: ModelSpec
    global_weights: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    meta: PublicMeta

    def update_norm(self) -> float:
        """L2 norm of the update over all parameters (of the weight change under fedavg)."""
        if self.meta.protocol == "fedavg":
            deltas = [self.update[k] - self.global_weights[k] for k in self.update]
        else:
            deltas = list(self.update.values())
        return float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas)))
