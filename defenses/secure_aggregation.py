"""Secure aggregation: the server observes only the aggregate of the clients' updates.

When a scenario lists "secure-aggregation", the point runs Flower's own SecAgg+ protocol
(:mod:`simulator.federation.secagg`: ``SecAggPlusWorkflow`` on the server, ``secaggplus_mod``
on the clients): each client masks its quantized, example-weighted update, and the server can
unmask only their sum, which the workflow turns into the weighted mean FedAvg (or FedSGD)
needs. This plugin holds the protocol's parameters and builds the workflow from them
(:meth:`SecureAggregation.workflow`). With fewer than ``min_clients`` updates nothing is
revealed. An aggregation defense; changes what the server observes (one aggregate per round
instead of one update per client).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.server.workflow import SecAggPlusWorkflow

from defenses.base import AggregationDefense, register_defense
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


@register_defense(
    "secure-aggregation", "Flower's SecAgg+: the server sees only the clients' weighted mean."
)
class SecureAggregation(AggregationDefense):
    """Runs SecAgg+; acts at aggregation and changes the observation (the aggregate only)."""

    Params = SecureAggregationParams
    params: SecureAggregationParams

    @property
    def min_clients(self) -> int:
        """The ``min_clients`` parameter."""
        return self.params.min_clients

    def workflow(self, federation: FederationConfig, largest_weight: float) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ workflow with these parameters (shares as fractions).

        ``max_weight`` is the parameter when set, else ``largest_weight``.
        """
        p = self.params
        return SecAggPlusWorkflow(
            num_shares=p.num_shares,
            reconstruction_threshold=p.reconstruction_threshold,
            max_weight=p.max_weight if p.max_weight is not None else largest_weight,
            clipping_range=p.clipping_range,
            quantization_range=p.quantization_range,
            timeout=federation.timeout_s,
        )
