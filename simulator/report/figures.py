"""Figures drawn from a run's records and artifacts (matplotlib, headless).

Axes are named in words with units (:data:`METRICS`); a figure, or a panel of one, is drawn
only where it has data, so each drawing function returns the path it wrote, or None. Files
are written atomically (:func:`save`).
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from simulator.core.objectives import objective_key
from simulator.core.records import AttackRecord, PointRecord, RoundRecord
from simulator.report.tables import Row
from simulator.run.folder import write_atomic


@dataclass(frozen=True)
class FigureFile:
    """A figure the report wrote: which section of report.html shows it, and its caption."""

    section: str
    caption: str
    path: Path


# Record keys as axis names: (words with units, factor from the record's value to the axis).
METRICS: dict[str, tuple[str, float]] = {
    "mean_psnr": ("mean PSNR (dB)", 1.0),
    "median_psnr": ("median PSNR (dB)", 1.0),
    "mean_ssim": ("mean SSIM", 1.0),
    "leaked_fraction": ("images leaked (%)", 100.0),
    "success_rate": ("updates fully leaked (%)", 100.0),
    "label_accuracy": ("labels recovered (%)", 100.0),
    "median_iterations_to_threshold": ("iterations to leak (median)", 1.0),
    "final_accuracy": ("final test accuracy (%)", 100.0),
    "test_accuracy": ("test accuracy (%)", 100.0),
}
BASELINE = "no defense"
# What each attack objective is, in words, for the axis it is plotted on.
OBJECTIVE_WORDS = {
    "gradient-distance": "gradient distance",
    "kkt-stationarity": "KKT stationarity loss",
    "generator-loss": "generator loss",
    "span-residual": "energy outside the span",
}


def metric_values(rows: Sequence[Row], metric: str) -> list[float]:
    """A metric of every row on its axis scale, NaN where missing."""
    factor = METRICS[metric][1]
    return [
        np.nan if not isinstance(row.get(metric), int | float) else factor * row[metric]
        for row in rows
    ]


def key_words(key: str) -> str:
    """A swept key in words: ``federation.batch_size`` reads ``batch size``."""
    return key.removeprefix("set:").rsplit(".", 1)[-1].replace("_", " ")


def value_words(key: str, value: Any) -> str:
    """A swept value in words: defense lists as ``pruning fraction=0.5``, none as no defense."""
    if key.endswith("defenses") and isinstance(value, list):
        parts = [
            " ".join(
                [str(d.get("name")), *(f"{k}={number(v)}" for k, v in d.items() if k != "name")]
            )
            for d in value
            if isinstance(d, dict)
        ]
        return " + ".join(parts) or BASELINE
    return f"{key_words(key)}={number(value)}"


def number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def point_labels(points: Sequence[PointRecord]) -> dict[int, str]:
    """A legend label per sweep point from its swept values."""
    return {
        r.point: ", ".join(value_words(k, v) for k, v in r.swept.items()) or "run" for r in points
    }


def save(figure: Figure, path: Path) -> Path:
    """Lay out, render to PNG and write ``path`` atomically; closes the figure."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return write_atomic(path, buffer.getvalue())


def accuracy_figure(
    rounds: Sequence[RoundRecord], points: Sequence[PointRecord], path: Path
) -> Path | None:
    """Global test accuracy against round, one line per sweep point (no defense in black)."""
    labels = point_labels(points)
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for record in rounds:
        if isinstance(record.test_accuracy, int | float):
            curves[record.point or 0].append((record.round, 100 * record.test_accuracy))
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(7.2 if len(curves) > 1 else 5.0, 3.4))
    for point, curve in sorted(curves.items()):
        xs, ys = zip(*sorted(curve), strict=True)
        label = labels.get(point, f"point {point}")
        style = {"color": "black", "lw": 2.0, "zorder": 3} if label == BASELINE else {}
        axis.plot(xs, ys, marker="o", markersize=3, label=label, **style)
    axis.set(xlabel="round", ylabel=METRICS["test_accuracy"][0])
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.grid(alpha=0.3)
    if len(curves) > 1:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save(figure, path)


