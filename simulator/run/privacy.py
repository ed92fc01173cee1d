"""Privacy accounting: how often each client trained, and the (epsilon, delta) that cost.

Sample-level DP of the scenario's training defense (DP-SGD): each client's local steps sample
``batch_size`` of its own examples; a FedSGD participation is one step, a FedAvg one
``local_epochs`` passes over the shard. The accountant is the defense's own (dp-accounting's
RDP accountant for DP-SGD), never a hand-written formula. A defense whose guarantee holds per
release (``local-dp``: :class:`defenses.base.ReleaseAccounted`) is charged one release per
participation instead.

Beside the spent budget, the record holds the ceiling it puts on reconstruction
(:mod:`simulator.scoring.dp_bound`) for the worst client, measured against the server's public
data at the scenario's leak thresholds.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable

from defenses.base import ReleaseAccounted, TrainingDefense
from simulator.core.config import Scenario
from simulator.core.protocol import PublicData, local_steps
from simulator.core.records import PrivacyRecord
from simulator.data.shards import shard_size
from simulator.scoring.dp_bound import prior_baseline, reconstruction_bound

Spent = tuple[float, list[tuple[float, float]] | None]  # epsilon and RDP curve of one client


class PrivacyLedger:
    """Counts each client's participations; after the last round, the "privacy" record."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.participations: Counter[int] = Counter()

    def count(self, participants: Iterable[int]) -> None:
        """One more participation for each client whose data a round used."""
        for client in participants:
            self.participations[client] += 1

    def _accountant(self) -> tuple[Callable[[int, int], Spent], float] | None:
        """Per (client, participations): the epsilon and RDP curve spent; and the delta.
        None without a DP defense."""
        scenario, fed = self.scenario, self.scenario.federation
        defenses = scenario.built_defenses
        training = [d for d in defenses if isinstance(d, TrainingDefense)]
        if training:
            defense = training[0]

            def trained(client: int, times: int) -> Spent:
                examples = shard_size(scenario.data, fed.clients, scenario.seed, client)
                batch = min(fed.batch_size, examples)
                per_participation = (
                    1
                    if fed.protocol == "fedsgd"
                    else local_steps(examples, batch, fed.local_epochs)
                )
                steps = times * per_participation
                rate = batch / examples
                return defense.epsilon(rate, steps), defense.rdp_curve(rate, steps)

            return trained, defense.delta
        released = [d for d in defenses if isinstance(d, ReleaseAccounted)]
        if released:
            local = released[0]
            return (
                lambda _client, times: (
                    local.release_epsilon(times),
                    local.release_rdp_curve(times),
                )
            ), local.delta
        return None

    def spent(self, public: Callable[[], PublicData] | None = None) -> PrivacyRecord | None:
        """The (epsilon, delta) for the client that spent most, with the reconstruction bound
        that implies against ``public`` data; None without a DP defense."""
        accountant = self._accountant()
        if accountant is None or not self.participations:
            return None
        charge, delta = accountant
        spent = {client: charge(client, times) for client, times in self.participations.items()}
        worst = max(spent, key=lambda client: spent[client][0])
        epsilon, curve = spent[worst]
        record = PrivacyRecord(
            epsilon=epsilon,
            delta=delta,
            client=worst,
            mean_epsilon=sum(e for e, _ in spent.values()) / len(spent),
        )
        if public is None:
            return record
        data = public()
        attack = self.scenario.attack
        prior = prior_baseline(
            data.images, data.labels, attack.leak_threshold_db, attack.leak_threshold_ssim
        )
        return dataclasses.replace(
            record,
            prior_baseline=prior.upper,
            prior_guess=prior.guess,
            reconstruction_bound=reconstruction_bound(epsilon, delta, curve, prior.upper),
            rdp_curve=curve,
        )
