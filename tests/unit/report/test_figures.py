"""Figures read as a paper's: axes in words with units, the baseline on every defense plot,
labels that do not overlap, and nothing drawn where there is no data."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from simulator.core.objectives import objective_key
from simulator.core.records import AttackRecord
from simulator.report import defense_figures, evaluation, figures
from simulator.run.folder import read_records
from tests.unit.report.synthetic_run import attack_record, build_run, point_record

RECORD_KEY = re.compile(r"\b[a-z]+_[a-z_]+\b")  # mean_psnr, leaked_fraction, final_accuracy


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Figure]]:
    """Figures by file name, kept open instead of saved."""
    kept: dict[str, Figure] = {}

    def keep(figure: Figure, path: Path) -> Path:
        figure.tight_layout()
        kept[path.name] = figure
        return path

    monkeypatch.setattr(figures, "save", keep)
    yield kept
    for figure in kept.values():
        plt.close(figure)


def _labels(figure: Figure) -> list[str]:
    return [t for a in figure.axes for t in (a.get_xlabel(), a.get_ylabel()) if t]


def _legend(axis: Any) -> list[str]:
    return [line.get_label() for line in axis.get_lines()]


def test_defense_plots_name_axes_in_words_and_draw_the_baseline(
    tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    run_dir = build_run(tmp_path)
    written = evaluation.write_figures(run_dir, list(read_records(run_dir)), tmp_path / "f")
    assert [f.path.name for f in written] == list(drawn) == [
        "privacy-utility.png", "leakage-by-strength.png", "reconstructions-by-strength.png",
        "privacy-utility-frontier.png",
    ]  # fmt: skip
    frontier = drawn["privacy-utility-frontier.png"].axes[0]
    assert frontier.get_xlabel() == "final test accuracy (%)"
    entries = [text.get_text() for text in frontier.get_legend().get_texts()]
    assert "frontier" in entries and "no defense" in entries
    utility, leakage = drawn["privacy-utility.png"], drawn["leakage-by-strength.png"]
    labels = _labels(utility) + _labels(leakage)
    assert not [t for t in labels if RECORD_KEY.search(t)], labels
    assert "final test accuracy (%)" in labels and "mean PSNR (dB)" in labels
    assert "images leaked (%)" in labels and "gaussian-noise: std" in labels
    assert "no defense" in _legend(utility.axes[0])
    assert "leak threshold (30 dB)" in _legend(utility.axes[0])
    for axis in leakage.axes:
        assert "no defense" in _legend(axis), axis.get_xlabel()


def test_strength_labels_on_the_privacy_utility_plot_do_not_overlap(
    tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    """Ten strengths crowded at nearly the same accuracy and leakage."""
    rows = [{"curve": "none", "strength": None, "mean_psnr": 60.0, "final_accuracy": 0.9}]
    rows += [
        {"curve": "noise", "strength": s, "parameter": "std", "mean_psnr": 40 - 0.1 * i,
         "final_accuracy": 0.85 - 0.001 * i}
        for i, s in enumerate([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    ]  # fmt: skip
    defense_figures.privacy_utility_figure(rows, tmp_path / "pu.png", threshold_db=30)
    figure = drawn["pu.png"]
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    texts = [t for t in figure.axes[0].texts if t.get_visible()]
    assert len(texts) >= 3
    boxes = [t.get_window_extent(renderer) for t in texts]
    inside = figure.axes[0].get_window_extent(renderer)
    for first, second in itertools.combinations(boxes, 2):
        assert not first.overlaps(second)
    assert all(inside.contains(b.x0, b.y0) and inside.contains(b.x1, b.y1) for b in boxes)


def test_identical_points_share_one_label(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    rows = [
        {"curve": "none", "strength": None, "mean_psnr": 100.0, "final_accuracy": 0.5},
        {"curve": "pruning", "strength": 0.01, "mean_psnr": 100.0, "final_accuracy": 0.5},
        {"curve": "pruning", "strength": 0.1, "mean_psnr": 100.0, "final_accuracy": 0.5},
    ]
    defense_figures.privacy_utility_figure(rows, tmp_path / "pu.png")
    assert [t.get_text() for t in drawn["pu.png"].axes[0].texts] == ["0.01, 0.1"]


def _attack(trace: int, curve: int, objective: str = "gradient-distance") -> AttackRecord:
    key = objective_key(objective)
    return attack_record(
        "idlg", point=0, objective=objective,
        trace=[{"iteration": i, key: 1.0 / (i + 1)} for i in range(trace)],
        psnr_curve=[(i, 10.0 + i) for i in range(curve)],
    )  # fmt: skip


def test_the_convergence_figure_is_drawn_only_with_iterations(
    tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    points = [point_record(0, {})]
    one_shot = [_attack(trace=1, curve=0)]  # the analytic attack: one distance, no snapshots
    assert figures.convergence_figure(one_shot, points, tmp_path / "a.png") is None
    assert drawn == {} and not (tmp_path / "a.png").exists()
    figures.convergence_figure([_attack(trace=5, curve=0)], points, tmp_path / "b.png")
    (panel,) = drawn["b.png"].axes
    assert panel.get_ylabel() == "gradient distance (log scale)"
    figures.convergence_figure([_attack(trace=5, curve=4)], points, tmp_path / "c.png")
    assert [a.get_ylabel() for a in drawn["c.png"].axes][1] == "mean PSNR (dB)"


def test_the_convergence_axis_names_what_each_attack_minimised(
    tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    """KKT's stationarity loss is not a gradient distance: each objective gets its own panel,
    labelled from the record's objective; a closed form (objective "none") gets none."""
    attacks = [
        _attack(trace=5, curve=0),
        _attack(trace=5, curve=0, objective="kkt-stationarity"),
        attack_record("imprint", point=0, objective="none", trace=[{"iteration": 0}] * 3),
    ]
    figures.convergence_figure(attacks, [point_record(0, {})], tmp_path / "k.png")
    assert [a.get_ylabel() for a in drawn["k.png"].axes] == [
        "gradient distance (log scale)", "KKT stationarity loss (log scale)",
    ]  # fmt: skip
    assert [len(a.get_lines()) for a in drawn["k.png"].axes] == [1, 1]


