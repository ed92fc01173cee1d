"""Dataset reconstruction and network inversion through `leaksim run`'s engine (Ray: ~10 s each).

Small versions of the shipped scenarios, asserting what they recover and that the report draws.
"""

from __future__ import annotations

import json
from pathlib import Path

from simulator import api
from simulator.core.records import AttackRecord
from simulator.run.engine import RunResult
from simulator.scenario import load, with_sweep


def attack_records(result: RunResult) -> list[AttackRecord]:
    assert [p.status for p in result.table()] == ["ok"], result.table()
    return result.table(AttackRecord)


def test_kkt_toy_scenario_recovers_the_red_blue_set(tmp_path: Path) -> None:
    result = api.run(load("kkt-toy"), out_dir=tmp_path / "toy")
    [record] = attack_records(result)
    assert record.matching == "nearest" and record.true_images == 20
    assert record.objective == "kkt-stationarity" and "kkt_stationarity" in record.trace[-1]
    assert record.extra["images_leaked"] == 20 and min(record.ssim) > 0.9
    assert record.extra["residual"] < 0.5 and "far from a KKT point" not in record.notes
    assert (result.folder.path / "figures" / "reconstructions-p0-r1.png").is_file()


def test_kkt_fedavg_client_scenario_recovers_most_digits(tmp_path: Path) -> None:
    overrides = {
        "federation.clients": 4,
        "federation.fraction": 0.5,
        "federation.rounds": 1,
        "federation.local_epochs": 5,
        "attack.rounds": [1],
        "attack.params.subspace_starts": 1000,
    }
    result = api.run(load("kkt-fedavg-client", overrides), out_dir=tmp_path / "fedavg")
    records = attack_records(result)
    assert len(records) == 2
    for record in records:
        assert record.true_images == 32 and record.extra["images_leaked"] >= 28, record.ssim
        # Labels are the client model's own predictions: after 5 epochs, far above chance (0.1).
        assert record.label_accuracy is not None and record.label_accuracy >= 0.3


def test_inversion_scenario_is_scored_against_the_clients_training_union(tmp_path: Path) -> None:
    overrides = {  # the global model after 2 rounds of one epoch on 3 x 600 digits
        "federation.clients": 3,
        "federation.rounds": 2,
        "federation.local_epochs": 1,
        "attack.rounds": [2],
        # A short generator budget: the test checks the scoring path (against the union of
        # the clients' training images), not the attack's quality (benchmarks do that).
        "attack.params.steps": 100,
        "attack.params.batch_size": 32,
        "attack.params.samples_per_class": 2,
    }
    scenario = with_sweep(load("inversion-pooling", overrides), {})
    result = api.run(scenario, out_dir=tmp_path / "inversion")
    [record] = attack_records(result)
    assert record.matching == "training" and record.extra["training_images"] == 1800
    assert record.generated == 20 and record.mean_ssim > record.extra["noise_ssim"]
    assert record.objective == "generator-loss" and 0 < record.extra["confidence"] <= 1
    folder = result.folder.path
    assert (folder / "figures" / "inversion-p0-r2.png").is_file()
    assert (folder / "figures" / "inversion-comparison.png").is_file()
    assert "Network inversion" in (folder / "summary.md").read_text()
    with (folder / "results.jsonl").open() as stream:
        kinds = {json.loads(line)["kind"] for line in stream}
    assert {"round", "attack", "point"} <= kinds
