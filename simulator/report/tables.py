"""The report's tables, computed from a run's typed records alone: points, attacks, inversions.

Every table is ``(rows, columns)``: rows keyed by the records' written keys (``set:`` keys
for swept values), and the columns to show in order. ``summary.md`` and ``report.html`` show
every column; the terminal shows :data:`TERMINAL_COLUMNS`, the key ones, so that a table fits
80 columns. Every attack table states the bar an image had to clear to count as leaked
(``leak_threshold``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from simulator.core.records import (
    AttackRecord,
    BestRecord,
    LeakageRecord,
    ManipulationRecord,
    PointRecord,
    Record,
    RoundRecord,
    of_kind,
)

# One row of a table: column name to value.
Row = Mapping[str, Any]


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


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(column_name(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def swept_columns(rows: Sequence[Row]) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith("set:")})


def rows_of(records: Iterable[Record]) -> list[Row]:
    """Records as table rows: their written form."""
    return [record.to_dict() for record in records]


def swept_values(point: PointRecord | None) -> dict[str, Any]:
    """A point's swept values as ``set:`` columns (none for an unknown point)."""
    return {} if point is None else {f"set:{k}": v for k, v in point.swept.items()}


def point_table(records: Sequence[Record]) -> tuple[list[Row], list[str]]:
    """One row per sweep point: swept values, status, accuracy, failures, time."""
    rows = rows_of(of_kind(records, PointRecord))
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


def manipulation_table(records: Sequence[Record]) -> list[Row]:
    """One row per round in which the server sent manipulated models: to whom, what changed,
    whether those replies were aggregated, and the global test accuracy before and after the
    round (its cost to training)."""
    accuracy = {(r.point or 0, r.round): r.test_accuracy for r in of_kind(records, RoundRecord)}
    rounds: dict[tuple[int, int], list[ManipulationRecord]] = {}
    for record in of_kind(records, ManipulationRecord):
        rounds.setdefault((record.point or 0, record.round), []).append(record)
    return [
        {
            "point": point,
            "round": server_round,
            "attack": members[0].attack,
            "clients": ", ".join(str(m.client) for m in members),
            "change": members[0].change,
            "aggregated": any(m.aggregated for m in members),
            "accuracy_before": accuracy.get((point, server_round - 1)),
            "accuracy_after": accuracy.get((point, server_round)),
        }
        for (point, server_round), members in sorted(rounds.items())
    ]


ATTACK_COLUMNS = (
    "attacked", "success_rate", "leaked_fraction", "leak_threshold", "mean_psnr", "median_psnr",
    "mean_ssim", "label_accuracy", "label_counts_right", "median_iterations_to_threshold",
    "median_seconds_to_threshold", "mean_seconds",
)  # fmt: skip
# An attack that states a guarantee (the active attacks): its exact share beside the bound.
EXACT_COLUMNS = ("recovered_60db", "predicted_share")


def leak_threshold(records: Iterable[LeakageRecord]) -> str | None:
    """The bar an image had to clear to count as leaked, in words (``PSNR >= 30 dB``; SSIM for
    candidate sets and class samples; both, joined by "or", where attacks of both kinds are
    combined); None when the records name none."""
    bars = []
    for record in records:
        if record.leak_threshold_db is not None:
            bars.append(f"PSNR >= {record.leak_threshold_db:g} dB")
        if record.leak_threshold_ssim is not None:
            bars.append(f"SSIM >= {record.leak_threshold_ssim:g}")
    return " or ".join(dict.fromkeys(bars)) or None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def attack_table(records: Sequence[Record]) -> tuple[list[Row], list[str]]:
    """Per sweep point: how often and how well the attack recovered the clients' images.

    ``success_rate`` is the fraction of attacked updates whose every image leaked (at or above
    ``leak_threshold``); ``leaked_fraction`` the fraction of all images that leaked. Attacks
    that state a guarantee add the share recovered at 60 dB beside the ``predicted_share``.
    """
    points = {r.point: r for r in of_kind(records, PointRecord)}
    attacks = of_kind(records, AttackRecord)
    scored: list[LeakageRecord] = [*attacks, *of_kind(records, BestRecord)]
    # Several attacks per update (attack.also, and their per-image best): a row for each.
    several = len({_attack_name(r) for r in scored}) > 1
    rows = []
    for point, attack in sorted(
        {(r.point, _attack_name(r) if several else None) for r in scored},
        key=lambda key: (key[0] or 0, key[1] == BestRecord.kind, str(key[1])),
    ):
        mine = [
            r for r in scored if r.point == point and (not several or _attack_name(r) == attack)
        ]
        tried = [r for r in mine if isinstance(r, AttackRecord)]
        reached = [r.iterations_to_threshold for r in tried]
        seconds = [r.seconds_to_threshold for r in tried]
        timed = [r.seconds for r in mine if isinstance(r.seconds, int | float)]
        # Old best records name no threshold: the bars of the attacks they combined.
        bar = leak_threshold(mine) or leak_threshold(r for r in attacks if r.point == point)
        exact = {
            key: _mean(getattr(r, key) for r in tried)
            for key in EXACT_COLUMNS
            if any(getattr(r, key) is not None for r in tried)
        }
        rows.append(
            {
                "point": point,
                **swept_values(points.get(point)),
                **({"attack": attack} if several else {}),
                "attacked": len(mine),
                "success_rate": float(np.mean([r.fraction_leaked == 1.0 for r in mine])),
                "leaked_fraction": float(np.mean([r.fraction_leaked for r in mine])),
                "leak_threshold": bar,
                "mean_psnr": float(np.mean([r.mean_psnr for r in mine])),
                "median_psnr": float(np.median([p for r in mine for p in r.psnr])),
                "mean_ssim": float(np.mean([r.mean_ssim for r in mine])),
                "label_accuracy": _mean(r.label_accuracy for r in tried),
                "label_counts_right": _mean(r.extra.get("label_counts_right") for r in tried),
                "median_iterations_to_threshold": _median(reached),
                "median_seconds_to_threshold": _median(seconds),
                "mean_seconds": float(np.mean(timed)) if timed else None,
                **exact,
            }
        )
    head = ["point", *swept_columns(rows), *(["attack"] if several else [])]
    exact_columns = [c for c in EXACT_COLUMNS if any(c in row for row in rows)]
    return rows, [*head, *ATTACK_COLUMNS, *exact_columns]


