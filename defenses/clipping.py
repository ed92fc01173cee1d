"""Clipping of the whole update to a maximum global L2 norm.

The norm is taken over all coordinates of all parameters together (not per layer), which is the
sensitivity bound that DP noise is calibrated to. Changes what the server observes whenever the
update's norm exceeds ``max_norm``; below it the update is sent unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defenses.base import UpdateDefense, flatten, register_defense
from simulator.core.fields import param


@dataclass(frozen=True)
class ClippingParams:
    """Parameters of "clipping"."""

    max_norm: float = param(
        1.0, low=0.0, low_open=True, help="largest global L2 norm of the update"
    )


def global_norm(update: dict[str, torch.Tensor]) -> float:
    """L2 norm of all coordinates of ``update`` together, accumulated in float64."""
    return float(torch.linalg.vector_norm(flatten(update), dtype=torch.float64))


@register_defense("clipping", "Scales the update down to a global L2 norm of at most max_norm.")
class Clipping(UpdateDefense):
    """Global L2 clipping; changes the observation when the update's norm exceeds max_norm."""

    Params = ClippingParams
    params: ClippingParams

    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``update * min(1, max_norm / ||update||)``; the generator is unused (deterministic)."""
        norm = global_norm(update)
        factor = min(1.0, self.params.max_norm / norm) if norm > 0 else 1.0
        return {name: t * factor for name, t in update.items()}
