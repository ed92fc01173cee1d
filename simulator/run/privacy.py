"""Privacy accounting: how often each client trained, and the (epsilon, delta) that cost.

Sample-level DP of the scenario's training defense (DP-SGD): each client's local steps sample
``batch_size`` of its own examples; a FedSGD participation is one step, a FedAvg one
``local_epochs`` passes over the shard. The accountant is the defense's own (dp-accounting's
RDP accountant for DP-SGD), never a hand-written formula.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from defenses.base import TrainingDefense
from simulator.core.config import Scenario
from simulator.core.protocol import local_steps
from simulator.core.records import PrivacyRecord
from simulator.data.shards import shard_size


class PrivacyLedger:
    """Counts each client's participations; after the last round, the "privacy" record."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.participations: Counter[int] = Counter()

    def count(self, participants: Iterable[int]) -> None:
        """One more participation for each client whose data a round used."""
        for client in participants:
            self.participations[client] += 1

    def spent(self) -> PrivacyRecord | None:
        """The (epsilon, delta) for the client that trained most; None without DP training."""
        scenario, fed = self.scenario, self.scenario.federation
        training = [d for d in scenario.built_defenses if isinstance(d, TrainingDefense)]
        if not training or not self.participations:
            return None
        defense = training[0]
        spent = {}
        for client, times in self.participations.items():
            examples = shard_size(scenario.data, fed.clients, scenario.seed, client)
            batch = min(fed.batch_size, examples)
            per_participation = (
                1 if fed.protocol == "fedsgd" else local_steps(examples, batch, fed.local_epochs)
            )
            spent[client] = defense.epsilon(batch / examples, times * per_participation)
        worst = max(spent, key=spent.__getitem__)
        return PrivacyRecord(
            epsilon=spent[worst],
            delta=defense.delta,
            client=worst,
            mean_epsilon=sum(spent.values()) / len(spent),
        )
