"""simulator.report.frontier: seeds, frontier, cheapest setting, leakage by round, by hand."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from simulator.core.records import Record
from simulator.report.frontier import (
    Setting,
    cheapest,
    frontier,
    leakage_by_round,
    settings,
    within_noise,
)
from tests.unit.report.synthetic_run import attack_record, best_record


def row(curve: str, strength: float | None, leaked: float, accuracy: float, seed: int) -> dict:
    return {"curve": curve, "strength": strength, "leaked_fraction": leaked,
            "final_accuracy": accuracy, "seed": seed}  # fmt: skip


ROWS = [
    row("none", None, 0.90, 0.96, 0), row("none", None, 0.80, 0.95, 1),
    row("none", None, 0.85, 0.97, 2),
    row("noise", 0.01, 0.50, 0.95, 0), row("noise", 0.01, 0.40, 0.94, 1),
    row("noise", 0.01, 0.45, 0.96, 2),
    row("noise", 0.1, 0.00, 0.80, 0), row("noise", 0.1, 0.02, 0.82, 1),
    row("noise", 0.1, 0.01, 0.78, 2),
    row("pruning", 0.5, 0.60, 0.90, 0), row("pruning", 0.5, 0.70, 0.91, 1),
    row("pruning", 0.5, 0.65, 0.89, 2),
    row("pruning", 0.9, 0.005, 0.85, 0), row("pruning", 0.9, 0.005, 0.86, 1),
    row("pruning", 0.9, 0.005, 0.84, 2),
]  # fmt: skip


def test_seeds_are_averaged_and_their_spread_kept() -> None:
    found = {(s.curve, s.strength): s for s in settings(ROWS)}
    noise = found[("noise", 0.01)]
    assert noise.seeds == 3
    assert noise.leakage == pytest.approx(0.45)
    assert noise.leakage_spread == pytest.approx(statistics.stdev([0.5, 0.4, 0.45]))
    assert noise.accuracy == pytest.approx(0.95)
    assert found[("none", None)].accuracy_spread == pytest.approx(0.01)


def test_frontier_and_cheapest_settings_on_a_constructed_set() -> None:
    found = settings(ROWS)
    names = [(s.curve, s.strength) for s in frontier(found)]
    # pruning 0.9 (0.5 %, 0.85) beats noise 0.1 (1 %, 0.80) on both; noise 0.01 (45 %, 0.95)
    # beats pruning 0.5 (65 %, 0.90); the undefended run keeps the best accuracy
    assert names == [("pruning", 0.9), ("noise", 0.01), ("none", None)]
    assert ("pruning", 0.5) not in names
    under_1_percent = cheapest(found, 0.01)
    assert under_1_percent["pruning"] is not None and under_1_percent["pruning"].strength == 0.9
    assert under_1_percent["noise"] is None  # 0.1 leaks 1.0 % on average: not under 1 %
    assert under_1_percent["any"] == under_1_percent["pruning"]
    assert cheapest(found, 0.5)["any"].curve == "noise"  # 0.45 at 0.95 accuracy


def test_differences_inside_the_spread_are_flagged() -> None:
    a = Setting("a", 1, 3, 0.50, 0.05, 0.9, 0.0)
    assert within_noise(a, Setting("b", 1, 3, 0.45, 0.05, 0.9, 0.0))
    assert not within_noise(a, Setting("c", 1, 3, 0.20, 0.05, 0.9, 0.0))


def test_leakage_is_recorded_for_every_attacked_round() -> None:
    def attack(point: int, server_round: int, leaked: float, name: str = "idlg") -> Record:
        if name == "best":
            return best_record(point=point, round=server_round, fraction_leaked=leaked)
        return attack_record(name, point=point, round=server_round, fraction_leaked=leaked)

    records = [
        attack(0, 1, 1.0), attack(0, 1, 0.5), attack(0, 5, 0.25), attack(0, 10, 0.0),
        attack(1, 1, 0.2), attack(1, 1, 0.9, "best"),
    ]  # fmt: skip
    assert leakage_by_round(records) == {0: {1: 0.75, 5: 0.25, 10: 0.0}, 1: {1: 0.9}}


def setting(strength: int, leakage: float, accuracy: float) -> Setting:
    return Setting("d", strength, 1, leakage, 0.0, accuracy, 0.0)


# Few distinct values, so that ties in leakage or accuracy (where "dominates" turns on the
# non-strict comparison) come up often.
value = st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0, 1)
pair = st.tuples(value, value)


def test_equal_leakage_and_better_accuracy_dominates() -> None:
    better = setting(1, leakage=0.5, accuracy=0.9)
    worse = setting(2, leakage=0.5, accuracy=0.8)
    assert better.dominates(worse) and not worse.dominates(better)
    assert frontier([worse, better]) == [better]


@hypothesis_settings(max_examples=80, deadline=None)
@given(st.lists(pair, min_size=1, max_size=12))
def test_frontier_matches_the_definition(points: list[tuple[float, float]]) -> None:
    candidates = [setting(i, leak, acc) for i, (leak, acc) in enumerate(points)]
    kept = frontier(candidates)
    for s in candidates:
        dominated = any(
            o.leakage <= s.leakage and o.accuracy >= s.accuracy
            and (o.leakage < s.leakage or o.accuracy > s.accuracy)
            for o in candidates
        )  # fmt: skip
        assert (s in kept) == (not dominated)
