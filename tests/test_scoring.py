"""The scorer and the malicious server's hook, without Flower: real tensors, known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attacks.base import Reconstruction
from simulator.interceptor import RoundTraffic
from simulator.landscape import compute, render
from simulator.oracle import Oracle
from simulator.report import attack_table
from simulator.scenario import load
from simulator.scoring import score, score_round
from simulator.server_app import ServerRun


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def test_shuffled_exact_reconstruction_is_matched_and_fully_leaked() -> None:
    truth, labels = batch(4), torch.tensor([3, 1, 4, 1])
    order = torch.tensor([2, 0, 3, 1])
    recon = Reconstruction(1, 7, truth[order].clone(), labels[order], status="converged")
    record = score(recon, Oracle(1, 7, truth, labels)).record
    assert record["fraction_leaked"] == 1.0 and record["label_accuracy"] == 1.0
    assert record["mean_psnr"] == 100.0 and record["mean_ssim"] == pytest.approx(1.0)


def test_missing_and_noisy_reconstructions_count_as_not_leaked() -> None:
    truth = batch(4)
    noisy = (truth[:3] + 0.1 * batch(3, seed=1)).clamp(0, 1)  # ~25 dB: below 30 dB
    record = score(Reconstruction(1, 0, noisy, None), Oracle(1, 0, truth, torch.zeros(4))).record
    assert record["recovered"] == 3 and record["batch_size"] == 4
    assert record["fraction_leaked"] == 0.0 and record["label_accuracy"] is None
    assert 15 < record["median_psnr"] < 30
    loose = score(Reconstruction(1, 0, noisy, None), Oracle(1, 0, truth, torch.zeros(4)), 20.0)
    assert loose.record["fraction_leaked"] == 0.75


def test_psnr_curve_and_iterations_to_threshold_come_from_snapshots() -> None:
    truth = batch(2)
    far, near = torch.full_like(truth, 0.5), truth + 1e-3
    trace = [
        {"iteration": i, "gradient_distance": 1 / (i + 1), "seconds": i / 10} for i in (0, 10, 20)
    ]
    recon = Reconstruction(1, 0, near, None, trace, [(0, far), (10, far), (20, near)])
    record = score(recon, Oracle(1, 0, truth, torch.zeros(2))).record
    assert [it for it, _ in record["psnr_curve"]] == [0, 10, 20]
    assert record["psnr_curve"][0][1] < 15 < 50 < record["psnr_curve"][2][1]
    assert record["iterations_to_threshold"] == 20 and record["seconds_to_threshold"] == 2.0


def test_binary_labels_are_scored_by_parity() -> None:
    truth = batch(2)
    recon = Reconstruction(1, 0, truth.clone(), torch.tensor([1, 0]))
    oracle = Oracle(1, 0, truth, torch.tensor([7, 4]))
    assert score(recon, oracle, parity=True).record["label_accuracy"] == 1.0
    assert score(recon, oracle, parity=False).record["label_accuracy"] == 0.0


def test_reconstructions_without_an_oracle_are_skipped() -> None:
    recon = Reconstruction(2, 5, batch(1), None)
    assert score_round([recon], [Oracle(2, 4, batch(1), torch.zeros(1))]) == []


def test_a_crashing_attack_is_recorded_and_the_federation_goes_on() -> None:
    records: list[dict] = []
    run = ServerRun(load("quickstart", {"attack.name": "analytic"}), emit=records.append)

    def explode(_observations: object) -> list:
        raise RuntimeError("attack blew up")

    run.malicious.observe = explode  # type: ignore[method-assign]
    run.intercept(RoundTraffic(3, (), (), (), ()))
    assert records == [
        {
            "kind": "attack_error",
            "round": 3,
            "attack": "analytic",
            "error": "RuntimeError: attack blew up",
        }
    ]


def test_attack_table_summarises_each_sweep_point() -> None:
    def attack(point: int, leaked: float, psnr: float, reached: int | None) -> dict:
        return {
            "kind": "attack", "point": point, "fraction_leaked": leaked, "mean_psnr": psnr,
            "psnr": [psnr], "mean_ssim": 0.5, "label_accuracy": 1.0, "seconds": 2.0,
            "iterations_to_threshold": reached,
            "seconds_to_threshold": None if reached is None else 1.0,
        }  # fmt: skip

    records = [
        {"kind": "point", "point": 0, "set:federation.batch_size": 1},
        {"kind": "point", "point": 1, "set:federation.batch_size": 8},
        attack(0, 1.0, 60.0, 40), attack(0, 1.0, 50.0, 60),
        attack(1, 0.5, 25.0, None), attack(1, 0.0, 10.0, None),
    ]  # fmt: skip
    rows, columns = attack_table(records)
    assert "set:federation.batch_size" in columns
    first, second = rows
    assert (first["success_rate"], first["median_iterations_to_threshold"]) == (1.0, 50.0)
    assert (second["success_rate"], second["leaked_fraction"]) == (0.0, 0.25)
    assert second["median_iterations_to_threshold"] is None and math.isclose(
        second["mean_psnr"], 17.5
    )


def test_landscape_is_zero_at_the_truth_and_positive_around_it(tmp_path) -> None:
    scenario = load("binary-fc-seed")
    landscape = compute(scenario, resolution=7, radius=0.5)
    centre = landscape.distance[3, 3]
    assert centre < 1e-10 and np.all(np.delete(landscape.distance.ravel(), 24) > 1e3 * centre)
    path = render(landscape, tmp_path / "landscape.png")
    assert path.stat().st_size > 1000 and (tmp_path / "landscape.npz").is_file()


def test_a_diverging_attack_is_recorded_as_failed_without_stopping_the_run() -> None:
    from attacks.observation import Observation, PublicMeta
    from simulator.models import ModelSpec, build_model

    spec = ModelSpec("mlp", widths=(16,), activation="sigmoid")
    weights = {k: v.detach() for k, v in build_model(spec, seed=0).named_parameters()}
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    observation = Observation(1, 0, spec, weights, poisoned, PublicMeta("fedsgd", 1, 0.1, 1, 1))
    records: list[dict] = []
    run = ServerRun(
        load("quickstart", {"attack.name": "dlg", "attack.params.iterations": 3}), records.append
    )
    oracle = Oracle(1, 0, batch(1), torch.tensor([2]))
    run.intercept(RoundTraffic(1, (0,), (observation,), (oracle,), ()))
    (attack,) = [r for r in records if r["kind"] == "attack"]
    assert attack["status"] == "diverged" and attack["fraction_leaked"] == 0.0
    assert "diverged" in attack["notes"] and math.isfinite(attack["mean_psnr"])


def test_defense_table_measures_leakage_and_accuracy_loss_against_the_undefended_run() -> None:
    from simulator.evaluation import defense_table, is_evaluation

    def point(index: int, defense: str, strength: float | None, accuracy: float) -> dict:
        return {"kind": "point", "point": index, "defense": defense, "strength": strength,
                "final_accuracy": accuracy}  # fmt: skip

    def attack(index: int, psnr: float) -> dict:
        return {"kind": "attack", "point": index, "psnr": [psnr, psnr], "mean_ssim": 0.5,
                "fraction_leaked": float(psnr >= 30), "label_accuracy": 1.0}  # fmt: skip

    records = [
        point(0, "none", None, 0.90), attack(0, 60.0),
        point(1, "gaussian-noise", 0.01, 0.88), attack(1, 40.0),
        point(2, "gaussian-noise", 0.1, 0.70), attack(2, 12.0),
        {"kind": "privacy", "point": 2, "epsilon": 3.5},
    ]  # fmt: skip
    rows = defense_table(records)
    assert [r["curve"] for r in rows] == ["none", "gaussian-noise", "gaussian-noise"]
    assert [r["accuracy_loss"] for r in rows] == pytest.approx([0.0, 0.02, 0.20])
    assert [r["leaked_fraction"] for r in rows] == [1.0, 1.0, 0.0]
    assert rows[2]["epsilon"] == 3.5 and rows[1]["epsilon"] is None
    assert is_evaluation(records)
