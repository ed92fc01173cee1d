"""Flower's SecAgg+ protocol, end to end in real federations.

Each run starts a simulation (~20-30 s here), so there are three small ones: two of SecAgg+
under FedSGD (3 clients, 2 rounds; the second checks that reruns repeat bit for bit) and one
under FedAvg with a client crashing (4 clients, 1 round). SecAggStrategy's own logic is tested
on mock results in ``tests/unit/federation/test_secagg_strategy.py``, and Flower's LocalDpMod
through the real ClientApp, without Ray, in ``tests/unit/federation/test_client_app.py``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import FitRes

from simulator import api
from simulator.core.config import Scenario
from simulator.core.models import build_model, model_with_weights
from simulator.core.protocol import NUM_EXAMPLES_KEY
from simulator.core.records import AttackRecord, FailureRecord, Record, RoundRecord, UpdateRecord
from simulator.core.registry import DEFENSES
from simulator.core.seeding import seeded_generator
from simulator.data.shards import load_shard
from simulator.federation import secagg as secagg_app
from simulator.federation.traffic import AGGREGATE_CLIENT_ID
from simulator.federation.training import batch_gradient, local_train
from simulator.run.engine import RunResult
from simulator.run.folder import attack_artifact
from simulator.run.referee import RefereedRound
from simulator.scenario import load
from tests.fixtures.secure_aggregation import aggregate_view, quantization_tolerance

Update = dict[str, torch.Tensor]


def small(**overrides: object) -> Scenario:
    base = {
        "federation.clients": 3,
        "federation.fraction": 1.0,
        "federation.rounds": 2,
        "federation.batch_size": 2,
        "federation.timeout_s": 60.0,
        "federation.lr": 0.1,
        "data.test_examples": 200,
        "data.examples_per_client": 10,
        "model.widths": [16],
        "attack.rounds": [],
    }
    return load("quickstart", {**base, **overrides})


class Spy:
    """Records what SecAggStrategy.aggregate_fit receives, before it reads anything."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def wrap(self, original: Any) -> Any:
        def aggregate_fit(strategy: Any, server_round: int, results: list, failures: list) -> Any:
            fitres: list[FitRes] = [res for _, res in results]
            self.calls.append(
                {
                    "round": server_round,
                    "clients": sorted(strategy.node_to_client[p.node_id] for p, _ in results),
                    "tensors": [list(res.parameters.tensors) for res in fitres],
                    "metric_keys": [set(res.metrics) for res in fitres],
                }
            )
            return original(strategy, server_round, results, failures)

        return aggregate_fit


def run_spied(scenario: Scenario, out: Path) -> tuple[RunResult, list[RefereedRound], Spy]:
    traffic: list[RefereedRound] = []
    spy = Spy()
    with pytest.MonkeyPatch.context() as patch:
        original = secagg_app.SecAggStrategy.aggregate_fit
        patch.setattr(secagg_app.SecAggStrategy, "aggregate_fit", spy.wrap(original))
        result = api.run(scenario, out_dir=out, taps=[traffic.append], raise_on_failure=False)
    return result, traffic, spy


