"""KKT dataset reconstruction: closed-form stationarity, victim training, scoring, recovery."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attacks.kkt.attack  # noqa: F401  (registers "kkt")
from attacks.kkt.attack import (
    KKT,
    KKTParams,
    _problem,
    combination,
    contributions,
    kkt_losses,
    mlp_layers,
)
from simulator.core.models import HomogeneousMlpParams, ModelSpec, build_model, is_binary
from simulator.core.protocol import Truth
from simulator.core.registry import ATTACKS
from simulator.scoring.metrics import nearest_candidates, ssim
from simulator.scoring.score import score
from tests.fixtures.trained_model import (
    TrainConfig,
    homogeneous_spec,
    mnist_odd_even,
    toy_red_blue,
    train_victim,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_homogeneous_mlp_has_bias_on_first_layer_only_and_scaled_init() -> None:
    spec = homogeneous_spec((1, 28, 28), widths=(7, 5), init_scale=1e-2)
    model = build_model(spec, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["2.weight", "2.bias", "4.weight", "6.weight"]  # 0: Centre, 1: Flatten
    unscaled = dataclasses.replace(spec.params, init_scale=1.0)
    reference = build_model(dataclasses.replace(spec, params=unscaled), seed=0)
    assert torch.allclose(model[4].weight, reference[4].weight * 1e-2)
    assert is_binary(spec) and model(torch.zeros(2, 1, 28, 28)).shape == (2, 1)
    assert HomogeneousMlpParams().init_scale == 1.0 and not is_binary(ModelSpec())


def _small_problem(
    classes: int, seed: int, count: int
) -> tuple[ModelSpec, torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A 16-pixel homogeneous MLP in float64 with ``count`` inputs and output coefficients."""
    spec = homogeneous_spec((1, 4, 4), widths=(6, 5), init_scale=1.0, num_classes=classes)
    model = build_model(spec, seed=seed).double()
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    inputs = torch.randn(count, 16, dtype=torch.double)
    coeff = torch.randn(count, classes, dtype=torch.double)
    return spec, model, weights, inputs, coeff