def _attack_name(record: LeakageRecord) -> str:
    """The attack a row is about: the record's attack, or "best" for the per-image best."""
    return record.attack if isinstance(record, AttackRecord) else BestRecord.kind


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


INVERSION_COLUMNS = (
    "final_accuracy", "mean_nn_ssim", "top_k_nn_ssim", "max_nn_ssim", "images_above",
    "leak_threshold", "generated", "noise_nn_ssim", "confidence", "diversity", "mean_seconds",
)  # fmt: skip


def inversion_table(records: Sequence[Record]) -> tuple[list[Row], list[str]]:
    """Per sweep point: how training-like the inverted samples are (mean over attacked rounds).

    NN-SSIM is each sample's SSIM with its nearest training image of the same class;
    ``images_above`` counts samples at or above the run's SSIM threshold (``leak_threshold``);
    ``noise_nn_ssim`` is the same score for uniform noise, the floor.
    """
    points = {r.point: r for r in of_kind(records, PointRecord)}
    attacks = [r for r in of_kind(records, AttackRecord) if r.matching == "training"]
    rows = []
    for point in sorted({r.point or 0 for r in attacks}):
        mine = [r for r in attacks if (r.point or 0) == point]
        summary = points.get(point)

        def mean(values: Iterable[Any]) -> float | None:
            return _mean(v for v in values if isinstance(v, int | float))

        rows.append(
            {
                "point": point,
                **swept_values(summary),
                "final_accuracy": None if summary is None else summary.final_accuracy,
                "mean_nn_ssim": mean(r.mean_ssim for r in mine),
                "top_k_nn_ssim": mean(r.extra.get("top_k_ssim") for r in mine),
                "max_nn_ssim": mean(r.extra.get("max_ssim") for r in mine),
                "images_above": mean(r.extra.get("images_leaked") for r in mine),
                "leak_threshold": leak_threshold(mine),
                "generated": mean(r.generated for r in mine),
                "noise_nn_ssim": mean(r.extra.get("noise_ssim") for r in mine),
                "confidence": mean(r.extra.get("confidence") for r in mine),
                "diversity": mean(r.extra.get("diversity") for r in mine),
                "mean_seconds": mean(r.seconds for r in mine),
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
        ("leak at", "leak_threshold", "text"),
        ("PSNR dB", "mean_psnr", "decibel"),
        ("SSIM", "mean_ssim", "ratio"),
        ("labels", "label_accuracy", "percent"),
        ("at 60 dB", "recovered_60db", "percent"),
        ("bound", "predicted_share", "percent"),
    ],
}
# Columns shown only where a row has a value (labels: not every attack recovers them; the
# exact share and its bound: active attacks only). "leak at" goes into the title instead
# when every row has the same bar.
SPARSE = {"label_accuracy", *EXACT_COLUMNS}


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
    records: Sequence[Record],
) -> list[tuple[str, list[tuple[str, bool]], list[list[str]]]]:
    """(title, (heading, numeric?) per column, rows of cells) of the points and attacks
    tables, key columns only.

    A swept defense list shows as the point's defense and strength (``pruning 0.5``), which
    is shorter than the list itself. The attacks table states its leak threshold: in its title
    when every row has the same (``attacks (leaked: PSNR >= 30 dB)``), else in a column.
    """
    points = {r.point: r for r in of_kind(records, PointRecord)}
    tables = []
    for title, (rows, columns) in (
        ("points", point_table(records)),
        ("attacks", attack_table(records)),
    ):
        if not rows:
            continue
        swept = [c for c in columns if c.startswith("set:") or c == "attack"]
        keys = [
            column
            for column in TERMINAL_COLUMNS[title]
            if column[1] not in SPARSE or any(row.get(column[1]) is not None for row in rows)
        ]
        bars = {row.get("leak_threshold") for row in rows}
        if title == "attacks" and len(bars) == 1:
            title = f"attacks (leaked: {bars.pop() or 'no threshold recorded'})"
            keys = [column for column in keys if column[1] != "leak_threshold"]
        headings = [("point", False), *((column_name(c), False) for c in swept)]
        headings += [(heading, style != "text") for heading, _, style in keys]
        cells = []
        for row in rows:
            values = [_swept_cell(points.get(row["point"]), row, c) for c in swept]
            values += [terminal_cell(row.get(key), style) for _, key, style in keys]
            cells.append([str(row["point"]), *values])
        tables.append((title, headings, cells))
    return tables


def _swept_cell(point: PointRecord | None, row: Row, column: str) -> str:
    value = row.get(column)
    if column == "set:defenses" and isinstance(value, list):
        if not value:
            return "none"
        strength = None if point is None else point.strength
        name = (point.defense if point else None) or "+".join(str(d.get("name")) for d in value)
        return name if strength is None else f"{name} {format_value(strength)}"
    return format_value(value)
