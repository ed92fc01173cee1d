"""Defense plugins do what they claim: measured norms, zero counts, noise, errors, epsilon."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch
from flwr.server.workflow import SecAggPlusWorkflow
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.base import (
    DEFENSE_KINDS,
    AggregationDefense,
    Defense,
    UpdateDefense,
    compose,
    register_defense,
)
from defenses.clipping import Clipping, ClippingParams
from defenses.dp_sgd import (
    DpSgd,
    DpSgdParams,
    dp_sgd_schedule,
    epsilon,
    private_gradient,
    private_local_train,
)
from defenses.noise import GaussianNoise, GaussianNoiseParams, LaplaceNoise, LaplaceNoiseParams
from defenses.pruning import Pruning, PruningParams
from defenses.quantization import Quantization, QuantizationParams
from simulator.core.config import FederationConfig, Scenario, ScenarioError
from simulator.core.models import ModelSpec, build_model, model_spec
from simulator.core.registry import DEFENSES
from simulator.data.shards import Shard
from simulator.federation.training import batch_gradient, local_train
from simulator.scenario import load, with_overrides
from tests.fixtures.secure_aggregation import aggregate_view

Update = dict[str, torch.Tensor]


def random_update(seed: int, scale: float = 1.0) -> Update:
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36), "fc.b": (10,)}
    return {name: scale * torch.randn(shape, generator=g) for name, shape in shapes.items()}


def flat(update: Update) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in update.values()])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- registry and parameters -------------------------------------------------------------------


def test_registry_lists_every_family_with_its_kind() -> None:
    built_in = [n for n in DEFENSES if DEFENSES.entry(n).module.startswith("defenses.")]
    kinds = {
        name: next(k.__name__ for k in DEFENSE_KINDS if isinstance(DEFENSES.create(name), k))
        for name in built_in  # a plugin file loaded by another test may have added more
    }
    assert kinds == {
        "gaussian-noise": "UpdateDefense",
        "laplace-noise": "UpdateDefense",
        "clipping": "UpdateDefense",
        "pruning": "UpdateDefense",
        "quantization": "UpdateDefense",
        "dp-sgd": "TrainingDefense",
        "secure-aggregation": "AggregationDefense",
        "local-dp": "ClientModDefense",
        "inspection": "ClientModDefense",
    }
    for name, line in DEFENSES.items():
        assert isinstance(line, str) and line
        assert isinstance(DEFENSES.create(name).changes_observation, bool)
    assert [row[0] for row in DEFENSES.params_help("dp-sgd")] == [
        "noise_multiplier",
        "max_grad_norm",
        "delta",
    ]


@pytest.mark.parametrize(
    ("name", "params", "fragments"),
    [
        ("gaussian-noise", {"std": -0.1}, ["'std'", "-0.1", "[0.0, inf)"]),
        ("laplace-noise", {"scale": -1}, ["'scale'", "-1", "[0.0"]),
        ("pruning", {"fraction": 1.5}, ["'fraction'", "1.5", "[0.0, 1.0]"]),
        ("pruning", {"fraction": "half"}, ["'fraction'", "'half'", "float"]),
        ("clipping", {"max_norm": 0.0}, ["'max_norm'", "0.0", "(0.0"]),
        ("clipping", {"max_nrom": 1.0}, ["unknown parameter 'max_nrom'", "'max_norm'"]),
        ("quantization", {"precision": "int4"}, ["'precision'", "'int4'", "'fp16', 'int8'"]),
        ("dp-sgd", {"noise_multiplier": -1.0}, ["'noise_multiplier'", "-1.0", "[0.0"]),
        ("dp-sgd", {"delta": 1.0}, ["'delta'", "1.0", "(0.0, 1.0)"]),
        ("dp-sgd", {"max_grad_norm": float("nan")}, ["'max_grad_norm'", "nan"]),
        ("secure-aggregation", {"min_clients": 0}, ["'min_clients'", "0", "[1"]),
        ("secure-aggregation", {"num_shares": 0.0}, ["'num_shares'", "0.0", "(0.0, 1.0]"]),
        ("secure-aggregation", {"reconstruction_threshold": 1.5}, ["'reconstruction_threshold'"]),
        ("secure-aggregation", {"clipping_range": 0}, ["'clipping_range'", "(0.0"]),
        ("secure-aggregation", {"quantization_range": 2**30}, ["'quantization_range'", "[2"]),
        ("secure-aggregation", {"quantization_range": 4.5}, ["'quantization_range'", "int"]),
        ("secure-aggregation", {"max_weight": -1.0}, ["'max_weight'", "-1.0"]),
        ("local-dp", {"clipping_norm": 0.0}, ["'clipping_norm'", "(0.0"]),
        ("local-dp", {"sensitivity": -1.0}, ["'sensitivity'", "[0.0"]),
        ("local-dp", {"epsilon": 0.0}, ["'epsilon'", "(0.0"]),
        ("local-dp", {"delta": 1.0}, ["'delta'", "(0.0, 1.0)"]),
    ],
)
def test_make_defense_rejects_bad_params_naming_key_value_and_allowed(
    name: str, params: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as error:
        DEFENSES.create(name, params)
    assert f"defense {name!r}" in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_make_defense_lists_known_defenses_for_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown defense 'gausian-noise'.*'gaussian-noise'"):
        DEFENSES.create("gausian-noise", {})


def test_make_defense_builds_validated_frozen_params() -> None:
    defense = DEFENSES.create("pruning", {"fraction": 1})  # int accepted for a float field
    assert isinstance(defense, Pruning)
    assert defense.params == PruningParams(fraction=1.0)


def test_compose_applies_update_defenses_in_order_and_leaves_the_input_alone() -> None:
    update = random_update(0, scale=10.0)
    before = {name: t.clone() for name, t in update.items()}
    chain: list[UpdateDefense] = [
        Clipping(ClippingParams(max_norm=1.0)),
        Pruning(PruningParams(fraction=0.5)),
    ]
    out = compose(chain, update, gen())
    assert all(torch.equal(update[n], before[n]) for n in update)
    assert float(flat(out).norm()) <= 1.0 + 1e-5
    assert int((flat(out) == 0).sum()) == flat(update).numel() // 2
    # Pruning first keeps the largest half, which clipping then brings to norm 1 exactly.
    reverse = compose(chain[::-1], update, gen())
    assert float(flat(reverse).norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(flat(out).norm()) < 0.99


def test_a_defense_must_be_one_of_the_four_kinds() -> None:
    with pytest.raises(TypeError, match="UpdateDefense, TrainingDefense"):

        @register_defense("not-a-kind", "subclasses the base, not a kind")
        class NotAKind(Defense):
            pass


# --- clipping ----------------------------------------------------------------------------------


def test_clipping_brings_a_large_update_to_max_norm_and_leaves_a_small_one_alone() -> None:
    update = random_update(1, scale=5.0)
    norm = float(flat(update).norm())
    clipped = Clipping(ClippingParams(max_norm=norm / 7)).apply(update, gen())
    assert float(flat(clipped).norm()) == pytest.approx(norm / 7, rel=1e-6)
    # Same direction: clipping is a global rescale, not per layer.
    assert torch.allclose(flat(clipped) * 7, flat(update), rtol=1e-5, atol=1e-6)
    kept = Clipping(ClippingParams(max_norm=norm * 1.01)).apply(update, gen())
    assert all(torch.equal(kept[n], update[n]) for n in update)


def slow_clip(values: list[list[float]], max_norm: float) -> list[list[float]]:
    norm = math.sqrt(sum(v * v for tensor in values for v in tensor))
    factor = max_norm / norm if norm > max_norm else 1.0
    return [[v * factor for v in tensor] for tensor in values]


def slow_prune(values: list[list[float]], fraction: float) -> list[list[float]]:
    coordinates = [(abs(v), i, j) for i, tensor in enumerate(values) for j, v in enumerate(tensor)]
    count = int(Decimal(repr(fraction)) * len(coordinates))  # floor: the count is non-negative
    out = [list(tensor) for tensor in values]
    for _, i, j in sorted(coordinates)[:count]:  # ties: earlier (tensor, position) first
        out[i][j] = 0.0
    return out


# Small integers make ties in magnitude common; the scale spreads norms around max_norm.
tensors = st.lists(
    st.lists(st.integers(-6, 6).map(float), min_size=1, max_size=12), min_size=1, max_size=4
)


def as_update(values: list[list[float]]) -> Update:
    return {f"p{i}": torch.tensor(tensor, dtype=torch.float64) for i, tensor in enumerate(values)}


@settings(max_examples=60, deadline=None)
@given(values=tensors, max_norm=st.floats(0.1, 30.0))
def test_clipping_matches_a_coordinate_loop(values: list[list[float]], max_norm: float) -> None:
    out = Clipping(ClippingParams(max_norm=max_norm)).apply(as_update(values), gen())
    expected = slow_clip(values, max_norm)
    for i, tensor in enumerate(expected):
        assert out[f"p{i}"].tolist() == pytest.approx(tensor, rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(values=tensors, fraction=st.floats(0.0, 1.0))
def test_pruning_matches_a_coordinate_loop(values: list[list[float]], fraction: float) -> None:
    out = Pruning(PruningParams(fraction=fraction)).apply(as_update(values), gen())
    assert [out[f"p{i}"].tolist() for i in range(len(values))] == slow_prune(values, fraction)


# --- pruning -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.29, 0.5, 0.999, 1.0])
def test_pruning_zeroes_exactly_floor_fraction_and_keeps_the_largest(fraction: float) -> None:
    update = random_update(2)
    values = flat(update)
    out = flat(Pruning(PruningParams(fraction=fraction)).apply(update, gen()))
    count = math.floor(Decimal(repr(fraction)) * values.numel())
    pruned = out == 0
    assert int(pruned.sum()) == count
    assert torch.equal(out[~pruned], values[~pruned])  # kept coordinates are untouched
    if 0 < count < values.numel():
        assert float(values[~pruned].abs().min()) >= float(values[pruned].abs().max())


def test_pruning_count_uses_the_written_decimal() -> None:
    update = {"w": torch.arange(1.0, 101.0)}
    out = Pruning(PruningParams(fraction=0.29)).apply(update, gen())["w"]
    assert int((out == 0).sum()) == 29  # 0.29 * 100 is 28.999... in floating point
    assert torch.equal(out[:29], torch.zeros(29)) and torch.equal(out[29:], update["w"][29:])


def test_pruning_breaks_ties_by_position_across_layers() -> None:
    update = {"a": torch.full((3,), -2.0), "b": torch.full((3,), 2.0)}
    out = Pruning(PruningParams(fraction=0.5)).apply(update, gen())
    assert out["a"].tolist() == [0.0, 0.0, 0.0] and out["b"].tolist() == [2.0, 2.0, 2.0]


# --- noise -------------------------------------------------------------------------------------


def large_update() -> Update:
    return {"w": torch.full((400, 500), 3.0), "b": torch.zeros(500)}


def test_gaussian_noise_has_the_requested_std_and_is_reproducible() -> None:
    update = large_update()
    defense = GaussianNoise(GaussianNoiseParams(std=0.5))
    first = flat(defense.apply(update, gen(7)))
    noise = first - flat(update)
    assert float(noise.std()) == pytest.approx(0.5, rel=0.01)
    assert abs(float(noise.mean())) < 0.005
    assert torch.equal(flat(defense.apply(update, gen(7))), first)
    assert not torch.equal(flat(defense.apply(update, gen(8))), first)
    zero = GaussianNoise(GaussianNoiseParams(std=0.0)).apply(update, gen(7))
    assert torch.equal(flat(zero), flat(update))


def test_laplace_noise_has_the_requested_scale_and_is_reproducible() -> None:
    update = large_update()
    defense = LaplaceNoise(LaplaceNoiseParams(scale=0.3))
    first = flat(defense.apply(update, gen(3)))
    noise = first - flat(update)
    assert float(noise.abs().mean()) == pytest.approx(0.3, rel=0.01)  # E|X| = b
    assert float(noise.std()) == pytest.approx(0.3 * math.sqrt(2), rel=0.02)
    assert abs(float(noise.mean())) < 0.005 and math.isfinite(float(noise.abs().max()))
    assert torch.equal(flat(defense.apply(update, gen(3))), first)
    assert not torch.equal(flat(defense.apply(update, gen(4))), first)


# --- quantization ------------------------------------------------------------------------------


def test_fp16_error_is_within_half_precision_rounding() -> None:
    g = gen(4)
    magnitudes = torch.exp(torch.empty(20000).uniform_(math.log(1e-4), math.log(6e4), generator=g))
    signs = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    update = {"w": (signs * magnitudes).reshape(100, 200), "big": torch.tensor([1e6, -1e6])}
    out = Quantization(QuantizationParams(precision="fp16")).apply(update, gen())
    x, error = update["w"], (out["w"] - update["w"]).abs()
    eps = torch.finfo(torch.float16).eps  # 2**-10
    # Round to nearest: relative error <= eps / 2 for normal halves, 2**-25 below them.
    assert bool((error <= torch.clamp(x.abs() * eps / 2, min=2.0**-25)).all())
    assert float((error / x.abs()).max()) <= eps
    assert out["big"].tolist() == [65504.0, -65504.0] and out["w"].dtype == torch.float32


def test_int8_uses_at_most_255_levels_and_errs_by_at_most_half_a_step() -> None:
    update = random_update(5, scale=3.0) | {"zeros": torch.zeros(7)}
    out = Quantization(QuantizationParams(precision="int8")).apply(update, gen())
    for name, x in update.items():
        q = out[name]
        scale = float(x.abs().max()) / 127
        assert len(torch.unique(q)) <= 255 and len(torch.unique(q.abs())) <= 128
        assert float((q - x).abs().max()) <= scale / 2 * (1 + 1e-5)
        if scale:
            assert float(q.abs().max()) == pytest.approx(127 * scale, rel=1e-6)
            levels = q / scale
            assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert torch.equal(out["zeros"], torch.zeros(7))


# --- DP-SGD ------------------------------------------------------------------------------------

SMALL_MLP = model_spec(kind="mlp", widths=(16,))


def batch(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def slow_clipped_mean(
    model: torch.nn.Module, spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, max_norm: float
) -> Update:
    total: Update = {}
    for i in range(len(y)):
        g = batch_gradient(model, spec, x[i : i + 1], y[i : i + 1])
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g.values()))
        factor = min(1.0, max_norm / norm)
        for name, t in g.items():
            total[name] = total.get(name, torch.zeros_like(t)) + factor * t
    return {name: t / len(y) for name, t in total.items()}


def per_sample_norms(
    model: torch.nn.Module, spec: ModelSpec, x: torch.Tensor, y: torch.Tensor
) -> list[float]:
    return [
        float(flat(batch_gradient(model, spec, x[i : i + 1], y[i : i + 1])).norm())
        for i in range(len(y))
    ]


@pytest.mark.parametrize("spec", [SMALL_MLP, ModelSpec(kind="lenet"), ModelSpec(kind="binary-fc")])
def test_private_gradient_without_noise_is_the_mean_of_clipped_sample_gradients(
    spec: ModelSpec,
) -> None:
    model = build_model(spec, seed=0)
    x, y = batch(1)
    norms = sorted(per_sample_norms(model, spec, x, y))
    max_norm = norms[len(norms) // 2]  # half the samples are clipped, half are not
    params = DpSgdParams(noise_multiplier=0.0, max_grad_norm=max_norm)
    private = private_gradient(model, spec, x, y, params, gen())
    expected = slow_clipped_mean(model, spec, x, y, max_norm)
    assert private.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(private[name], expected[name], rtol=1e-4, atol=1e-7), name
    # No clipping at all would give the plain batch gradient, which differs.
    plain = flat(batch_gradient(model, spec, x, y))
    assert not torch.allclose(flat(private), plain, rtol=1e-3)


def test_private_gradient_noise_has_std_noise_multiplier_times_norm_over_batch() -> None:
    model = build_model(SMALL_MLP, seed=0)
    x, y = batch(2, n=8)
    clean = private_gradient(model, SMALL_MLP, x, y, DpSgdParams(0.0, 0.5), gen())
    params = DpSgdParams(noise_multiplier=2.0, max_grad_norm=0.5)
    noisy = private_gradient(model, SMALL_MLP, x, y, params, gen(9))
    noise = flat(noisy) - flat(clean)
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.03)
    again = private_gradient(model, SMALL_MLP, x, y, params, gen(9))
    assert torch.equal(flat(again), flat(noisy))
    halved = private_gradient(model, SMALL_MLP, x, y, params, gen(9), denominator=16)
    assert torch.allclose(flat(halved) * 2, flat(noisy), atol=1e-7)


def test_private_local_train_without_clipping_or_noise_is_full_batch_sgd() -> None:
    x, y = batch(3, n=20)
    private_model, plain_model = build_model(SMALL_MLP, seed=1), build_model(SMALL_MLP, seed=1)
    # batch_size >= n: Poisson rate 1 keeps every example, as one plain full batch does.
    params = DpSgdParams(noise_multiplier=0.0, max_grad_norm=1e6)
    loss = private_local_train(private_model, SMALL_MLP, x, y, 3, 32, 0.5, params, gen(0))
    local_train(plain_model, SMALL_MLP, Shard(x, y), 3, 32, 0.5, gen(0))
    plain = plain_model.state_dict()
    for name, weights in private_model.state_dict().items():
        assert torch.allclose(weights, plain[name], atol=1e-6), name
    assert math.isfinite(loss)


def test_private_local_train_is_reproducible_and_moves_the_weights() -> None:
    x, y = batch(4, n=40)
    params = DpSgdParams(noise_multiplier=1.0, max_grad_norm=1.0)
    models = [build_model(SMALL_MLP, seed=2) for _ in range(3)]
    start = flat(dict(models[0].state_dict()))
    for model, seed in zip(models, [5, 5, 6], strict=True):
        DpSgd(params).local_train(model, SMALL_MLP, x, y, 2, 10, 0.1, gen(seed))
    ends = [flat(dict(m.state_dict())) for m in models]
    assert torch.equal(ends[0], ends[1]) and not torch.equal(ends[0], ends[2])
    assert not torch.equal(ends[0], start)
    assert dp_sgd_schedule(40, 10, 2) == (0.25, 8)
    assert dp_sgd_schedule(45, 10, 3) == (10 / 45, 15)


def test_dp_sgd_tells_the_server_the_noise_its_update_carries() -> None:
    """The std the server is told is the std measured on the update: FedSGD's gradient, and
    FedAvg's first-layer change on all-zero inputs, where every gradient of that layer is 0
    and the change is the noise of 8 steps alone."""
    params = DpSgdParams(noise_multiplier=2.0, max_grad_norm=0.5)
    fedsgd = FederationConfig(protocol="fedsgd", batch_size=8)
    model = build_model(SMALL_MLP, seed=0)
    x, y = batch(2, n=8)
    clean = private_gradient(model, SMALL_MLP, x, y, DpSgdParams(0.0, 0.5), gen())
    noise = flat(private_gradient(model, SMALL_MLP, x, y, params, gen(9))) - flat(clean)
    told = DpSgd(params).known_to_server(fedsgd, 100)
    assert told is not None and told.noise == "gaussian"
    assert float(noise.std()) == pytest.approx(told.noise_std, rel=0.03)

    fedavg = FederationConfig(protocol="fedavg", batch_size=10, local_epochs=2, lr=0.1)
    model = build_model(SMALL_MLP, seed=2)
    first = model.state_dict()["1.weight"].clone()
    zeros = torch.zeros(40, 1, 28, 28)
    DpSgd(params).local_train(model, SMALL_MLP, zeros, y.repeat(5), 2, 10, 0.1, gen(3))
    change = model.state_dict()["1.weight"] - first
    told = DpSgd(params).known_to_server(fedavg, 40)
    assert told is not None
    assert told.noise_std == pytest.approx(0.1 * 2.0 * 0.5 * math.sqrt(8) / 10)
    assert float(change.std()) == pytest.approx(told.noise_std, rel=0.05)
    # Without the shard size FedAvg's step count is unknown; without noise nothing is told.
    assert DpSgd(params).known_to_server(fedavg, 0) is None
    assert DpSgd(DpSgdParams(0.0, 0.5)).known_to_server(fedsgd, 100) is None


def flower_epsilon(
    sigma: float, sample_size: int, population: int, steps: int, delta: float
) -> float:
    """The same question asked through Flower's accountant (flwr[dp], dp-accounting backend)."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = PrivacyConfig(
        target_delta=delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.POISSON,
    )
    accountant = RdpAccountant(config)
    accountant.compose(GaussianPrivacyEvent(sigma, sample_size, population), count=steps)
    return accountant.get_epsilon(delta)


