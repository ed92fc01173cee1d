"""Magnitude pruning: the smallest-magnitude coordinates of the update are sent as zeros.

The threshold is global: the ``fraction`` of smallest |x| over ALL coordinates of all parameters
together, not a fraction per layer, so a layer of small updates can be pruned entirely. Exactly
``floor(fraction * n)`` coordinates are zeroed (``fraction`` read as the decimal it is written
as, so 0.29 of 100 coordinates is 29, not 28 by float rounding). Ties in magnitude are broken
by position: among equal magnitudes, the coordinate earlier in the flattened update (dict order,
row-major within a tensor) is pruned first. Changes what the server observes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from defenses.base import UpdateDefense, flatten, register_defense, unflatten
from simulator.core.config import FederationConfig
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge


@dataclass(frozen=True)
class PruningParams:
    """Parameters of "pruning"."""

    fraction: float = param(
        0.9, low=0.0, high=1.0, help="fraction of all coordinates set to zero (smallest |x|)"
    )


def pruned_count(fraction: float, size: int) -> int:
    """How many of ``size`` coordinates are zeroed: floor(fraction * size), fraction as decimal."""
    return math.floor(Fraction(repr(float(fraction))) * size)


@register_defense("pruning", "Zeroes the smallest-magnitude fraction of all update coordinates.")
class Pruning(UpdateDefense):
    """Global magnitude pruning; changes the observation (zeros replace small coordinates)."""

    Params = PruningParams
    params: PruningParams

    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The update with its ``floor(fraction * n)`` smallest |x| set to 0 (deterministic)."""
        flat = flatten(update).clone()
        count = pruned_count(self.params.fraction, flat.numel())
        if count:
            # A stable sort puts equal magnitudes in position order: deterministic ties.
            order = torch.sort(flat.abs(), stable=True).indices
            flat[order[:count]] = 0
        return unflatten(flat, update)

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge | None:
        return DefenseKnowledge((self.name,), intervals="pruning") if self.params.fraction else None
