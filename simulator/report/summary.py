"""Tables and figures rendered from a run's records, so a report is redrawn without rerunning."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from simulator.report import evaluation, figures
from simulator.run.folder import attack_artifact, read_records

Record = dict[str, Any]
SUMMARY_FILE = "summary.md"
FIGURES_DIR = "figures"


def format_value(value: Any) -> str:
    """A table cell: short floats, and defense lists as ``name(param=value)+...``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and all(isinstance(v, dict) and "name" in v for v in value):
        return "+".join(f"{d['name']}({_params(d)})" for d in value) or "none"
    return "" if value is None else str(value)


def _params(defense: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in defense.items() if k != "name")


def _params(defense: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in defense.items() if k != "name")


def markdown_table(rows: list[Record], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def point_table(records: list[Record]) -> tuple[list[Record], list[str]]:
    """One row per sweep point: swept values, status, accuracy, failures, time."""
    rows = [r for r in records if r.get("kind") == "point"]
    swept = sorted({k for r in rows for k in r if k.startswith("set:")})
    columns = [
        "point",
        *swept,
        "status",
        "rounds_completed",
        "final_accuracy",
        "failed_updates",
        "seconds",
    ]
    return rows, columns


def write_report(run_dir: Path | str) -> Path:
    """Write ``summary.md`` and ``figures/*.png`` for a run folder; returns the summary path."""
    run_dir = Path(run_dir)
    records = list(read_records(run_dir))
    rows, columns = point_table(records)
    failures = [r for r in records if r.get("kind") == "failure"]
    rounds = [r for r in records if r.get("kind") == "round"]
    parts = [f"# Run {run_dir.name}", "", "## Points", "", markdown_table(rows, columns)]
    parts += [
        "",
        "## Rounds",
        "",
        markdown_table(
            rounds, ["point", "round", "test_accuracy", "test_loss", "failures", "seconds"]
        ),
    ]
    if failures:
        parts += ["", f"## Failed client updates ({len(failures)})", ""]
        parts += [markdown_table(failures, ["point", "round", "client", "reason"])]
    if any(r.get("status") == "failed" for r in rows):
        parts += ["", "## Errors", ""] + [
            f"- point {r['point']}: {r.get('error')}" for r in rows if r.get("error")
        ]
    attacks = [r for r in records if r.get("kind") == "attack"]
    attack_rows, attack_columns = attack_table(records)
    if any(r.get("matching") == "training" for r in attacks):
        parts += ["", "## Network inversion (generated samples against the training data)", ""]
        parts += [markdown_table(*inversion_table(records))]
    if attacks:
        parts += ["", "## Attacks (per point, mean over attacked updates)", ""]
        parts += [markdown_table(attack_rows, attack_columns)]
    if evaluation.is_evaluation(records):
        parts += ["", "## Defense evaluation", ""]
        parts += [markdown_table(evaluation.defense_table(records), list(evaluation.COLUMNS))]
    attack_errors = [r for r in records if r.get("kind") == "attack_error"]
    if attack_errors:
        parts += ["", f"## Attack errors ({len(attack_errors)})", ""]
        parts += [markdown_table(attack_errors, ["point", "round", "attack", "error"])]
    summary = run_dir / SUMMARY_FILE
    summary.write_text("\n".join(parts) + "\n")
    figures_dir = run_dir / FIGURES_DIR
    if rounds:
        figures.accuracy_figure(rounds, rows, figures_dir / "accuracy.png")
    if evaluation.is_evaluation(records):
        evaluation.write_figures(run_dir, records, figures_dir)
    inversions = [r for r in attacks if r.get("matching") == "training"]
    attacks = [r for r in attacks if r.get("matching") != "training"]
    if inversions:
        inversion_rows, _ = inversion_table(records)
        figures.inversion_comparison_figure(
            inversion_rows, figures_dir / "inversion-comparison.png"
        )
        _inversion_figures(run_dir, inversions, figures_dir)
    if attacks:
        figures.convergence_figure(attacks, rows, figures_dir / "convergence.png")
        _reconstruction_figures(run_dir, attacks, figures_dir)
        swept = [c for c in attack_columns if c.startswith("set:")]
        scalar = all(
            isinstance(row.get(c), int | float | str) for row in attack_rows for c in swept
        )
        if len(swept) == 1 and len(attack_rows) > 1 and scalar:
            metrics = ["success_rate", "mean_psnr", "median_iterations_to_threshold"]
            figures.by_value_figure(
                attack_rows, swept[0], metrics, figures_dir / "attack-by-value.png"
            )
    return summary


ATTACK_COLUMNS = (
    "attacked", "success_rate", "leaked_fraction", "mean_psnr", "median_psnr", "mean_ssim",
    "label_accuracy", "median_iterations_to_threshold", "median_seconds_to_threshold",
    "mean_seconds",
)  # fmt: skip


def attack_table(records: list[Record]) -> tuple[list[Record], list[str]]:
    """Per sweep point: how often and how well the attack recovered the clients' images.

    ``success_rate`` is the fraction of attacked updates whose every image leaked (PSNR at or
    above the threshold); ``leaked_fraction`` the fraction of all images that leaked.
    """
    points = {r["point"]: r for r in records if r.get("kind") == "point"}
    attacks = [r for r in records if r.get("kind") == "attack"]
    rows = []
    for point in sorted({r["point"] for r in attacks}):
        mine = [r for r in attacks if r["point"] == point]
        reached = [
            r["iterations_to_threshold"] for r in mine if r["iterations_to_threshold"] is not None
        ]
        seconds = [
            r["seconds_to_threshold"] for r in mine if r.get("seconds_to_threshold") is not None
        ]
        labels = [r["label_accuracy"] for r in mine if r.get("label_accuracy") is not None]
        rows.append(
            {
                "point": point,
                **{k: v for k, v in points.get(point, {}).items() if k.startswith("set:")},
                "attacked": len(mine),
                "success_rate": float(np.mean([r["fraction_leaked"] == 1.0 for r in mine])),
                "leaked_fraction": float(np.mean([r["fraction_leaked"] for r in mine])),
                "mean_psnr": float(np.mean([r["mean_psnr"] for r in mine])),
                "median_psnr": float(np.median([p for r in mine for p in r["psnr"]])),
                "mean_ssim": float(np.mean([r["mean_ssim"] for r in mine])),
                "label_accuracy": float(np.mean(labels)) if labels else None,
                "median_iterations_to_threshold": float(np.median(reached)) if reached else None,
                "median_seconds_to_threshold": float(np.median(seconds)) if seconds else None,
                "mean_seconds": float(np.mean([r["seconds"] for r in mine])),
            }
        )
    swept = sorted({k for row in rows for k in row if k.startswith("set:")})
    columns = ["point", *swept, *ATTACK_COLUMNS]
    return rows, columns


INVERSION_COLUMNS = (
    "final_accuracy", "mean_nn_ssim", "top_k_nn_ssim", "max_nn_ssim", "images_above",
    "generated", "noise_nn_ssim", "confidence", "diversity", "mean_seconds",
)  # fmt: skip


def inversion_table(records: list[Record]) -> tuple[list[Record], list[str]]:
    """Per sweep point: how training-like the inverted samples are (mean over attacked rounds).

    NN-SSIM is each sample's SSIM with its nearest training image of the same class;
    ``images_above`` counts samples at or above the run's SSIM threshold; ``noise_nn_ssim`` is
    the same score for uniform noise, the floor.
    """
    points = {r["point"]: r for r in records if r.get("kind") == "point"}
    attacks = [r for r in records if r.get("kind") == "attack" and r.get("matching") == "training"]
    rows = []
    for point in sorted({r["point"] for r in attacks}):
        mine = [r for r in attacks if r["point"] == point]
        summary = points.get(point, {})

        def mean(key: str, mine: list[Record] = mine) -> float | None:
            values = [r[key] for r in mine if isinstance(r.get(key), int | float)]
            return float(np.mean(values)) if values else None

        rows.append(
            {
                "point": point,
                **{k: v for k, v in summary.items() if k.startswith("set:")},
                "final_accuracy": summary.get("final_accuracy"),
                "mean_nn_ssim": mean("mean_ssim"),
                "top_k_nn_ssim": mean("top_k_ssim"),
                "max_nn_ssim": mean("max_ssim"),
                "images_above": mean("images_leaked"),
                "generated": mean("batch_size"),
                "noise_nn_ssim": mean("noise_ssim"),
                "confidence": mean("confidence"),
                "diversity": mean("diversity"),
                "mean_seconds": mean("seconds"),
            }
        )
    swept = sorted({k for row in rows for k in row if k.startswith("set:")})
    return rows, ["point", *swept, *INVERSION_COLUMNS]


def _inversion_figures(run_dir: Path, inversions: list[Record], figures_dir: Path) -> None:
    """Per inverted model: generated samples per class above their nearest training images."""
    for record in inversions:
        path = attack_artifact(run_dir, record)
        if not path.is_file():
            continue
        with np.load(path) as arrays:
            figures.inversion_figure(
                arrays["reconstruction"],
                arrays["truth"],
                arrays["labels"],
                record["ssim"],
                figures_dir / f"inversion-p{record['point']}-r{record['round']}.png",
            )


def _reconstruction_figures(run_dir: Path, attacks: list[Record], figures_dir: Path) -> None:
    """One figure per (point, round): every attacked client's truth above its reconstruction."""
    groups: dict[tuple[int, int], list[Record]] = defaultdict(list)
    for record in attacks:
        groups[(record["point"], record["round"])].append(record)
    for (point, round_), group in sorted(groups.items()):
        pairs = []
        for record in sorted(group, key=lambda r: r["client"]):
            path = attack_artifact(run_dir, record)
            if path.is_file():
                with np.load(path) as arrays:
                    title = f"client {record['client']}: mean PSNR {record['mean_psnr']:.1f} dB"
                    if record.get("matching") == "nearest":
                        title = (
                            f"client {record['client']}: best matches by SSIM, "
                            f"{record['images_leaked']}/{record['batch_size']} at or above "
                            f"{record['leak_threshold_ssim']}"
                        )
                    pairs.append((title, arrays["truth"], arrays["reconstruction"]))
        if pairs:
            figures.reconstruction_figure(
                pairs, figures_dir / f"reconstructions-p{point}-r{round_}.png"
            )
