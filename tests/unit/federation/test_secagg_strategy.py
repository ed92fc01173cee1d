"""SecAggStrategy on mock SecAgg+ results, without Ray (as Flower tests its strategies).

What the strategy gets from Flower's ``SecAggPlusWorkflow`` (flwr 1.41, ``unmask_stage``): one
FitRes per client whose masked vector arrived, each with that client's example count, and all
with the same ``parameters``: the unmasked weighted mean. The tests hand it exactly that and
check what it observes, records and returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as ndarrays

from simulator.core.config import Scenario
from simulator.core.models import IMPRINT, SentModel, build_model
from simulator.core.protocol import NUM_EXAMPLES_KEY, ROUND_KEY, SCENARIO_KEY
from simulator.federation.interceptor import Manipulate
from simulator.federation.secagg import SecAggHalted, SecAggStrategy
from simulator.federation.traffic import AGGREGATE_CLIENT_ID, AllClientsFailed, RoundTraffic
from tests.unit.federation.helpers import small_scenario

Weights = dict[str, torch.Tensor]

NODE_TO_CLIENT = {41: 2, 17: 0, 93: 3, 58: 1}


class Proxy:
    """The one thing the strategy reads of a ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


PROXIES = {client: Proxy(node) for node, client in NODE_TO_CLIENT.items()}


class Manager:
    """A client manager that lists every connected client."""

    def all(self) -> dict[str, Proxy]:
        return {str(p.node_id): p for p in PROXIES.values()}


def scenario(protocol: str = "fedsgd", **secagg: object) -> Scenario:
    return small_scenario(protocol, [{"name": "secure-aggregation", **secagg}])


def parameters(weights: Mapping[str, torch.Tensor]) -> Parameters:
    return ndarrays_to_parameters([t.numpy() for t in weights.values()])


def named(params: Parameters, like: Mapping[str, torch.Tensor]) -> Weights:
    arrays = ndarrays(params)
    return {k: torch.from_numpy(a) for k, a in zip(like, arrays, strict=True)}


def noise_like(weights: Mapping[str, torch.Tensor], seed: int) -> Weights:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in weights.items()}


class Round:
    """One SecAgg+ round of the strategy: its traffic and the tests' evaluations recorded."""

    def __init__(self, scenario: Scenario, manipulate: Manipulate | None = None) -> None:
        self.scenario = scenario
        self.traffic: list[RoundTraffic] = []
        self.evaluated: list[int] = []
        self.initial = build_model(scenario.model, seed=scenario.seed).state_dict()
        self.strategy = SecAggStrategy(
            scenario, NODE_TO_CLIENT, self.initial, self.traffic.append, self.evaluate, manipulate
        )
        start = self.strategy.initialize_parameters(Manager())  # type: ignore[arg-type]
        assert start is not None
        self.fit = dict(self.strategy.configure_fit(1, start, Manager()))  # type: ignore[arg-type]

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.evaluated.append(server_round)
        return MetricRecord({"test-loss": 0.25, "test-accuracy": 0.5})

    def aggregate(
        self,
        aggregate: Mapping[str, torch.Tensor],
        examples: Mapping[int, int],
        failures: Sequence[BaseException] = (),
    ) -> Parameters | None:
        """The strategy's result when SecAgg+ unmasked ``aggregate`` from these clients."""
        unmasked = parameters(aggregate)  # one object in every FitRes, as the workflow does
        results = [
            (PROXIES[c], FitRes(Status(Code.OK, ""), unmasked, n, {NUM_EXAMPLES_KEY: n}))
            for c, n in examples.items()
        ]
        stepped, metrics = self.strategy.aggregate_fit(1, results, list(failures))  # type: ignore[arg-type]
        assert metrics == {}
        return stepped


