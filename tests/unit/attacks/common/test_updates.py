"""The one reading of an update as gradients, and the one count of local steps."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.common.updates import (
    as_gradient,
    epoch_batches,
    gradient_factor,
    num_samples,
    weight_change,
)
from defenses.dp_sgd import dp_sgd_schedule
from simulator.core.models import model_spec
from simulator.core.protocol import Observation, PublicMeta, local_steps

SPEC = model_spec("mlp", widths=(8,))


def observation(protocol: str, examples: int = 10, batch: int = 4, epochs: int = 3) -> Observation:
    generator = torch.Generator().manual_seed(0)
    sent = {"w": torch.randn(5, 3, generator=generator), "b": torch.randn(5, generator=generator)}
    update = {k: torch.randn(v.shape, generator=generator) for k, v in sent.items()}
    meta = PublicMeta(protocol, batch, 0.1, epochs, examples)  # type: ignore[arg-type]
    return Observation(1, 0, SPEC, sent, update, meta)


@pytest.mark.parametrize("scale", ["change", "step-sum", "mean-step"])
def test_fedsgd_updates_are_the_gradient_at_every_scale(scale: str) -> None:
    obs = observation("fedsgd")
    gradient = as_gradient(obs, scale)  # type: ignore[arg-type]
    assert all(gradient[k] is obs.update[k] for k in obs.update)
    assert gradient_factor(obs, scale) == 1.0  # type: ignore[arg-type]


def test_fedavg_scales_are_sent_minus_returned_per_lr_and_per_step() -> None:
    obs = observation("fedavg", examples=10, batch=4, epochs=3)  # 3 x ceil(10 / 4) = 9 steps
    assert obs.meta.local_steps == 9
    change = {k: obs.global_weights[k] - obs.update[k] for k in obs.update}
    for k in obs.update:
        assert torch.equal(as_gradient(obs, "change")[k], change[k])
        # bit for bit what the attacks computed before: divided by lr, or times 1 / (lr steps)
        assert torch.equal(as_gradient(obs, "step-sum")[k], change[k] / 0.1)
        assert torch.equal(as_gradient(obs, "mean-step")[k], change[k] * (1.0 / (0.1 * 9)))
        assert torch.equal(weight_change(obs)[k], -change[k])
    assert gradient_factor(obs, "step-sum") == 1.0 / 0.1
    assert gradient_factor(obs, "mean-step") == 1.0 / (0.1 * 9)


def test_samples_behind_an_update_are_the_batch_or_the_shard() -> None:
    assert num_samples(observation("fedsgd", examples=10, batch=4)) == 4
    assert num_samples(observation("fedavg", examples=10, batch=4)) == 10


@pytest.mark.parametrize(("samples", "batch"), [(10, 4), (8, 4), (3, 8), (1, 1), (17, 5)])
def test_one_epoch_is_the_clients_split_and_the_step_count_follows(
    samples: int, batch: int
) -> None:
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(1))
    batches = epoch_batches(samples, batch)
    # the client's local training splits its shuffled order the same way
    assert [order[b].tolist() for b in batches] == [part.tolist() for part in order.split(batch)]
    assert local_steps(samples, batch, 3) == 3 * len(batches) == 3 * math.ceil(samples / batch)
    # DP-SGD's schedule takes the same count (Poisson batches of that expected size)
    assert dp_sgd_schedule(samples, batch, 3)[1] == local_steps(samples, batch, 3)
