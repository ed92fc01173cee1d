"""simulator.report: tables drawn from records alone."""

from __future__ import annotations

import math

import pytest

from simulator.report.evaluation import defense_table, is_evaluation
from simulator.report.summary import attack_table


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


def test_defense_table_measures_leakage_and_accuracy_loss_against_the_undefended_run() -> None:
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
