"""The honest client's update: its randomness is keyed by (seed, round, client)."""

from __future__ import annotations

import pytest
import torch

from simulator.core.models import build_model
from simulator.data.shards import load_shard
from simulator.federation.client import compute_update
from simulator.scenario import load

# Noise far above the gradient, so that two updates are alike only if their noise is.
NOISY = load("quickstart", {"defenses": [{"name": "gaussian-noise", "std": 10.0}]})


@pytest.fixture(scope="module", autouse=True)
def training_split_read() -> None:
    """Read MNIST's training split once (the clients' shards come from it)."""
    load_shard(NOISY.data, NOISY.federation.clients, NOISY.seed, 0)


def flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in update.values()])


def test_clients_of_one_round_draw_their_own_batch_and_noise_and_reruns_repeat() -> None:
    weights = build_model(NOISY.model, seed=0).state_dict()
    first, second = (flat(compute_update(NOISY, 1, c, weights).update) for c in (0, 1))
    assert torch.equal(first, flat(compute_update(NOISY, 1, 0, weights).update))
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1]
    assert abs(float(correlation)) < 0.05  # independent draws; one shared generator gives ~1
    later = flat(compute_update(NOISY, 2, 0, weights).update)
    assert abs(float(torch.corrcoef(torch.stack([first, later]))[0, 1])) < 0.05
