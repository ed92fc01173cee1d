"""The noise-aware subspace and the multi-round subspace attack against a known noise floor."""

from __future__ import annotations

import pytest
import torch

from attacks.first_layer.rounds import RoundsAttack
from simulator.core.models import build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.federation.training import batch_gradient
from simulator.scoring.metrics import nearest_candidates
from tests.fixtures.trained_model import mnist_odd_even


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


SPEC = model_spec(kind="mlp", widths=(128,), activation="sigmoid")


def _noisy_update(
    images: torch.Tensor, labels: torch.Tensor, std: float, round: int, client: int = 0
) -> Observation:
    """A FedSGD gradient of the client's whole shard at a fresh global model each round, plus
    N(0, std^2) noise on every coordinate (the gaussian-noise defense)."""
    model = build_model(SPEC, seed=round)
    gradient = batch_gradient(model, SPEC, images, labels)
    generator = torch.Generator().manual_seed(1000 * client + round)
    sent = {k: v + std * torch.randn(v.shape, generator=generator) for k, v in gradient.items()}
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = PublicMeta("fedsgd", batch_size=len(labels), lr=0.1, local_epochs=1,
                      num_examples=len(labels))  # fmt: skip
    return Observation(round, client, SPEC, weights, sent, meta)


def test_the_noise_aware_subspace_recovers_digits_the_blind_one_cannot() -> None:
    """A FedSGD batch of 16 digits (the blind attack gets all of them without noise)."""
    images, labels = mnist_odd_even(per_class=8, seed=3)
    spec = model_spec(kind="mlp", widths=(256,), activation="sigmoid")
    model = build_model(spec, seed=0)
    gradient = batch_gradient(model, spec, images, labels)
    generator = torch.Generator().manual_seed(0)
    std = 1e-3
    noisy = {k: v + std * torch.randn(v.shape, generator=generator) for k, v in gradient.items()}
    obs = Observation(
        1, 0, spec, {k: v.detach().clone() for k, v in model.state_dict().items()}, noisy,
        PublicMeta("fedsgd", batch_size=16, lr=0.1, local_epochs=1, num_examples=16),
    )  # fmt: skip
    blind = ATTACKS.create("subspace", {"starts": 200}).run([obs])[0]
    aware = ATTACKS.create("subspace", {"starts": 200, "noise_std": std}).run([obs])[0]
    blind_recovered = nearest_candidates(images, blind.images).recovered
    aware_recovered = nearest_candidates(images, aware.images).recovered
    assert blind_recovered == 0
    assert aware_recovered >= 4, aware.notes  # 6 of 16 measured


def test_the_multi_round_attack_recovers_more_from_more_of_a_clients_updates() -> None:
    images, labels = mnist_odd_even(per_class=6, seed=3)
    std = 4e-3
    attack = RoundsAttack(RoundsAttack.Params(starts=200, noise_std=std))
    # The server sees two clients every round; only client 0's updates may feed its span.
    other_images, other_labels = mnist_odd_even(per_class=6, seed=5)
    recovered = []
    for round in range(1, 5):
        updates = [
            _noisy_update(images, labels, std, round, client=0),
            _noisy_update(other_images, other_labels, std, round, client=1),
        ]
        attack.remember(updates)
        if round in (1, 4):
            reconstruction = attack.run(updates[:1])[0]
            recovered.append(nearest_candidates(images, reconstruction.images).recovered)
    assert len(attack.history[0]) == 4 and len(attack.history[1]) == 4
    one, four = recovered
    assert four >= one + 3, recovered  # 1, then 7 of 12 measured


def test_the_multi_round_attack_takes_observations_only() -> None:
    """Everything it keeps comes from Observations, keyed by the client id a server sees."""
    attack = RoundsAttack()
    with pytest.raises(TypeError, match="takes Observations"):
        attack.remember([{"round": 1, "client_id": 0}])  # type: ignore[list-item]
    assert RoundsAttack.keeps_history and ATTACKS.entry("subspace-rounds").value is RoundsAttack
