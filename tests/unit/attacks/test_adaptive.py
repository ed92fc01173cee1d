"""Adaptive attacks: every attack that can use a point's defenses also runs told their public
settings, and the twin a scenario builds beats its blind original where the defense is known."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from simulator.core.knowledge import DefenseKnowledge, combined, is_adaptive, knowing_label
from simulator.core.models import build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta
from simulator.federation.training import batch_gradient
from simulator.scenario import expand, load
from simulator.scoring.metrics import nearest_candidates
from tests.fixtures.trained_model import mnist_odd_even


def built(defenses: list[dict[str, object]], **attack: object) -> dict[str, Any]:
    """{label: attack} of the quickstart with these defenses and attack settings."""
    overrides = {"defenses": defenses, **{f"attack.{k}": v for k, v in attack.items()}}
    scenario = load("quickstart", overrides)
    return dict(scenario.built_attacks)


def test_a_noise_defense_gives_each_attack_that_uses_it_a_twin_told_its_std() -> None:
    attacks = built([{"name": "gaussian-noise", "std": 0.01}], name="subspace",
                    also=[{"name": "analytic"}, {"name": "kkt"}])  # fmt: skip
    assert list(attacks) == [
        "subspace",
        "analytic",
        "kkt",
        "subspace knowing gaussian-noise",
        "analytic knowing gaussian-noise",
    ]  # fmt: skip  (KKT from random candidates has no use for it)
    assert attacks["subspace knowing gaussian-noise"].params.noise_std == 0.01
    assert attacks["analytic knowing gaussian-noise"].params.noise_std == 0.01
    assert attacks["subspace"].params.noise_std == 0.0  # the blind one stays blind


def test_each_defense_says_what_the_matching_attacks_use() -> None:
    laplace = built([{"name": "laplace-noise", "scale": 0.02}], name="dlg")
    twin = laplace["dlg knowing laplace-noise"].params
    assert (twin.distance, twin.noise_scale) == ("laplace", 0.02)
    int8 = built([{"name": "quantization", "precision": "int8"}], name="inverting-gradients")
    twin = int8["inverting-gradients knowing quantization"].params
    assert (twin.known_defense, twin.distance) == ("int8", "l2")
    pruned = built([{"name": "clipping", "max_norm": 1.0}, {"name": "pruning", "fraction": 0.9}],
                   name="subspace")  # fmt: skip
    assert pruned["subspace knowing pruning"].params.known_defense == "pruning"
    assert list(built([{"name": "clipping", "max_norm": 1.0}], name="subspace")) == ["subspace"]


def test_kkt_started_from_the_subspace_is_told_the_defense_there() -> None:
    scenario = load("kkt-defenses-fedavg")
    curves = {}
    for point in expand(scenario):
        if point.scenario.seed == 0:
            attacks = dict(point.scenario.built_attacks)
            curves[point.scenario.defenses[0]["name"] if point.scenario.defenses else "none"] = (
                attacks
            )
    assert list(curves["none"]) == ["kkt"]
    int8 = curves["quantization"]["kkt knowing quantization"].params
    assert (int8.init, int8.known_defense, int8.noise_std) == ("subspace", "int8", 0.0)
    dp = curves["local-dp"]["kkt knowing local-dp"].params
    assert dp.noise_std > 0 and dp.known_defense == "none"


def test_no_twins_when_the_scenario_says_so_or_the_attack_already_knows() -> None:
    noise = [{"name": "gaussian-noise", "std": 0.01}]
    assert list(built(noise, name="subspace", adaptive=False)) == ["subspace"]
    told = built(noise, name="subspace", params={"noise_std": 0.01})
    assert list(told) == ["subspace"]


def test_local_dp_is_known_as_the_gaussian_noise_it_adds() -> None:
    scenario = load("quickstart", {"federation.protocol": "fedavg",
                                   "defenses": [{"name": "local-dp", "epsilon": 2.0}],
                                   "attack.name": "subspace"})  # fmt: skip
    (defense,) = scenario.built_defenses
    attacks = dict(scenario.built_attacks)
    assert attacks["subspace knowing local-dp"].params.noise_std == pytest.approx(defense.noise_std)


def test_dp_sgd_is_known_as_the_noise_its_steps_leave_on_the_update() -> None:
    """FedSGD batch 32: std noise_multiplier * max_grad_norm / 32 on the gradient sent."""
    dp = [{"name": "dp-sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}]
    attacks = built(dp, name="subspace", also=[{"name": "analytic"}], **{"rounds": [1]})
    told = attacks["subspace knowing dp-sgd"].params.noise_std
    assert told == pytest.approx(1.0 * 1.0 / load("quickstart").federation.batch_size)
    assert attacks["analytic knowing dp-sgd"].params.noise_std == told


def test_no_twin_under_secure_aggregation() -> None:
    """The server sees the clients' mean there: the per-update noise std describes nothing."""
    noise = [{"name": "gaussian-noise", "std": 0.01}]
    overrides = {"attack.name": "subspace", "attack.params": {}, "attack.also": []}
    told = load("kkt-defenses-fedavg", {"defenses": noise, **overrides})
    assert [label for label, _ in told.built_attacks] == [
        "subspace",
        "subspace knowing gaussian-noise",
    ]
    secagg = [*noise, {"name": "secure-aggregation"}]
    hidden = load("kkt-defenses-fedavg", {"defenses": secagg, **overrides})
    assert [label for label, _ in hidden.built_attacks] == ["subspace"]


