"""Additive noise on every coordinate of the update the client sends.

Both change what the server observes: the noise is added on the client, before sending. On their
own they give no formal privacy guarantee (the update's sensitivity is unbounded); put
"clipping" before them for a clipped-and-noised (local-DP style) update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defenses.base import UpdateDefense, flatten, noise_like, register_defense, unflatten
from simulator.core.config import FederationConfig
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge


@dataclass(frozen=True)
class GaussianNoiseParams:
    """Parameters of "gaussian-noise"."""

    std: float = param(0.01, low=0.0, help="standard deviation of the noise per coordinate")


@register_defense("gaussian-noise", "Adds N(0, std^2) noise to every coordinate of the update.")
class GaussianNoise(UpdateDefense):
    """Adds i.i.d. Gaussian noise; changes the observation (the server sees the noisy update)."""

    Params = GaussianNoiseParams
    params: GaussianNoiseParams

    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``update`` plus N(0, std^2) per coordinate, drawn once over the flattened update."""
        if self.params.std == 0.0:
            return {name: t.clone() for name, t in update.items()}
        flat = flatten(update)
        return unflatten(flat + self.params.std * noise_like(flat, generator, "gaussian"), update)

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge | None:
        if self.params.std == 0.0:
            return None
        return DefenseKnowledge((self.name,), noise="gaussian", noise_scale=self.params.std)


@dataclass(frozen=True)
class LaplaceNoiseParams:
    """Parameters of "laplace-noise"."""

    scale: float = param(0.01, low=0.0, help="Laplace scale b per coordinate (std = sqrt(2) * b)")


@register_defense("laplace-noise", "Adds Laplace(0, scale) noise to every coordinate.")
class LaplaceNoise(UpdateDefense):
    """Adds i.i.d. Laplace noise; changes the observation (the server sees the noisy update)."""

    Params = LaplaceNoiseParams
    params: LaplaceNoiseParams

    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``update`` plus Laplace(0, scale) per coordinate, drawn over the flattened update."""
        if self.params.scale == 0.0:
            return {name: t.clone() for name, t in update.items()}
        flat = flatten(update)
        return unflatten(flat + self.params.scale * noise_like(flat, generator, "laplace"), update)

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge | None:
        if self.params.scale == 0.0:
            return None
        return DefenseKnowledge((self.name,), noise="laplace", noise_scale=self.params.scale)
