"""simulator.report.evaluation on constructed records: leakage by round over seeds, the
accuracy cost against the same seed's undefended point, and the within-spread flag."""

from __future__ import annotations

import math
import statistics

import pytest

from simulator.core.records import BestRecord, PointRecord, PrivacyRecord, Record
from simulator.report.evaluation import (
    SETTING_COLUMNS,
    defense_table,
    rounds_table,
    settings_table,
)
from simulator.scoring.best import best_of
from tests.unit.report.synthetic_run import attack_record, best_record, point_record


def point(index: int, seed: int, accuracy: float, std: float | None = None) -> PointRecord:
    defenses = [] if std is None else [{"name": "gaussian-noise", "std": std}]
    return point_record(index, {"seed": seed, "defenses": defenses}, final_accuracy=accuracy)


def best(index: int, server_round: int, leaked: float) -> BestRecord:
    return best_record([40.0], point=index, round=server_round, fraction_leaked=leaked)


# Undefended: leaks everything at round 1, less later; noise 0.01: only round 1 differs.
LEAKS = {  # (seed, std) -> leaked fraction at rounds 1, 50, 100
    (0, None): (1.0, 0.6, 0.5), (1, None): (0.9, 0.5, 0.4), (2, None): (0.8, 0.4, 0.3),
    (0, 0.01): (0.0, 0.6, 0.5), (1, 0.01): (0.1, 0.5, 0.5), (2, 0.01): (0.2, 0.4, 0.2),
}  # fmt: skip
ACCURACY = {(0, None): 0.95, (1, None): 0.96, (2, None): 0.94,
            (0, 0.01): 0.93, (1, 0.01): 0.90, (2, 0.01): 0.94}  # fmt: skip


def records() -> list[Record]:
    found = []
    for index, ((seed, std), leaks) in enumerate(LEAKS.items()):
        found.append(point(index, seed, ACCURACY[(seed, std)], std))
        found += [best(index, r, leak) for r, leak in zip((1, 50, 100), leaks, strict=True)]
    return found


def test_leakage_by_round_is_averaged_over_seeds_with_its_spread() -> None:
    rows = {(r["curve"], r["round"]): r for r in rounds_table(records())}
    assert len(rows) == 6
    for seed_std, curve in ((None, "none"), (0.01, "gaussian-noise")):
        for position, server_round in enumerate((1, 50, 100)):
            values = [LEAKS[(seed, seed_std)][position] for seed in range(3)]
            row = rows[(curve, server_round)]
            assert row["seeds"] == 3
            assert row["leakage"] == pytest.approx(statistics.fmean(values))
            assert row["leakage_spread"] == pytest.approx(statistics.stdev(values))


def test_accuracy_cost_is_against_the_same_seed() -> None:
    rows = {(r["seed"], r["curve"]): r for r in defense_table(records())}
    for seed in range(3):
        expected = ACCURACY[(seed, None)] - ACCURACY[(seed, 0.01)]
        assert rows[(seed, "gaussian-noise")]["accuracy_loss"] == pytest.approx(expected)


def test_a_difference_inside_the_spread_is_flagged() -> None:
    rows = {r["curve"]: r for r in settings_table(records())}
    assert rows["none"]["leakage_within_spread_of_none"] is None
    # mean over rounds: none 0.6 +- 0.1, noise 0.31 +- 0.1: a real difference
    assert rows["gaussian-noise"]["leakage_within_spread_of_none"] is False
    # without round 1 they agree
    later = [r for r in records() if not (isinstance(r, BestRecord) and r.round == 1)]
    rows = {r["curve"]: r for r in settings_table(later)}
    assert rows["gaussian-noise"]["leakage_within_spread_of_none"] is True


