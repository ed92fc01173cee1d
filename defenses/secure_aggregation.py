"""Secure aggregation: the server observes only the aggregate of the clients' updates.

When a scenario lists "secure-aggregation", the point runs Flower's own SecAgg+ protocol
(:mod:`simulator.secagg_app`: ``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the
clients): each client masks its quantized, example-weighted update, and the server can unmask
only their sum, which the workflow turns into the weighted mean FedAvg (or FedSGD) needs.
This plugin holds the protocol's parameters and :func:`aggregate_view`, the exact (unquantized)
weighted mean, which tests compare the protocol's output with and which
:func:`simulator.interceptor.aggregated` uses to model the view on the Message-API path.
With fewer than ``min_clients`` updates nothing is revealed. An aggregation defense; changes what
the server observes (one aggregate per round instead of one update per client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from defenses.base import AggregationDefense, Defense, register_defense
from simulator.core.config import FederationConfig
from simulator.core.fields import param


@dataclass(frozen=True)
class SecureAggregationParams:
    """Parameters of "secure-aggregation" (the SecAgg+ ones are ``SecAggPlusWorkflow``'s)."""

    min_clients: int = param(
        2, low=1, help="fewest updates the aggregate is revealed for (1 reveals that update)"
    )
    num_shares: float = param(
        1.0,
        low=0.0,
        high=1.0,
        low_open=True,
        help="fraction of the sampled clients each one secret-shares its keys with (1: all)",
    )
    reconstruction_threshold: float = param(
        0.5,
        low=0.0,
        high=1.0,
        low_open=True,
        help="fraction of the shares needed to rebuild a key (at least 2 shares)",
    )
    clipping_range: float = param(
        8.0, low=0.0, low_open=True, help="each weighted coordinate is clipped to +-this first"
    )
    quantization_range: int = param(
        2**22, low=2, high=2**28, help="integer levels over [-clipping_range, clipping_range]"
    )
    max_weight: float | None = param(
        None,
        low=0.0,
        low_open=True,
        help="largest example count a client reports (None: the batch size under FedSGD, "
        "the largest shard under FedAvg); weights are quantized relative to it",
    )


def quantization_tolerance(
    weights: Sequence[float], params: SecureAggregationParams, max_weight: float, largest: float
) -> float:
    """A bound on |SecAgg+ aggregate - exact weighted mean| per coordinate.

    Each client sends round(w / max_weight * Q) / Q times its update, stochastically rounded
    to a step of 2 C / Q (C the clipping range, Q the quantization range), so the unmasked sum
    errs by under one step per client and the weights by half a level each; ``largest`` bounds
    the updates' coordinates. Assumes no coordinate was clipped (|w / max_weight * x| <= C).
    """
    levels = params.quantization_range
    ratios = [round(w / max_weight * levels) / levels for w in weights]
    step = 2 * params.clipping_range / levels
    rounding = len(weights) * step / sum(ratios)
    reweighting = 2 * largest * len(weights) / (2 * levels) / sum(ratios)
    return rounding + reweighting


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
    "secure-aggregation", "Flower's SecAgg+: the server sees only the clients' weighted mean."
)
class SecureAggregation(AggregationDefense):
    """Runs SecAgg+; acts at aggregation and changes the observation (the aggregate only)."""

    Params = SecureAggregationParams
    params: SecureAggregationParams

    def check_scenario(self, federation: FederationConfig, defenses: Sequence[Defense]) -> None:
        """SecAgg+ masks between at least 2 sampled clients, and reveals the aggregate only
        when ``min_clients`` updates arrive: with fewer sampled, no round could ever end."""
        sampled = max(1, int(federation.clients * federation.fraction))
        if sampled < 2:
            raise ValueError(
                f"defense 'secure-aggregation' needs at least 2 clients sampled per round, got "
                f"{sampled} (federation.clients = {federation.clients} x federation.fraction "
                f"= {federation.fraction:g})"
            )
        if self.params.min_clients > sampled:
            raise ValueError(
                f"defense 'secure-aggregation': parameter 'min_clients' = "
                f"{self.params.min_clients} exceeds the {sampled} clients sampled per round; "
                f"allowed: [1, {sampled}]"
            )

    def view(
        self,
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """:func:`aggregate_view` with this defense's ``min_clients``."""
        return aggregate_view(updates, weights, min_clients=self.params.min_clients)
