"""The compact table docs/studies.md shows for a defense study, from its run folder.

One row per setting (defense and strength, or batch size) over its seeds: leakage in each
attacked round and over all of them (the per-image best of every attack, adaptive twins
included), the blind attacks' leakage over all rounds ("same" where no twin ran), and final
test accuracy, each as mean +- standard deviation over the seeds; the attacks that leaked most
on their own, seed by seed; "frontier" marks the privacy-utility frontier and "~none" a
leakage within the spread of the undefended point's. Every number is one of the run's
``summary.md`` tables (``settings_table`` and ``rounds_table``), rounded.

    leaksim run dlg-defenses-fedsgd --out runs/dlg-defenses-fedsgd
    python -m benchmarks.study_table runs/dlg-defenses-fedsgd
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from simulator.report.evaluation import rounds_table, settings_table
from simulator.run.folder import read_records


def _percent(mean: float, spread: float) -> str:
    return f"{100 * mean:.1f} ± {100 * spread:.1f}"


def _setting(curve: str, strength: Any) -> str:
    if curve == "none" or strength is None:
        return curve
    return f"{curve} {strength:g}" if isinstance(strength, int | float) else f"{curve} {strength}"


def study_table(run_dir: Path) -> str:
    """The markdown table for one study's run folder."""
    records = list(read_records(run_dir))
    by_round: dict[tuple[str, str], dict[int, str]] = {}
    for row in rounds_table(records):
        key = (row["curve"], repr(row["strength"]))
        by_round.setdefault(key, {})[row["round"]] = _percent(row["leakage"], row["leakage_spread"])
    rounds = sorted({r for cells in by_round.values() for r in cells})
    head = ["setting", "seeds", *(f"leaked, round {r} (%)" for r in rounds)]
    head += ["leaked, all rounds (%)", "blind attacks only, all rounds (%)"]
    head += ["final accuracy (%)", "strongest attack", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in settings_table(records):
        cells = by_round.get((row["curve"], repr(row["strength"])), {})
        notes = [word for word, flag in (("frontier", row["on_frontier"]),
                 ("~none", row["leakage_within_spread_of_none"])) if flag]  # fmt: skip
        values = [
            _setting(row["curve"], row["strength"]),
            str(row["seeds"]),
            *(cells.get(r, "") for r in rounds),
            _percent(row["leakage"], row["leakage_spread"]),
            # No adaptive twin ran at this setting: the blind attacks are all there were.
            "same"
            if row["blind_leakage"] is None
            else _percent(row["blind_leakage"], row["blind_leakage_spread"]),
            _percent(row["accuracy"], row["accuracy_spread"]),
            row["strongest_attacks"],
            ", ".join(notes),
        ]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    print(study_table(args.run_dir))


if __name__ == "__main__":
    main()