def test_knowledge_of_defenses_in_order() -> None:
    gaussian = DefenseKnowledge(("a",), noise="gaussian", noise_scale=0.03)
    laplace = DefenseKnowledge(("b",), noise="laplace", noise_scale=0.04 / math.sqrt(2))
    both = combined([gaussian, None, laplace])
    assert both is not None and both.defenses == ("a", "b")
    assert both.noise == "gaussian" and both.noise_std == pytest.approx(0.05)
    later = combined([DefenseKnowledge(("p",), intervals="pruning"),
                      DefenseKnowledge(("q",), intervals="int8")])  # fmt: skip
    assert later is not None and later.intervals == "int8"
    assert combined([None, None]) is None
    # Under secure aggregation the server sees a mean the per-update settings do not describe.
    assert combined([gaussian, DefenseKnowledge(("s",), aggregated=True)]) is None
    label = knowing_label("dlg", both)
    assert label == "dlg knowing a+b" and is_adaptive(label) and not is_adaptive("dlg")


def test_the_twin_a_scenario_builds_recovers_digits_its_blind_original_cannot() -> None:
    """A FedSGD batch of 16 digits under the gaussian-noise defense at std 1e-3: the blind
    subspace attack gets none, its twin (told the std) several."""
    std = 1e-3
    attacks = built([{"name": "gaussian-noise", "std": std}], name="subspace",
                    params={"starts": 200})  # fmt: skip
    images, labels = mnist_odd_even(per_class=8, seed=3)
    spec = model_spec(kind="mlp", widths=(256,), activation="sigmoid")
    model = build_model(spec, seed=0)
    gradient = batch_gradient(model, spec, images, labels)
    generator = torch.Generator().manual_seed(0)
    noisy = {k: v + std * torch.randn(v.shape, generator=generator) for k, v in gradient.items()}
    obs = Observation(
        1, 0, spec, {k: v.detach().clone() for k, v in model.state_dict().items()}, noisy,
        PublicMeta("fedsgd", batch_size=16, lr=0.1, local_epochs=1, num_examples=16),
    )  # fmt: skip
    recovered = {
        label: nearest_candidates(images, attack.run([obs])[0].images).recovered
        for label, attack in attacks.items()
    }
    assert recovered["subspace"] == 0
    assert recovered["subspace knowing gaussian-noise"] >= 4, recovered
