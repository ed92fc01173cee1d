"""Defense-aware attacks: the intervals a known update defense leaves, and the attacks that use
them (interval matching, the completed first-layer subspace), against blind ones; and the
attacks' indifference to clipping."""

from __future__ import annotations

import pytest
import torch

from attacks.common.intervals import low_rank_completion, sent_intervals, update_intervals
from attacks.common.updates import as_gradient
from defenses.base import UpdateDefense
from defenses.clipping import Clipping, ClippingParams
from defenses.pruning import Pruning, PruningParams
from defenses.quantization import Quantization, QuantizationParams
from simulator.core.models import build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.federation.training import batch_gradient
from simulator.scoring.metrics import match, nearest_candidates, psnr
from tests.fixtures.trained_model import fedavg_client_update, mnist_odd_even
from tests.unit.attacks.active.helpers import LABELS, PRIVATE

DEFENSES: dict[str, UpdateDefense] = {
    "pruning": Pruning(PruningParams(0.9)),
    "int8": Quantization(QuantizationParams("int8")),
    "fp16": Quantization(QuantizationParams("fp16")),
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def fedsgd_observation(
    images: torch.Tensor, labels: torch.Tensor, width: int, defense: UpdateDefense | None
) -> Observation:
    """A FedSGD client's gradient on a fresh ReLU MLP, through ``defense`` (None: as computed)."""
    spec = model_spec(kind="mlp", widths=(width,), activation="relu")
    model = build_model(spec, seed=0)
    gradient = batch_gradient(model, spec, images, labels)
    sent = gradient if defense is None else defense.apply(gradient, torch.Generator())
    n = int(images.shape[0])
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Observation(1, 0, spec, weights, sent, PublicMeta("fedsgd", n, 0.1, 1, n))


def defended_fedavg(obs: Observation, defense: UpdateDefense) -> Observation:
    """``obs`` with ``defense`` applied to its weight change, as a FedAvg client applies it."""
    change = {k: obs.update[k] - obs.global_weights[k] for k in obs.update}
    sent = defense.apply(change, torch.Generator())
    update = {k: obs.global_weights[k] + sent[k] for k in sent}
    return Observation(obs.round, obs.client_id, obs.model, obs.global_weights, update, obs.meta)


@pytest.mark.parametrize("known", ["pruning", "int8", "fp16"])
@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_every_true_coordinate_lies_in_its_interval(known: str, protocol: str) -> None:
    images, labels = PRIVATE[:8], LABELS[:8]
    spec = model_spec(kind="mlp", widths=(32,), activation="relu")
    if protocol == "fedsgd":
        truth = fedsgd_observation(images, labels, 32, None)
        observed = fedsgd_observation(images, labels, 32, DEFENSES[known])
    else:
        truth = fedavg_client_update(images, labels, spec, 1, 4, 0.5)
        observed = defended_fedavg(truth, DEFENSES[known])
    true = as_gradient(truth, "step-sum")
    box = update_intervals(observed, known, "step-sum")  # type: ignore[arg-type]
    for name, value in true.items():
        assert bool((box.low[name] <= value).all() and (value <= box.high[name]).all()), name
    widths = torch.cat([(box.high[k] - box.low[k]).flatten() for k in true])
    if known == "pruning":  # kept coordinates are known exactly (up to FedAvg's rounding)
        kept = torch.cat([(observed.update[k] != observed.global_weights[k]).flatten()
                          if protocol == "fedavg" else (observed.update[k] != 0).flatten()
                          for k in true])  # fmt: skip
        assert float(widths[kept].abs().max()) < 1e-5 and float(widths[~kept].min()) > 0
    else:  # informative: narrower than the values they bound
        assert float(widths.max()) < float(
            torch.cat([v.flatten() for v in true.values()]).abs().max()
        )


@pytest.mark.parametrize("known", ["pruning", "int8"])
def test_completion_refills_a_defended_low_rank_matrix(known: str) -> None:
    """A rank-3 matrix (a first-layer change of 3 inputs) through pruning 60% or int8: the
    completion inside the intervals is far closer to it than what arrived."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(40, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, 60, generator=generator, dtype=torch.float64
    )
    defense = Pruning(PruningParams(0.6)) if known == "pruning" else DEFENSES["int8"]
    sent = defense.apply({"w": truth}, generator)
    box = sent_intervals(sent, known)  # type: ignore[arg-type]
    completed = low_rank_completion(box.low["w"], box.high["w"], rank=3, iterations=300)
    blind_error = float((sent["w"] - truth).norm() / truth.norm())
    assert float((completed - truth).norm() / truth.norm()) < blind_error / 3, blind_error


def test_completed_subspace_recovers_a_pruned_batch_the_blind_one_does_not() -> None:
    """FedSGD batch of 16 on the MLP 784-256-10, pruning 90%: 7 of 16 blind, 14 aware."""
    images, labels = mnist_odd_even(per_class=8, seed=3)
    obs = fedsgd_observation(images, labels, 256, DEFENSES["pruning"])
    found = {}
    for known in ("none", "pruning"):
        attack = ATTACKS.create("subspace", {"starts": 200, "known_defense": known})
        (reconstruction,) = attack.run([obs])
        found[known] = nearest_candidates(images, reconstruction.images).recovered
    assert found["none"] <= 9 and found["pruning"] >= 12, found
    assert "completed inside the pruning intervals" in reconstruction.notes


def test_interval_matching_beats_blind_matching_under_heavy_pruning() -> None:
    """One digit, MLP 784-64-10, pruning 99%: matching the zeros pruning left (blind) gives
    about 14 dB, matching the intervals 19 dB (neither reaches 30 dB at 99%)."""
    obs = fedsgd_observation(PRIVATE[:1], LABELS[:1], 64, Pruning(PruningParams(0.99)))
    scores = {}
    for known in ("none", "pruning"):
        params = {"iterations": 200, "box": True, "rel_tolerance": 0.0, "known_defense": known}
        (reconstruction,) = ATTACKS.create("idlg", params).run([obs])
        images = reconstruction.images
        scores[known] = float(psnr(images[match(images, PRIVATE[:1])], PRIVATE[:1]).mean())
    assert scores["pruning"] > scores["none"] + 3.0, scores


def test_interval_matching_needs_the_l2_distance() -> None:
    obs = fedsgd_observation(PRIVATE[:1], LABELS[:1], 16, DEFENSES["int8"])
    attack = ATTACKS.create("inverting-gradients", {"known_defense": "int8", "iterations": 1})
    with pytest.raises(ValueError, match="distance") as error:
        attack.run([obs])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("max_norm", [1e-3])
def test_clipping_changes_no_reconstruction_of_the_ratio_and_span_attacks(max_norm: float) -> None:
    """Clipping scales the whole update by one factor: the analytic attack reads ratios of its
    rows, the subspace attack its row space, so both return what they return unclipped."""
    images, labels = PRIVATE[:8], LABELS[:8]
    plain = fedsgd_observation(images, labels, 256, None)
    clipped = fedsgd_observation(images, labels, 256, Clipping(ClippingParams(max_norm)))
    scale = float(torch.cat([v.flatten() for v in clipped.update.values()]).norm())
    assert scale == pytest.approx(max_norm, rel=1e-5)  # the clip bit
    for name, params in (("analytic", {}), ("subspace", {"starts": 100})):
        (before,) = ATTACKS.create(name, params).run([plain])
        (after,) = ATTACKS.create(name, params).run([clipped])
        if name == "analytic":
            assert torch.allclose(before.images, after.images, atol=1e-4)
        # The subspace's basis may come back rotated (the random starts then land in another
        # order), so compare what each true digit's best candidate is, not the list.
        was, now = (
            nearest_candidates(images, before.images),
            nearest_candidates(images, after.images),
        )
        assert torch.allclose(torch.as_tensor(was.ssim), torch.as_tensor(now.ssim), atol=1e-3), name
        assert now.recovered >= 4, name  # and what they return still leaks