def test_every_sampled_client_gets_the_global_model_and_the_scenario() -> None:
    federation = Round(scenario())
    assert sorted(NODE_TO_CLIENT[proxy.node_id] for proxy in federation.fit) == [0, 1, 2, 3]
    for fit_ins in federation.fit.values():
        assert fit_ins.config[ROUND_KEY] == 1
        assert Scenario.from_json(str(fit_ins.config[SCENARIO_KEY])) == federation.scenario
        sent = named(fit_ins.parameters, federation.initial)
        assert all(torch.equal(sent[k], v) for k, v in federation.initial.items())


def test_the_aggregate_is_observed_once_as_one_update_of_all_the_clients() -> None:
    federation = Round(scenario())
    aggregate = noise_like(federation.initial, 1)
    federation.aggregate(aggregate, {3: 2, 0: 2, 2: 1, 1: 2})
    (traffic,) = federation.traffic
    (observation,) = traffic.observations
    assert observation.client_id == AGGREGATE_CLIENT_ID and observation.round == 1
    assert list(observation.update) == list(federation.initial)
    assert all(torch.equal(observation.update[k], v) for k, v in aggregate.items())
    assert all(torch.equal(observation.global_weights[k], v) for k, v in federation.initial.items())
    # FedSGD: the union of the batches (4 x 2) and of the example counts (7)
    assert (observation.meta.batch_size, observation.meta.num_examples) == (8, 7)
    assert traffic.failures == () and traffic.participants == (0, 1, 2, 3)


def test_fedsgd_steps_the_global_model_by_the_aggregate_gradient() -> None:
    federation = Round(scenario("fedsgd"))
    aggregate = noise_like(federation.initial, 2)
    stepped = federation.aggregate(aggregate, dict.fromkeys(range(4), 2))
    assert stepped is not None
    for name, value in named(stepped, federation.initial).items():
        expected = federation.initial[name].numpy() - 0.5 * aggregate[name].numpy()
        np.testing.assert_array_equal(value.numpy(), expected)


def test_fedavg_takes_the_aggregate_weights_as_the_global_model() -> None:
    federation = Round(scenario("fedavg"))
    aggregate = noise_like(federation.initial, 3)
    stepped = federation.aggregate(aggregate, dict.fromkeys(range(4), 10))
    assert stepped is not None
    assert all(torch.equal(v, aggregate[k]) for k, v in named(stepped, aggregate).items())
    (observation,) = federation.traffic[0].observations
    assert (observation.meta.batch_size, observation.meta.num_examples) == (2, 40)


def test_a_dropped_client_is_a_failure_with_the_reason_the_workflow_reported() -> None:
    federation = Round(scenario())
    crash = RuntimeError(type("Error", (), {"reason": "injected crash of client 2 in round 1"})())
    stepped = federation.aggregate(noise_like(federation.initial, 4), {0: 2, 1: 2, 3: 2}, [crash])
    (traffic,) = federation.traffic
    assert [(f.round, f.client_id, f.reason) for f in traffic.failures] == [
        (1, 2, "injected crash of client 2 in round 1")
    ]
    (observation,) = traffic.observations
    assert observation.meta.num_examples == 6 and traffic.participants == (0, 1, 3)
    assert stepped is not None


def test_clients_that_dropped_without_an_error_are_failures_of_the_round() -> None:
    federation = Round(scenario())
    federation.aggregate(noise_like(federation.initial, 5), {0: 2, 3: 2})
    reasons = {f.client_id: f.reason for f in federation.traffic[0].failures}
    assert reasons == dict.fromkeys((1, 2), "no masked update within the SecAgg+ round")


def test_below_min_clients_nothing_is_revealed_and_the_global_model_stays() -> None:
    federation = Round(scenario(min_clients=3))
    assert federation.aggregate(noise_like(federation.initial, 6), {0: 2, 1: 2}) is None
    (traffic,) = federation.traffic
    assert traffic.observations == ()
    assert [f.client_id for f in traffic.failures] == [2, 3]
    # the round was unmasked (and revealed nothing): testing the model goes on
    federation.strategy.evaluate(1, parameters(federation.initial))
    assert federation.evaluated == [1]


