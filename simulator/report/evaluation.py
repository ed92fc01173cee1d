"""The defense evaluation: leakage against utility (and epsilon) for every defended point.

Drawn from a run's records by ``leaksim report`` whenever the points differ in their defenses
or in a swept protocol setting (batch size, local epochs): a summary table, the
privacy-utility plot, leakage against strength per defense, and reconstruction grids.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from simulator.report import figures
from simulator.report.figures import strength_order
from simulator.run.folder import attack_artifact

Record = dict[str, Any]

COLUMNS = (
    "point", "curve", "strength", "epsilon", "attacked", "mean_psnr", "median_psnr", "mean_ssim",
    "leaked_fraction", "label_accuracy", "final_accuracy", "accuracy_loss",
)  # fmt: skip


def _curve_and_strength(point: Record) -> tuple[str, Any]:
    """The curve a point belongs to (its defenses, or the swept protocol key) and its strength."""
    if point.get("defense", "none") != "none":
        return point["defense"], point.get("strength")
    swept = {k[4:]: v for k, v in point.items() if k.startswith("set:") and k != "set:defenses"}
    if len(swept) == 1:
        ((key, value),) = swept.items()
        return key.rsplit(".", 1)[-1], value
    return "none", None


def defense_table(records: list[Record]) -> list[Record]:
    """One row per point: its defense curve and strength, leakage, accuracy, epsilon."""
    points = [r for r in records if r.get("kind") == "point"]
    attacks: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        if record.get("kind") == "attack":
            attacks[record["point"]].append(record)
    privacy = {r["point"]: r for r in records if r.get("kind") == "privacy"}
    baseline = next((p for p in points if p.get("defense", "none") == "none"), None)
    base_accuracy = baseline.get("final_accuracy") if baseline else None
    rows = []
    for point in points:
        curve, strength = _curve_and_strength(point)
        mine = attacks.get(point["point"], [])
        psnrs = [p for r in mine for p in r["psnr"]]
        labels = [r["label_accuracy"] for r in mine if r.get("label_accuracy") is not None]
        accuracy = point.get("final_accuracy")
        rows.append(
            {
                "point": point["point"],
                "curve": curve,
                "strength": strength,
                "epsilon": privacy.get(point["point"], {}).get("epsilon"),
                "attacked": len(mine),
                "mean_psnr": float(np.mean(psnrs)) if psnrs else None,
                "median_psnr": float(np.median(psnrs)) if psnrs else None,
                "mean_ssim": float(np.mean([r["mean_ssim"] for r in mine])) if mine else None,
                "leaked_fraction": float(np.mean([r["fraction_leaked"] for r in mine]))
                if mine
                else None,
                "label_accuracy": float(np.mean(labels)) if labels else None,
                "final_accuracy": accuracy,
                "accuracy_loss": None
                if accuracy is None or base_accuracy is None
                else base_accuracy - accuracy,
            }
        )
    return rows


def is_evaluation(records: list[Record]) -> bool:
    """Whether a run compares defended points (worth the evaluation section and figures)."""
    rows = defense_table(records)
    return (
        len(rows) > 1
        and any(r["curve"] != "none" for r in rows)
        and any(r["attacked"] for r in rows)
    )


def write_figures(run_dir: Path, records: list[Record], figures_dir: Path) -> None:
    """The privacy-utility plot, leakage against strength, and side-by-side grids."""
    rows = defense_table(records)
    figures.privacy_utility_figure(rows, figures_dir / "privacy-utility.png")
    figures.leakage_by_strength_figure(rows, figures_dir / "leakage-by-strength.png")
    grids = _strength_grids(run_dir, records, rows)
    if grids:
        figures.strength_grid_figure(grids, figures_dir / "reconstructions-by-strength.png")


def _strength_grids(
    run_dir: Path, records: list[Record], rows: list[Record], per_curve: int = 4
) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """Per curve: the first attacked client's truth and its reconstructions at a few strengths."""
    first_attack: dict[int, Record] = {}
    for record in records:
        if record.get("kind") == "attack":
            first_attack.setdefault(record["point"], record)
    by_curve: dict[str, list[Record]] = defaultdict(list)
    for row in rows:
        if row["point"] in first_attack:
            by_curve[row["curve"]].append(row)
    grids = []
    for curve, members in sorted(by_curve.items()):
        members = sorted(members, key=lambda r: strength_order(r["strength"]))
        picks = [
            members[int(i)] for i in np.linspace(0, len(members) - 1, min(per_curve, len(members)))
        ]
        truth, columns = None, []
        for row in picks:
            path = attack_artifact(run_dir, first_attack[row["point"]])
            if not path.is_file():
                continue
            with np.load(path) as arrays:
                truth = arrays["truth"] if truth is None else truth
                columns.append((f"{row['strength']}", arrays["reconstruction"]))
        if truth is not None and columns:
            grids.append((curve, truth, columns))
    return grids
