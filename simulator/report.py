"""Tables and figures rendered from a run's records, so a report is redrawn without rerunning."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from simulator.results import read_records

Record = dict[str, Any]
SUMMARY_FILE = "summary.md"
FIGURES_DIR = "figures"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[Record], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
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
    summary = run_dir / SUMMARY_FILE
    summary.write_text("\n".join(parts) + "\n")
    if rounds:
        _accuracy_figure(rounds, rows, run_dir / FIGURES_DIR / "accuracy.png")
    return summary


def _accuracy_figure(rounds: list[Record], points: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        r["point"]: ", ".join(f"{k[4:]}={v}" for k, v in r.items() if k.startswith("set:")) or "run"
        for r in points
    }
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for record in rounds:
        curves[record["point"]].append((record["round"], record["test_accuracy"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for point, curve in sorted(curves.items()):
        xs, ys = zip(*sorted(curve), strict=True)
        axis.plot(xs, ys, marker="o", label=labels.get(point, f"point {point}"))
    axis.set_xlabel("round")
    axis.set_ylabel("global test accuracy")
    axis.grid(alpha=0.3)
    if len(curves) > 1:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
