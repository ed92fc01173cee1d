"""The federation driver: discovers the clients, runs the rounds, tests the global model.

It runs one sweep point's federation through Flower, either the Message-API strategy
(:class:`simulator.federation.interceptor.Interceptor`) or, when the scenario has an
aggregation defense, Flower's SecAgg+ legacy workflow
(:class:`simulator.federation.secagg.SecAggStrategy`). Each round's traffic goes to the
referee; the driver writes the "startup" and "round" records and, at the end, the privacy
ledger's "privacy" record.

With an active attack (the scenario's ``attack.name``; attacks in ``attack.also`` only watch),
the driver asks its malicious server before each round which
clients get a manipulated model (:meth:`FederationDriver.manipulate`), writes a "manipulation"
record for each, and hands the models to the strategy, which sends them instead of the global
weights. The server's public statistics are the whole test split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from attacks.server import MaliciousServer
from defenses.base import AggregationDefense
from simulator.core.config import Scenario
from simulator.core.models import SentModel, build_model, model_with_weights
from simulator.core.protocol import CLIENT_ID_KEY, CONFIG_KEY, SCENARIO_KEY
from simulator.core.records import (
    AttackErrorRecord,
    ManipulationRecord,
    Record,
    RoundRecord,
    StartupRecord,
)
from simulator.data.shards import Shard, load_test_set
from simulator.federation.interceptor import Interceptor, Manipulate
from simulator.federation.messages import from_record, to_record
from simulator.federation.secagg import SecAggStrategy, secagg_workflow
from simulator.federation.strategies import make_strategy
from simulator.federation.traffic import RoundTraffic, client_error_message
from simulator.federation.training import evaluate
from simulator.run.referee import Referee


class DiscoveryError(RuntimeError):
    """Not every client answered the identification query in time."""


GRID_PULL_INTERVAL_S = 0.005


def discover_clients(grid: Grid, expected: int, timeout: float) -> dict[int, int]:
    """Ask every node which client it is: {node id: client id}, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise DiscoveryError(
                f"only {len(node_ids)} of {expected} clients connected in {timeout:g} s"
            )
        time.sleep(0.1)
    queries = [
        Message(
            RecordDict({CONFIG_KEY: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in node_ids
    ]
    replies = list(grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())))
    mapping = {
        m.metadata.src_node_id: int(m.content[CONFIG_KEY][CLIENT_ID_KEY])  # type: ignore[arg-type]
        for m in replies
        if not m.has_error()
    }
    if len(mapping) < expected:
        reasons = sorted(
            {client_error_message(m.error.reason, "discovery") for m in replies if m.has_error()}
        )
        because = f": {'; '.join(reasons)}"[:2000] if reasons else " (no reply)"
        raise DiscoveryError(
            f"only {len(mapping)} of {expected} clients identified themselves{because}"
        )
    return mapping


def connected_nodes(grid: Grid, settle_s: float = 1.0, timeout: float = 30.0) -> int:
    """How many nodes the federation has, once the count has stopped changing."""
    deadline = time.monotonic() + timeout
    count, stable_since = 0, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
        elif count and time.monotonic() - stable_since >= settle_s:
            return count
        time.sleep(0.1)
    if not count:
        raise DiscoveryError(f"no client connected within {timeout:g} s")
    return count


@dataclass
class FederationDriver:
    """Runs one sweep point's rounds; ``emit`` receives the startup, round and privacy records."""

    scenario: Scenario
    emit: Callable[[Record], None]
    referee: Referee
    on_progress: Callable[[int], None] = lambda _round: None
    _round_started: float = field(default=0.0, init=False)
    _round_failures: int = field(default=0, init=False)
    _test_set: Shard | None = field(default=None, init=False)

    @property
    def secure_aggregation(self) -> bool:
        """Whether the scenario hides individual updates behind an aggregation defense."""
        return any(isinstance(d, AggregationDefense) for d in self.scenario.built_defenses)

    def main(self, grid: Grid, context: Context) -> None:
        """The ServerApp body: discovery, then the rounds, then the privacy record."""
        if hasattr(grid, "pull_interval"):
            # Flower's in-memory grid sleeps 0.1 s between polls for replies: at a few ms of
            # client work a round, that sleep was most of a FedSGD round's time.
            grid.pull_interval = GRID_PULL_INTERVAL_S
        if self.secure_aggregation:
            self._run_secagg(grid, context)
        else:
            self._run_plain(grid)
        privacy = self.referee.privacy.spent(self.referee.public_data)
        if privacy is not None:
            self.emit(privacy)

    def _run_plain(self, grid: Grid) -> None:
        scenario, fed = self.scenario, self.scenario.federation
        interceptor = Interceptor(
            make_strategy(fed.protocol, fed.lr),
            self.discover(grid),
            fed,
            scenario.model,
            scenario.seed,
            self.on_round,
            self.manipulation(),
        )
        interceptor.start(
            grid=grid,
            initial_arrays=to_record(self.initial_weights()),
            num_rounds=fed.rounds,
            timeout=fed.timeout_s,
            train_config=ConfigRecord({SCENARIO_KEY: scenario.to_json()}),
            evaluate_fn=self.evaluate_round,
        )

    def _run_secagg(self, grid: Grid, context: Context) -> None:
        """Flower's legacy DefaultWorkflow with SecAgg+ as its fit workflow."""
        scenario = self.scenario
        strategy = SecAggStrategy(
            scenario, self.discover(grid), self.initial_weights(), self.on_round,
            self.evaluate_round, self.manipulation(),
        )  # fmt: skip
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=scenario.federation.rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=secagg_workflow(scenario))(grid, legacy)

    def discover(self, grid: Grid) -> dict[int, int]:
        """{node id: client id} of every client; emits the "startup" record."""
        fed = self.scenario.federation
        started = time.perf_counter()
        node_to_client = discover_clients(grid, fed.clients, fed.timeout_s)
        self.emit(StartupRecord(time.perf_counter() - started))
        return node_to_client

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The seeded initial global model's weights."""
        return build_model(self.scenario.model, seed=self.scenario.seed).state_dict()

    @property
    def malicious(self) -> MaliciousServer:
        """The malicious server of the scenario's own attack: the one that may manipulate."""
        return self.referee.servers[0]

    def manipulation(self) -> Manipulate | None:
        """The strategy's hook for manipulated models, when the attack is an active one."""
        return self.manipulate if self.malicious.active else None

    def manipulate(
        self, server_round: int, sampled: tuple[int, ...], weights: Mapping[str, torch.Tensor]
    ) -> dict[int, SentModel]:
        """The malicious server's models for this round; one "manipulation" record each.

        An attack that fails to plan writes an "attack_error" record, and every client gets
        the honest model.
        """
        scenario = self.scenario
        try:
            offers = self.malicious.manipulate(
                server_round, sampled, scenario.model, weights, scenario.federation,
                self.secure_aggregation,
            )  # fmt: skip
        except Exception as error:  # a failed attack must not end the federation it watches
            message = f"{type(error).__name__}: {error}"
            self.emit(AttackErrorRecord(server_round, scenario.attack.name, message))
            self.malicious.manipulated.pop(server_round, None)
            return {}
        for client, offer in sorted(offers.items()):
            self.emit(
                ManipulationRecord(
                    server_round, client, scenario.attack.name, offer.change, offer.aggregate
                )
            )
        return offers

    def on_round(self, traffic: RoundTraffic) -> None:
        """Each round's traffic: counted for the round record, then refereed."""
        self._round_failures = len(traffic.failures)
        self.referee.on_round(traffic)

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test the global model after ``server_round`` (0: initial); emits a "round" record."""
        spec = self.scenario.model
        if self._test_set is None:
            self._test_set = load_test_set(self.scenario.data)
        model = model_with_weights(spec, from_record(arrays))
        loss, accuracy = evaluate(model, spec, self._test_set)
        record = RoundRecord(server_round, accuracy, loss)
        if server_round > 0:
            seconds = time.perf_counter() - self._round_started
            record = dataclasses.replace(record, seconds=seconds, failures=self._round_failures)
        self.emit(record)
        self.on_progress(server_round)
        self._round_started = time.perf_counter()
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})
