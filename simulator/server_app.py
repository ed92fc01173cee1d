"""The Flower ServerApp: discovers clients, runs the wrapped strategy, evaluates globally.

:class:`ServerRun` holds one scenario point's server-side state; the engine builds a
ServerApp around it. The module-level ``app`` serves ``flwr run .`` from the run config.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
from flwr.serverapp import Grid, ServerApp

from attacks.server import MaliciousServer
from simulator.interceptor import Interceptor, RoundTraffic, aggregated
from simulator.messages import CLIENT_ID_KEY, CONFIG_KEY, SCENARIO_KEY, from_record, to_record
from simulator.models import build_model, is_binary
from simulator.scenario import Scenario
from simulator.scoring import score_round
from simulator.strategies import make_strategy
from simulator.task import Shard, evaluate, load_shard, load_test_set, load_weights

Record = dict[str, Any]


class DiscoveryError(RuntimeError):
    """Not every client answered the identification query in time."""


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
        raise DiscoveryError(f"only {len(mapping)} of {expected} clients identified themselves")
    return mapping


@dataclass
class ServerRun:
    """Server-side state of one scenario point; ``emit`` receives every result record."""

    scenario: Scenario
    emit: Callable[[Record], None]
    on_progress: Callable[[int], None] = lambda _round: None
    taps: Sequence[Callable[[RoundTraffic], None]] = ()
    save_attack: Callable[[Record, Mapping[str, np.ndarray]], object] = lambda _r, _arrays: None
    malicious: MaliciousServer = field(init=False)
    failures: list[Record] = field(default_factory=list)
    _round_started: float = field(default=0.0, init=False)
    _round_failures: int = field(default=0, init=False)
    _participations: Counter[int] = field(default_factory=Counter, init=False)
    _test_set: Shard | None = field(default=None, init=False)
    _training_set: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False)

    @property
    def secure_aggregation(self) -> bool:
        """Whether the scenario hides individual updates behind secure aggregation."""
        return any(entry["name"] == "secure-aggregation" for entry in self.scenario.defenses)

    def __post_init__(self) -> None:
        attack = self.scenario.attack
        self.malicious = MaliciousServer(
            attack.name, attack.params, attack.rounds, attack.max_clients
        )

    def main(self, grid: Grid, context: Context) -> None:
        """The ServerApp body: discovery, R rounds of train + intercept + global evaluation."""
        scenario, fed = self.scenario, self.scenario.federation
        interceptor = Interceptor(
            make_strategy(fed.protocol, fed.lr),
            self.discover(grid),
            fed,
            scenario.model_spec(),
            scenario.seed,
            self.intercept,
        )
        config = ConfigRecord({SCENARIO_KEY: scenario.to_json()})
        interceptor.start(
            grid=grid,
            initial_arrays=to_record(self.initial_weights()),
            num_rounds=fed.rounds,
            timeout=fed.timeout_s,
            train_config=config,
            evaluate_fn=self.evaluate_round,
        )
        self.finish()

    # discover / initial_weights / evaluate_round / finish are also the steps of the SecAgg+
    # ServerApp (simulator.secagg_app), which runs Flower's legacy workflow instead of main.
    def discover(self, grid: Grid) -> dict[int, int]:
        """{node id: client id} of every client; emits the "startup" record."""
        fed = self.scenario.federation
        started = time.perf_counter()
        node_to_client = discover_clients(grid, fed.clients, fed.timeout_s)
        self.emit({"kind": "startup", "discovery_s": time.perf_counter() - started})
        return node_to_client

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The seeded initial global model's weights."""
        return build_model(self.scenario.model_spec(), seed=self.scenario.seed).state_dict()

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test the global model after ``server_round`` (0: initial); emits a "round" record."""
        spec = self.scenario.model_spec()
        if self._test_set is None:
            self._test_set = load_test_set(self.scenario.data)
        model = load_weights(build_model(spec), from_record(arrays))
        loss, accuracy = evaluate(model, spec, self._test_set)
        record = {
            "kind": "round",
            "round": server_round,
            "test_accuracy": accuracy,
            "test_loss": loss,
        }
        if server_round > 0:
            record |= {
                "seconds": time.perf_counter() - self._round_started,
                "failures": self._round_failures,
            }
        self.emit(record)
        self.on_progress(server_round)
        self._round_started = time.perf_counter()
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})

    def finish(self) -> None:
        """After the last round: the "privacy" record, when a training defense spent epsilon."""
        privacy = privacy_spent(self.scenario, self._participations)
        if privacy is not None:
            self.emit(privacy)

    def intercept(self, traffic: RoundTraffic) -> None:
        """Per round: log each update, let the malicious server attack, score, record failures.

        ``taps`` (for scripts and tests) see the whole split traffic, oracles included.
        """
        self._round_failures = len(traffic.failures)
        for failure in traffic.failures:
            record = {
                "kind": "failure",
                "round": failure.round,
                "client": failure.client_id,
                "reason": failure.reason,
            }
            self.failures.append(record)
            self.emit(record)
        for tap in self.taps:
            tap(traffic)
        for client in traffic.participants:  # known to the server even under secure aggregation
            self._participations[client] += 1
        if self.secure_aggregation:
            traffic = aggregated(traffic)
        for observation in traffic.observations:
            self.emit(
                {
                    "kind": "update",
                    "round": observation.round,
                    "client": observation.client_id,
                    "num_examples": observation.meta.num_examples,
                    "update_norm": observation.update_norm(),
                }
            )
        try:
            reconstructions = self.malicious.observe(traffic.observations)
        except Exception as error:  # a failed attack must not end the federation it watches
            self.emit(
                {
                    "kind": "attack_error",
                    "round": traffic.round,
                    "attack": self.scenario.attack.name,
                    "error": f"{type(error).__name__}: {error}",
                }
            )
            return
        threshold = self.scenario.attack.leak_threshold_db
        parity = is_binary(self.scenario.model_spec())
        for scored in score_round(
            reconstructions,
            traffic.oracles,
            threshold,
            parity,
            self.scenario.attack.leak_threshold_ssim,
            self.training_set,
        ):
            self.emit(scored.record)
            self.save_attack(scored.record, scored.arrays())

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of every client's shard (images, labels), for scoring network inversion.

        Loaded on first use and kept: the scorer's truth, never handed to an attack.
        """
        if self._training_set is None:
            scenario, clients = self.scenario, self.scenario.federation.clients
            shards = [load_shard(scenario.data, clients, scenario.seed, c) for c in range(clients)]
            self._training_set = (
                torch.cat([shard.inputs for shard in shards]),
                torch.cat([shard.labels for shard in shards]),
            )
        return self._training_set