def test_by_value_panels_only_for_metrics_with_data(
    tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    rows = [
        {"set:federation.batch_size": b, "leaked_fraction": 1 / b, "mean_psnr": 40.0 / b,
         "median_iterations_to_threshold": None}
        for b in (1, 4, 16)
    ]  # fmt: skip
    metrics = ["leaked_fraction", "mean_psnr", "median_iterations_to_threshold"]
    figures.by_value_figure(rows, "set:federation.batch_size", metrics, tmp_path / "v.png")
    axes = drawn["v.png"].axes
    assert [a.get_ylabel() for a in axes] == ["images leaked (%)", "mean PSNR (dB)"]
    assert {a.get_xlabel() for a in axes} == {"batch size"}
    assert list(axes[0].get_lines()[0].get_ydata()) == pytest.approx([100, 25, 6.25])
    nothing = [{**r, "leaked_fraction": None, "mean_psnr": None} for r in rows]
    assert figures.by_value_figure(nothing, "set:federation.batch_size", metrics, tmp_path) is None


def test_batch_one_grid_has_one_row_per_defense_and_no_empty_column(
    tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    run_dir = build_run(tmp_path, scenario="dlg-defenses-fedsgd", points=10, batch=1)
    records = list(read_records(run_dir))
    grids = evaluation._strength_grids(run_dir, records, evaluation.defense_table(records))
    assert [(curve, truth.shape[0]) for curve, truth, _ in grids] == [
        ("gaussian-noise", 1), ("pruning", 1),
    ]  # fmt: skip
    assert [label for label, _ in grids[0][2]] == [
        "no defense", "std=0.01", "std=0.0316", "std=0.1", "std=0.316",
    ]  # fmt: skip
    defense_figures.strength_grid_figure(grids, tmp_path / "g.png")
    axes = drawn["g.png"].axes
    shown = [a for a in axes if a.get_visible()]
    assert len(axes) == 2 * 6 and all(a.images for a in shown)
    titles = {a.get_title() for a in shown}
    assert "None" not in titles and {"truth", "no defense", "fraction=0.9"} <= titles