def test_an_update_only_one_attack_scored_counts_in_both_views() -> None:
    """Round 100's other attack failed: its lone record counts for the point and the round."""
    records = [
        point(0, 0, 0.9),
        best(0, 1, 1.0),
        # no best record: one attack scored it
        attack_record("subspace", [40.0], point=0, round=100, fraction_leaked=0.0),
    ]
    (row,) = defense_table(records)
    assert row["leaked_fraction"] == 0.5
    by_round = {r["round"]: r["leakage"] for r in rounds_table(records)}
    assert by_round == {1: 1.0, 100: 0.0}


def _dp_point(leaked: int, images: int, matching: str = "hungarian") -> list[Record]:
    """A dp-sgd point at epsilon 1 and prior 0.01, whose one attack leaked ``leaked`` of
    ``images`` (a candidate set returns ``images`` candidates)."""
    psnr = [40.0] * leaked + [10.0] * (images - leaked)
    ssim = [0.9] * leaked + [0.1] * (images - leaked)
    swept = {"seed": 0, "defenses": [{"name": "dp-sgd", "noise_multiplier": 1.0}]}
    fraction = {"fraction_leaked": leaked / images}
    return [
        point_record(0, swept),
        PrivacyRecord(epsilon=1.0, delta=1e-5, client=0, mean_epsilon=1.0, prior_baseline=0.01,
                      prior_guess="public mean", reconstruction_bound=0.0272, point=0),
        attack_record("subspace", psnr, ssim=ssim, matching=matching, point=0, **fraction),
    ]  # fmt: skip


def test_a_dp_point_leaking_above_its_bound_is_a_broken_claim() -> None:
    (honest,) = defense_table(_dp_point(1, 100))
    assert honest["dp_bound"] == pytest.approx(math.e * 0.01 + 1e-5)
    assert honest["broken_dp"] is False
    (broken,) = defense_table(_dp_point(20, 100))
    assert broken["broken_dp"] is True
    # Candidate sets: 100 candidates per target make the prior 100 x 0.01 = 1, no bound left.
    (candidates,) = defense_table(_dp_point(20, 100, matching="nearest"))
    assert candidates["dp_bound"] == 1.0 and candidates["broken_dp"] is False
    undefended = point_record(1, {"seed": 0, "defenses": []})
    (row,) = defense_table([undefended])
    assert row["dp_bound"] is None and row["broken_dp"] is None


def test_a_point_names_its_strongest_attack_and_what_the_blind_ones_leaked() -> None:
    """Two updates under noise, each scored by two blind attacks and the subspace attack's
    adaptive twin: the point's leakage is the best of all three, the blind column the best
    of the two blind ones, image by image, and the twin is named as the strongest."""
    twin = "subspace knowing gaussian-noise"
    records: list[Record] = [point(0, 0, 0.9, std=0.01)]
    for server_round in (1, 50):
        scored = [
            attack_record("subspace", [35.0, 10.0, 10.0, 10.0], round=server_round),
            attack_record("analytic", [10.0, 31.0, 10.0, 10.0], round=server_round),
            attack_record(twin, [35.0, 10.0, 40.0, 40.0], round=server_round),
        ]
        records += [*scored, best_of(scored)]
    (row,) = defense_table(records)
    assert row["leaked_fraction"] == pytest.approx(1.0)  # every image by one attack or other
    assert row["blind_leaked_fraction"] == pytest.approx(0.5)  # images 0 and 1
    assert row["strongest_attack"] == twin
    (setting,) = settings_table(records)  # over seeds: the same, as means
    assert setting["leakage"] == pytest.approx(1.0)
    assert setting["blind_leakage"] == pytest.approx(0.5)
    assert setting["strongest_attacks"] == twin
    # The summary's settings table shows both, beside the best of all.
    assert {"blind_leakage", "strongest_attacks"} <= set(SETTING_COLUMNS)
    # Without an adaptive attack, there is nothing to set apart: the blind column is empty.
    blind_only = [r for r in records if getattr(r, "attack", None) != twin and r.kind != "best"]
    (row,) = defense_table(blind_only)
    assert row["blind_leaked_fraction"] is None and row["strongest_attack"] == "subspace"