@pytest.fixture(scope="module")
def fedsgd_secagg(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    scenario = small(**{"defenses": [{"name": "secure-aggregation"}], "attack.name": "analytic"})
    tmp = tmp_path_factory.mktemp("secagg")
    return scenario, run_spied(scenario, tmp / "a"), run_spied(scenario, tmp / "b")


def true_gradients(scenario: Scenario, server_round: int, sent: Update) -> list[Update]:
    """Each client's FedSGD gradient, recomputed from its seeded batch (client order)."""
    torch.set_num_threads(1)
    spec, fed = scenario.model, scenario.federation
    gradients = []
    for client in range(fed.clients):
        shard = load_shard(scenario.data, fed.clients, scenario.seed, client)
        generator = seeded_generator(scenario.seed, server_round, client)
        batch = torch.randperm(len(shard.labels), generator=generator)[: fed.batch_size]
        model = model_with_weights(spec, sent)
        gradients.append(batch_gradient(model, spec, shard.inputs[batch], shard.labels[batch]))
    return gradients


def max_error(observed: Update, expected: Update) -> float:
    return max(float((observed[k].double() - expected[k].double()).abs().max()) for k in expected)


def tolerance(scenario: Scenario, weights: list[float], updates: list[Update]) -> float:
    params = DEFENSES.create("secure-aggregation").params
    largest = max(float(v.abs().max()) for u in updates for v in u.values())
    max_weight = secagg_app.secagg_workflow(scenario).max_weight
    bound = quantization_tolerance(weights, params, max_weight, largest)
    return bound + 1e-6 * max(1.0, largest)  # the aggregate is cast to float32 at the end


def test_aggregate_fit_gets_only_the_aggregate_once_per_round(fedsgd_secagg: tuple) -> None:
    scenario, (_, traffic, spy), _ = fedsgd_secagg
    assert [call["round"] for call in spy.calls] == [1, 2]
    for call, round_traffic in zip(spy.calls, traffic, strict=True):
        assert call["clients"] == [0, 1, 2]
        # one FitRes per client for num_examples, but all carry the same parameters: the aggregate
        assert all(tensors == call["tensors"][0] for tensors in call["tensors"])
        aggregate = np.concatenate([np.load(io.BytesIO(t)).ravel() for t in call["tensors"][0]])
        sent = round_traffic.traffic.observations[0].global_weights
        for gradient in true_gradients(scenario, call["round"], sent):
            individual = np.concatenate([g.numpy().ravel() for g in gradient.values()])
            assert np.abs(aggregate - individual).max() > 1e-3
        # the clients' metrics hold their example counts, and nothing of their data
        assert all(keys == {NUM_EXAMPLES_KEY} for keys in call["metric_keys"])
    for round_traffic in traffic:
        (observation,) = round_traffic.traffic.observations
        (truth,) = round_traffic.truths
        assert observation.client_id == AGGREGATE_CLIENT_ID == truth.client_id
        assert round_traffic.traffic.participants == (0, 1, 2)


def test_the_observed_aggregate_is_the_true_mean_within_quantization(fedsgd_secagg: tuple) -> None:
    scenario, (_, traffic, _), _ = fedsgd_secagg
    initial = build_model(scenario.model, seed=scenario.seed).state_dict()
    for round_traffic in (t.traffic for t in traffic):
        (observation,) = round_traffic.observations
        sent = observation.global_weights
        if round_traffic.round == 1:
            assert all(torch.equal(sent[k], initial[k]) for k in initial)
        gradients = true_gradients(scenario, round_traffic.round, sent)
        expected = aggregate_view(gradients, [2.0, 2.0, 2.0])
        error = max_error(observation.update, expected)
        assert error <= tolerance(scenario, [2.0, 2.0, 2.0], gradients)
        assert observation.update["1.weight"].dtype == torch.float32
        assert (observation.meta.batch_size, observation.meta.num_examples) == (6, 6)
    # FedSGD under SecAgg+: the server steps w - lr * aggregate
    first, second = (t.traffic for t in traffic)
    for name, weights in first.observations[0].global_weights.items():
        stepped = weights - 0.1 * first.observations[0].update[name]
        torch.testing.assert_close(second.observations[0].global_weights[name], stepped)


def test_an_attack_on_the_aggregate_is_scored_against_the_union(fedsgd_secagg: tuple) -> None:
    scenario, (result, traffic, _), _ = fedsgd_secagg
    attacks = result.table(AttackRecord)
    assert [(a.round, a.client) for a in attacks] == [(1, -1), (2, -1)]
    for record, round_traffic in zip(attacks, traffic, strict=True):
        assert record.attack == "analytic" and record.true_images == 6
        (union,) = round_traffic.truths
        truth = np.load(attack_artifact(result.folder.path, record))["truth"]
        np.testing.assert_array_equal(truth, union.inputs.numpy())
        # the union is the clients' own seeded batches, in client order
        fed = scenario.federation
        for client, part in enumerate(union.inputs.split(fed.batch_size)):
            shard = load_shard(scenario.data, fed.clients, scenario.seed, client)
            generator = seeded_generator(scenario.seed, round_traffic.traffic.round, client)
            batch = torch.randperm(len(shard.labels), generator=generator)[: fed.batch_size]
            assert torch.equal(part, shard.inputs[batch])


def test_a_secagg_run_records_rounds_with_test_accuracy(fedsgd_secagg: tuple) -> None:
    result = fedsgd_secagg[1][0]
    rounds = result.table(RoundRecord)
    assert [r.round for r in rounds] == [0, 1, 2]
    assert all(0.0 <= r.test_accuracy <= 1.0 and math.isfinite(r.test_loss) for r in rounds)
    assert [(u.round, u.client) for u in result.table(UpdateRecord)] == [(1, -1), (2, -1)]
    (point,) = result.table()
    assert point.status == "ok" and point.defense == "secure-aggregation"
    assert point.final_accuracy == rounds[-1].test_accuracy


def test_secagg_runs_repeat_bit_for_bit(fedsgd_secagg: tuple) -> None:
    """SecAgg+'s stochastic rounding draws from numpy, seeded per (seed, round, client)."""
    _, (first, traffic_a, _), (second, traffic_b, _) = fedsgd_secagg

    def stable(records: list[Record]) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.to_dict().items() if k not in {"seconds", "discovery_s"}}
            for r in records
        ]

    assert stable(first.records) == stable(second.records)
    for a, b in zip(traffic_a, traffic_b, strict=True):
        update_a, update_b = a.traffic.observations[0].update, b.traffic.observations[0].update
        assert all(torch.equal(update_a[k], update_b[k]) for k in update_a)


def test_fedavg_secagg_aggregates_the_weights_of_the_clients_that_stayed(tmp_path: Path) -> None:
    scenario = small(
        **{
            "federation.protocol": "fedavg",
            "federation.clients": 4,
            "federation.rounds": 1,
            "federation.batch_size": 5,
            "faults.crash_clients": [3],
            "defenses": [{"name": "secure-aggregation"}],
        }
    )
    result, traffic, spy = run_spied(scenario, tmp_path / "fedavg")
    assert [(f.round, f.client) for f in result.table(FailureRecord)] == [(1, 3)]
    assert "injected crash of client 3" in result.table(FailureRecord)[0].reason
    assert spy.calls[0]["clients"] == [0, 1, 2]
    (observation,) = traffic[0].traffic.observations
    spec = scenario.model
    torch.set_num_threads(1)
    trained = []
    for client in range(3):
        model = model_with_weights(spec, observation.global_weights)
        shard = load_shard(scenario.data, 4, scenario.seed, client)
        local_train(model, spec, shard, 1, 5, 0.1, seeded_generator(scenario.seed, 1, client))
        trained.append({k: v.detach() for k, v in model.named_parameters()})
    expected = aggregate_view(trained, [10.0, 10.0, 10.0])
    assert max_error(observation.update, expected) <= tolerance(scenario, [10.0] * 3, trained)
    assert observation.meta.num_examples == 30
    assert [r.round for r in result.table(RoundRecord)] == [0, 1]
