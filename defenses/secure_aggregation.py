"""Secure aggregation: the server observes only the aggregate of the clients' updates.

This plugin models what a secure-aggregation protocol such as Flower's SecAgg+ reveals to an
honest-but-curious server: the sum of the masked updates of the clients that took part (or,
with weights, the weighted mean FedAvg computes from it), and nothing about any single update.
It does not run the protocol (no masks, secret sharing or dropouts); wiring Flower's SecAgg+ is
separate. With fewer than ``min_clients`` updates the protocol would not reveal anything, so
:func:`aggregate_view` refuses. Kind "aggregation"; changes what the server observes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from defenses.base import Defense, Kind, register_defense
from simulator.params import param


@dataclass(frozen=True)
class SecureAggregationParams:
    """Parameters of "secure-aggregation"."""

    min_clients: int = param(
        2, low=1, help="fewest updates the aggregate is revealed for (1 reveals that update)"
    )


def aggregate_view(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    min_clients: int = 1,
) -> dict[str, torch.Tensor]:
    """What the server sees: the sum of ``updates``, or their ``weights``-weighted mean.

    All updates must have the same names and shapes. The result is new tensors (no storage is
    shared with any input).
    """
    if len(updates) < max(min_clients, 1):
        raise ValueError(
            f"secure aggregation reveals nothing for {len(updates)} update(s); "
            f"it needs at least {max(min_clients, 1)}"
        )
    names = list(updates[0])
    for index, update in enumerate(updates):
        if list(update) != names:
            raise ValueError(f"update {index} has parameters {list(update)}, expected {names}")
    if weights is None:
        coefficients = torch.ones(len(updates), dtype=torch.float64)
    else:
        coefficients = torch.as_tensor(list(weights), dtype=torch.float64)
        if coefficients.shape != (len(updates),):
            raise ValueError(f"got {len(coefficients)} weights for {len(updates)} updates")
        if bool((coefficients < 0).any()) or not float(coefficients.sum()) > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        coefficients = coefficients / coefficients.sum()
    view: dict[str, torch.Tensor] = {}
    for name in names:
        stacked = torch.stack([update[name] for update in updates])
        # Accumulate in float64 so the view does not depend on the clients' order.
        mixed = torch.tensordot(coefficients.to(stacked.device), stacked.double(), dims=1)
        view[name] = mixed.to(stacked.dtype)
    return view


@register_defense(
    "secure-aggregation", "The server sees only the sum (or mean) of the clients' updates."
)
class SecureAggregation(Defense):
    """Models SecAgg+'s view; acts at aggregation and changes the observation (aggregate only)."""

    kind: ClassVar[Kind] = "aggregation"
    changes_observation: ClassVar[bool] = True
    Params = SecureAggregationParams
    params: SecureAggregationParams

    def view(
        self,
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """:func:`aggregate_view` with this defense's ``min_clients``."""
        return aggregate_view(updates, weights, min_clients=self.params.min_clients)