@pytest.mark.parametrize("classes", [1, 3])
def test_closed_form_combination_equals_autograd(classes: int) -> None:
    spec, model, weights, inputs, coeff = _small_problem(classes, seed=1, count=9)
    # A huge alpha makes sigmoid(alpha z) the exact ReLU derivative.
    closed = combination(mlp_layers(spec, weights), inputs, coeff, alpha=1e9)
    out = model(((inputs + 1) / 2).view(9, 1, 4, 4))  # the model centres its [0, 1] input
    reference = torch.autograd.grad((out * coeff).sum(), list(model.parameters()))
    for a, b in zip(closed, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("classes", [1, 3])
def test_contributions_are_per_sample_gradient_norms(classes: int) -> None:
    spec, model, weights, inputs, coeff = _small_problem(classes, seed=2, count=7)
    closed = contributions(mlp_layers(spec, weights), inputs, coeff, alpha=1e9)
    for i in range(7):
        out = model(((inputs[i : i + 1] + 1) / 2).view(1, 1, 4, 4))
        grads = torch.autograd.grad((out * coeff[i]).sum(), list(model.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert float(closed[i]) == pytest.approx(float(norm), rel=1e-9)


def test_nearest_candidates_scores_each_true_image() -> None:
    truth = torch.rand(6, 1, 16, 16)
    candidates = torch.cat([torch.rand(10, 1, 16, 16), truth[[4, 1]]])
    report = nearest_candidates(truth, candidates, threshold=0.9)
    assert report.recovered == 2 and report.fraction == pytest.approx(2 / 6)
    assert report.index[4] == 10 and report.index[1] == 11
    assert report.ssim[4] == pytest.approx(1.0)
    direct = ssim(candidates[report.index], truth)
    assert torch.allclose(direct, report.ssim)


def test_nearest_candidates_handles_constant_images() -> None:
    red, _ = toy_red_blue(per_class=1)
    candidates = torch.cat([torch.rand(5, 3, 16, 16), red[[1, 0]]])
    report = nearest_candidates(red, candidates)
    assert report.recovered == 2 and report.index.tolist() == [6, 5]


def _toy_observation() -> tuple[torch.Tensor, object]:
    images, labels = toy_red_blue()
    spec = homogeneous_spec((3, 16, 16), widths=(100, 100), init_scale=1e-2)
    config = TrainConfig(steps=500, lr=0.5, weight_decay=1e-3)
    victim = train_victim(spec, images, labels, config)
    assert victim.history[-1]["accuracy"] == 1.0
    return images, victim.observation(images.shape[0], config)


def test_toy_red_blue_fully_recovered_and_selected_without_the_truth() -> None:
    """One fit, with the truth-free agreement selection on: every true image recovered, and
    both distinct ones (red, blue) among the few candidates selected first."""
    images, obs = _toy_observation()
    params = KKTParams(
        iterations=2000, init_scale=0.1, alpha=500.0, log_every=500, select="agreement"
    )
    rec = KKT(params).run([obs])[0]
    assert rec.images.shape == (40, 3, 16, 16) and rec.labels is not None
    assert rec.matching == "nearest" and "far from a KKT point" not in rec.notes
    assert [t["iteration"] for t in rec.trace] == [0.0, 500.0, 1000.0, 1500.0, 2000.0]
    assert rec.trace[-1]["stationarity"] < rec.trace[0]["stationarity"]
    report = nearest_candidates(images, rec.images)
    assert report.recovered == 20, report.ssim
    colours = rec.images.mean((2, 3))
    red = int((colours[:, 0] > colours[:, 2]).sum())
    assert 10 <= red <= 30  # candidates split between the two classes
    assert rec.confident is not None
    k = int(rec.confident.sum())
    assert 2 <= k <= 5 and bool(rec.confident[:k].all())  # selected first, best first
    assert f"agreement selection: {k} of 40 candidates" in rec.notes
    truth = Truth(obs.round, obs.client_id, images, torch.zeros(20, dtype=torch.int64))
    record = score(rec, truth, parity=True).record.to_dict()
    # Two distinct true images: both among the few selected (3 measured: the candidates the
    # fit leans on carry 0.25-0.54 of theta's scale, the rest at most 0.13).
    assert record["selected"] == k and record["selected_leaked"] >= 2
    assert record["images_leaked_selected"] == record["images_leaked"] == 20
    plain = KKT(dataclasses.replace(params, iterations=10, select="none")).run([obs])[0]
    assert plain.confident is None and "selection" not in plain.notes


def test_mnist_tiny_case_beats_random_candidates() -> None:
    images, labels = mnist_odd_even(per_class=10, seed=0)
    spec = homogeneous_spec((1, 28, 28), widths=(100, 100), init_scale=0.3)
    # Long annealed training: the closer theta is to a KKT point, the more digits come back.
    config = TrainConfig(steps=12000, lr=0.05, weight_decay=3e-2, log_every=12000)
    victim = train_victim(spec, images, labels, config)
    assert victim.history[-1]["accuracy"] == 1.0
    rec = KKT(KKTParams(iterations=3000)).run([victim.observation(20, config)])[0]
    report = nearest_candidates(images, rec.images)
    noise = nearest_candidates(images, torch.rand_like(rec.images))
    assert noise.recovered == 0
    assert report.ssim.mean() > noise.ssim.mean() + 0.05
    assert report.recovered >= 2  # 3 of 20 measured (seed 0, one thread)


def test_loss_terms_switch_off_with_zero_weight() -> None:
    _, obs = _toy_observation()
    problem = _problem(obs, "weights", 1.0, "layer")
    inputs = 3 * torch.randn(problem.count, problem.dims)  # far outside [-1, 1]
    relative = torch.full((problem.count,), 0.01)  # below lambda_min
    labels = torch.arange(problem.count) % 2
    full = KKTParams()
    total, terms, _ = kkt_losses(problem, inputs, relative, labels, full)
    assert all(float(v) > 0 for v in terms.values())
    assert float(total) == pytest.approx(float(sum(terms.values())), rel=1e-5)
    for key in ("stationarity", "lambda", "range"):
        params = dataclasses.replace(full, **{f"{key}_weight": 0.0})
        total_off, _, _ = kkt_losses(problem, inputs, relative, labels, params)
        expected = sum(float(v) for k, v in terms.items() if k != key)
        assert float(total_off) == pytest.approx(expected, rel=1e-5)


def test_difference_mode_and_multiclass_run() -> None:
    images, labels = toy_red_blue(per_class=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    spec = homogeneous_spec((3, 16, 16), widths=(20, 20), init_scale=0.3, num_classes=3)
    config = TrainConfig(steps=50, lr=0.1, weight_decay=1e-2)
    obs = train_victim(spec, images, labels, config).observation(6, config)
    for mode in ("weights", "difference"):
        rec = ATTACKS.create("kkt", {"iterations": 20, "mode": mode, "snapshots": 2}).run([obs])[0]
        assert rec.images.shape == (12, 3, 16, 16) and rec.status == "budget"
        assert rec.labels is not None and sorted(set(rec.labels.tolist())) == [0, 1, 2]
        assert [it for it, _ in rec.snapshots] == [10, 20]
        assert float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1


def test_unsupported_model_is_rejected() -> None:
    _, obs = _toy_observation()
    obs = dataclasses.replace(obs, model=ModelSpec(kind="lenet", input_shape=(3, 16, 16)))
    with pytest.raises(ValueError, match="needs a ReLU MLP"):
        KKT().run([obs])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"iterations": -1}, "'iterations' = -1 is out of range"),
        ({"lr": 0.0}, "'lr' = 0.0 is out of range"),
        ({"mode": "gradients"}, "'mode' = 'gradients' is not allowed"),
        ({"candidates": -1.0}, "'candidates' = -1.0 is out of range"),
        ({"alpha": "big"}, "'alpha' = 'big' has type str"),
        ({"tolerance": 1.0}, "unknown parameter 'tolerance'"),
        ({"init": "zeros"}, "'init' = 'zeros' is not allowed"),
        ({"sparsity": 0.0}, "'sparsity' = 0.0 is out of range"),
        ({"select": "truth"}, "'select' = 'truth' is not allowed"),
        ({"select_top": -1}, "'select_top' = -1 is out of range"),
    ],
)
def test_bad_params_are_rejected_with_a_clear_message(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ATTACKS.create("kkt", params)


def test_centred_model_sees_two_x_minus_one() -> None:
    spec = homogeneous_spec((1, 4, 4), widths=(3,), init_scale=1.0)
    plain = build_model(dataclasses.replace(spec, centre_inputs=False), seed=0)
    centred = build_model(spec, seed=0)
    images = torch.rand(5, 1, 4, 4)
    assert torch.allclose(centred(images), plain(images * 2 - 1))


def test_multiclass_form_recovers_three_colour_classes() -> None:
    images = torch.zeros(9, 3, 16, 16)
    for colour in range(3):
        images[3 * colour : 3 * colour + 3, colour] = 1.0
    labels = torch.arange(9) // 3
    spec = homogeneous_spec((3, 16, 16), widths=(50, 50), init_scale=1e-2, num_classes=3)
    config = TrainConfig(steps=500, lr=0.5, weight_decay=1e-3)
    obs = train_victim(spec, images, labels, config).observation(9, config)
    params = KKTParams(iterations=1000, init_scale=0.1, alpha=500.0)
    rec = KKT(params).run([obs])[0]
    report = nearest_candidates(images, rec.images)
    assert report.recovered == 9, report.ssim  # 0.44-1.0 measured
    assert rec.labels is not None and torch.equal(rec.labels[report.index], labels)


def test_a_model_far_from_a_kkt_point_is_reported() -> None:
    images, labels = toy_red_blue(per_class=4)
    spec = homogeneous_spec((3, 16, 16), widths=(30, 30), init_scale=1.0)
    untrained = train_victim(spec, images, labels, TrainConfig(steps=0))
    obs = untrained.observation(8, TrainConfig(steps=0))
    rec = KKT(KKTParams(iterations=200, log_every=100)).run([obs])[0]
    assert rec.objective_value > KKTParams().stationarity_tolerance
    assert "far from a KKT point" in rec.notes and f"{rec.objective_value:.3g}" in rec.notes