def test_epsilon_is_the_rdp_accountants_for_poisson_sampled_dp_sgd() -> None:
    params = DpSgdParams(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    rate, steps = dp_sgd_schedule(60000, 256, 60)
    value = epsilon(params, rate, steps)
    assert value == pytest.approx(flower_epsilon(1.1, 256, 60000, steps, 1e-5), rel=1e-9)
    assert 1.0 < value < 5.0  # the well-known single-digit budget of this MNIST setting
    assert DpSgd(params).epsilon(rate, steps) == value


def test_epsilon_falls_with_noise_and_grows_with_steps_and_rate() -> None:
    by_noise = [epsilon(DpSgdParams(noise_multiplier=s), 0.01, 1000) for s in (0.7, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    by_steps = [epsilon(DpSgdParams(), 0.01, t) for t in (1, 10, 100, 1000)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 4
    assert epsilon(DpSgdParams(), 0.001, 100) < epsilon(DpSgdParams(), 0.1, 100)
    assert epsilon(DpSgdParams(noise_multiplier=0.0), 0.01, 10) == math.inf
    assert epsilon(DpSgdParams(), 0.01, 0) == 0.0
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon(DpSgdParams(), 0.0, 10)


# --- secure aggregation ------------------------------------------------------------------------


def test_secure_aggregation_builds_flowers_secagg_plus_workflow_from_its_parameters() -> None:
    federation = FederationConfig(clients=4, fraction=1.0, timeout_s=30.0)
    params = {"num_shares": 0.5, "reconstruction_threshold": 0.75, "clipping_range": 4.0}
    defense = DEFENSES.create("secure-aggregation", {**params, "quantization_range": 2**10})
    assert isinstance(defense, AggregationDefense) and defense.min_clients == 2
    workflow = defense.workflow(federation, largest_weight=16.0)
    assert type(workflow) is SecAggPlusWorkflow
    assert (workflow.num_shares, workflow.reconstruction_threshold) == (0.5, 0.75)
    assert (workflow.clipping_range, workflow.quantization_range) == (4.0, 2**10)
    assert (workflow.max_weight, workflow.timeout) == (16.0, 30.0)
    # a max_weight of the defense's own wins over the largest example count
    fixed = DEFENSES.create("secure-aggregation", {"max_weight": 50.0, "min_clients": 3})
    assert fixed.workflow(federation, 16.0).max_weight == 50.0  # type: ignore[attr-defined]
    assert fixed.min_clients == 3  # type: ignore[attr-defined]


def test_a_scenario_has_at_most_one_aggregation_defense() -> None:
    with pytest.raises(ScenarioError, match="at most one aggregation defense per scenario"):
        load("quickstart", {"defenses": [{"name": "secure-aggregation"}] * 2})


def test_an_aggregation_defense_that_does_not_say_how_it_runs_is_refused_when_registered() -> None:
    class ViewOnly(AggregationDefense):
        def view(self, updates: list) -> dict:
            return {}

    with pytest.raises(TypeError) as info:
        register_defense("view-only-aggregation", "unusable")(ViewOnly)
    assert str(info.value) == (
        "defense 'view-only-aggregation': ViewOnly does not implement min_clients, workflow"
    )
    assert "view-only-aggregation" not in DEFENSES


def test_the_secure_aggregation_oracle_is_the_weighted_mean_and_no_single_update() -> None:
    """The tests' oracle for what SecAgg+ reveals (tests.fixtures.secure_aggregation)."""
    updates = [random_update(seed) for seed in (10, 11, 12)]
    total = aggregate_view(updates)
    for name in updates[0]:
        assert torch.allclose(total[name], sum(u[name] for u in updates), atol=1e-6)
        for update in updates:
            assert not torch.allclose(total[name], update[name], atol=1e-3)
    mean = aggregate_view(updates, [1.0, 2.0, 1.0])
    expected = (updates[0]["fc.weight"] + 2 * updates[1]["fc.weight"] + updates[2]["fc.weight"]) / 4
    assert torch.allclose(mean["fc.weight"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="parameters"):
        aggregate_view([random_update(0), {"other": torch.zeros(1)}])


# --- local DP (Flower's LocalDpMod) ------------------------------------------------------------


def local_dp_scenario(protocol: str = "fedavg", **params: float) -> Scenario:
    overrides = {
        "federation.protocol": protocol,
        "federation.clients": 2,
        "federation.batch_size": 5,
        "federation.lr": 0.1,
        "data.examples_per_client": 10,
        "model.widths": [32],
        "defenses": [{"name": "local-dp", **params}],
    }
    return load("quickstart", overrides)


def test_local_dp_is_fedavg_only_and_not_under_secure_aggregation() -> None:
    """Both mistakes stop the scenario at load, before any client runs."""
    with pytest.raises(ScenarioError, match=r"'local-dp' needs federation.protocol = 'fedavg'"):
        local_dp_scenario("fedsgd")
    with pytest.raises(ScenarioError, match="cannot be combined with 'secure-aggregation'"):
        with_overrides(
            local_dp_scenario(),
            {"defenses": [{"name": "local-dp"}, {"name": "secure-aggregation"}]},
        )
    assert local_dp_scenario().defenses[0]["name"] == "local-dp"  # fedavg alone is fine
