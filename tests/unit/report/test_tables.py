"""Tables when each update is attacked by several attacks (attack.also) and their "best"."""

from __future__ import annotations

from simulator.report.evaluation import defense_table
from simulator.report.tables import attack_table, terminal_tables


def _attack(point: int, name: str, psnr: float) -> dict:
    return {
        "kind": "attack", "point": point, "round": 1, "client": 0, "attack": name,
        "fraction_leaked": float(psnr >= 30), "mean_psnr": psnr, "psnr": [psnr],
        "mean_ssim": 0.5, "seconds": 1.0,
    }  # fmt: skip


RECORDS = [
    {"kind": "point", "point": 0, "set:defenses": [], "defense": "none", "strength": None,
     "status": "ok", "final_accuracy": 0.9},
    {"kind": "point", "point": 1, "set:defenses": [{"name": "pruning", "fraction": 0.5}],
     "defense": "pruning", "strength": 0.5, "status": "ok", "final_accuracy": 0.8},
    _attack(0, "idlg", 20.0), _attack(0, "analytic", 60.0), _attack(0, "best", 60.0),
    _attack(1, "idlg", 12.0), _attack(1, "analytic", 25.0), _attack(1, "best", 25.0),
]  # fmt: skip


def test_one_attack_row_per_point_and_attack_the_best_last() -> None:
    rows, columns = attack_table(RECORDS)
    assert columns[:3] == ["point", "set:defenses", "attack"]
    assert [(r["point"], r["attack"], r["mean_psnr"]) for r in rows] == [
        (0, "analytic", 60.0), (0, "idlg", 20.0), (0, "best", 60.0),
        (1, "analytic", 25.0), (1, "idlg", 12.0), (1, "best", 25.0),
    ]  # fmt: skip
    (_, headings, cells), *_ = [t for t in terminal_tables(RECORDS) if t[0] == "attacks"]
    assert [h for h, _ in headings][:3] == ["point", "defenses", "attack"]
    assert cells[-1][:3] == ["1", "pruning 0.5", "best"]


def test_the_defense_evaluation_scores_the_strongest_attack_per_image() -> None:
    rows = defense_table(RECORDS)
    assert [(r["curve"], r["attacked"], r["mean_psnr"]) for r in rows] == [
        ("none", 1, 60.0), ("pruning", 1, 25.0),
    ]  # fmt: skip
    assert rows[1]["parameter"] == "fraction"


def test_a_single_attack_has_no_attack_column() -> None:
    single = [r for r in RECORDS if r.get("attack") in (None, "analytic")]
    _, columns = attack_table(single)
    assert "attack" not in columns


def test_manipulated_rounds_show_whom_and_the_accuracy_around_them() -> None:
    from simulator.report.tables import manipulation_table

    records = [
        {"kind": "round", "point": 0, "round": 1, "test_accuracy": 0.50},
        {"kind": "round", "point": 0, "round": 2, "test_accuracy": 0.62},
        {"kind": "manipulation", "point": 0, "round": 2, "client": 3, "attack": "imprint",
         "change": "imprint block", "aggregated": False},
        {"kind": "manipulation", "point": 0, "round": 2, "client": 5, "attack": "imprint",
         "change": "imprint block", "aggregated": False},
    ]  # fmt: skip
    (row,) = manipulation_table(records)
    assert row["clients"] == "3, 5" and row["aggregated"] is False
    assert (row["accuracy_before"], row["accuracy_after"]) == (0.50, 0.62)
