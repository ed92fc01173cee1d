"""The report's tables, computed from a run's records alone: points, attacks, inversions.

Every table is ``(rows, columns)``: dict rows keyed by record keys, and the columns to show in
order. ``summary.md`` and ``report.html`` show every column; the terminal shows
:data:`TERMINAL_COLUMNS`, the key ones, so that a table fits 80 columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Record = dict[str, Any]


def format_value(value: Any) -> str:
    """A table cell: short floats, and defense lists as ``name(param=value)+...``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and all(isinstance(v, dict) and "name" in v for v in value):
        return "+".join(f"{d['name']}({_params(d)})" for d in value) or "none"
    return "" if value is None else str(value)


def _params(defense: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in defense.items() if k != "name")


def column_name(column: str) -> str:
    """A column's heading: a swept key without its ``set:`` prefix and section."""
    return column.removeprefix("set:").rsplit(".", 1)[-1] if column.startswith("set:") else column


def markdown_table(rows: list[Record], columns: list[str]) -> str:
    lines = ["| " + " | ".join(column_name(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def swept_columns(rows: list[Record]) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith("set:")})


def point_table(records: list[Record]) -> tuple[list[Record], list[str]]:
    """One row per sweep point: swept values, status, accuracy, failures, time."""
    rows = [r for r in records if r.get("kind") == "point"]
    columns = [
        "point",
        *swept_columns(rows),
        "status",
        "rounds_completed",
        "final_accuracy",
        "failed_updates",
        "seconds",
    ]
    return rows, columns


ROUND_COLUMNS = ["point", "round", "test_accuracy", "test_loss", "failures", "seconds"]
FAILURE_COLUMNS = ["point", "round", "client", "reason"]
ATTACK_ERROR_COLUMNS = ["point", "round", "attack", "error"]
MANIPULATION_COLUMNS = [
    "point", "round", "attack", "clients", "change", "aggregated", "accuracy_before",
    "accuracy_after",
]  # fmt: skip


def manipulation_table(records: list[Record]) -> list[Record]:
    """One row per round in which the server sent manipulated models: to whom, what changed,
    whether those replies were aggregated, and the global test accuracy before and after the
    round (its cost to training)."""
    accuracy = {
        (r.get("point", 0), r["round"]): r["test_accuracy"]
        for r in records
        if r.get("kind") == "round"
    }
    rounds: dict[tuple[int, int], list[Record]] = {}
    for record in records:
        if record.get("kind") == "manipulation":
            rounds.setdefault((record.get("point", 0), record["round"]), []).append(record)
    return [
        {
            "point": point,
            "round": server_round,
            "attack": members[0]["attack"],
            "clients": ", ".join(str(m["client"]) for m in members),
            "change": members[0]["change"],
            "aggregated": any(m["aggregated"] for m in members),
            "accuracy_before": accuracy.get((point, server_round - 1)),
            "accuracy_after": accuracy.get((point, server_round)),
        }
        for (point, server_round), members in sorted(rounds.items())
    ]


ATTACK_COLUMNS = (
    "attacked", "success_rate", "leaked_fraction", "mean_psnr", "median_psnr", "mean_ssim",
    "label_accuracy", "label_counts_right", "median_iterations_to_threshold",
    "median_seconds_to_threshold", "mean_seconds",
)  # fmt: skip


def attack_table(records: list[Record]) -> tuple[list[Record], list[str]]:
    """Per sweep point: how often and how well the attack recovered the clients' images.

    ``success_rate`` is the fraction of attacked updates whose every image leaked (PSNR at or
    above the threshold); ``leaked_fraction`` the fraction of all images that leaked.
    """
    points = {r["point"]: r for r in records if r.get("kind") == "point"}
    attacks = [r for r in records if r.get("kind") == "attack"]
    # Several attacks per update (attack.also, and their per-image "best"): a row for each.
    several = len({r.get("attack") for r in attacks}) > 1
    rows = []
    for point, attack in sorted(
        {(r["point"], r.get("attack") if several else None) for r in attacks},
        key=lambda key: (key[0], key[1] == "best", str(key[1])),
    ):
        mine = [
            r for r in attacks if r["point"] == point and (not several or r["attack"] == attack)
        ]
        reached = [
            r["iterations_to_threshold"]
            for r in mine
            if r.get("iterations_to_threshold") is not None
        ]
        seconds = [
            r["seconds_to_threshold"] for r in mine if r.get("seconds_to_threshold") is not None
        ]
        labels = [r["label_accuracy"] for r in mine if r.get("label_accuracy") is not None]
        counts = [r["label_counts_right"] for r in mine if r.get("label_counts_right") is not None]
        timed = [r["seconds"] for r in mine if isinstance(r.get("seconds"), int | float)]
        rows.append(
            {
                "point": point,
                **{k: v for k, v in points.get(point, {}).items() if k.startswith("set:")},
                **({"attack": attack} if several else {}),
                "attacked": len(mine),
                "success_rate": float(np.mean([r["fraction_leaked"] == 1.0 for r in mine])),
                "leaked_fraction": float(np.mean([r["fraction_leaked"] for r in mine])),
                "mean_psnr": float(np.mean([r["mean_psnr"] for r in mine])),
                "median_psnr": float(np.median([p for r in mine for p in r["psnr"]])),
                "mean_ssim": float(np.mean([r["mean_ssim"] for r in mine])),
                "label_accuracy": float(np.mean(labels)) if labels else None,
                "label_counts_right": float(np.mean(counts)) if counts else None,
                "median_iterations_to_threshold": float(np.median(reached)) if reached else None,
                "median_seconds_to_threshold": float(np.median(seconds)) if seconds else None,
                "mean_seconds": float(np.mean(timed)) if timed else None,
            }
        )
    head = ["point", *swept_columns(rows), *(["attack"] if several else [])]
    return rows, [*head, *ATTACK_COLUMNS]


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
    return rows, ["point", *swept_columns(rows), *INVERSION_COLUMNS]


# The terminal's key columns (heading, record key, how to show it); swept values go after
# ``point``. Everything else is in summary.md and report.html.
TERMINAL_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "points": [
        ("status", "status", "text"),
        ("rounds", "rounds_completed", "text"),
        ("accuracy", "final_accuracy", "percent"),
        ("failures", "failed_updates", "text"),
        ("time s", "seconds", "seconds"),
    ],
    "attacks": [
        ("attacked", "attacked", "text"),
        ("leaked", "leaked_fraction", "percent"),
        ("PSNR dB", "mean_psnr", "decibel"),
        ("SSIM", "mean_ssim", "ratio"),
        ("labels", "label_accuracy", "percent"),
    ],
}


