"""The "none" attack: the malicious server only logs what it intercepts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from attacks.base import Attack, register_attack
from simulator.core.protocol import Observation, Reconstruction


@dataclass(frozen=True)
class NoParams:
    """The no-op attack takes no parameters."""


@register_attack("none", "No attack: the server only logs what it intercepts.")
class NoAttack(Attack[NoParams]):
    """Registered so that "none" is validated and listed like every attack; it selects no
    targets (``observes_only``), so it never runs and no truth is read for it."""

    Params = NoParams
    observes_only = True

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return []
