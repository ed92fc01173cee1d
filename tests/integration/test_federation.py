"""End-to-end federations through Flower's Simulation Engine (each point starts one: ~10 s).

The strategies' own logic (sorting, failures, aggregation, manipulated replies) is tested on
mock replies in ``tests/unit/federation``; these runs check what only a real federation shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defenses.dp_sgd import epsilon
from simulator import api
from simulator.core.config import Scenario
from simulator.core.models import model_with_weights
from simulator.core.records import (
    AttackRecord,
    FailureRecord,
    PointRecord,
    PrivacyRecord,
    UpdateRecord,
)
from simulator.core.registry import DEFENSES
from simulator.core.seeding import seeded_generator
from simulator.data.shards import Shard, load_shard
from simulator.federation.training import local_train
from simulator.run import engine
from simulator.run.engine import RunResult
from simulator.run.folder import read_records
from simulator.run.referee import RefereedRound
from simulator.scenario import load, with_sweep


def small(**overrides: object) -> Scenario:
    base = {
        "federation.clients": 4,
        "federation.fraction": 1.0,
        "federation.rounds": 2,
        "federation.batch_size": 1,
        "federation.timeout_s": 120.0,
        "federation.lr": 0.1,
        "data.test_examples": 500,
        "data.examples_per_client": 50,
        "model.widths": [32],
    }
    return load("quickstart", {**base, **overrides})


def run_with_traffic(
    scenario: Scenario, tmp_path: Path, name: str
) -> tuple[RunResult, list[RefereedRound]]:
    traffic: list[RefereedRound] = []
    result = api.run(
        scenario, out_dir=tmp_path / name, taps=[traffic.append], raise_on_failure=False
    )
    return result, traffic


@pytest.fixture(scope="module")
def fedsgd_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One run of a FedSGD scenario (batch size 1) where client 2 crashes in round 2.

    That two runs of one scenario give the same records is checked where runs are compared
    whole: the resumed and the parallel runs of ``test_interrupt.py``, and the SecAgg+ runs of
    ``test_flower_defenses.py``.
    """
    scenario = small(
        **{
            "faults.crash_clients": [2],
            "faults.crash_rounds": [2],
            "attack.name": "analytic",
            "attack.max_clients": 2,
            "attack.rounds": [],
        }
    )
    return scenario, run_with_traffic(scenario, tmp_path_factory.mktemp("fedsgd"), "a")


def test_every_update_reaches_the_hook_once_per_round_with_its_client_id(
    fedsgd_runs: tuple,
) -> None:
    scenario, (_, traffic) = fedsgd_runs
    seen = [(o.round, o.client_id) for t in traffic for o in t.traffic.observations]
    assert sorted(seen) == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 3)]
    for t in traffic:
        for observation, truth in zip(t.traffic.observations, t.truths, strict=True):
            assert (observation.round, observation.client_id) == (truth.round, truth.client_id)
            shard = load_shard(scenario.data, 4, scenario.seed, observation.client_id)
            # the true image is in that client's own shard, and in no other client's
            owners = [
                c
                for c in range(4)
                if (load_shard(scenario.data, 4, scenario.seed, c).inputs == truth.inputs[0])
                .all((1, 2, 3))
                .any()
            ]
            assert owners == [observation.client_id]
            assert (shard.inputs == truth.inputs[0]).all((1, 2, 3)).any()


def test_fedsgd_gradient_is_real_first_layer_over_bias_gives_the_image(fedsgd_runs: tuple) -> None:
    _, (_, traffic) = fedsgd_runs
    for observation, truth in zip(traffic[0].traffic.observations, traffic[0].truths, strict=True):
        weight_grad, bias_grad = observation.update["1.weight"], observation.update["1.bias"]
        row = bias_grad.abs().argmax()
        recovered = weight_grad[row] / bias_grad[row]
        torch.testing.assert_close(recovered, truth.inputs[0].flatten(), atol=1e-4, rtol=1e-4)


def test_observations_hold_the_sent_global_weights_and_public_meta(fedsgd_runs: tuple) -> None:
    _, (_, traffic) = fedsgd_runs
    round1, round2 = (t.traffic for t in traffic)
    sent1 = round1.observations[0].global_weights
    assert all(o.global_weights.keys() == sent1.keys() for o in round1.observations)
    # FedSGD: the next global model is the old one minus lr times the mean gradient
    mean_grad = {k: torch.stack([o.update[k] for o in round1.observations]).mean(0) for k in sent1}
    expected = {k: sent1[k] - 0.1 * mean_grad[k] for k in sent1}
    for key, value in round2.observations[0].global_weights.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5)
    meta = round1.observations[0].meta
    assert (meta.protocol, meta.batch_size, meta.num_examples) == ("fedsgd", 1, 1)


def test_a_crashed_client_is_recorded_and_the_round_goes_on(fedsgd_runs: tuple) -> None:
    _, (result, traffic) = fedsgd_runs
    failures = result.table(FailureRecord)
    assert [(f.round, f.client) for f in failures] == [(2, 2)]
    assert "injected crash of client 2 in round 2" in failures[0].reason
    assert traffic[1].traffic.failures[0].client_id == 2
    (point,) = result.table()
    assert point.status == "ok" and point.rounds_completed == 2 and point.failed_updates == 1
    summary = (result.folder.path / "summary.md").read_text()
    assert "Failed client updates (1)" in summary and "injected crash" in summary


