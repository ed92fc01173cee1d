"""Run folders written before the records named their format still give their report.

The ``*-old`` fixtures are real run folders written by the code before format 2 (see
``tests/fixtures/runs/README.md``); the ``*-new`` ones are the same runs written today.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from simulator.core.records import (
    FIRST_FORMAT,
    FORMAT_VERSION,
    AttackRecord,
    BestRecord,
    StartupRecord,
    of_kind,
    read,
)
from simulator.report.summary import write_report
from simulator.report.tables import attack_table, terminal_tables
from simulator.run.folder import read_records

RUNS = Path(__file__).resolve().parents[2] / "fixtures" / "runs"
# Wall-clock figures differ between any two runs.
TIMINGS = {"mean_seconds", "median_seconds_to_threshold"}


def copied(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(RUNS / name, tmp_path / name))


def read_quietly(run_dir: Path) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no line of an old folder may be skipped
        return list(read_records(run_dir))


def without_timings(rows: list) -> list:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_an_old_run_folder_reads_as_todays_records(tmp_path: Path) -> None:
    old = read_quietly(RUNS / "also-small-old")
    ((startup,),) = [of_kind(old, StartupRecord)]
    assert startup.format == FIRST_FORMAT
    assert of_kind(read_quietly(RUNS / "also-small-new"), StartupRecord)[0].format == FORMAT_VERSION
    attacks = of_kind(old, AttackRecord)
    assert [r.attack for r in attacks] == ["analytic", "analytic", "idlg", "idlg"]
    assert all(r.true_images == 2 and r.generated is None for r in attacks)
    assert all(r.objective == "gradient-distance" and r.matching == "hungarian" for r in attacks)
    assert all("batch_size" not in r.to_dict() for r in attacks)
    best = of_kind(old, BestRecord)
    assert [b.attacks for b in best] == [["analytic", "idlg"]] * 2
    assert all(b.true_images == 2 and b.kind == "best" for b in best)


def test_an_old_run_folder_gives_the_report_the_same_run_gives_today(tmp_path: Path) -> None:
    old, new = copied("also-small-old", tmp_path), copied("also-small-new", tmp_path)
    summary = write_report(old).read_text()
    assert (old / "report.html").is_file() and (old / "figures" / "convergence.png").is_file()
    old_rows, old_columns = attack_table(read_quietly(old))
    new_rows, new_columns = attack_table(read_quietly(new))
    assert old_columns == new_columns and "leak_threshold" in old_columns
    assert without_timings(old_rows) == without_timings(new_rows)
    assert [r["attack"] for r in old_rows] == ["analytic", "idlg", "best"]
    assert all(r["leak_threshold"] == "PSNR >= 30 dB" for r in old_rows)
    assert "| best |" in summary and "PSNR >= 30 dB" in summary
    old_titles = [title for title, _, _ in terminal_tables(read_quietly(old))]
    assert old_titles == ["points", "attacks (leaked: PSNR >= 30 dB)"]


def test_an_old_active_attack_folder_keeps_its_bound_and_exact_share(tmp_path: Path) -> None:
    old = copied("imprint-small-old", tmp_path)
    summary = write_report(old).read_text()
    attacks = of_kind(read_quietly(old), AttackRecord)
    assert all(r.objective == "none" and r.trace == [{"iteration": 0}] for r in attacks)
    assert all(r.recovered_60db == 1.0 and r.predicted_share is not None for r in attacks)
    rows, columns = attack_table(read_quietly(old))
    assert columns[-2:] == ["recovered_60db", "predicted_share"]
    assert rows[0]["predicted_share"] == pytest.approx((1 - 1 / 64) ** 7)
    assert "| recovered_60db | predicted_share |" in summary
    new_rows, _ = attack_table(read_quietly(RUNS / "imprint-small-new"))
    assert without_timings(rows) == without_timings(new_rows)


@pytest.mark.parametrize(
    ("attack", "matching", "objective", "key"),
    [
        ("kkt", "nearest", "kkt-stationarity", "kkt_stationarity"),
        ("inversion", "training", "generator-loss", "generator_loss"),
        ("subspace", "hungarian", "span-residual", "span_residual"),
        ("my-plugin", "hungarian", "gradient-distance", "gradient_distance"),
    ],
)
def test_the_old_gradient_distance_key_is_read_as_the_objective_it_held(
    attack: str, matching: str, objective: str, key: str
) -> None:
    """Format 1 wrote every attack's objective as "gradient_distance"; the built-in attacks
    that minimised something else are read as what they minimised."""
    line = json.loads((RUNS / "also-small-old" / "results.jsonl").read_text().splitlines()[4])
    assert line["attack"] == "analytic" and "batch_size" in line  # an old attack record
    line |= {"attack": attack, "trace": [{"iteration": 0, "gradient_distance": 0.5}]}
    if matching != "hungarian":
        line["matching"] = matching
    record = read(line)
    assert isinstance(record, AttackRecord)
    assert (record.objective, record.trace) == (objective, [{"iteration": 0, key: 0.5}])
    counted = record.generated if matching == "training" else record.true_images
    assert counted == line["batch_size"]