def privacy_spent(scenario: Scenario, participations: Mapping[int, int]) -> Record | None:
    """The (epsilon, delta) of DP-SGD for the client that trained most, from the accountant.

    Sample-level DP: each client's local steps sample ``batch_size`` of its own examples;
    a FedSGD participation is one step, a FedAvg one ``local_epochs`` passes over the shard.
    """
    from simulator.client_defenses import build_defenses
    from simulator.task import shard_size

    training = [d for d in build_defenses(scenario) if d.kind == "training"]
    if not training or not participations:
        return None
    from defenses.dp_sgd import epsilon

    fed = scenario.federation
    spent = {}
    for client, times in participations.items():
        examples = shard_size(scenario.data, fed.clients, scenario.seed, client)
        batch = min(fed.batch_size, examples)
        per_participation = (
            1 if fed.protocol == "fedsgd" else fed.local_epochs * math.ceil(examples / batch)
        )
        spent[client] = epsilon(training[0].params, batch / examples, times * per_participation)
    worst = max(spent, key=spent.__getitem__)
    return {
        "kind": "privacy",
        "epsilon": spent[worst],
        "delta": training[0].params.delta,
        "client": worst,
        "mean_epsilon": sum(spent.values()) / len(spent),
    }


def make_server_app(run: ServerRun) -> ServerApp:
    """A ServerApp whose main is ``run.main`` (closures, since run_simulation has no run config)."""
    server_app = ServerApp()
    server_app.main()(run.main)
    return server_app


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


app = ServerApp()


@app.main()
def flwr_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the scenario named in the run config, records to stdout.

    The federation, not the scenario, decides how many clients there are: ``federation.clients``
    is set to the number of connected SuperNodes.
    """
    from simulator import scenario as scenarios
    from simulator.results import print_record

    name = str(context.run_config.get("scenario", scenarios.DEFAULT_SCENARIO))
    scenario = scenarios.load(name)
    nodes = connected_nodes(grid, timeout=scenario.federation.timeout_s)
    if nodes != scenario.federation.clients:
        print_record({"kind": "note", "message": f"federation.clients set to {nodes} SuperNodes"})
        scenario = scenario.with_overrides({"federation.clients": nodes})
    ServerRun(scenario, emit=print_record).main(grid, context)
