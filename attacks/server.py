"""The malicious server: receives every intercepted update, picks which to attack, runs it.

It is handed :class:`Observation` objects only. What it returns (reconstructions and a log of
what it saw) goes to the scorer, which is the only place that joins them with the truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attacks.base import Attack
from simulator.core.protocol import Observation, Reconstruction
from simulator.core.registry import ATTACKS

NO_ATTACK = "none"


@dataclass
class MaliciousServer:
    """Sees every update before aggregation; attacks the ones its schedule selects.

    ``rounds`` empty means every round; ``max_clients`` 0 means every client of a round
    (otherwise the lowest client ids, so runs are reproducible).
    """

    attack_name: str = NO_ATTACK
    attack_params: Mapping[str, Any] = field(default_factory=dict)
    rounds: Sequence[int] = ()
    max_clients: int = 0
    seen: list[tuple[int, int]] = field(default_factory=list)

    def targets(self, observations: Sequence[Observation]) -> list[Observation]:
        """The observations of this round the schedule selects for an attack."""
        if self.attack_name == NO_ATTACK or not observations:  # the registered no-op
            return []
        if self.rounds and observations[0].round not in self.rounds:
            return []
        ordered = sorted(observations, key=lambda o: o.client_id)
        return ordered[: self.max_clients] if self.max_clients else ordered

    def observe(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        """Record one round's updates and attack the selected ones, all in one batch."""
        for observation in observations:
            if not isinstance(observation, Observation):
                raise TypeError(f"the malicious server takes Observations, got {type(observation)}")
            self.seen.append((observation.round, observation.client_id))
        targets = self.targets(observations)
        if not targets:
            return []
        attack: Attack[Any] = ATTACKS.create(self.attack_name, dict(self.attack_params))
        reconstructions = attack.run(targets)
        for reconstruction in reconstructions:  # named here, so a plugin need not name itself
            reconstruction.attack = self.attack_name
        return [flag_divergence(r) for r in reconstructions]


def flag_divergence(reconstruction: Reconstruction) -> Reconstruction:
    """Mark a reconstruction diverged when its images, or the distance it tracked, are not finite.

    A safety net for every attack: non-finite images are replaced by mid-grey so that scoring
    stays defined, and the run records a failed attack instead of stopping. A NaN ``distance``
    means "not computed" (closed-form attacks), so only a tracked, non-finite one counts.
    """
    trace = reconstruction.trace
    last = trace[-1]["gradient_distance"] if trace else 0.0
    tracked = not math.isnan(reconstruction.distance)
    finite_images = bool(torch.isfinite(reconstruction.images).all())
    if finite_images and (math.isfinite(last) or not tracked):
        return reconstruction
    reconstruction.images = torch.nan_to_num(reconstruction.images, nan=0.5).clamp(0, 1)
    reconstruction.status = "diverged"
    reconstruction.notes = (
        f"{reconstruction.notes}; diverged: non-finite distance or images".lstrip("; ")
    )
    return reconstruction