def test_results_file_is_written_record_by_record(fedsgd_runs: tuple) -> None:
    _, (result, _) = fedsgd_runs
    on_disk = list(read_records(result.folder.path))
    assert on_disk == result.records
    kinds = [r.kind for r in on_disk]
    assert kinds[0] == "startup" and kinds[-1] == "point" and kinds.count("round") == 3
    assert (result.folder.path / "scenario.toml").is_file()
    assert (result.folder.path / "figures" / "accuracy.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def fedavg_points(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One FedAvg run of two points: an honest one, then one where every client crashes."""
    scenario = small(
        **{
            "federation.protocol": "fedavg",
            "federation.batch_size": 10,
            "federation.fraction": 0.5,
            "federation.local_epochs": 2,
            "federation.rounds": 1,
            "data.examples_per_client": 20,
        }
    )
    sweep = with_sweep(scenario, {"faults.crash_clients": [[], [0, 1, 2, 3]]})
    out = tmp_path_factory.mktemp("fedavg") / "run"
    traffic: list[RefereedRound] = []
    with pytest.raises(engine.RunFailed) as info:
        api.run(sweep, out_dir=out, taps=[traffic.append])
    return scenario, list(read_records(out)), traffic, str(info.value)


def test_fedavg_observes_real_weights_after_local_training(fedavg_points: tuple) -> None:
    scenario, records, traffic, _ = fedavg_points
    points = [r for r in records if isinstance(r, PointRecord)]
    assert [(list(p.swept["faults.crash_clients"]), p.status) for p in points] == [
        ([], "ok"),
        ([0, 1, 2, 3], "failed"),
    ]
    torch.set_num_threads(1)  # as the clients do, for bit-identical replay
    honest = traffic[0]
    assert len(honest.traffic.observations) == 2  # fraction 0.5 of 4 clients
    for observation, truth in zip(honest.traffic.observations, honest.truths, strict=True):
        spec = scenario.model
        model = model_with_weights(spec, observation.global_weights)
        generator = seeded_generator(scenario.seed, 1, observation.client_id)
        local_train(model, spec, Shard(truth.inputs, truth.labels), 2, 10, 0.1, generator)
        for name, value in model.named_parameters():
            torch.testing.assert_close(observation.update[name], value.detach())
        assert observation.meta.local_epochs == 2 and observation.meta.num_examples == 20


def test_a_point_where_every_client_fails_stops_with_a_clear_error(fedavg_points: tuple) -> None:
    _, records, traffic, message = fedavg_points
    assert "AllClientsFailed: round 1: all 2 sampled clients failed" in message
    assert "injected crash of client" in message
    (point,) = [r for r in records if isinstance(r, PointRecord) and r.point == 1]
    assert point.status == "failed" and point.rounds_completed == 0
    failures = [r for r in records if isinstance(r, FailureRecord) and r.point == 1]
    assert [f.round for f in failures] == [1, 1]
    assert traffic[1].traffic.observations == () and len(traffic[1].traffic.failures) == 2


def test_the_malicious_server_attacks_and_the_scorer_scores_against_the_truth(
    fedsgd_runs: tuple,
) -> None:
    _, (result, _) = fedsgd_runs
    attacks = result.table(AttackRecord)
    assert [(a.round, a.client) for a in attacks] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for record in attacks:
        assert record.attack == "analytic" and record.fraction_leaked == 1.0
        assert record.mean_psnr > 60 and record.mean_ssim > 0.99
    folder = result.folder.path
    assert (folder / "artifacts" / "p0-attack-r1-c0.npz").is_file()
    assert (folder / "figures" / "reconstructions-p0-r1.png").stat().st_size > 1000
    assert "## Attacks" in (folder / "summary.md").read_text()


def test_defenses_change_what_the_server_sees_and_dp_reports_its_epsilon(tmp_path: Path) -> None:
    dp = {"name": "dp-sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    scenario = small(
        **{
            "defenses": [dp, {"name": "pruning", "fraction": 0.5}, {"name": "secure-aggregation"}],
            "federation.batch_size": 4,
            "attack.name": "analytic",
            "attack.rounds": [],
        }
    )
    result, traffic = run_with_traffic(scenario, tmp_path, "defended")
    # under Flower's SecAgg+ the server never holds a client's (pruned, DP-noised) update:
    # even the taps get one aggregate per round; its truth is the union of the four batches
    for round_traffic in traffic:
        (observation,) = round_traffic.traffic.observations
        (truth,) = round_traffic.truths
        assert observation.client_id == -1 == truth.client_id
        assert round_traffic.traffic.participants == (0, 1, 2, 3)
    # what the server saw: only the aggregate of the four clients, attacked as one batch
    updates = result.table(UpdateRecord)
    assert [(u.round, u.client) for u in updates] == [(1, -1), (2, -1)]
    attacks = result.table(AttackRecord)
    assert [(a.round, a.client) for a in attacks] == [(1, -1), (2, -1)]
    for attack, round_traffic in zip(attacks, traffic, strict=True):
        assert attack.true_images == sum(len(t.labels) for t in round_traffic.truths)
        assert attack.fraction_leaked == 0.0
    # epsilon from the accountant: 2 rounds of one Poisson step at rate 4/50 for every client
    (privacy,) = result.table(PrivacyRecord)
    params = DEFENSES.create("dp-sgd", {k: v for k, v in dp.items() if k != "name"}).params
    assert privacy.epsilon == pytest.approx(epsilon(params, 4 / 50, 2))
    assert privacy.delta == 1e-5
    (point,) = result.table()
    assert point.defense == "dp-sgd+pruning+secure-aggregation"