def test_a_round_no_client_finished_ends_the_point() -> None:
    federation = Round(scenario())
    with pytest.raises(AllClientsFailed, match="round 1: all 4 sampled clients failed"):
        federation.aggregate(federation.initial, {})
    assert [f.client_id for f in federation.traffic[0].failures] == [0, 1, 2, 3]


def test_individual_parameters_in_the_results_are_refused() -> None:
    federation = Round(scenario())
    results = [
        (
            PROXIES[c],
            FitRes(Status(Code.OK, ""), parameters(noise_like(federation.initial, c)), 2, {}),
        )
        for c in range(4)
    ]
    with pytest.raises(RuntimeError, match="differing \\(individual\\) parameters"):
        federation.strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]


def test_a_round_secagg_never_unmasked_halts_the_point_when_tested() -> None:
    federation = Round(scenario())
    loss, metrics = federation.strategy.evaluate(0, parameters(federation.initial))  # type: ignore[misc]
    assert (loss, metrics["test-accuracy"], federation.evaluated) == (0.25, 0.5, [0])
    with pytest.raises(SecAggHalted, match="round 1: SecAgg\\+ halted before unmasking"):
        federation.strategy.evaluate(1, parameters(federation.initial))


def imprinting(aggregate: bool) -> Manipulate:
    """Every sampled client gets an imprint block in front of its own scaled honest weights."""

    def manipulate(
        _round: int, sampled: tuple[int, ...], sent: Mapping[str, torch.Tensor]
    ) -> dict[int, SentModel]:
        spec = dataclasses.replace(scenario().model, imprint_bins=3)
        model = build_model(spec, seed=7).state_dict()
        block = {k: v for k, v in model.items() if k.startswith(IMPRINT)}
        return {
            c: SentModel(
                spec, {**block, **{k: (c + 1) * v for k, v in sent.items()}}, "imprint", aggregate
            )
            for c in sampled
        }

    return manipulate


def test_manipulated_clients_get_their_models_and_the_aggregate_is_seen_against_their_mean() -> (
    None
):
    federation = Round(scenario("fedavg"), imprinting(aggregate=False))
    offers = federation.strategy.path.offers
    for proxy, fit_ins in federation.fit.items():
        offer = offers[NODE_TO_CLIENT[proxy.node_id]]
        sent = named(fit_ins.parameters, offer.weights)
        assert all(torch.equal(sent[k], v) for k, v in offer.weights.items())
        assert Scenario.from_json(str(fit_ins.config[SCENARIO_KEY])).model == offer.spec
    aggregate = noise_like(offers[0].weights, 8)
    # the round is observed, but its aggregate does not become the global model
    assert federation.aggregate(aggregate, {0: 10, 1: 10, 2: 20, 3: 40}) is None
    (observation,) = federation.traffic[0].observations
    assert observation.model == offers[0].spec
    assert all(torch.equal(observation.update[k], v) for k, v in aggregate.items())
    mean_factor = (1 * 10 + 2 * 10 + 3 * 20 + 4 * 40) / 80
    for name, value in federation.initial.items():
        torch.testing.assert_close(observation.global_weights[name], mean_factor * value)
    federation.strategy.evaluate(1, parameters(federation.initial))  # a lost round, not an error
    assert federation.evaluated == [1]


def test_a_manipulated_aggregate_that_may_join_keeps_only_the_honest_tensors() -> None:
    federation = Round(scenario("fedavg"), imprinting(aggregate=True))
    aggregate = noise_like(federation.strategy.path.offers[0].weights, 9)
    stepped = federation.aggregate(aggregate, dict.fromkeys(range(4), 10))
    assert stepped is not None
    global_model = named(stepped, federation.initial)
    assert list(global_model) == list(federation.initial)
    assert all(torch.equal(global_model[k], aggregate[k]) for k in federation.initial)
