"""Figures drawn from a run's records and artifacts (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

Record = dict[str, Any]


def point_labels(points: Sequence[Record]) -> dict[int, str]:
    """A legend label per sweep point from its swept values."""
    return {
        r["point"]: ", ".join(f"{k[4:]}={v}" for k, v in r.items() if k.startswith("set:")) or "run"
        for r in points
    }


def accuracy_figure(rounds: Sequence[Record], points: Sequence[Record], path: Path) -> None:
    """Global test accuracy against round, one line per sweep point."""
    labels = point_labels(points)
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for record in rounds:
        curves[record["point"]].append((record["round"], record["test_accuracy"]))
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for point, curve in sorted(curves.items()):
        xs, ys = zip(*sorted(curve), strict=True)
        axis.plot(xs, ys, marker="o", label=labels.get(point, f"point {point}"))
    axis.set(xlabel="round", ylabel="global test accuracy")
    axis.grid(alpha=0.3)
    if len(curves) > 1:
        axis.legend(fontsize=7)
    save(figure, path)


def show(axis: Any, image: np.ndarray) -> None:
    """Draw one (C, H, W) image in [0, 1]: grey for one channel, colour for three."""
    if image.shape[0] == 3:
        axis.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
    else:
        axis.imshow(image[0], cmap="gray", vmin=0, vmax=1)


def reconstruction_figure(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """For each attacked client: its true images (top row) above the reconstructions (bottom)."""
    columns = max(truth.shape[0] for _, truth, _ in pairs)
    columns = min(columns, 16)
    figure, axes = plt.subplots(
        2 * len(pairs), columns, figsize=(columns * 0.9, len(pairs) * 2.0), squeeze=False
    )
    for block, (title, truth, reconstruction) in enumerate(pairs):
        for column in range(columns):
            for row, images in enumerate((truth, reconstruction)):
                axis = axes[2 * block + row, column]
                axis.axis("off")
                if column < images.shape[0]:
                    show(axis, images[column])
        # Out of the layout: tight_layout would shrink every column to fit a long title.
        first = axes[2 * block, 0]
        label = first.text(0, 1.08, title, fontsize=7, transform=first.transAxes, va="bottom")
        label.set_in_layout(False)
    save(figure, path)


def convergence_figure(attacks: Sequence[Record], points: Sequence[Record], path: Path) -> None:
    """Gradient distance and PSNR against iteration, one line per attacked update."""
    labels = point_labels(points)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    colours = plt.get_cmap("viridis")
    point_ids = sorted({r["point"] for r in attacks})
    seen: set[int] = set()
    for record in attacks:
        colour = colours(point_ids.index(record["point"]) / max(1, len(point_ids) - 1))
        label = None if record["point"] in seen else labels.get(record["point"])
        seen.add(record["point"])
        trace = [t for t in record.get("trace") or [] if t.get("gradient_distance") is not None]
        if trace:
            left.plot(
                [t["iteration"] for t in trace],
                [max(t["gradient_distance"], 1e-12) for t in trace],
                color=colour,
                alpha=0.6,
                label=label,
            )
        curve = record.get("psnr_curve") or []
        if curve:
            right.plot(*zip(*curve, strict=True), color=colour, alpha=0.6)
    left.set(xlabel="iteration", ylabel="gradient distance", yscale="log")
    right.set(xlabel="iteration", ylabel="PSNR (dB)")
    thresholds = {r["leak_threshold_db"] for r in attacks if "leak_threshold_db" in r}
    for threshold in thresholds:
        right.axhline(threshold, color="red", lw=0.8, ls="--")
    if len(point_ids) > 1:
        left.legend(fontsize=7)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    save(figure, path)


def by_value_figure(rows: Sequence[Record], key: str, metrics: Sequence[str], path: Path) -> None:
    """Attack metrics against one swept key (e.g. the batch size), one panel per metric."""
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.0), squeeze=False)
    xs = [row[key] for row in rows]
    for axis, metric in zip(axes[0], metrics, strict=True):
        axis.plot(xs, [np.nan if row.get(metric) is None else row[metric] for row in rows], "o-")
        axis.set(xlabel=key.removeprefix("set:"), ylabel=metric)
        if all(isinstance(x, int | float) and x > 0 for x in xs):
            axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
    save(figure, path)


def save(figure: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def privacy_utility_figure(rows: Sequence[Record], path: Path) -> None:
    """Leakage (mean PSNR) against global accuracy, one curve per defense, labelled by strength."""
    figure, axis = plt.subplots(figsize=(5.4, 3.8))
    for curve, members in _curves(rows).items():
        members = [
            m for m in members if m["mean_psnr"] is not None and m["final_accuracy"] is not None
        ]
        if not members:
            continue
        xs = [m["final_accuracy"] for m in members]
        ys = [m["mean_psnr"] for m in members]
        axis.plot(xs, ys, "o-", label=curve)
        for m, x, y in zip(members, xs, ys, strict=True):
            if m["strength"] is not None:
                axis.annotate(
                    f"{m['strength']:g}"
                    if isinstance(m["strength"], float)
                    else str(m["strength"]),
                    (x, y),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    axis.set(xlabel="global test accuracy (utility)", ylabel="mean PSNR of reconstructions (dB)")
    axis.axhline(30, color="red", lw=0.7, ls="--")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    save(figure, path)


def leakage_by_strength_figure(rows: Sequence[Record], path: Path) -> None:
    """Per defense: mean PSNR and leaked fraction against its strength."""
    curves = {c: m for c, m in _curves(rows).items() if any(r["strength"] is not None for r in m)}
    if not curves:
        return
    figure, axes = plt.subplots(2, len(curves), figsize=(3.2 * len(curves), 5.0), squeeze=False)
    for column, (curve, members) in enumerate(curves.items()):
        members = [m for m in members if m["strength"] is not None]
        xs = [m["strength"] for m in members]
        numeric = all(isinstance(x, int | float) and x > 0 for x in xs)
        for row, metric in enumerate(("mean_psnr", "leaked_fraction")):
            axis = axes[row, column]
            ys = [np.nan if m[metric] is None else m[metric] for m in members]
            axis.plot(xs if numeric else [str(x) for x in xs], ys, "o-")
            axis.set(xlabel=f"{curve} strength", ylabel=metric)
            if numeric and max(xs) / max(min(xs), 1e-12) > 20:
                axis.set_xscale("log")
            axis.grid(alpha=0.3)
    save(figure, path)


def strength_grid_figure(
    grids: Sequence[tuple[str, np.ndarray, Sequence[tuple[str, np.ndarray]]]],
    path: Path,
    images: int = 4,
) -> None:
    """Per defense: the true images, then the reconstructions at increasing strengths."""
    rows = sum(1 + len(columns) for _, _, columns in grids)
    figure, axes = plt.subplots(rows, images, figsize=(images * 1.0, rows * 1.05), squeeze=False)
    row = 0
    for curve, truth, columns in grids:
        for label, stack in [("truth", truth), *columns]:
            for column in range(images):
                axis = axes[row, column]
                axis.set_xticks([])
                axis.set_yticks([])
                if column < stack.shape[0]:
                    show(axis, stack[column])
            axes[row, 0].set_ylabel(f"{curve}\n{label}" if label == "truth" else label, fontsize=6)
            row += 1
    save(figure, path)


def strength_order(strength: Any) -> tuple[int, float, str]:
    """Sort key: numbers numerically, then anything else by text, missing strengths last."""
    if isinstance(strength, int | float) and not isinstance(strength, bool):
        return (0, float(strength), "")
    return (1 if strength is not None else 2, 0.0, str(strength))


def _curves(rows: Sequence[Record]) -> dict[str, list[Record]]:
    curves: dict[str, list[Record]] = defaultdict(list)
    baseline = [r for r in rows if r["curve"] == "none"]
    for record in rows:
        if record["curve"] != "none":
            curves[record["curve"]].append(record)
    for members in curves.values():
        members.sort(key=lambda r: strength_order(r["strength"]))
        members[:0] = baseline[:1]  # every curve starts from the undefended run
    return dict(curves)


def inversion_figure(
    generated: np.ndarray,
    nearest: np.ndarray,
    labels: np.ndarray,
    ssim: Sequence[float],
    path: Path,
    per_class: int = 4,
) -> None:
    """One column per class: generated samples, each above its nearest training image.

    The ``per_class`` samples of highest NN-SSIM are shown, best first, with their SSIM.
    """
    classes = sorted(set(labels.tolist()))
    scores = np.asarray(ssim, dtype=float)
    figure, axes = plt.subplots(
        2 * per_class, len(classes), figsize=(len(classes) * 0.9, per_class * 1.9), squeeze=False
    )
    for column, cls in enumerate(classes):
        mine = np.flatnonzero(labels == cls)
        mine = mine[np.argsort(-np.nan_to_num(scores[mine], nan=-1.0))][:per_class]
        axes[0, column].set_title(str(cls), fontsize=8)
        for row in range(per_class):
            for offset, stack in enumerate((generated, nearest)):
                axis = axes[2 * row + offset, column]
                axis.set_xticks([])
                axis.set_yticks([])
                if row < len(mine):
                    show(axis, stack[mine[row]])
                    if offset == 1:
                        axis.set_xlabel(f"{scores[mine[row]]:.2f}", fontsize=6, labelpad=1)
        for row in range(per_class):
            axes[2 * row, 0].set_ylabel("generated", fontsize=6)
            axes[2 * row + 1, 0].set_ylabel("nearest", fontsize=6)
    save(figure, path)


def inversion_comparison_figure(rows: Sequence[Record], path: Path) -> None:
    """Mean and top-k NN-SSIM of the inverted samples per sweep point, noise as the floor."""
    names = [
        ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r.items() if k.startswith("set:"))
        or "run"
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
    axis.set(ylabel="NN-SSIM")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7)
    save(figure, path)