def terminal_cell(value: Any, style: str) -> str:
    """A short cell for the terminal: percentages, dB with one decimal, whole seconds."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return format_value(value)
    if style == "percent":
        return f"{100 * value:.1f}%"
    if style == "decibel":
        return f"{value:.1f}"
    if style == "ratio":
        return f"{value:.2f}"
    if style == "seconds":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return format_value(value)


def terminal_tables(
    records: list[Record],
) -> list[tuple[str, list[tuple[str, bool]], list[list[str]]]]:
    """(title, (heading, numeric?) per column, rows of cells) of the points and attacks
    tables, key columns only.

    A swept defense list shows as the point's defense and strength (``pruning 0.5``), which
    is shorter than the list itself.
    """
    points = {r["point"]: r for r in records if r.get("kind") == "point"}
    tables = []
    for title, (rows, columns) in (
        ("points", point_table(records)),
        ("attacks", attack_table(records)),
    ):
        if not rows:
            continue
        swept = [c for c in columns if c.startswith("set:") or c == "attack"]
        keys = TERMINAL_COLUMNS[title]
        headings = [("point", False), *((column_name(c), False) for c in swept)]
        headings += [(heading, style != "text") for heading, _, style in keys]
        cells = []
        for row in rows:
            values = [_swept_cell(points.get(row["point"], row), row, c) for c in swept]
            values += [terminal_cell(row.get(key), style) for _, key, style in keys]
            cells.append([str(row["point"]), *values])
        tables.append((title, headings, cells))
    return tables


def _swept_cell(point: Record, row: Record, column: str) -> str:
    value = point.get(column, row.get(column))
    if column == "set:defenses" and isinstance(value, list):
        if not value:
            return "none"
        strength = point.get("strength")
        name = point.get("defense") or "+".join(str(d.get("name")) for d in value)
        return name if strength is None else f"{name} {format_value(strength)}"
    return format_value(value)
