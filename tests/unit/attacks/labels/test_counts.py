"""Batch label counts from the last layer, with the server's public data: the solve on
constructed confusions, real MNIST batches against the probe rule, the labels-only attack,
and the server handing its public data to the attacks."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from attacks.labels.recovery import _public_fractions, recover_labels
from attacks.server import MaliciousServer
from simulator.core.models import build_model, model_spec, task_loss
from simulator.core.protocol import Observation, PublicData, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.data.datasets import load_split, to_tensor
from simulator.scoring.metrics import label_counts_right

MLP = model_spec("mlp", widths=(256,), activation="relu")


def _split(name: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split("mnist", name)
    return to_tensor(images[:count]), torch.tensor(labels[:count], dtype=torch.int64)


TRAIN_X, TRAIN_Y = _split("train", 4096)
PUBLIC = PublicData(*_split("test", 10000))


def _observation(model: torch.nn.Module, start: int, size: int) -> Observation:
    x, y = TRAIN_X[start : start + size], TRAIN_Y[start : start + size]
    model.zero_grad()
    task_loss(MLP, model(x), y).backward()
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    return Observation(1, 0, MLP, weights, grads, PublicMeta("fedsgd", size, 0.1, 1, size))


@hypothesis_settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 12))
def test_the_solve_recovers_fractions_a_confusion_explains(seed: int, classes: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Rows in the simplex, diagonal-heavy as a model that learned something.
    logits = torch.randn(classes, classes, generator=generator, dtype=torch.float64)
    confusion = (logits + 3 * torch.eye(classes, dtype=torch.float64)).softmax(-1)
    fractions = torch.rand(classes, generator=generator, dtype=torch.float64)
    fractions[torch.rand(classes, generator=generator) < 0.3] = 0  # some classes absent
    fractions[0] += 0.1
    fractions /= fractions.sum()
    bias = (confusion.T - torch.eye(classes, dtype=torch.float64)) @ fractions
    assert torch.allclose(_public_fractions(bias, confusion), fractions, atol=1e-6)


def test_identical_rows_reduce_to_the_mean_softmax_rule() -> None:
    """At initialisation every class gets the same softmax: f = pbar - db, the probe rule."""
    pbar = torch.tensor([0.3, 0.2, 0.1, 0.4], dtype=torch.float64)
    fractions = torch.tensor([0.25, 0.5, 0.0, 0.25], dtype=torch.float64)
    bias = pbar - fractions  # db = pbar - counts / n
    found = _public_fractions(bias, pbar.expand(4, 4))
    assert torch.allclose(found, pbar - bias, atol=1e-9)


def test_public_counts_beat_probes_at_large_batches() -> None:
    model = build_model(MLP, seed=0)
    public_right, probe_right = [], []
    for start in (0, 256, 512):
        obs = _observation(model, start, 256)
        truth = TRAIN_Y[start : start + 256]
        by_public = recover_labels(obs, public=PUBLIC)
        assert by_public.method == "public-counts"
        public_right.append(label_counts_right(by_public.labels, truth))
        probe_right.append(label_counts_right(recover_labels(obs).labels, truth))
    # At most one of 256 labels off per batch; the probe rule misses more.
    assert min(public_right) >= 255 / 256 and sum(public_right) > sum(probe_right), (
        public_right,
        probe_right,
    )


def test_public_counts_help_on_a_trained_model() -> None:
    model = build_model(MLP, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.8)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):  # ten FedSGD-like rounds of 160 images: about 80% test accuracy
        chosen = torch.randint(0, 4096, (160,), generator=generator)
        optimizer.zero_grad()
        task_loss(MLP, model(TRAIN_X[chosen]), TRAIN_Y[chosen]).backward()
        optimizer.step()
    public_right, probe_right = 0.0, 0.0
    for start in range(2048, 4096, 512):
        obs = _observation(model, start, 128)
        truth = TRAIN_Y[start : start + 128]
        public_right += label_counts_right(recover_labels(obs, public=PUBLIC).labels, truth) / 4
        probe_right += label_counts_right(recover_labels(obs).labels, truth) / 4
    assert public_right > probe_right + 0.05, (public_right, probe_right)


@hypothesis_settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=40), st.lists(st.integers(-1, 9)))
def test_label_counts_right_matches_a_counter(truth: list[int], found: list[int]) -> None:
    remaining = list(truth)
    hits = 0
    for label in found:
        if label in remaining:
            remaining.remove(label)
            hits += 1
    expected = hits / len(truth)
    assert label_counts_right(torch.tensor(found), torch.tensor(truth)) == expected


def test_the_server_hands_its_public_data_to_the_labels_only_attack() -> None:
    obs = _observation(build_model(MLP, seed=0), 0, 128)
    loads: list[int] = []

    def public() -> PublicData:
        loads.append(1)
        return PUBLIC

    server = MaliciousServer("label-counts", ATTACKS.create("label-counts", {}), public=public)
    (reconstruction,) = server.observe([obs])
    assert reconstruction.images.shape == (128, 1, 28, 28)
    assert bool((reconstruction.images == 0.5).all())  # no images: labels only
    assert "public-counts" in reconstruction.notes and loads == [1]
    assert label_counts_right(reconstruction.labels, TRAIN_Y[:128]) == 1.0
    blind = ATTACKS.create("label-counts", {"public": False})
    blind.public = PUBLIC
    assert "bias-counts" in blind.run([obs])[0].notes


def test_counts_are_exact_on_a_batch_with_repeated_labels() -> None:
    """64 digits of only three classes (30 threes, 24 sevens, 10 zeros) on the untrained MLP:
    the multiset comes back exactly, repeats included."""
    wanted = {3: 30, 7: 24, 0: 10}
    chosen = torch.cat([torch.nonzero(torch.eq(TRAIN_Y, c))[:n, 0] for c, n in wanted.items()])
    model = build_model(MLP, seed=0)
    model.zero_grad()
    task_loss(MLP, model(TRAIN_X[chosen]), TRAIN_Y[chosen]).backward()
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    obs = Observation(1, 0, MLP, weights, grads, PublicMeta("fedsgd", 64, 0.1, 1, 64))
    found = recover_labels(obs, public=PUBLIC).labels
    assert found is not None
    assert torch.equal(
        torch.bincount(found, minlength=10), torch.bincount(TRAIN_Y[chosen], minlength=10)
    )
