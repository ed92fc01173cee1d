"""Tables when each update is attacked by several attacks (attack.also) and their "best"."""

from __future__ import annotations

from simulator.core.records import (
    AttackRecord,
    LeakageRecord,
    ManipulationRecord,
    Record,
    RoundRecord,
)
from simulator.report.evaluation import defense_table
from simulator.report.html import table as html_table
from simulator.report.tables import (
    attack_table,
    inversion_table,
    manipulation_table,
    markdown_table,
    terminal_tables,
)
from tests.unit.report.synthetic_run import attack_record, best_record, point_record


def _attack(point: int, name: str, psnr: float) -> LeakageRecord:
    if name == "best":
        return best_record([psnr], point=point, mean_ssim=0.5, seconds=1.0)
    return attack_record(name, [psnr], point=point, mean_ssim=0.5, seconds=1.0)


RECORDS: list[Record] = [
    point_record(0, {"defenses": []}),
    point_record(1, {"defenses": [{"name": "pruning", "fraction": 0.5}]}),
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
    (title, headings, cells), *_ = [
        t for t in terminal_tables(RECORDS) if t[0].startswith("attacks")
    ]
    assert title == "attacks (leaked: PSNR >= 30 dB)"  # the best's bar is its attacks' bar
    assert [h for h, _ in headings][:3] == ["point", "defenses", "attack"]
    assert cells[-1][:3] == ["1", "pruning 0.5", "best"]


def test_the_defense_evaluation_scores_the_strongest_attack_per_image() -> None:
    rows = defense_table(RECORDS)
    assert [(r["curve"], r["attacked"], r["mean_psnr"]) for r in rows] == [
        ("none", 1, 60.0), ("pruning", 1, 25.0),
    ]  # fmt: skip
    assert rows[1]["parameter"] == "fraction"


def test_a_single_attack_has_no_attack_column() -> None:
    single = [
        r
        for r in RECORDS
        if not isinstance(r, LeakageRecord)
        or (isinstance(r, AttackRecord) and r.attack == "analytic")
    ]
    _, columns = attack_table(single)
    assert "attack" not in columns


def test_manipulated_rounds_show_whom_and_the_accuracy_around_them() -> None:
    records = [
        RoundRecord(1, 0.50, 2.0, point=0),
        RoundRecord(2, 0.62, 1.5, point=0),
        ManipulationRecord(2, 3, "imprint", "imprint block", False, point=0),
        ManipulationRecord(2, 5, "imprint", "imprint block", False, point=0),
    ]
    (row,) = manipulation_table(records)
    assert row["clients"] == "3, 5" and row["aggregated"] is False
    assert (row["accuracy_before"], row["accuracy_after"]) == (0.50, 0.62)


def test_an_active_attack_table_gives_the_exact_share_beside_its_bound() -> None:
    """imprint states a bound (alone in a bin); its rows show the 60 dB share beside it, in
    summary.md, report.html and the terminal."""
    records: list[Record] = [
        point_record(0, {}),
        *(
            attack_record(
                "imprint", [100.0, 100.0, 20.0, 100.0], point=0, client=client,
                recovered_60db=share, recovered_30db=share, predicted_share=0.9,
            )
            for client, share in ((0, 0.75), (1, 1.0))
        ),
    ]  # fmt: skip
    rows, columns = attack_table(records)
    assert columns[-2:] == ["recovered_60db", "predicted_share"]
    assert (rows[0]["recovered_60db"], rows[0]["predicted_share"]) == (0.875, 0.9)
    markdown = markdown_table(rows, columns)
    assert "| recovered_60db | predicted_share |" in markdown and "| 0.875 | 0.9 |" in markdown
    page = html_table(rows, columns)
    assert "<th>recovered_60db</th><th>predicted_share</th>" in page
    ((title, headings, cells),) = [t for t in terminal_tables(records) if t[0] != "points"]
    assert title == "attacks (leaked: PSNR >= 30 dB)"
    names = [h for h, _ in headings]
    assert names[-2:] == ["at 60 dB", "bound"] and "labels" not in names  # no labels recovered
    assert cells[0][-2:] == ["87.5%", "90.0%"]


def test_every_attack_table_states_its_leak_threshold() -> None:
    """One bar: in the terminal table's title; different bars: in a column. summary.md and
    report.html always have the column."""
    records: list[Record] = [
        point_record(0, {"attack.leak_threshold_db": 20.0}),
        point_record(1, {"attack.leak_threshold_db": 40.0}),
        attack_record("idlg", [30.0], point=0, leak_threshold_db=20.0),
        attack_record("idlg", [30.0], point=1, leak_threshold_db=40.0),
        attack_record("kkt", [30.0], point=1, matching="nearest", leak_threshold_ssim=0.5),
    ]
    rows, columns = attack_table(records)
    assert "leak_threshold" in columns
    assert [r["leak_threshold"] for r in rows] == [
        "PSNR >= 20 dB", "PSNR >= 40 dB", "SSIM >= 0.5",
    ]  # fmt: skip
    assert "PSNR >= 20 dB" in markdown_table(rows, columns)
    assert "SSIM &gt;= 0.5" in html_table(rows, columns)
    ((title, headings, cells),) = [t for t in terminal_tables(records) if t[0] != "points"]
    assert title == "attacks" and "leak at" in [h for h, _ in headings]
    assert [row[[h for h, _ in headings].index("leak at")] for row in cells] == [
        "PSNR >= 20 dB", "PSNR >= 40 dB", "SSIM >= 0.5",
    ]  # fmt: skip
    (inverted,) = inversion_table(
        [attack_record("inversion", [10.0], point=0, matching="training")]
    )[0]
    assert inverted["leak_threshold"] == "SSIM >= 0.4" and inverted["generated"] == 1
