"""The malicious server: receives every intercepted update, picks which to attack, runs it.

It is handed :class:`Observation` objects only. What it returns (reconstructions and a log of
what it saw) goes to the scorer, which is the only place that joins them with the truth.

With an active attack (:mod:`attacks.active`) it also decides, before each round, what model
to send each sampled client (:meth:`MaliciousServer.manipulate`), and attacks exactly the
updates that came back from manipulated models.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attacks.active.base import ActiveAttack, Plan
from attacks.base import Attack
from simulator.core.config import FederationConfig
from simulator.core.devices import move, resolve_device
from simulator.core.models import ModelSpec, SentModel
from simulator.core.objectives import objective_key
from simulator.core.protocol import Observation, PublicData, Reconstruction


@dataclass
class MaliciousServer:
    """Sees every update before aggregation; attacks the ones its schedule selects.

    ``rounds`` empty means every round; ``max_clients`` 0 means every client of a round
    (otherwise the lowest client ids, so runs are reproducible). An active attack manipulates
    the models of those rounds and clients (narrowed by its ``clients`` parameter) and attacks
    only the updates computed on them; ``manipulated`` maps each round to those clients.

    ``attack`` is the one instance for the whole run (a validated scenario builds it:
    :attr:`~simulator.core.config.AttackConfig.built`), registered as ``attack_name``.
    ``public`` loads the server's labelled public data; the server sets it on the attack
    (:attr:`Attack.public`) before asking it anything, active or not.

    An attack that ``keeps_history`` (:attr:`Attack.keeps_history`) also sees every round's
    updates (:meth:`Attack.remember`), attacked or not, keyed by the client ids a server sees,
    and reconstructs the selected ones from all it has seen of their clients.
    """

    attack_name: str
    attack: Attack[Any]
    rounds: Sequence[int] = ()
    max_clients: int = 0
    seen: list[tuple[int, int]] = field(default_factory=list)
    manipulated: dict[int, frozenset[int]] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    public: Callable[[], PublicData] | None = field(default=None, repr=False)
    device: str = "auto"  # where the attack runs (simulator.core.devices)

    @property
    def active(self) -> bool:
        """Whether the attack manipulates the model it sends (an :class:`ActiveAttack`)."""
        return isinstance(self.attack, ActiveAttack)

    def manipulate(
        self,
        server_round: int,
        sampled: Sequence[int],
        spec: ModelSpec,
        weights: Mapping[str, torch.Tensor],
        federation: FederationConfig,
        secure_aggregation: bool,
    ) -> dict[int, SentModel]:
        """The manipulated model for each client that gets one this round (none: honest).

        Under secure aggregation every participant's update is summed, so a changed
        architecture must go to every sampled client alike; anything else is an error.
        """
        attack = self.attack
        if not isinstance(attack, ActiveAttack) or (
            self.rounds and server_round not in self.rounds
        ):
            return {}
        wanted = attack.params.clients
        chosen = tuple(c for c in sorted(sampled) if not wanted or c in wanted)
        chosen = chosen[: self.max_clients] if self.max_clients else chosen
        if not chosen:
            return {}
        self.hand_public(attack, torch.device("cpu"))  # the plan's statistics stay on the CPU
        fedsgd = federation.protocol == "fedsgd"
        samples = {c: federation.batch_size if fedsgd else self.examples.get(c, 0) for c in chosen}
        plan = Plan(
            server_round, chosen, tuple(sorted(sampled)), spec, weights, federation, samples,
            secure_aggregation,
        )  # fmt: skip
        offers = attack.manipulate(plan)
        if secure_aggregation:
            specs = {o.spec for o in offers.values()}
            if specs - {spec} and (set(offers) != set(sampled) or len(specs) > 1):
                raise ValueError(
                    f"attack {self.attack_name!r} sent a changed architecture to clients "
                    f"{sorted(offers)} of {sorted(sampled)}: under secure aggregation every "
                    "sampled client must train the same one (set attack.params.clients to "
                    "all, or use an attack made for it)"
                )
        self.manipulated[server_round] = frozenset(offers)
        return offers

    def targets(self, observations: Sequence[Observation]) -> list[Observation]:
        """The observations of this round the schedule selects for an attack.

        For an active attack: the updates computed on manipulated models (the aggregate of a
        manipulated round under secure aggregation).
        """
        if not observations or self.attack.observes_only:
            return []
        if self.active:
            done = self.manipulated.get(observations[0].round, frozenset())
            return sorted(
                (o for o in observations if o.client_id in done or (o.client_id < 0 and done)),
                key=lambda o: o.client_id,
            )
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
            if observation.client_id >= 0:  # what each client trains on, for later plans
                self.examples[observation.client_id] = observation.meta.num_examples
        if self.attack.keeps_history:  # on the CPU: the history outlives the device copies
            self.attack.remember(list(observations))
        targets = self.targets(observations)
        if not targets:
            return []
        attack = self.attack
        device = resolve_device(self.device)
        self.hand_public(attack, device)
        started = time.perf_counter()
        reconstructions = attack.run(on_device(targets, device))
        # Timed here, around the call: an attack's trace says what the attack claims.
        seconds = time.perf_counter() - started
        for reconstruction in reconstructions:  # named here, so a plugin need not name itself
            reconstruction.attack = self.attack_name
            reconstruction.seconds = seconds
            reconstruction.images = reconstruction.images.cpu()
            if reconstruction.labels is not None:
                reconstruction.labels = reconstruction.labels.cpu()
            reconstruction.snapshots = [(i, images.cpu()) for i, images in reconstruction.snapshots]
            if reconstruction.confident is not None:
                reconstruction.confident = reconstruction.confident.cpu()
        return [flag_divergence(r) for r in reconstructions]

    def hand_public(self, attack: Attack[Any], device: torch.device) -> None:
        """Set the server's public data on ``attack``, on ``device`` (None without any)."""
        if self.public is None:
            attack.public = None
            return
        public = self.public()  # loaded once by the caller, on first use
        attack.public = PublicData(public.images.to(device), public.labels.to(device))


def on_device(observations: Sequence[Observation], device: torch.device) -> list[Observation]:
    """The observations with their tensors on ``device`` (the attacks follow their inputs'
    device); unchanged on the CPU, where they already are."""
    if device.type == "cpu":
        return list(observations)
    return [
        dataclasses.replace(
            o, global_weights=move(o.global_weights, device), update=move(o.update, device)
        )
        for o in observations
    ]


def flag_divergence(reconstruction: Reconstruction) -> Reconstruction:
    """Mark a reconstruction diverged when its images, or the objective it tracked, are not
    finite.

    A safety net for every attack: non-finite images are replaced by mid-grey so that scoring
    stays defined, and the run records a failed attack instead of stopping. A NaN
    ``objective_value`` means "not computed" (closed-form attacks), so only a tracked,
    non-finite one counts.
    """
    trace = reconstruction.trace
    last = trace[-1].get(objective_key(reconstruction.objective), math.nan) if trace else 0.0
    tracked = not math.isnan(reconstruction.objective_value)
    finite_images = bool(torch.isfinite(reconstruction.images).all())
    if finite_images and (math.isfinite(last) or not tracked):
        return reconstruction
    reconstruction.images = torch.nan_to_num(reconstruction.images, nan=0.5).clamp(0, 1)
    reconstruction.status = "diverged"
    reconstruction.notes = (
        f"{reconstruction.notes}; diverged: non-finite distance or images".lstrip("; ")
    )
    return reconstruction