def show(axis: Axes, image: np.ndarray) -> None:
    """Draw one (C, H, W) image in [0, 1]: grey for one channel, colour for three."""
    if image.shape[0] == 3:
        axis.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
    else:
        axis.imshow(image[0], cmap="gray", vmin=0, vmax=1)


def bare(axis: Axes) -> None:
    """No ticks and no frame, but (unlike ``axis("off")``) the axis labels still show."""
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(False)


def reconstruction_figure(
    pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: Path,
    names: tuple[str, str] = ("truth", "recon."),
) -> Path | None:
    """For each attacked client: a title row, its true images above the reconstructions."""
    if not pairs:
        return None
    columns = min(max(truth.shape[0] for _, truth, _ in pairs), 16)
    figure, axes = plt.subplots(
        3 * len(pairs),
        columns,
        figsize=(max(3.4, 0.6 + columns * 0.9), len(pairs) * 2.15),
        squeeze=False,
        gridspec_kw={"height_ratios": [0.2, 1.0, 1.0] * len(pairs)},
    )
    for block, (title, truth, reconstruction) in enumerate(pairs):
        for axis in axes[3 * block]:
            axis.set_axis_off()
        # Out of the layout: tight_layout would shrink every column to fit a long title.
        heading = axes[3 * block, 0]
        label = heading.text(0, 0, title, fontsize=7, transform=heading.transAxes, va="bottom")
        label.set_in_layout(False)
        for row, images in enumerate((truth, reconstruction), start=1):
            for column in range(columns):
                axis = axes[3 * block + row, column]
                bare(axis)
                if column < images.shape[0]:
                    show(axis, images[column])
            axes[3 * block + row, 0].set_ylabel(names[row - 1], fontsize=7)
    return save(figure, path)


def objective_trace(record: AttackRecord) -> list[tuple[float, float]]:
    """(iteration, objective value) of an attack record's trace, where the value is known."""
    key = objective_key(record.objective)
    return [(row["iteration"], row[key]) for row in record.trace if row.get(key) is not None]


def convergence_figure(
    attacks: Sequence[AttackRecord], points: Sequence[PointRecord], path: Path
) -> Path | None:
    """Each attack's objective (one panel per objective, named on its axis) and PSNR against
    iteration, one line per attacked update.

    A panel is drawn only when some update has at least two points on it (a one-shot attack
    such as the analytic one has none), and the figure only when a panel is.
    """
    traces = {id(r): objective_trace(r) for r in attacks}
    objectives = [
        o
        for o in OBJECTIVE_WORDS
        if any(r.objective == o and len(traces[id(r)]) > 1 for r in attacks)
    ]
    has_curve = any(len(r.psnr_curve) > 1 for r in attacks)
    panels = [*objectives, *(["psnr"] if has_curve else [])]
    if not panels:
        return None
    labels = point_labels(points)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    axis_of = dict(zip(panels, axes[0], strict=True))
    colours = plt.get_cmap("viridis")
    point_ids = sorted({r.point or 0 for r in attacks})
    seen: set[tuple[int, str]] = set()
    for record in attacks:
        point = record.point or 0
        colour = colours(point_ids.index(point) / max(1, len(point_ids) - 1))
        label = None if (point, record.objective) in seen else labels.get(point)
        trace = traces[id(record)]
        if record.objective in axis_of and len(trace) > 1:
            seen.add((point, record.objective))
            axis_of[record.objective].plot(
                [iteration for iteration, _ in trace],
                [max(value, 1e-12) for _, value in trace],
                color=colour,
                alpha=0.6,
                label=label,
            )
        curve = record.psnr_curve
        if "psnr" in axis_of and len(curve) > 1:
            axis_of["psnr"].plot(*zip(*curve, strict=True), color=colour, alpha=0.6)
    for objective in objectives:
        axis_of[objective].set(
            xlabel="attack iteration",
            ylabel=f"{OBJECTIVE_WORDS[objective]} (log scale)",
            yscale="log",
        )
        if len(point_ids) > 1:
            axis_of[objective].legend(fontsize=7)
    if "psnr" in axis_of:
        axis_of["psnr"].set(xlabel="attack iteration", ylabel="mean PSNR (dB)")
        for threshold in sorted(
            {r.leak_threshold_db for r in attacks if r.leak_threshold_db is not None}
        ):
            axis_of["psnr"].axhline(threshold, color="red", lw=0.8, ls="--")
            axis_of["psnr"].annotate(
                f"leak threshold ({threshold:g} dB)",
                (0.01, threshold),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="red",
                va="bottom",
            )
    for axis in axis_of.values():
        axis.grid(alpha=0.3)
    return save(figure, path)


