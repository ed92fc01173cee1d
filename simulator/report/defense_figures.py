"""The defense evaluation's figures: leakage against utility and against each defense's
strength, and reconstructions side by side by strength.

Every plot shows the undefended run (the baseline); strength labels never overlap
(:func:`place_labels`); a figure is drawn only where it has data (else None is returned).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

from simulator.report import figures
from simulator.report.figures import (
    BASELINE,
    METRICS,
    bare,
    key_words,
    metric_values,
    number,
    plt,
    show,
)
from simulator.report.tables import Row


def strength_order(strength: Any) -> tuple[int, float, str]:
    """Sort key: numbers numerically, then anything else by text, missing strengths last."""
    if isinstance(strength, int | float) and not isinstance(strength, bool):
        return (0, float(strength), "")
    return (1 if strength is not None else 2, 0.0, str(strength))


def strength_words(row: Row) -> str:
    """A point's strength as ``std=0.01`` (the defense's parameter) or ``batch size=4``."""
    if row["curve"] == "none":
        return BASELINE
    if row.get("strength") is None:
        return row["curve"]
    parameter = row.get("parameter")
    words = parameter.replace("_", " ") if parameter else key_words(row["curve"])
    return f"{words}={number(row['strength'])}"


def _curves(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Defended points grouped by curve, each sorted by strength (the baseline not included)."""
    curves: dict[str, list[Row]] = defaultdict(list)
    for record in rows:
        if record["curve"] != "none":
            curves[record["curve"]].append(record)
    for members in curves.values():
        members.sort(key=lambda r: strength_order(r["strength"]))
    return dict(curves)


def _baseline(rows: Sequence[Row]) -> Row | None:
    return next((r for r in rows if r["curve"] == "none"), None)


