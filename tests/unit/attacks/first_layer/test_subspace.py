"""First-layer subspace recovery: the decay fit, the span, and digits from a real FedAvg update."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attacks.kkt.attack  # noqa: F401  (registers "kkt")
from attacks.first_layer.subspace import first_layer_subspace, fit_decay, select_candidates
from simulator.core.models import ModelSpec, build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.federation.training import batch_gradient
from simulator.scoring.metrics import nearest_candidates
from tests.fixtures.trained_model import fedavg_client_update, mnist_odd_even


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@settings(max_examples=25, deadline=None)
@given(
    decay=st.floats(0.0, 1.0),
    rank=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_fit_decay_finds_the_factor_that_leaves_a_low_rank_change(
    decay: float, rank: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    initial = torch.randn(20, 30, generator=generator, dtype=torch.float64)
    change = torch.randn(20, rank, generator=generator, dtype=torch.float64) @ torch.randn(
        rank, 30, generator=generator, dtype=torch.float64
    )
    sent = decay * initial + 0.1 * change
    assert fit_decay(sent, initial, rank) == pytest.approx(decay, abs=1e-6)


@pytest.mark.parametrize("shape", [(20, 30), (30, 20)])
def test_fit_decay_matches_the_svd_of_every_candidate_factor(shape: tuple[int, int]) -> None:
    """The slow obvious reference: the SVD of ``sent - c initial`` on a fine grid of ``c``."""
    generator = torch.Generator().manual_seed(3)
    initial = torch.randn(*shape, generator=generator, dtype=torch.float64)
    change = torch.randn(shape[0], 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, shape[1], generator=generator, dtype=torch.float64
    )
    sent = (
        0.7 * initial
        + change
        + 0.05 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    )

    def outside(c: float) -> float:
        values = torch.linalg.svdvals(sent - c * initial) ** 2
        return float(values[4:].sum() / values.sum())

    grid = torch.linspace(0, 1, 2001, dtype=torch.float64).tolist()
    reference = min(grid, key=outside)
    assert fit_decay(sent, initial, 4) == pytest.approx(reference, abs=1e-3)


def test_the_span_contains_every_training_input() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(5, 40, generator=generator, dtype=torch.float64)
    signals = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    initial = torch.randn(12, 40, generator=generator, dtype=torch.float64)
    subspace = first_layer_subspace(0.7 * initial + signals @ inputs, initial, rank=5)
    assert subspace.decay == pytest.approx(0.7, abs=1e-6)
    inside = inputs @ subspace.basis.T @ subspace.basis
    assert torch.allclose(inside, inputs, atol=1e-6) and subspace.outside < 1e-12


def test_select_candidates_drops_duplicates_and_mixtures_first() -> None:
    clean = torch.zeros(3, 10)
    clean[0, :2], clean[1, 4:6], clean[2, 8:] = 1.0, 1.0, 1.0
    mixture = clean[0] - 0.5 * clean[1]  # carries negative mass: ranked last
    vectors = torch.cat([mixture[None], clean, clean[:1] * 1.001])
    chosen = select_candidates(vectors, 3)
    assert sorted(map(tuple, chosen.tolist())) == sorted(map(tuple, clean.tolist()))


def test_subspace_init_recovers_a_fedavg_clients_digits() -> None:
    """A real client: 16 digits, 5 local epochs of mini-batch SGD (batch 4), weight decay."""
    images, labels = mnist_odd_even(per_class=8, seed=2)
    spec = model_spec(kind="mlp", widths=(64,), activation="relu")
    obs = fedavg_client_update(images, labels, spec, 5, 4, 0.05, weight_decay=1e-3)
    attack = ATTACKS.create("kkt", {"init": "subspace", "iterations": 0, "subspace_starts": 1000})
    rec = attack.run([obs])[0]
    report = nearest_candidates(images, rec.images)
    assert rec.images.shape == (32, 1, 28, 28) and rec.matching == "nearest"
    assert report.recovered >= 15, report.ssim  # 16 of 16 measured
    assert "decay 0.9" in rec.notes  # (1 - 0.05 * 1e-3) ** 20 steps


def test_subspace_attack_recovers_a_fedsgd_batch_of_32() -> None:
    """A FedSGD batch of 32 through the real client gradient: batch size is no defense here."""
    images, labels = mnist_odd_even(per_class=16, seed=3)
    spec = model_spec(kind="mlp", widths=(256,), activation="sigmoid")
    model = build_model(spec, seed=0)
    gradient = batch_gradient(model, spec, images, labels)
    obs = Observation(
        round=1,
        client_id=0,
        model=spec,
        global_weights={k: v.detach().clone() for k, v in model.state_dict().items()},
        update=gradient,
        meta=PublicMeta("fedsgd", batch_size=32, lr=0.1, local_epochs=1, num_examples=32),
    )
    rec = ATTACKS.create("subspace", {"starts": 500}).run([obs])[0]
    report = nearest_candidates(images, rec.images)
    assert rec.matching == "nearest" and rec.labels is None and rec.images.shape[0] == 64
    assert report.recovered >= 30, report.ssim  # 32 of 32 measured


def test_subspace_attack_needs_a_dense_first_layer() -> None:
    obs = fedavg_client_update(
        torch.rand(4, 1, 28, 28), torch.arange(4), ModelSpec(kind="lenet"), 1, 2, 0.1
    )
    with pytest.raises(ValueError, match="fully-connected first layer"):
        ATTACKS.create("subspace").run([obs])
