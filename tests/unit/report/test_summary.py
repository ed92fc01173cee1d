"""simulator.report: tables drawn from records alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from simulator.core.records import AttackRecord, PointRecord, PrivacyRecord, Record
from simulator.report.evaluation import defense_table, is_evaluation
from simulator.report.html import render_html
from simulator.report.summary import attack_table, markdown_summary
from tests.unit.report.synthetic_run import attack_record, point_record


def test_attack_table_summarises_each_sweep_point() -> None:
    def attack(point: int, leaked: float, psnr: float, reached: int | None) -> AttackRecord:
        return attack_record(
            "idlg", [psnr], point=point, fraction_leaked=leaked, mean_ssim=0.5,
            label_accuracy=1.0, seconds=2.0, iterations_to_threshold=reached,
            seconds_to_threshold=None if reached is None else 1.0,
        )  # fmt: skip

    records: list[Record] = [
        point_record(0, {"federation.batch_size": 1}),
        point_record(1, {"federation.batch_size": 8}),
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
    assert first["leak_threshold"] == "PSNR >= 30 dB"
    assert "recovered_60db" not in columns and "predicted_share" not in columns


def test_defense_table_measures_leakage_and_accuracy_loss_against_the_undefended_run() -> None:
    def point(index: int, defense: str, strength: float | None, accuracy: float) -> PointRecord:
        return point_record(index, {}, defense=defense, strength=strength, final_accuracy=accuracy)

    def attack(index: int, psnr: float) -> AttackRecord:
        return attack_record("idlg", [psnr, psnr], point=index, mean_ssim=0.5)

    records = [
        point(0, "none", None, 0.90), attack(0, 60.0),
        point(1, "gaussian-noise", 0.01, 0.88), attack(1, 40.0),
        point(2, "gaussian-noise", 0.1, 0.70), attack(2, 12.0),
        PrivacyRecord(epsilon=3.5, delta=1e-5, client=0, mean_epsilon=3.0, point=2),
    ]  # fmt: skip
    rows = defense_table(records)
    assert [r["curve"] for r in rows] == ["none", "gaussian-noise", "gaussian-noise"]
    assert [r["accuracy_loss"] for r in rows] == pytest.approx([0.0, 0.02, 0.20])
    assert [r["leaked_fraction"] for r in rows] == [1.0, 1.0, 0.0]
    assert rows[2]["epsilon"] == 3.5 and rows[1]["epsilon"] is None
    assert is_evaluation(records)


def test_a_degraded_point_is_named_with_its_reason_in_summary_and_page(tmp_path: Path) -> None:
    reason = "Degraded: client 2 failed 2 of the 3 updates it was asked for"
    records: list[Record] = [
        point_record(0, {}),
        point_record(1, {}, status="degraded", failed_updates=2, error=reason),
    ]
    summary = markdown_summary(tmp_path, records, [])
    assert f"- point 1 (degraded): {reason}" in summary.split("## Errors")[1]
    page = render_html(tmp_path, records, [])
    assert "Points that failed or are degraded (1)" in page and "(degraded)" in page
    assert "point 0 (" not in summary.split("## Errors")[1]
