"""The defense evaluation: leakage against utility (and epsilon) for every defended point.

Drawn from a run's records by ``leaksim report`` whenever the points differ in their defenses
or in a swept protocol setting (batch size, local epochs): a summary table, the
privacy-utility plot, leakage against strength per defense, and reconstruction grids.

A point's leakage is the per-image best of every attack that scored its updates, the adaptive
ones (told the defenses' public settings, :mod:`simulator.core.knowledge`) included;
``blind_leaked_fraction`` is the same best over the attacks that were not told, and
``strongest_attack`` the attack that leaked the most on its own: what each verdict stands on.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulator.core.knowledge import is_adaptive
from simulator.core.records import (
    AttackRecord,
    BestRecord,
    LeakageRecord,
    PointRecord,
    PrivacyRecord,
    Record,
    of_kind,
)
from simulator.report import defense_figures, frontier, frontier_figures
from simulator.report.defense_figures import strength_order, strength_words
from simulator.report.figures import FigureFile
from simulator.report.tables import Row, leak_threshold
from simulator.run.folder import attack_artifact
from simulator.scoring.best import best_of, comparable
from simulator.scoring.dp_bound import broken_claim, reconstruction_bound

SECTION = "evaluation"

COLUMNS = (
    "point", "seed", "curve", "strength", "epsilon", "attacked", "mean_psnr", "median_psnr",
    "mean_ssim", "leaked_fraction", "blind_leaked_fraction", "strongest_attack", "dp_bound",
    "broken_dp", "leak_threshold", "label_accuracy", "final_accuracy", "accuracy_loss",
)  # fmt: skip


def _curve_and_strength(point: PointRecord) -> tuple[str, Any, str | None]:
    """The curve a point belongs to (its defenses, or the swept protocol key), its strength,
    and the name of the defense parameter the strength is (``std``), where known."""
    if point.defense != "none":
        return point.defense, point.strength, _strength_parameter(point)
    # The seed repeats a setting; it is not the setting.
    swept = {k: v for k, v in point.swept.items() if k not in {"defenses", "seed"}}
    if len(swept) == 1:
        ((key, value),) = swept.items()
        return key.rsplit(".", 1)[-1], value, None
    return "none", None, None


def _strength_parameter(point: PointRecord) -> str | None:
    """The strength's parameter: the first numeric one of the last defense (as the engine's
    ``defense_summary`` picks it), read from the swept defense list."""
    defenses = point.swept.get("defenses")
    if not isinstance(defenses, list) or not defenses or not isinstance(defenses[-1], dict):
        return None
    return next(
        (
            k
            for k, v in defenses[-1].items()
            if k != "name" and isinstance(v, int | float) and not isinstance(v, bool)
        ),
        None,
    )


def best_per_update(records: Sequence[LeakageRecord]) -> list[LeakageRecord]:
    """Per attacked update (round, client): its ``best`` record where several attacks scored
    it, else the records it has (one attack scored it: the others failed or do not apply)."""
    updates: dict[tuple[int, int], list[LeakageRecord]] = defaultdict(list)
    for record in records:
        updates[(record.round, record.client)].append(record)
    chosen: list[LeakageRecord] = []
    for members in updates.values():
        best = [r for r in members if isinstance(r, BestRecord)]
        chosen += best or members
    return chosen


def _guesses_per_target(records: Sequence[LeakageRecord]) -> int:
    """The most guesses any one target of these records got: per update, one per one-to-one
    attack and every candidate of a candidate-set attack (all of them, for the per-image
    best of several attacks)."""
    guesses: dict[tuple[int, int], int] = defaultdict(int)
    for record in records:
        if isinstance(record, AttackRecord):
            many = record.matching != "hungarian"
            guesses[(record.round, record.client)] += record.recovered if many else 1
    return max(guesses.values(), default=1)


def _leaked_images(records: Sequence[LeakageRecord]) -> tuple[int, int]:
    """(images leaked, images scored) over ``records``."""
    leaked = scored = 0
    for record in records:
        count = len(record.psnr)
        leaked += (
            sum(record.leaked)
            if isinstance(record, BestRecord)
            else round(record.fraction_leaked * count)
        )
        scored += count
    return leaked, scored


def dp_bound(
    spent: PrivacyRecord | None, scored: Sequence[LeakageRecord], chosen: Sequence[LeakageRecord]
) -> tuple[float | None, bool | None]:
    """A DP point's reconstruction bound (:mod:`simulator.scoring.dp_bound`) for the guesses
    its attacks made per target, and whether the leakage of ``chosen`` (each update's best)
    breaks it beyond sampling noise; (None, None) without a bound."""
    if spent is None or spent.prior_baseline is None:
        return None, None
    prior = min(1.0, spent.prior_baseline * _guesses_per_target(scored))
    bound = reconstruction_bound(spent.epsilon, spent.delta, spent.rdp_curve, prior)
    leaked, images = _leaked_images(chosen)
    return bound, (broken_claim(leaked, images, bound) if images else None)


def blind_leaked_fraction(records: Sequence[LeakageRecord]) -> float | None:
    """The share of each update's images that some attack not told the defenses leaked,
    averaged over the updates; None where no adaptive attack scored any (nothing to set
    apart from the point's leakage)."""
    attacks = [r for r in records if isinstance(r, AttackRecord) and comparable(r)]
    if not any(is_adaptive(r.attack) for r in attacks):
        return None
    updates: dict[tuple[int, int], list[AttackRecord]] = defaultdict(list)
    for record in attacks:
        updates[(record.round, record.client)].append(record)
    shares = []
    for members in updates.values():
        blind = [r for r in members if not is_adaptive(r.attack)]
        best = best_of(blind)
        # One blind attack scored the update: its own share; none (it failed): nothing leaked.
        shares.append(best.fraction_leaked if best else blind[0].fraction_leaked if blind else 0.0)
    return float(np.mean(shares))


def strongest_attack(records: Sequence[LeakageRecord]) -> str | None:
    """The attack whose own records leaked the largest share on average (the first listed of
    equals); None without attack records."""
    shares: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if isinstance(record, AttackRecord):
            shares[record.attack].append(record.fraction_leaked)
    return max(shares, key=lambda name: float(np.mean(shares[name])), default=None)


def scored_by_point(records: Sequence[Record]) -> dict[int, list[LeakageRecord]]:
    """Per sweep point, the attack and best records of its updates, in order."""
    scored: dict[int, list[LeakageRecord]] = defaultdict(list)
    for record in records:
        if isinstance(record, LeakageRecord):
            scored[record.point or 0].append(record)
    return scored


def defense_table(records: Sequence[Record]) -> list[Row]:
    """One row per point: its defense curve and strength, leakage, accuracy, epsilon."""
    points = of_kind(records, PointRecord)
    scored = scored_by_point(records)
    # Several attacks: their per-image best of each update.
    attacks = {point: best_per_update(mine) for point, mine in scored.items()}
    privacy = {r.point: r for r in of_kind(records, PrivacyRecord)}
    # The accuracy cost is against the undefended point of the same seed (the first one when
    # no point of that seed is undefended).
    undefended = [p for p in points if p.defense == "none"]
    baselines = {p.swept.get("seed"): p.final_accuracy for p in reversed(undefended)}
    first = undefended[0].final_accuracy if undefended else None
    rows = []
    for point in points:
        base_accuracy = baselines.get(point.swept.get("seed"), first)
        curve, strength, parameter = _curve_and_strength(point)
        mine = attacks.get(point.point, [])
        psnrs = [p for r in mine for p in r.psnr]
        labels = [
            r.label_accuracy
            for r in mine
            if isinstance(r, AttackRecord) and r.label_accuracy is not None
        ]
        accuracy = point.final_accuracy
        spent = privacy.get(point.point)
        bound, broken = dp_bound(spent, scored.get(point.point, []), mine)
        rows.append(
            {
                "point": point.point,
                "seed": point.swept.get("seed"),
                "curve": curve,
                "strength": strength,
                "parameter": parameter,
                "epsilon": None if spent is None else spent.epsilon,
                "attacked": len(mine),
                "mean_psnr": float(np.mean(psnrs)) if psnrs else None,
                "median_psnr": float(np.median(psnrs)) if psnrs else None,
                "mean_ssim": float(np.mean([r.mean_ssim for r in mine])) if mine else None,
                "leaked_fraction": float(np.mean([r.fraction_leaked for r in mine]))
                if mine
                else None,
                "blind_leaked_fraction": blind_leaked_fraction(scored.get(point.point, [])),
                "strongest_attack": strongest_attack(scored.get(point.point, [])),
                "dp_bound": bound,
                "broken_dp": broken,
                "leak_threshold": leak_threshold(scored.get(point.point, [])),
                "label_accuracy": float(np.mean(labels)) if labels else None,
                "final_accuracy": accuracy,
                "accuracy_loss": None
                if accuracy is None or base_accuracy is None
                else base_accuracy - accuracy,
            }
        )
    return rows


def is_evaluation(records: Sequence[Record]) -> bool:
    """Whether a run compares defended points (worth the evaluation section and figures)."""
    rows = defense_table(records)
    return (
        len(rows) > 1
        and any(r["curve"] != "none" for r in rows)
        and any(r["attacked"] for r in rows)
    )


def write_figures(run_dir: Path, records: Sequence[Record], figures_dir: Path) -> list[FigureFile]:
    """The privacy-utility plot, leakage against strength, and side-by-side grids."""
    rows = defense_table(records)
    thresholds = {
        r.leak_threshold_db
        for r in of_kind(records, AttackRecord)
        if isinstance(r.leak_threshold_db, int | float)
    }
    threshold = thresholds.pop() if len(thresholds) == 1 else None
    drawn = [
        (
            defense_figures.privacy_utility_figure(
                rows, figures_dir / "privacy-utility.png", threshold
            ),
            "Privacy against utility: mean PSNR of the reconstructions against the final test "
            "accuracy, one curve per defense from the undefended run; labels are strengths.",
        ),
        (
            defense_figures.leakage_by_strength_figure(
                rows, figures_dir / "leakage-by-strength.png"
            ),
            "Leakage against each defense's strength; the dashed line is the undefended run.",
        ),
        (
            defense_figures.strength_grid_figure(
                _strength_grids(run_dir, records, rows),
                figures_dir / "reconstructions-by-strength.png",
            ),
            "The same client's images: the truth, then the reconstructions without a defense "
            "and at increasing strengths.",
        ),
    ]
    labels = {r["point"]: strength_words(r) + _seed_words(r) for r in rows}
    drawn += [
        (
            frontier_figures.frontier_figure(
                frontier.settings(rows), figures_dir / "privacy-utility-frontier.png"
            ),
            "Every defense's settings (mean and spread over seeds) and the frontier: the "
            "settings no other setting beats on both leakage and accuracy.",
        ),
        (
            frontier_figures.leakage_by_round_figure(
                frontier.leakage_by_round(records), labels, figures_dir / "leakage-by-round.png"
            ),
            "Leakage in each attacked round: a defense that only protects the untrained model "
            "shows it here.",
        ),
    ]
    return [FigureFile(SECTION, caption, path) for path, caption in drawn if path is not None]


def _seed_words(row: Row) -> str:
    return "" if row.get("seed") is None else f", seed {row['seed']}"


SETTING_COLUMNS = (
    "curve", "strength", "seeds", "leakage", "leakage_spread", "blind_leakage",
    "blind_leakage_spread", "strongest_attacks", "accuracy", "accuracy_spread", "on_frontier",
    "leakage_within_spread_of_none",
)  # fmt: skip
ROUND_COLUMNS = ("curve", "strength", "round", "seeds", "leakage", "leakage_spread")
CHEAPEST_BOUNDS = (0.01, 0.1)


def settings_table(records: Sequence[Record]) -> list[Row]:
    """One row per (defense, strength) over its seeds: mean, spread, and whether it is on the
    privacy-utility frontier."""
    found = frontier.settings(defense_table(records))
    kept = {id(s) for s in frontier.frontier(found)}
    none = next((s for s in found if s.curve == "none"), None)
    return [
        {
            **dataclasses.asdict(s),
            "on_frontier": id(s) in kept,
            # A difference smaller than the spread over seeds is not a finding.
            "leakage_within_spread_of_none": None
            if none is None or s is none
            else frontier.within_noise(s, none),
        }
        for s in sorted(found, key=_setting_order)
    ]


def rounds_table(records: Sequence[Record]) -> list[Row]:
    """Leakage in each attacked round per (defense, strength), mean and spread over seeds: a
    defense that protects only the untrained model shows it here."""
    rows = {row["point"]: row for row in defense_table(records)}
    per_round = [
        {**rows[point], "round": server_round, "leaked_fraction": leaked}
        for point, curve in frontier.leakage_by_round(records).items()
        if point in rows
        for server_round, leaked in curve.items()
    ]
    found = []
    for server_round in sorted({r["round"] for r in per_round}):
        members = [{**r, "final_accuracy": 0.0} for r in per_round if r["round"] == server_round]
        for setting in frontier.settings(members):
            found.append((setting, server_round))
    found.sort(key=lambda pair: (_setting_order(pair[0]), pair[1]))
    return [
        {
            "curve": s.curve,
            "strength": s.strength,
            "round": server_round,
            "seeds": s.seeds,
            "leakage": s.leakage,
            "leakage_spread": s.leakage_spread,
        }
        for s, server_round in found
    ]


def _setting_order(setting: frontier.Setting) -> tuple[bool, str, tuple[int, float, str]]:
    return (setting.curve != "none", setting.curve, strength_order(setting.strength))


def cheapest_table(records: Sequence[Record]) -> list[Row]:
    """For each bound X in :data:`CHEAPEST_BOUNDS` and each defense, the setting with the best
    accuracy among those leaking under X (a dash where none does)."""
    found = [s for s in frontier.settings(defense_table(records)) if s.curve != "none"]
    rows = []
    for bound in CHEAPEST_BOUNDS:
        for curve, setting in frontier.cheapest(found, bound).items():
            rows.append(
                {
                    "leaked_under": bound,
                    "defense": curve,
                    "strength": None if setting is None else setting.strength,
                    "leakage": None if setting is None else setting.leakage,
                    "accuracy": None if setting is None else setting.accuracy,
                    "accuracy_spread": None if setting is None else setting.accuracy_spread,
                }
            )
    return rows


CHEAPEST_COLUMNS = (
    "leaked_under", "defense", "strength", "leakage", "accuracy", "accuracy_spread",
)  # fmt: skip


def _strength_grids(
    run_dir: Path, records: Sequence[Record], rows: Sequence[Row], per_curve: int = 4
) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """Per defense: one client's truth, its reconstruction without a defense, and at up to
    ``per_curve`` strengths (the same round and client at every point where it was attacked)."""
    attacks: dict[int, list[AttackRecord]] = defaultdict(list)
    for record in of_kind(records, AttackRecord):
        if attack_artifact(run_dir, record).is_file():
            attacks[record.point or 0].append(record)
    baseline = next((r for r in rows if r["curve"] == "none" and attacks.get(r["point"])), None)
    first = attacks[baseline["point"]][0] if baseline else None

    def attack_of(point: int) -> AttackRecord | None:
        mine = attacks.get(point, [])
        same = [r for r in mine if first and (r.round, r.client) == (first.round, first.client)]
        return (same or mine or [None])[0]

    by_curve: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row["curve"] != "none" and attack_of(row["point"]) is not None:
            by_curve[row["curve"]].append(row)
    grids = []
    for curve, members in sorted(by_curve.items()):
        members = sorted(members, key=lambda r: strength_order(r["strength"]))
        picks = [
            members[int(i)] for i in np.linspace(0, len(members) - 1, min(per_curve, len(members)))
        ]
        truth, columns = None, []
        for row in ([baseline] if baseline else []) + picks:
            record = attack_of(row["point"])
            if record is None:
                continue
            with np.load(attack_artifact(run_dir, record)) as arrays:
                truth = arrays["truth"] if truth is None else truth
                columns.append((strength_words(row), arrays["reconstruction"]))
        if truth is not None and columns:
            grids.append((curve, truth, columns))
    return grids
