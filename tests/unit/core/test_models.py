"""Model builders: the homogeneous MLP's first-layer scale (Haim et al.), the cnn-fc shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.bench_kkt_regimes import first_layer_initial
from simulator.core import models
from simulator.core.models import (
    HomogeneousMlpParams,
    build_model,
    model_spec,
    model_with_weights,
)
from simulator.scenario import ScenarioError, load
from tests.fixtures.trained_model import homogeneous_spec


def test_first_layer_scale_multiplies_the_first_layer_only() -> None:
    spec = homogeneous_spec((1, 4, 4), widths=(6, 5), init_scale=1.0)
    plain = build_model(spec, seed=3).state_dict()
    small = build_model(
        dataclasses.replace(spec, params=dataclasses.replace(spec.params, first_layer_scale=1e-4)),
        seed=3,
    ).state_dict()
    assert list(small) == ["2.weight", "2.bias", "4.weight", "6.weight"]
    assert torch.allclose(small["2.weight"], plain["2.weight"] * 1e-4)
    assert torch.allclose(small["2.bias"], plain["2.bias"] * 1e-4)
    assert torch.equal(small["4.weight"], plain["4.weight"])
    assert torch.equal(small["6.weight"], plain["6.weight"])
    assert HomogeneousMlpParams().first_layer_scale == 1.0


@pytest.mark.parametrize("init_scale", [1.0, 0.3])
def test_first_layer_scale_is_the_regime_benchmarks_hand_scaling(init_scale: float) -> None:
    """One mechanism: the spec key gives the weights bench_kkt_regimes builds by hand."""
    spec = homogeneous_spec((1, 4, 4), widths=(6, 5), init_scale=init_scale)
    by_hand = first_layer_initial(spec, 1e-4, seed=5)
    by_spec = build_model(
        dataclasses.replace(spec, params=dataclasses.replace(spec.params, first_layer_scale=1e-4)),
        seed=5,
    ).state_dict()
    for name, tensor in by_hand.items():
        assert torch.allclose(by_spec[name], tensor, rtol=1e-6, atol=0), name


def test_paper_scenario_sets_the_papers_victim_and_full_batch_gd() -> None:
    scenario = load("kkt-mnist-odd-even-paper")
    model, federation = scenario.model, scenario.federation
    assert model.kind == "homogeneous-mlp" and model.params.widths == (1000, 1000)
    assert model.params.first_layer_scale == 1e-4 and model.params.init_scale == 1.0
    assert model.centre_inputs
    # Full-batch GD: one client holding every digit, one batch of all of them, no decay.
    assert scenario.data.train_examples == 500 and federation.clients == 1
    assert federation.batch_size >= scenario.data.train_examples
    assert federation.lr == 0.01 and federation.weight_decay == 0.0
    params = scenario.attack.params
    assert params["select"] == "agreement" and params["lambda_min"] == 0.45
    assert params["candidates"] * scenario.data.train_examples == 1000


def test_first_layer_scale_must_be_positive() -> None:
    with pytest.raises(ScenarioError, match="first_layer_scale"):
        load("kkt-mnist-odd-even-paper", overrides=["model.first_layer_scale=0"])


def test_cnn_fc_is_the_fedavg_papers_cnn_and_cnn_is_unchanged() -> None:
    """channels [32, 64] + widths [100]: Dimitrov et al.'s FEMNIST CNN (conv 3x3 32, avg pool,
    conv 3x3 64, avg pool, dense 100, head); with no widths it is exactly the plain cnn."""
    spec = model_spec("cnn-fc", channels=(32, 64), widths=(100,))
    shapes = [tuple(p.shape) for p in build_model(spec, seed=0).parameters()]
    assert shapes == [
        (32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (100, 64 * 7 * 7), (100,), (10, 100), (10,)
    ]  # fmt: skip
    assert build_model(spec, seed=0)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    plain = build_model(model_spec("cnn", channels=(4, 8)), seed=1).state_dict()
    no_dense = build_model(model_spec("cnn-fc", channels=(4, 8), widths=()), seed=1).state_dict()
    assert list(plain) == list(no_dense)
    assert all(torch.equal(plain[k], no_dense[k]) for k in plain)


def test_a_scenario_selects_cnn_fc_with_its_widths() -> None:
    scenario = load("fedavg-multistep", overrides=['model.kind="cnn-fc"', "model.widths=[100]"])
    assert scenario.model.kind == "cnn-fc" and scenario.model.params.widths == (100,)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_model_with_given_weights_is_the_built_model_holding_them(kind: str) -> None:
    spec = load("quickstart", {"model.kind": kind}).model
    weights = build_model(spec, seed=3).state_dict()
    torch.manual_seed(0)
    model = model_with_weights(spec, weights)
    assert torch.equal(torch.rand(3), torch.manual_seed(0) and torch.rand(3))  # RNG untouched
    reference = build_model(spec)
    reference.load_state_dict(weights)
    inputs = torch.rand(4, *spec.input_shape)
    assert torch.equal(model(inputs), reference(inputs))
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())
    with torch.no_grad():  # its tensors are its own: training it leaves the weights sent alone
        next(model.parameters()).add_(1.0)
    assert torch.equal(
        weights[next(iter(weights))], build_model(spec, seed=3).state_dict()[next(iter(weights))]
    )


class WithScale(torch.nn.Module):
    """A layer with a non-persistent buffer: it is not in the state a client is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs) * self.scale


def test_a_model_with_state_outside_its_weights_is_built_the_ordinary_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The meta-device build would leave the non-persistent buffer without a value (a plugin
    model may have one): the model is built for real, then given the weights."""
    monkeypatch.setattr(models, "build_model", lambda spec, seed=None: WithScale())
    weights = {k: torch.rand_like(v) for k, v in WithScale().state_dict().items()}
    model = model_with_weights(load("quickstart").model, weights)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert torch.equal(model.scale, torch.full((2,), 3.0))
    assert torch.equal(model.linear.weight, weights["linear.weight"])
    inputs = torch.rand(5, 4)
    assert torch.equal(
        model(inputs), (inputs @ weights["linear.weight"].T + weights["linear.bias"]) * 3
    )
