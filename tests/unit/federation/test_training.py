"""Local training's loss-scaled schedule (Lyu and Li's eta_t = alpha_t / L(theta_t)) and the
log-loss it steps on."""

from __future__ import annotations

import math

import pytest
import torch

from simulator.core.models import build_model, log_task_loss, model_spec, task_loss
from simulator.data.shards import Shard
from simulator.federation.training import (
    LOSS_SCALED_SHRINK,
    LossScaled,
    local_train,
    loss_scaled_train,
)

# A linear binary classifier on 2 pixels: z = w . x + b, odd labels are the positive class.
SPEC = model_spec(kind="binary-fc", input_shape=(1, 1, 2), num_classes=1)


def linear(w: tuple[float, float], b: float) -> torch.nn.Module:
    model = build_model(SPEC, seed=0)
    linear_layer = model[1]
    with torch.no_grad():
        linear_layer.weight.copy_(torch.tensor([w]))
        linear_layer.bias.fill_(b)
    return model


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_one_loss_scaled_step_matches_the_hand_computation() -> None:
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    labels = torch.tensor([1, 0])  # odd: y = +1, even: y = -1
    model = linear((0.5, -0.25), 0.0)
    # By hand: margins y z are 0.5 and 0.25; L = mean softplus(-m);
    # grad L = mean(-y sigmoid(-m) x), over (w1, w2, b).
    loss = (softplus(-0.5) + softplus(-0.25)) / 2
    grad_w1 = -sigmoid(-0.5) / 2
    grad_w2 = sigmoid(-0.25) / 2
    grad_b = (-sigmoid(-0.5) + sigmoid(-0.25)) / 2
    eta = 0.1 / loss
    schedule = LossScaled(alpha=0.1, alpha_max=0.1)
    final = loss_scaled_train(model, SPEC, inputs, labels, 1, schedule)
    weight, bias = model[1].weight[0].tolist(), float(model[1].bias.detach())
    assert weight[0] == pytest.approx(0.5 - eta * grad_w1, abs=1e-6)
    assert weight[1] == pytest.approx(-0.25 - eta * grad_w2, abs=1e-6)
    assert bias == pytest.approx(-eta * grad_b, abs=1e-6)
    # The step lowered the loss, so it was kept and alpha stays at its bound.
    w1, w2, b = 0.5 - eta * grad_w1, -0.25 - eta * grad_w2, -eta * grad_b
    expected = (softplus(-(w1 + b)) + softplus(w2 + b)) / 2
    assert final == pytest.approx(expected, rel=1e-5) and final < loss
    assert schedule.alpha == 0.1 and schedule.undone == 0


def test_a_step_that_raises_the_loss_is_undone_and_alpha_shrinks() -> None:
    # The same pixel labelled odd and even: the loss is least at z = 0, a huge step overshoots.
    inputs = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)
    labels = torch.tensor([1, 0])
    model = linear((0.5, 0.0), 0.0)
    before = [p.detach().clone() for p in model.parameters()]
    schedule = LossScaled(alpha=1e3, alpha_max=1e3)
    loss = loss_scaled_train(model, SPEC, inputs, labels, 1, schedule)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert schedule.undone == 1 and schedule.alpha == 1e3 * LOSS_SCALED_SHRINK
    assert loss == pytest.approx((softplus(-0.5) + softplus(0.5)) / 2, rel=1e-6)


def test_log_task_loss_is_the_log_of_the_loss_and_stays_finite_where_it_underflows() -> None:
    labels = torch.tensor([1, 0, 3])
    logits = torch.tensor([[0.3], [-1.2], [2.0]])
    assert float(log_task_loss(SPEC, logits, labels)) == pytest.approx(
        math.log(float(task_loss(SPEC, logits, labels))), rel=1e-6
    )
    fitted = torch.tensor([[200.0], [-300.0], [250.0]])  # margins 200, 300, 250
    assert float(task_loss(SPEC, fitted, labels)) == 0.0  # float32 underflow
    # log mean exp(-m) = -200 + log(1 + e^-100 + e^-50) - log 3
    assert float(log_task_loss(SPEC, fitted, labels)) == pytest.approx(-200 - math.log(3))
    multiclass = model_spec(kind="mlp", widths=(4,), num_classes=3)
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    classes = torch.tensor([0, 2])
    assert float(log_task_loss(multiclass, scores, classes)) == pytest.approx(
        math.log(float(task_loss(multiclass, scores, classes))), rel=1e-6
    )
    far = torch.tensor([[400.0, 0.0, -10.0]])  # cross-entropy ~ e^-400
    assert float(log_task_loss(multiclass, far, torch.tensor([0]))) == pytest.approx(-400.0)


def test_loss_scaled_local_training_needs_full_batches_and_constant_stays_plain_sgd() -> None:
    shard = Shard(torch.rand(4, 1, 1, 2), torch.tensor([1, 0, 1, 0]))
    model = linear((0.5, -0.25), 0.0)
    with pytest.raises(ValueError, match="full-batch steps"):
        local_train(model, SPEC, shard, 1, 2, 0.1, torch.Generator(), lr_schedule="loss-scaled")
    # Full batch: alpha starts at lr, so the first step is lr / L times plain GD's.
    plain, scaled = linear((0.5, -0.25), 0.0), linear((0.5, -0.25), 0.0)
    start_loss = float(task_loss(SPEC, plain(shard.inputs), shard.labels))
    local_train(plain, SPEC, shard, 1, 4, 0.1, torch.Generator().manual_seed(0))
    local_train(scaled, SPEC, shard, 1, 4, 0.1, torch.Generator(), lr_schedule="loss-scaled")
    start = torch.tensor([0.5, -0.25, 0.0])
    plain_step = torch.cat([p.detach().flatten() for p in plain.parameters()]) - start
    scaled_step = torch.cat([p.detach().flatten() for p in scaled.parameters()]) - start
    assert torch.allclose(scaled_step, plain_step / start_loss, atol=1e-6)
