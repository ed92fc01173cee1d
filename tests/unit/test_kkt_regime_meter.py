"""The regime meter's KKT residual (benchmarks.kkt_residual): near 0 on a constructed KKT
point, large on random weights, and its Gram-matrix algebra equal to the explicit design's."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.bench_kkt_regime_meter import checkpoints, fit_extrapolation
from benchmarks.kkt_residual import gram_system, nnls_gram, truth_residual
from simulator.core.models import ModelSpec, build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta
from tests.fixtures.trained_model import homogeneous_spec


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def observe(spec: ModelSpec, weights: dict[str, torch.Tensor], n: int) -> Observation:
    return Observation(
        round=0,
        client_id=0,
        model=spec,
        global_weights=weights,
        update=weights,
        meta=PublicMeta("fedavg", n, 0.1, 1, num_examples=n),
    )


def test_a_linear_kkt_point_has_zero_residual_only_on_the_labels_side() -> None:
    spec = model_spec(kind="binary-fc", input_shape=(1, 2, 3), num_classes=1)
    images = torch.rand(4, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0, 3, 2])  # y = +1, -1, +1, -1
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    lambdas = torch.tensor([0.5, 1.0, 0.0, 2.0])  # a zero coefficient is allowed
    w = (lambdas * signs) @ images.flatten(1)  # theta = sum_i lambda_i y_i grad f(x_i)
    b = (lambdas * signs).sum()
    kkt = {"1.weight": w[None], "1.bias": b[None]}
    assert truth_residual(observe(spec, kkt, 4), images, labels=labels) < 1e-10
    # The same weights negated: least squares with free signs still explains them, but
    # lambda >= 0 cannot -- not a KKT point of these labels.
    flipped = {k: -v for k, v in kkt.items()}
    assert truth_residual(observe(spec, flipped, 4), images) < 1e-10
    assert truth_residual(observe(spec, flipped, 4), images, labels=labels) > 0.1


def test_a_constructed_two_layer_kkt_point_is_near_zero_and_random_weights_are_not() -> None:
    """784-style victim in miniature: centred inputs, bias on the first layer only. Digit 1 is
    white on the left half, digit 2 on the right (centred: opposite signs, dot product -16);
    units 0-1 fire on digit 1 only, units 2-3 on digit 2 only. With lambda_i =
    1 / sqrt(||x_i||^2 + 1), ``W_j = lambda y v_j x_i``, ``b_j = lambda y v_j`` and the output
    weights ``v`` solve theta = sum_i lambda_i y_i grad f(x_i) exactly."""
    spec = homogeneous_spec((1, 1, 16), widths=(4,), init_scale=1.0)
    images = torch.zeros(2, 1, 1, 16)
    images[0, ..., :8] = 1.0
    images[1, ..., 8:] = 1.0
    labels = torch.tensor([1, 0])  # y = +1, -1
    centred = images.flatten(1) * 2 - 1
    lam = 1 / math.sqrt(16 + 1)
    v = torch.tensor([0.7, 1.3, -0.4, -2.0])  # y_i v_j > 0 on each unit's own digit
    owner, y = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, -1.0, -1.0])
    names = list(build_model(spec, seed=0).state_dict())
    kkt = {
        names[0]: (lam * y * v)[:, None] * centred[owner],
        names[1]: lam * y * v,
        names[2]: v[None],
    }
    obs = observe(spec, kkt, 2)
    assert truth_residual(obs, images, labels=labels) < 1e-10
    assert truth_residual(obs, images, first_only=True, labels=labels) < 1e-10
    model = build_model(homogeneous_spec((1, 1, 16), widths=(64, 64), init_scale=1.0), seed=1)
    many = torch.rand(12, 1, 1, 16, generator=torch.Generator().manual_seed(1))
    random = observe(homogeneous_spec((1, 1, 16), widths=(64, 64)), model.state_dict(), 12)
    assert truth_residual(random, many, labels=torch.arange(12)) > 1.0  # 3 tensors + bias: 4


def test_the_gram_form_equals_the_explicit_per_example_design() -> None:
    spec = homogeneous_spec((1, 2, 4), widths=(10, 7), init_scale=1.0)
    model = build_model(spec, seed=3)
    images = torch.rand(6, 1, 2, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    norms = {k: float((v.double() ** 2).sum()) for k, v in weights.items()}
    columns = []
    for x, label in zip(images, labels, strict=True):
        model.zero_grad()
        (float(label % 2 * 2 - 1) * model.double()(x[None].double())[0, 0]).backward()
        columns.append(
            torch.cat(
                [p.grad.double().flatten() / norms[k] ** 0.5 for k, p in model.named_parameters()]
            )
        )
    design = torch.stack(columns, 1)
    target = torch.cat([v.double().flatten() / norms[k] ** 0.5 for k, v in weights.items()])
    gram, cross, t2 = gram_system(observe(spec, weights, 6), images, labels, first_only=False)
    # (the attack's per-tensor norms are float32 sums: equal to about 1e-7)
    assert torch.allclose(gram, design.T @ design, rtol=1e-6, atol=1e-9)
    assert torch.allclose(cross, design.T @ target, rtol=1e-6, atol=1e-9)
    assert t2 == pytest.approx(float(target @ target), rel=1e-6)
    free = torch.linalg.lstsq(design, target[:, None]).solution
    assert truth_residual(observe(spec, weights, 6), images) == pytest.approx(
        float(((target - (design @ free)[:, 0]) ** 2).sum()), rel=1e-6
    )
    # Non-negative least squares: the KKT conditions of min ||t - D c||^2 s.t. c >= 0.
    coeff = nnls_gram(gram, cross)
    slope = gram @ coeff - cross
    assert bool((coeff >= 0).all()) and bool((slope >= -1e-9).all())
    assert float((coeff * slope).abs().max()) < 1e-9


def test_extrapolation_fits_a_power_law_tail() -> None:
    # residual = 2 t^-0.5: reaches 0.1 at t = 400
    points = [
        {"epoch": e, "seconds": float(e), "residual_all": 2 * e**-0.5} for e in checkpoints(100)
    ]
    fit = fit_extrapolation(points)
    assert fit["slope"] == pytest.approx(-0.5, abs=1e-3)
    assert fit["seconds_to_target"] == pytest.approx(400.0, rel=1e-3)
    assert fit["reached_target_at_seconds"] is None
