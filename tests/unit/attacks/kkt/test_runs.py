"""KKT runs batched as one tensor problem: same answer as the runs one after the other."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attacks.kkt.attack import KKT, KKTParams, _problem, run_params
from attacks.kkt.runs import BatchedOptimizer, combination, draw_settings
from simulator.core.protocol import Observation
from tests.fixtures.trained_model import TrainConfig, homogeneous_spec, toy_red_blue, train_victim


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _observation(classes: int) -> Observation:
    """A small trained victim: 6 toy 3x16x16 images, hidden widths 12."""
    images, _ = toy_red_blue(per_class=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if classes == 3 else torch.tensor([1] * 3 + [0] * 3)
    spec = homogeneous_spec((3, 16, 16), widths=(12, 12), init_scale=0.3, num_classes=classes)
    config = TrainConfig(steps=40, lr=0.1, weight_decay=1e-2)
    return train_victim(spec, images, labels, config).observation(6, config)


@pytest.mark.parametrize(
    ("classes", "mode", "optimizer"),
    [(1, "weights", "sgd"), (1, "difference", "adam"), (3, "weights", "adam")],
)
def test_batched_runs_equal_separate_runs(classes: int, mode: str, optimizer: str) -> None:
    """R runs fitted together give each run's candidates, losses and trace as R separate runs
    with the drawn settings (the slow reference: a Python loop over runs)."""
    obs = _observation(classes)
    params = KKTParams(
        iterations=30,
        runs=3,
        run_spread=3.0,
        lambda_min_spread=0.1,
        mode=mode,  # type: ignore[arg-type]
        optimizer=optimizer,  # type: ignore[arg-type]
        lr=0.01 if optimizer == "adam" else 0.1,
        log_every=10,
        seed=4,
    )
    batched = KKT(params).run([obs])[0]
    singles = [KKT(one).run([obs])[0] for one in run_params(params)]
    count = singles[0].images.shape[0]
    assert batched.images.shape[0] == 3 * count
    for r, single in enumerate(singles):
        got = batched.images[r * count : (r + 1) * count]
        assert torch.allclose(got, single.images, atol=1e-4), (r, (got - single.images).abs().max())
        assert single.labels is not None and batched.labels is not None
        assert torch.equal(batched.labels[r * count : (r + 1) * count], single.labels)
        assert f"residual {single.objective_value:.3g}" in batched.notes
    assert batched.objective_value == pytest.approx(
        min(s.objective_value for s in singles), rel=1e-4
    )
    # The trace follows the run of lowest loss: its values are that run's own.
    for row in batched.trace:
        own = singles[int(row["run"])].trace[int(row["iteration"]) // 10]
        assert row["loss"] == pytest.approx(own["loss"], rel=1e-4)
        lowest = min(s.trace[int(row["iteration"]) // 10]["loss"] for s in singles)
        assert row["loss"] == pytest.approx(lowest, rel=1e-4)


def test_drawn_settings_keep_run_zero_and_stay_in_range() -> None:
    settings = draw_settings(
        5,
        seed=7,
        lr=0.01,
        lambda_lr=0.02,
        alpha=150.0,
        init_scale=0.03,
        lambda_min=0.45,
        spread=2.0,
        lambda_spread=0.05,
    )
    assert settings.seeds == (7, 8, 9, 10, 11) and settings.runs == 5
    assert float(settings.lr[0]) == 0.01 and float(settings.alpha[0]) == 150.0
    assert float(settings.init_scale[0]) == 0.03 and float(settings.lambda_min[0]) == 0.45
    assert bool((settings.lr >= 0.005).all() and (settings.lr <= 0.02).all())
    assert bool((settings.alpha >= 75).all() and (settings.alpha <= 300).all())
    assert bool(((settings.lambda_min - 0.45).abs() <= 0.05 + 1e-12).all())
    assert bool((settings.lambda_lr == 0.02).all())
    assert len(set(settings.lr.tolist())) == 5  # every other run draws its own
    again = draw_settings(5, 7, 0.01, 0.02, 150.0, 0.03, 0.45, 2.0, 0.05)
    assert torch.equal(again.lr, settings.lr)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        draw_settings(0, 0, 0.1, 0.1, 1.0, 1.0, 0.5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_batched_optimizer_steps_as_torch_optim(kind: str) -> None:
    """One run of the hand-written optimiser follows torch.optim with cosine annealing; two
    runs with different step sizes follow two torch optimisers."""
    target = torch.randn(2, 5, 3, dtype=torch.float64)
    ours = torch.zeros(2, 5, 3, dtype=torch.float64, requires_grad=True)
    lrs = torch.tensor([0.05, 0.2], dtype=torch.float64)
    steps = BatchedOptimizer([ours], [lrs], kind, iterations=20, decay=True)
    refs = [torch.zeros(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    optims = [
        torch.optim.Adam([x], lr=float(lr))
        if kind == "adam"
        else torch.optim.SGD([x], lr=float(lr), momentum=0.9)
        for x, lr in zip(refs, lrs, strict=True)
    ]
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, 20) for o in optims]
    for _ in range(20):
        ours.grad = None
        ((ours - target) ** 2).sum().backward()
        steps.step(torch.ones(2, dtype=torch.bool))
        for x, t, o, s in zip(refs, target, optims, schedules, strict=True):
            o.zero_grad()
            ((x - t) ** 2).sum().backward()
            o.step()
            s.step()
    for r in range(2):
        assert torch.allclose(ours[r], refs[r], atol=1e-10)


def test_inactive_runs_do_not_move() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    steps = BatchedOptimizer([x], [torch.tensor([0.1, 0.1])], "sgd", iterations=5, decay=False)
    x.grad = torch.tensor([[1.0, 1.0, 1.0], [math.nan, 1.0, 1.0]])
    steps.step(torch.tensor([True, False]))
    assert torch.allclose(x[0], torch.full((3,), 0.9)) and torch.equal(x[1], torch.ones(3))


def test_first_layer_only_combination_is_the_first_block() -> None:
    obs = _observation(1)
    problem = _problem(obs, "weights", 1.0, "layer")
    inputs = torch.randn(2, 4, problem.dims)
    coeff = torch.randn(2, 4, 1)
    full = combination(problem.layers, inputs, coeff, 50.0)
    first = combination(problem.layers, inputs, coeff, 50.0, first_only=True)
    assert len(first) == 2 and len(full) == 4  # first layer's weight and bias only
    for a, b in zip(first, full[:2], strict=True):
        assert torch.allclose(a, b)
    # Batched over runs = each run alone.
    for r in range(2):
        alone = combination(problem.layers, inputs[r], coeff[r], 50.0)
        for a, b in zip(alone, full, strict=True):
            assert torch.allclose(a, b[r], atol=1e-5)
    rec = KKT(KKTParams(iterations=5, fit="first")).run([obs])[0]
    assert math.isfinite(rec.objective_value)


def test_agreement_selection_pools_the_runs() -> None:
    obs = _observation(1)
    params = KKTParams(
        iterations=40, runs=2, run_spread=1.5, init_scale=0.1, alpha=500.0, select="agreement"
    )
    rec = KKT(params).run([obs])[0]
    assert rec.confident is not None and rec.images.shape[0] == 24
    assert "2 runs batched" in rec.notes and "found by >= 2 runs" in rec.notes
    plain = KKT(dataclasses.replace(params, runs=1)).run([obs])[0]
    assert plain.images.shape[0] == 12 and "runs batched" not in plain.notes
