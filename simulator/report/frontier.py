"""What a defense evaluation concludes: settings over seeds, the privacy-utility frontier, the
cheapest setting that keeps leakage under a bound, and leakage across training rounds.

Pure functions of the defense table's rows (one per sweep point: its defense ``curve`` and
``strength``, ``leaked_fraction``, ``final_accuracy`` and the ``seed`` it ran with), so the
report can be redrawn from the records alone.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from simulator.core.records import BestRecord, LeakageRecord, Record
from simulator.report.tables import Row


@dataclass(frozen=True)
class Setting:
    """One defense at one strength, over the seeds it ran with: mean and spread."""

    curve: str
    strength: Any
    seeds: int
    leakage: float
    leakage_spread: float
    accuracy: float
    accuracy_spread: float
    # The blind attacks' leakage (mean over the seeds that ran adaptive twins; None where none
    # did) and the attacks that leaked most on their own, seed by seed (distinct, in order).
    blind_leakage: float | None = None
    blind_leakage_spread: float | None = None
    strongest_attacks: str = ""

    def dominates(self, other: Setting) -> bool:
        """Leaks no more and costs no more accuracy, and is strictly better in one."""
        no_worse = self.leakage <= other.leakage and self.accuracy >= other.accuracy
        better = self.leakage < other.leakage or self.accuracy > other.accuracy
        return no_worse and better


def _spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def settings(rows: Iterable[Row]) -> list[Setting]:
    """Rows grouped by (curve, strength) over their seeds, in first-seen order.

    Rows without a leakage or an accuracy (a failed point) are left out.
    """
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    strengths: dict[tuple[str, str], Any] = {}
    for row in rows:
        if row.get("leaked_fraction") is None or row.get("final_accuracy") is None:
            continue
        key = (str(row["curve"]), repr(row.get("strength")))
        groups[key].append(row)
        strengths[key] = row.get("strength")
    found = []
    for key, members in groups.items():
        leakage = [float(r["leaked_fraction"]) for r in members]
        accuracy = [float(r["final_accuracy"]) for r in members]
        blind = [float(r["blind_leaked_fraction"]) for r in members
                 if r.get("blind_leaked_fraction") is not None]  # fmt: skip
        strongest = dict.fromkeys(str(r["strongest_attack"]) for r in members
                                  if r.get("strongest_attack"))  # fmt: skip
        found.append(
            Setting(
                curve=key[0],
                strength=strengths[key],
                seeds=len(members),
                leakage=statistics.fmean(leakage),
                leakage_spread=_spread(leakage),
                accuracy=statistics.fmean(accuracy),
                accuracy_spread=_spread(accuracy),
                blind_leakage=statistics.fmean(blind) if blind else None,
                blind_leakage_spread=_spread(blind) if blind else None,
                strongest_attacks=", ".join(strongest),
            )
        )
    return found


def frontier(candidates: Sequence[Setting]) -> list[Setting]:
    """The Pareto frontier of (leakage, accuracy): settings no other setting dominates,
    sorted by leakage."""
    kept = [s for s in candidates if not any(o.dominates(s) for o in candidates if o is not s)]
    return sorted(kept, key=lambda s: (s.leakage, -s.accuracy))


def cheapest(
    candidates: Sequence[Setting], max_leakage: float, baseline_accuracy: float | None = None
) -> dict[str, Setting | None]:
    """Per defense, the setting with the best accuracy among those leaking less than
    ``max_leakage`` (None when no strength of that defense gets there); key "any": overall."""
    by_curve: dict[str, list[Setting]] = defaultdict(list)
    for setting in candidates:
        by_curve[setting.curve].append(setting)
    by_curve["any"] = list(candidates)
    return {
        curve: max(
            (s for s in members if s.leakage < max_leakage),
            key=lambda s: s.accuracy,
            default=None,
        )
        for curve, members in by_curve.items()
    }


def within_noise(first: Setting, second: Setting) -> bool:
    """Whether two settings' leakage differs by less than their combined spread (then the
    report must not call one better than the other)."""
    combined = math.hypot(first.leakage_spread, second.leakage_spread)
    return abs(first.leakage - second.leakage) <= combined


def leakage_by_round(records: Iterable[Record]) -> dict[int, dict[int, float]]:
    """Per sweep point, the mean leaked fraction of each attacked round (the per-image best
    of several attacks when a round has one, else every attack record of that round)."""
    updates: dict[tuple[int, int, int], list[LeakageRecord]] = defaultdict(list)
    for record in records:
        if isinstance(record, LeakageRecord):
            updates[(record.point or 0, record.round, record.client)].append(record)
    rounds: dict[tuple[int, int], list[LeakageRecord]] = defaultdict(list)
    for (point, server_round, _client), members in updates.items():
        # Per update: its best record, else what it has (the same rule as the point's table).
        best = [r for r in members if isinstance(r, BestRecord)]
        rounds[(point, server_round)] += best or members
    curves: dict[int, dict[int, float]] = defaultdict(dict)
    for (point, server_round), chosen in sorted(rounds.items()):
        curves[point][server_round] = statistics.fmean(r.fraction_leaked for r in chosen)
    return dict(curves)
