"""The referee's half in the attack process: logs each round's traffic and runs the attacks.

Per round, in this order: the failures and one "update" record per observation; then the
malicious servers' attacks (on :class:`Observation` objects only); then the round's
reconstructions go to the judge (:class:`AttackedRound`). The judge is the scorer
(:class:`simulator.run.seal.Scorer`), which alone holds the key that opens the clients'
sealed truths: across the worker's pipe in the supervising ``leaksim`` process, or in this
process when a run has taps (tests, scripts). The scorer reads the round's truths, scores,
writes the "attack" records and artifacts, and deletes the truths, so nothing in the attack
process can read a truth or write a score. Without a truth store (a real deployment under
``flwr run``) the attacks run but nothing is scored, so no "attack" records are written.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass

from attacks.server import MaliciousServer
from simulator.core.config import Scenario
from simulator.core.protocol import PublicData, Reconstruction, Truth
from simulator.core.records import AttackErrorRecord, FailureRecord, Record, UpdateRecord
from simulator.data.shards import load_test_set
from simulator.federation.traffic import RoundTraffic
from simulator.run.privacy import PrivacyLedger


@dataclass(frozen=True)
class AttackedRound:
    """What the scorer needs of one round: which updates were observed (client ids, in order;
    -1 for an aggregate, whose truth is the union of ``participants``) and each attack's
    reconstructions, the scenario's attack first. ``traffic`` rides along in-process only
    (for taps); it never crosses the worker's pipe."""

    round: int
    observed: tuple[int, ...]
    participants: tuple[int, ...]
    per_attack: tuple[tuple[Reconstruction, ...], ...]
    traffic: RoundTraffic | None = dataclasses.field(default=None, compare=False)


@dataclass(frozen=True)
class RefereedRound:
    """One round as the scorer saw it after the attacks: the traffic and its truths.

    ``truths`` holds one entry per observation (in the same order) whose client wrote one;
    the aggregate's truth is the union of its participants' batches, in client order.
    """

    traffic: RoundTraffic
    truths: tuple[Truth, ...]
    reconstructions: tuple[Reconstruction, ...]


Tap = Callable[[RefereedRound], None]
Judge = Callable[[AttackedRound], None]


@dataclass
class Referee:
    """Logs and attacks each round of one sweep point; ``emit`` receives its records and
    ``judge`` each round's reconstructions."""

    scenario: Scenario
    emit: Callable[[Record], None]
    privacy: PrivacyLedger
    judge: Judge = lambda _attacked: None
    failures: list[FailureRecord] = dataclasses.field(default_factory=list)
    _public: PublicData | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        attack = self.scenario.attack
        # One malicious server per attack, all on the same schedule: the first is the
        # scenario's attack, the others (attack.also, then the adaptive twins of those that
        # can use the defenses' public settings) are compared with it image by image.
        # The attacks are the validated scenario's own instances, built once.
        self.servers = [
            MaliciousServer(
                name,
                built,
                attack.rounds,
                attack.max_clients,
                public=self.public_data,
                device=attack.device,
            )
            for name, built in self.scenario.built_attacks
        ]

    def public_data(self) -> PublicData:
        """The server's labelled public data: the whole test split (loaded once)."""
        if self._public is None:
            test = load_test_set(dataclasses.replace(self.scenario.data, test_examples=0))
            self._public = PublicData(test.inputs, test.labels)
        return self._public

    def on_round(self, traffic: RoundTraffic) -> None:
        """Log the round's traffic, let the malicious servers attack, hand the judge the rest."""
        if any(server.targets(traffic.observations) for server in self.servers):
            # Anything that still holds an earlier round's objects is cyclic garbage (a
            # traceback, a frame's locals snapshot), which gc.get_objects() would hand this
            # attack. Collect it first. Only before an attack: a full collection costs about
            # 0.25 s with torch and Ray loaded, more than a FedSGD round's work.
            gc.collect()
        self._log(traffic)
        per_attack = tuple(tuple(self._attack(server, traffic)) for server in self.servers)
        self.judge(
            AttackedRound(
                traffic.round,
                tuple(o.client_id for o in traffic.observations),
                tuple(traffic.participants),
                per_attack,
                traffic,
            )
        )

    def _log(self, traffic: RoundTraffic) -> None:
        for failure in traffic.failures:
            record = FailureRecord(failure.round, failure.client_id, failure.reason)
            self.failures.append(record)
            self.emit(record)
        self.privacy.count(traffic.participants)  # known to the server even under SecAgg+
        for observation in traffic.observations:
            self.emit(
                UpdateRecord(
                    observation.round,
                    observation.client_id,
                    observation.meta.num_examples,
                    observation.update_norm(),
                )
            )

    def _attack(self, server: MaliciousServer, traffic: RoundTraffic) -> list[Reconstruction]:
        try:
            return server.observe(traffic.observations)
        except Exception as error:  # a failed attack must not end the federation it watches
            message = f"{type(error).__name__}: {error}"
            self.emit(AttackErrorRecord(traffic.round, server.attack_name, message))
            return []
