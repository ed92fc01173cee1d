"""Local differential privacy through Flower's own ``LocalDpMod`` on the client's reply.

The mod (``flwr.clientapp.mod.LocalDpMod``, the Message-API twin of ``flwr.client.mod``'s) clips
the change ``reply - sent`` of the client's weights to ``clipping_norm`` and adds Gaussian
noise of std ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` to every coordinate of the
weights it sends. It needs weights in the reply, so it runs under FedAvg only. It acts after
every other client defense, whatever its place in ``[[defenses]]``, because it wraps the whole
train function. A client-mod defense; changes what the server observes (the noisy, clipped weights).

Seeding: Flower draws the noise from numpy's global generator.
:mod:`simulator.federation.client_mods` seeds that generator from (seed, round, client)
around the mod and restores it afterwards, so reruns repeat; a client built outside leaksim
gets Flower's unseeded noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from flwr.clientapp.mod import LocalDpMod

from defenses.base import (
    AggregationDefense,
    ClientModDefense,
    Defense,
    ReleaseAccounted,
    register_defense,
)
from defenses.dp_sgd import gaussian_epsilon, gaussian_rdp_curve
from simulator.core.config import FederationConfig
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge


@dataclass(frozen=True)
class LocalDpParams:
    """Parameters of "local-dp" (those of Flower's LocalDpMod)."""

    clipping_norm: float = param(
        1.0, low=0.0, low_open=True, help="L2 bound on the change of the weights before noise"
    )
    sensitivity: float = param(1.0, low=0.0, help="sensitivity of the clipped update")
    epsilon: float = param(1.0, low=0.0, low_open=True, help="privacy budget per release")
    delta: float = param(
        1e-5, low=0.0, high=1.0, low_open=True, high_open=True, help="failure probability"
    )


@register_defense("local-dp", "Flower's LocalDpMod: clip the weight change, add Gaussian noise.")
class LocalDp(ClientModDefense, ReleaseAccounted):
    """Flower's LocalDpMod as a client mod; changes the observation (clipped, noisy weights)."""

    Params = LocalDpParams
    params: LocalDpParams

    @property
    def noise_std(self) -> float:
        """The per-coordinate noise std LocalDpMod adds (the Gaussian mechanism's)."""
        p = self.params
        return p.sensitivity * math.sqrt(2 * math.log(1.25 / p.delta)) / p.epsilon

    @property
    def noise_multiplier(self) -> float:
        """The noise std over the sensitivity: the Gaussian mechanism's multiplier."""
        p = self.params
        return math.sqrt(2 * math.log(1.25 / p.delta)) / p.epsilon

    @property
    def delta(self) -> float:
        return self.params.delta

    def release_epsilon(self, releases: int) -> float:
        """The releases' epsilon at ``delta``: the Gaussian mechanism composed ``releases``
        times by the RDP accountant; for one release, the parameter itself where the classic
        calibration holds (epsilon <= 1) and is the smaller."""
        composed = gaussian_epsilon(self.noise_multiplier, self.params.delta, 1.0, releases)
        if releases == 1 and self.params.epsilon <= 1.0:
            return min(composed, self.params.epsilon)
        return composed

    def release_rdp_curve(self, releases: int) -> list[tuple[float, float]]:
        """The RDP curve of ``releases`` Gaussian releases of this noise multiplier."""
        return gaussian_rdp_curve(self.noise_multiplier, 1.0, releases)

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge:
        """The Gaussian noise on every coordinate of the (clipped) weights sent."""
        return DefenseKnowledge((self.name,), noise="gaussian", noise_scale=self.noise_std)

    def mod(self) -> LocalDpMod:
        """Flower's mod with these parameters."""
        p = self.params
        return LocalDpMod(p.clipping_norm, p.sensitivity, p.epsilon, p.delta)

    def check_scenario(self, federation: FederationConfig, defenses: Sequence[Defense]) -> None:
        """FedAvg only (the mod clips a weight change); not under SecAgg+'s legacy messages."""
        protocol = federation.protocol
        if protocol != "fedavg":
            raise ValueError(
                f"defense 'local-dp' needs federation.protocol = 'fedavg' (got {protocol!r}): "
                "Flower's LocalDpMod clips and noises the weights a client sends back"
            )
        for other in defenses:
            if isinstance(other, AggregationDefense):
                raise ValueError(
                    f"defense 'local-dp' cannot be combined with {other.name!r}: SecAgg+ runs "
                    "Flower's legacy message format, which the Message-API LocalDpMod does not "
                    "read"
                )
