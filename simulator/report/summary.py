"""Tables and figures rendered from a run's records, so a report is redrawn without rerunning.

:func:`write_report` writes ``summary.md``, ``figures/*.png`` and ``report.html`` (the same
content on one self-contained page), each atomically.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simulator.core.records import (
    AttackErrorRecord,
    AttackRecord,
    BestRecord,
    FailureRecord,
    PointRecord,
    Record,
    RoundRecord,
    of_kind,
)
from simulator.report import evaluation, figures, html
from simulator.report.figures import FigureFile
from simulator.report.tables import (
    ATTACK_ERROR_COLUMNS,
    FAILURE_COLUMNS,
    MANIPULATION_COLUMNS,
    ROUND_COLUMNS,
    attack_table,
    format_value,
    inversion_table,
    manipulation_table,
    markdown_table,
    point_table,
    rows_of,
)
from simulator.run.folder import attack_artifact, read_records, write_atomic

__all__ = ["attack_table", "format_value", "inversion_table", "point_table", "write_report"]

SUMMARY_FILE = "summary.md"
FIGURES_DIR = "figures"
# The figures a report draws; those of an earlier report not drawn this time are removed.
FIGURE_PATTERNS = (
    "accuracy.png", "convergence.png", "reconstructions-*.png", "attack-by-value.png",
    "inversion-*.png", "privacy-utility.png", "leakage-by-strength.png",
)  # fmt: skip


def write_report(run_dir: Path | str) -> Path:
    """Write ``summary.md``, ``figures/*.png`` and ``report.html``; returns the summary path."""
    run_dir = Path(run_dir)
    records = list(read_records(run_dir))
    drawn = write_figures(run_dir, records)
    summary = write_atomic(run_dir / SUMMARY_FILE, markdown_summary(run_dir, records, drawn))
    html.write_html(run_dir, records, drawn)
    return summary


def markdown_summary(run_dir: Path, records: Sequence[Record], drawn: Sequence[FigureFile]) -> str:
    """``summary.md``: every table of the run, then links to its figures."""
    rows, columns = point_table(records)
    points = of_kind(records, PointRecord)
    failures = rows_of(of_kind(records, FailureRecord))
    rounds = rows_of(of_kind(records, RoundRecord))
    parts = [f"# Run {run_dir.name}", "", "## Points", "", markdown_table(rows, columns)]
    parts += ["", "## Rounds", "", markdown_table(rounds, ROUND_COLUMNS)]
    if failures:
        parts += ["", f"## Failed client updates ({len(failures)})", ""]
        parts += [markdown_table(failures, FAILURE_COLUMNS)]
    if any(p.status != "ok" for p in points):  # failed, or degraded by failed updates
        parts += ["", "## Errors", ""] + [
            f"- point {p.point} ({p.status}): {p.error}" for p in points if p.error
        ]
    attacks = of_kind(records, AttackRecord)
    if any(r.matching == "training" for r in attacks):
        parts += ["", "## Network inversion (generated samples against the training data)", ""]
        parts += [markdown_table(*inversion_table(records))]
    if attacks:
        parts += ["", "## Attacks (per point, mean over attacked updates)", ""]
        parts += [markdown_table(*attack_table(records))]
    if evaluation.is_evaluation(records):
        parts += ["", "## Defense evaluation", ""]
        parts += [markdown_table(evaluation.defense_table(records), list(evaluation.COLUMNS))]
        parts += ["", "### Settings over seeds (mean, spread, on the frontier)", ""]
        parts += [markdown_table(evaluation.settings_table(records), evaluation.SETTING_COLUMNS)]
        parts += ["", "### Leakage by attacked round (mean, spread over seeds)", ""]
        parts += [markdown_table(evaluation.rounds_table(records), evaluation.ROUND_COLUMNS)]
        parts += ["", "### Cheapest setting that keeps leakage under a bound", ""]
        parts += [markdown_table(evaluation.cheapest_table(records), evaluation.CHEAPEST_COLUMNS)]
    manipulated = manipulation_table(records)
    if manipulated:
        parts += ["", "## Manipulated models (the server's active attack)", ""]
        parts += [markdown_table(manipulated, MANIPULATION_COLUMNS)]
    attack_errors = rows_of(of_kind(records, AttackErrorRecord))
    if attack_errors:
        parts += ["", f"## Attack errors ({len(attack_errors)})", ""]
        parts += [markdown_table(attack_errors, ATTACK_ERROR_COLUMNS)]
    if drawn:
        parts += ["", "## Figures", ""]
        parts += [f"- [{f.path.name}]({f.path.relative_to(run_dir).as_posix()})" for f in drawn]
    parts += ["", f"The whole report on one page: [{html.HTML_FILE}]({html.HTML_FILE})"]
    return "\n".join(parts) + "\n"


def write_figures(run_dir: Path, records: Sequence[Record]) -> list[FigureFile]:
    """Draw every figure the records have data for; returns them with their report sections."""
    figures_dir = run_dir / FIGURES_DIR
    points = of_kind(records, PointRecord)
    rounds = of_kind(records, RoundRecord)
    attacks = of_kind(records, AttackRecord)
    inversions = [r for r in attacks if r.matching == "training"]
    attacks = [r for r in attacks if r.matching != "training"]
    drawn: list[tuple[str, Path | None, str]] = [
        (
            "accuracy",
            figures.accuracy_figure(rounds, points, figures_dir / "accuracy.png"),
            "Global test accuracy after each round (round 0: the initial model).",
        )
    ]
    if inversions:
        drawn.append(
            (
                "attacks",
                figures.inversion_comparison_figure(
                    inversion_table(records)[0], figures_dir / "inversion-comparison.png"
                ),
                "How training-like the inverted samples are, per point; noise is the floor.",
            )
        )
        drawn += _inversion_figures(run_dir, inversions, figures_dir)
    if attacks:
        attack_rows, attack_columns = attack_table(records)
        if "attack" in attack_columns:  # several attacks: plot the strongest, per image
            best = [row for row in attack_rows if row["attack"] == BestRecord.kind]
            attack_rows = best or [r for r in attack_rows if r["attack"] == attacks[0].attack]
        swept = [c for c in attack_columns if c.startswith("set:")]
        scalar = all(
            isinstance(row.get(c), int | float | str) for row in attack_rows for c in swept
        )
        if len(swept) == 1 and len(attack_rows) > 1 and scalar:
            metrics = ["leaked_fraction", "success_rate", "mean_psnr"]
            metrics.append("median_iterations_to_threshold")
            path = figures.by_value_figure(
                attack_rows, swept[0], metrics, figures_dir / "attack-by-value.png"
            )
            drawn.append(
                ("attacks", path, f"Attack outcome against {figures.key_words(swept[0])}.")
            )
        drawn.append(
            (
                "attacks",
                figures.convergence_figure(attacks, points, figures_dir / "convergence.png"),
                "Convergence of the iterative attacks: the objective each minimised (gradient "
                "distance, KKT stationarity, ...) and PSNR by iteration.",
            )
        )
        drawn += _reconstruction_figures(run_dir, attacks, figures_dir, points)
    written = [FigureFile(section, caption, path) for section, path, caption in drawn if path]
    if evaluation.is_evaluation(records):
        written += evaluation.write_figures(run_dir, records, figures_dir)
    _remove_stale(figures_dir, {f.path for f in written})
    return written


def _remove_stale(figures_dir: Path, keep: set[Path]) -> None:
    """Delete figures an earlier report drew that this one did not (they have no data now)."""
    for pattern in FIGURE_PATTERNS:
        for path in figures_dir.glob(pattern):
            if path not in keep:
                path.unlink(missing_ok=True)


def _inversion_figures(
    run_dir: Path, inversions: Sequence[AttackRecord], figures_dir: Path
) -> list[tuple[str, Path | None, str]]:
    """Per inverted model: generated samples per class above their nearest training images."""
    drawn = []
    for record in inversions:
        path = attack_artifact(run_dir, record)
        if not path.is_file():
            continue
        with np.load(path) as arrays:
            written = figures.inversion_figure(
                arrays["reconstruction"],
                arrays["truth"],
                arrays["labels"],
                record.ssim,
                figures_dir / f"inversion-p{record.point}-r{record.round}.png",
            )
        caption = (
            f"Point {record.point}, round {record.round}: generated samples per class, "
            "each above its nearest training image (SSIM below)."
        )
        drawn.append(("attacks", written, caption))
    return drawn


def _reconstruction_figures(
    run_dir: Path,
    attacks: Sequence[AttackRecord],
    figures_dir: Path,
    points: Sequence[PointRecord],
) -> list[tuple[str, Path | None, str]]:
    """One figure per (point, round): every attacked client's truth above its reconstruction."""
    labels = figures.point_labels(points)
    groups: dict[tuple[int, int], list[AttackRecord]] = defaultdict(list)
    seen: set[tuple[int, int, int]] = set()
    for record in attacks:  # the first attack of each update: the one whose images are kept
        update = (record.point or 0, record.round, record.client)
        if update not in seen:
            seen.add(update)
            groups[(record.point or 0, record.round)].append(record)
    drawn = []
    for (point, round_), group in sorted(groups.items()):
        pairs = []
        nearest = False
        for record in sorted(group, key=lambda r: r.client):
            path = attack_artifact(run_dir, record)
            if not path.is_file():
                continue
            with np.load(path) as arrays:
                title = f"client {record.client}: mean PSNR {record.mean_psnr:.1f} dB"
                if record.matching == "nearest":
                    nearest = True
                    title = (
                        f"client {record.client}: best matches by SSIM, "
                        f"{record.extra.get('images_leaked')}/{record.true_images} at or above "
                        f"{record.leak_threshold_ssim}"
                    )
                pairs.append((title, arrays["truth"], arrays["reconstruction"]))
        names = ("truth", "best match") if nearest else ("truth", "recon.")
        written = figures.reconstruction_figure(
            pairs, figures_dir / f"reconstructions-p{point}-r{round_}.png", names
        )
        where = (
            f"Point {point} ({labels[point]}), round"
            if labels.get(point, "run") != "run"
            else "Round"
        )
        below = "their best-matching candidates" if nearest else "the reconstructions"
        caption = f"{where} {round_}: each attacked client's true images above {below}."
        drawn.append(("attacks", written, caption))
    return drawn