def by_value_figure(
    rows: Sequence[Row], key: str, metrics: Sequence[str], path: Path
) -> Path | None:
    """Attack metrics against one swept key (e.g. the batch size), one panel per metric.

    Metrics with no value at any point (iterations to leak, for a one-shot attack) get no panel.
    """
    metrics = [m for m in metrics if any(np.isfinite(metric_values(rows, m)))]
    if not metrics:
        return None
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.0), squeeze=False)
    xs = [row[key] for row in rows]
    for axis, metric in zip(axes[0], metrics, strict=True):
        axis.plot(xs, metric_values(rows, metric), "o-")
        axis.set(xlabel=key_words(key), ylabel=METRICS[metric][0])
        if all(isinstance(x, int | float) and x > 0 for x in xs):
            axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
    return save(figure, path)


def inversion_figure(
    generated: np.ndarray,
    nearest: np.ndarray,
    labels: np.ndarray,
    ssim: Sequence[float],
    path: Path,
    per_class: int = 4,
) -> Path | None:
    """One column per class: generated samples, each above its nearest training image.

    The ``per_class`` samples of highest NN-SSIM are shown, best first, with their SSIM.
    """
    classes = sorted(set(labels.tolist()))
    if not classes:
        return None
    scores = np.asarray(ssim, dtype=float)
    per_class = min(per_class, max(int((labels == c).sum()) for c in classes))
    figure, axes = plt.subplots(
        2 * per_class, len(classes), figsize=(len(classes) * 0.9, per_class * 1.9), squeeze=False
    )
    for column, cls in enumerate(classes):
        mine = np.flatnonzero(labels == cls)
        mine = mine[np.argsort(-np.nan_to_num(scores[mine], nan=-1.0))][:per_class]
        axes[0, column].set_title(f"class {cls}", fontsize=7)
        for row in range(per_class):
            for offset, stack in enumerate((generated, nearest)):
                axis = axes[2 * row + offset, column]
                bare(axis)
                if row < len(mine):
                    show(axis, stack[mine[row]])
                    if offset == 1:
                        axis.set_xlabel(f"SSIM {scores[mine[row]]:.2f}", fontsize=6, labelpad=1)
        for row in range(per_class):
            axes[2 * row, 0].set_ylabel("generated", fontsize=6)
            axes[2 * row + 1, 0].set_ylabel("nearest", fontsize=6)
    return save(figure, path)


def inversion_comparison_figure(rows: Sequence[Row], path: Path) -> Path | None:
    """Mean and top-k NN-SSIM of the inverted samples per sweep point, noise as the floor."""
    if not rows:
        return None
    names = [
        ", ".join(value_words(k, v) for k, v in r.items() if k.startswith("set:")) or "run"
        for r in rows
    ]
    positions = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 1.5), 4.0))
    for offset, (key, name) in enumerate(
        [("mean_nn_ssim", "mean NN-SSIM"), ("top_k_nn_ssim", "top-k NN-SSIM")]
    ):
        values = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
        axis.bar(positions + (offset - 0.5) * 0.38, values, width=0.38, label=name)
    floor = [r.get("noise_nn_ssim") if r.get("noise_nn_ssim") is not None else np.nan for r in rows]
    axis.scatter(positions, floor, color="black", marker="_", s=200, label="noise", zorder=3)
    axis.set_xticks(positions, names, rotation=30, ha="right", fontsize=7)
    axis.set(ylabel="SSIM with the nearest training image")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7)
    return save(figure, path)