def privacy_utility_figure(
    rows: Sequence[Row], path: Path, threshold_db: float | None = None
) -> Path | None:
    """Leakage (mean PSNR) against final accuracy: one curve per defense from the undefended
    run (a black star), each point labelled by its strength where the labels do not collide."""
    baseline = _baseline(rows)
    base = None
    if baseline and None not in (baseline["mean_psnr"], baseline["final_accuracy"]):
        base = (100 * baseline["final_accuracy"], baseline["mean_psnr"])
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    labels: list[tuple[float, float, str, Any]] = []
    drawn = False
    for curve, members in _curves(rows).items():
        members = [m for m in members if None not in (m["mean_psnr"], m["final_accuracy"])]
        if not members:
            continue
        xs = [100 * m["final_accuracy"] for m in members]
        ys = [m["mean_psnr"] for m in members]
        (line,) = axis.plot(
            ([base[0]] if base else []) + xs,
            ([base[1]] if base else []) + ys,
            "o-",
            label=key_words(curve),
        )
        drawn = True
        merged: dict[tuple[float, float], list[str]] = defaultdict(list)
        for member, x, y in zip(members, xs, ys, strict=True):
            if member["strength"] is not None:
                merged[(round(x, 6), round(y, 6))].append(number(member["strength"]))
        labels += [(x, y, ", ".join(text), line.get_color()) for (x, y), text in merged.items()]
    if not drawn and base is None:
        plt.close(figure)
        return None
    if base:
        axis.plot(*base, "*", color="black", markersize=12, label=BASELINE, zorder=4)
    if threshold_db is not None:
        axis.axhline(
            threshold_db,
            color="red",
            lw=0.7,
            ls="--",
            label=f"leak threshold ({threshold_db:g} dB)",
        )
    axis.set(xlabel=METRICS["final_accuracy"][0], ylabel="mean PSNR of reconstructions (dB)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    place_labels(figure, axis, labels)
    return figures.save(figure, path)


# Where a label may go relative to its point, in points: right-above first, then around.
_OFFSETS = ((4, 3, "left", "bottom"), (4, -3, "left", "top"), (-4, 3, "right", "bottom"),
            (-4, -3, "right", "top"), (0, 7, "center", "bottom"), (0, -7, "center", "top"),
            (10, 0, "left", "center"), (-10, 0, "right", "center"))  # fmt: skip


def place_labels(
    figure: Figure, axis: Axes, labels: Sequence[tuple[float, float, str, Any]]
) -> list[Annotation]:
    """Annotate points so that no two labels overlap: each label takes the first free spot
    around its point inside the axes; a label with no free spot is left out (the value is in
    the tables). Returns the labels drawn."""
    figure.tight_layout()  # the final layout: labels are kept out of it below
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    inside = axis.get_window_extent(renderer)
    taken: list[Bbox] = []
    drawn = []
    for x, y, text, colour in labels:
        for dx, dy, ha, va in _OFFSETS:
            label = axis.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=6,
                color=colour,
                ha=ha,
                va=va,
            )
            label.set_in_layout(False)
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            fits = inside.containsx(box.x0) and inside.containsx(box.x1)
            fits = fits and inside.containsy(box.y0) and inside.containsy(box.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                drawn.append(label)
                break
            label.remove()
    return drawn


def leakage_by_strength_figure(rows: Sequence[Row], path: Path) -> Path | None:
    """Per defense with numeric strengths: mean PSNR and images leaked against its strength,
    the undefended run as a dashed black line on every panel."""
    curves = {
        curve: [m for m in members if isinstance(m["strength"], int | float)]
        for curve, members in _curves(rows).items()
    }
    curves = {c: m for c, m in curves.items() if m}
    metrics = [m for m in ("mean_psnr", "leaked_fraction") if any(r[m] is not None for r in rows)]
    if not curves or not metrics:
        return None
    baseline = _baseline(rows)
    figure, axes = plt.subplots(
        len(metrics),
        len(curves),
        figsize=(3.3 * len(curves), 2.6 * len(metrics)),
        squeeze=False,
        sharey="row",
    )
    for column, (curve, members) in enumerate(curves.items()):
        xs = [m["strength"] for m in members]
        parameter = members[0].get("parameter")
        for row, metric in enumerate(metrics):
            axis = axes[row, column]
            axis.plot(xs, metric_values(members, metric), "o-")
            if baseline is not None and baseline[metric] is not None:
                axis.axhline(
                    metric_values([baseline], metric)[0],
                    color="black",
                    lw=1.0,
                    ls="--",
                    label=BASELINE,
                )
            axis.set(
                xlabel=f"{curve}: {parameter.replace('_', ' ')}" if parameter else key_words(curve),
                ylabel=METRICS[metric][0] if column == 0 else "",
            )
            if all(x > 0 for x in xs) and max(xs) / min(xs) > 20:
                axis.set_xscale("log")
            axis.grid(alpha=0.3)
    if baseline is not None:
        axes[0, 0].legend(fontsize=7, loc="best")
    return figures.save(figure, path)


def strength_grid_figure(
    grids: Sequence[tuple[str, np.ndarray, Sequence[tuple[str, np.ndarray]]]],
    path: Path,
    images: int = 4,
) -> Path | None:
    """Per defense, a block of rows: the true images in the first column, then the
    reconstructions at increasing strengths, one column each (titled with the strength).

    Only as many image rows as the batch holds (one for batch 1), and no empty columns beyond
    the widest block.
    """
    grids = [g for g in grids if g[2]]
    if not grids:
        return None
    shown = [min(images, truth.shape[0]) for _, truth, _ in grids]
    width = 1 + max(len(columns) for _, _, columns in grids)
    rows = sum(shown)
    figure, axes = plt.subplots(
        rows, width, figsize=(0.8 + width * 1.0, 0.3 * len(grids) + rows * 1.0), squeeze=False
    )
    row = 0
    for (curve, truth, columns), count in zip(grids, shown, strict=True):
        stacks = [("truth", truth), *columns]
        for image in range(count):
            for column in range(width):
                axis = axes[row + image, column]
                bare(axis)
                if column >= len(stacks):
                    axis.set_visible(False)
                    continue
                label, stack = stacks[column]
                if image < stack.shape[0]:
                    show(axis, stack[image])
                if image == 0:
                    axis.set_title(label, fontsize=6)
        axes[row, 0].set_ylabel(key_words(curve), fontsize=7)
        row += count
    return figures.save(figure, path)
