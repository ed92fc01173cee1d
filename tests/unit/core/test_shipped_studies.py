"""The shipped defense studies keep the form the evaluation needs: several seeds as a sweep
key, attacks at the start, middle and end of training, and more than one attack per update
(except the KKT study, whose one attack is started from the subspace attack's answer)."""

from __future__ import annotations

import pytest

from simulator.scenario import expand, load

STUDIES = (
    "dlg-defenses-fedsgd",
    "dlg-defenses-fedavg",
    "dlg-batch-fedsgd",
    "dlg-batch-fedavg",
    "kkt-defenses-fedavg",
)


@pytest.mark.parametrize("name", STUDIES)
def test_study_repeats_over_seeds_and_attacks_across_training(name: str) -> None:
    scenario = load(name)
    assert len(set(scenario.sweep["seed"])) >= 3
    rounds = scenario.attack.rounds
    last = scenario.federation.rounds
    assert rounds[0] == 1 and rounds[-1] == last
    assert any(last // 3 <= r <= 2 * last // 3 for r in rounds), rounds
    points = expand(scenario)
    assert {p.scenario.seed for p in points} == set(scenario.sweep["seed"])
    if name != "kkt-defenses-fedavg":
        assert scenario.attack.also, "a study reports the best of several attacks"


@pytest.mark.parametrize("name", STUDIES)
def test_undefended_point_runs_over_every_seed(name: str) -> None:
    scenario = load(name, overrides=["sweep.defenses=[[]]"])
    if "defenses" not in load(name).sweep:
        pytest.skip("a batch-size study: every point is undefended")
    points = expand(scenario)
    assert [p.scenario.defenses for p in points] == [()] * len(scenario.sweep["seed"])
