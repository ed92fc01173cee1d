"""The referee: runs the malicious server on each round's traffic, then scores it.

Per round, in this order: the failures and one "update" record per observation; the malicious
server's attacks (on :class:`Observation` objects only); and only after they have returned, the
truth of each observed update, read from the simulation's truth store, for scoring and for the
taps. The round's truths are then deleted, so while an attack runs the server process holds no
true batch of that round. Without a truth store (a real deployment under ``flwr run``) the
attacks run but nothing is scored, so no "attack" records are written.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.server import MaliciousServer
from simulator.core.config import Scenario
from simulator.core.models import is_binary
from simulator.core.protocol import PublicData, Reconstruction, Truth
from simulator.core.records import (
    AttackErrorRecord,
    AttackRecord,
    FailureRecord,
    Record,
    UpdateRecord,
)
from simulator.data.shards import load_test_set, load_training_union
from simulator.federation.traffic import AGGREGATE_CLIENT_ID, RoundTraffic
from simulator.federation.truth import TruthStore
from simulator.run.privacy import PrivacyLedger
from simulator.scoring.best import best_of
from simulator.scoring.score import score_round


@dataclass(frozen=True)
class RefereedRound:
    """One round as the referee saw it after the attacks: the traffic and its truths.

    ``truths`` holds one entry per observation (in the same order) whose client wrote one;
    the aggregate's truth is the union of its participants' batches, in client order.
    """

    traffic: RoundTraffic
    truths: tuple[Truth, ...]
    reconstructions: tuple[Reconstruction, ...]


Tap = Callable[[RefereedRound], None]


@dataclass
class Referee:
    """Attacks and scores each round of one sweep point; ``emit`` receives its records."""

    scenario: Scenario
    emit: Callable[[Record], None]
    privacy: PrivacyLedger
    truth_store: TruthStore | None
    taps: Sequence[Tap] = ()
    save_attack: Callable[[AttackRecord, Mapping[str, np.ndarray]], object] = lambda _r, _a: None
    failures: list[FailureRecord] = dataclasses.field(default_factory=list)
    _public: PublicData | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        attack = self.scenario.attack
        # One malicious server per attack, all on the same schedule: the first is the
        # scenario's attack, the others (attack.also) are compared with it image by image.
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
            for name, built in attack.built
        ]

    def public_data(self) -> PublicData:
        """The server's labelled public data: the whole test split (loaded once)."""
        if self._public is None:
            test = load_test_set(dataclasses.replace(self.scenario.data, test_examples=0))
            self._public = PublicData(test.inputs, test.labels)
        return self._public

    def on_round(self, traffic: RoundTraffic) -> None:
        """Log the round's traffic, let the malicious servers attack, then score against truth."""
        attacking = any(server.targets(traffic.observations) for server in self.servers)
        if attacking:
            # Anything that still holds an earlier round's truths is cyclic garbage (a
            # traceback, a frame's locals snapshot), which gc.get_objects() would hand this
            # attack. Collect it first. Only before an attack: a full collection costs about
            # 0.25 s with torch and Ray loaded, more than a FedSGD round's work.
            gc.collect()
        try:
            self._log(traffic)
            per_attack = [self._attack(server, traffic) for server in self.servers]
            # Truths are read only when something scores or inspects them.
            wanted = self.truth_store is not None and (attacking or bool(self.taps))
            truths = self._truths(traffic) if wanted else ()
            scored = [self._score(reconstructions, truths) for reconstructions in per_attack]
            if len(scored) > 1:
                self._best(scored)
            everything = tuple(r for reconstructions in per_attack for r in reconstructions)
            for tap in self.taps:
                tap(RefereedRound(traffic, truths, everything))
        finally:
            if self.truth_store is not None:
                self.truth_store.discard_round(traffic.round)

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

    def _truths(self, traffic: RoundTraffic) -> tuple[Truth, ...]:
        """The truth of every observation whose clients wrote one (read after the attacks)."""
        assert self.truth_store is not None
        store, found = self.truth_store, []
        for observation in traffic.observations:
            if observation.client_id != AGGREGATE_CLIENT_ID:
                truth = store.get(traffic.round, observation.client_id)
                if truth is not None:
                    found.append(truth)
                continue
            parts = [store.get(traffic.round, c) for c in traffic.participants]
            if parts and all(p is not None for p in parts):
                found.append(
                    Truth(
                        traffic.round,
                        AGGREGATE_CLIENT_ID,
                        torch.cat([p.inputs for p in parts if p is not None]),
                        torch.cat([p.labels for p in parts if p is not None]),
                    )
                )
        return tuple(found)

    def _score(
        self, reconstructions: Sequence[Reconstruction], truths: Sequence[Truth]
    ) -> list[AttackRecord]:
        """Score and record one attack's reconstructions; the first attack's arrays are kept
        (the figures show the scenario's attack; the others are compared by their scores)."""
        attack = self.scenario.attack
        records = []
        for scored in score_round(
            reconstructions,
            truths,
            attack.leak_threshold_db,
            is_binary(self.scenario.model),
            attack.leak_threshold_ssim,
            self._training_set,
        ):
            self.emit(scored.record)
            if scored.record.attack == attack.name:
                self.save_attack(scored.record, scored.arrays())
            records.append(scored.record)
        return records

    def _best(self, per_attack: Sequence[Sequence[AttackRecord]]) -> None:
        """For each update every attack scored, the per-image best of them."""
        by_update: dict[tuple[int, int], list[AttackRecord]] = {}
        for records in per_attack:
            for record in records:
                by_update.setdefault((record.round, record.client), []).append(record)
        for records in by_update.values():
            best = best_of(records)
            if best is not None:
                self.emit(best)

    def _training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of every client's shard, for scoring network inversion (not kept)."""
        scenario = self.scenario
        union = load_training_union(scenario.data, scenario.federation.clients, scenario.seed)
        return union.inputs, union.labels
