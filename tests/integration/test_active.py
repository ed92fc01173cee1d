"""An actively malicious server in real Ray federations (two small runs, ~30 s each here).

* Message API, FedSGD, 3 clients: the imprint attack manipulates client 1 in round 1 only.
  The other clients receive (and are observed against) the honest global model, only client
  1's update is attacked, and the global model of round 2 is the honest clients' step alone.
* SecAgg+, FedSGD, 3 clients: the client-separating imprint reads the clients' digits out of
  the one aggregate the server sees; the manipulated round leaves the global model as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simulator import api
from simulator.core.config import Scenario
from simulator.core.models import build_model, model_with_weights
from simulator.core.records import AttackRecord, ManipulationRecord
from simulator.core.seeding import seeded_generator
from simulator.data.shards import load_shard
from simulator.federation.traffic import AGGREGATE_CLIENT_ID
from simulator.federation.training import batch_gradient
from simulator.run.engine import RunResult
from simulator.run.referee import RefereedRound
from simulator.scenario import load


def small(**overrides: object) -> Scenario:
    base = {
        "federation.clients": 3,
        "federation.fraction": 1.0,
        "federation.rounds": 2,
        "federation.batch_size": 8,
        "federation.timeout_s": 120.0,
        "data.test_examples": 200,
        "data.examples_per_client": 40,
        "model.widths": [32],
        "attack.rounds": [1],
    }
    return load("quickstart", {**base, **overrides})


def run(scenario: Scenario, out: Path) -> tuple[RunResult, list[RefereedRound]]:
    traffic: list[RefereedRound] = []
    result = api.run(scenario, out_dir=out, taps=[traffic.append], raise_on_failure=True)
    return result, traffic


def honest_step(scenario: Scenario, clients: list[int], sent: dict) -> dict:
    """The FedSGD step of the given clients' round-1 gradients (equal batches: their mean)."""
    spec, fed = scenario.model, scenario.federation
    gradients = []
    for client in clients:
        shard = load_shard(scenario.data, fed.clients, scenario.seed, client)
        generator = seeded_generator(scenario.seed, 1, client)
        batch = torch.randperm(len(shard.labels), generator=generator)[: fed.batch_size]
        model = model_with_weights(spec, sent)
        gradients.append(batch_gradient(model, spec, shard.inputs[batch], shard.labels[batch]))
    return {k: v - fed.lr * sum(g[k] for g in gradients) / len(gradients) for k, v in sent.items()}


@pytest.fixture(scope="module")
def imprint_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    scenario = small(**{"attack.name": "imprint", "attack.params": {"bins": 128, "clients": [1]}})
    return scenario, *run(scenario, tmp_path_factory.mktemp("imprint"))


def test_only_the_named_client_gets_the_manipulated_model(imprint_run: tuple) -> None:
    scenario, result, traffic = imprint_run
    (manipulation,) = result.table(ManipulationRecord)
    assert (manipulation.round, manipulation.client) == (1, 1)
    assert manipulation.aggregated is False
    first = {o.client_id: o for o in traffic[0].traffic.observations}
    initial = build_model(scenario.model, seed=scenario.seed).state_dict()
    for client in (0, 2):
        assert first[client].model == scenario.model
        assert all(torch.equal(first[client].global_weights[k], v) for k, v in initial.items())
    assert first[1].model.imprint_bins == 128 and "imprint.encoder.weight" in first[1].update
    (attack,) = result.table(AttackRecord)
    assert attack.client == 1 and attack.recovered_60db is not None
    assert attack.recovered_60db >= 0.75
    assert attack.predicted_share == pytest.approx((1 - 1 / 128) ** 7)
    # round 2 is honest for everyone
    assert all(o.model == scenario.model for o in traffic[1].traffic.observations)


def test_the_manipulated_reply_stays_out_of_the_global_model(imprint_run: tuple) -> None:
    scenario, _, traffic = imprint_run
    initial = build_model(scenario.model, seed=scenario.seed).state_dict()
    expected = honest_step(scenario, [0, 2], initial)
    second = traffic[1].traffic.observations[0].global_weights
    for name, value in expected.items():
        assert torch.allclose(second[name], value, atol=1e-6), name


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    scenario = small(
        **{
            "defenses": [{"name": "secure-aggregation"}],
            "attack.name": "client-separation",
            "attack.params": {"bins": 64},
            "federation.batch_size": 4,
        }
    )
    return scenario, *run(scenario, tmp_path_factory.mktemp("secagg"))


def test_client_separation_reads_inputs_through_secagg(secagg_run: tuple) -> None:
    scenario, result, traffic = secagg_run
    assert sorted(r.client for r in result.table(ManipulationRecord)) == [0, 1, 2]
    (observation,) = traffic[0].traffic.observations
    assert observation.client_id == AGGREGATE_CLIENT_ID
    assert observation.model.imprint_bins == 64 * 3
    (attack,) = result.table(AttackRecord)
    assert attack.true_images == 12 and attack.recovered_60db is not None
    assert attack.recovered_60db >= 0.5
    # the manipulated round was not applied: round 2 starts from the initial weights
    initial = build_model(scenario.model, seed=scenario.seed).state_dict()
    second = traffic[1].traffic.observations[0].global_weights
    assert all(torch.equal(second[k], v) for k, v in initial.items())
    assert result.table()[0].status == "ok"
