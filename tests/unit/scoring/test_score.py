"""simulator.scoring.score: real tensors, known answers."""

from __future__ import annotations

import json

import pytest
import torch

from simulator.core.protocol import Reconstruction, Truth
from simulator.scoring.score import score, score_round


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def test_shuffled_exact_reconstruction_is_matched_and_fully_leaked() -> None:
    truth, labels = batch(4), torch.tensor([3, 1, 4, 1])
    order = torch.tensor([2, 0, 3, 1])
    recon = Reconstruction(1, 7, truth[order].clone(), labels[order], status="converged")
    record = score(recon, Truth(1, 7, truth, labels)).record.to_dict()
    assert record["fraction_leaked"] == 1.0 and record["label_accuracy"] == 1.0
    assert record["mean_psnr"] == 100.0 and record["mean_ssim"] == pytest.approx(1.0)


def test_missing_and_noisy_reconstructions_count_as_not_leaked() -> None:
    truth = batch(4)
    noisy = (truth[:3] + 0.1 * batch(3, seed=1)).clamp(0, 1)  # ~25 dB: below 30 dB
    record = score(
        Reconstruction(1, 0, noisy, None), Truth(1, 0, truth, torch.zeros(4))
    ).record.to_dict()
    assert record["recovered"] == 3 and record["true_images"] == 4
    assert record["fraction_leaked"] == 0.0 and record["label_accuracy"] is None
    assert 15 < record["median_psnr"] < 30
    loose = score(Reconstruction(1, 0, noisy, None), Truth(1, 0, truth, torch.zeros(4)), 20.0)
    assert loose.record.to_dict()["fraction_leaked"] == 0.75


def test_psnr_curve_and_iterations_to_threshold_come_from_snapshots() -> None:
    truth = batch(2)
    far, near = torch.full_like(truth, 0.5), truth + 1e-3
    trace = [
        {"iteration": i, "gradient_distance": 1 / (i + 1), "seconds": i / 10} for i in (0, 10, 20)
    ]
    recon = Reconstruction(1, 0, near, None, trace, [(0, far), (10, far), (20, near)])
    record = score(recon, Truth(1, 0, truth, torch.zeros(2))).record.to_dict()
    assert [it for it, _ in record["psnr_curve"]] == [0, 10, 20]
    assert record["psnr_curve"][0][1] < 15 < 50 < record["psnr_curve"][2][1]
    assert record["iterations_to_threshold"] == 20 and record["seconds_to_threshold"] == 2.0


def test_binary_labels_are_scored_by_parity() -> None:
    truth = batch(2)
    recon = Reconstruction(1, 0, truth.clone(), torch.tensor([1, 0]))
    oracle = Truth(1, 0, truth, torch.tensor([7, 4]))
    assert score(recon, oracle, parity=True).record.to_dict()["label_accuracy"] == 1.0
    assert score(recon, oracle, parity=False).record.to_dict()["label_accuracy"] == 0.0


def test_reconstructions_without_a_truth_are_skipped() -> None:
    recon = Reconstruction(2, 5, batch(1), None)
    assert score_round([recon], [Truth(2, 4, batch(1), torch.zeros(1))]) == []


def test_candidate_sets_are_scored_in_both_windows() -> None:
    truth = batch(3)
    candidates = torch.cat([batch(5, seed=2), truth[[2, 0, 1]]])
    recon = Reconstruction(1, 0, candidates, None, matching="nearest")
    record = score(recon, Truth(1, 0, truth, torch.zeros(3))).record.to_dict()
    assert record["images_leaked"] == record["images_leaked_paper"] == 3
    assert record["ssim_paper"] == pytest.approx([1.0] * 3)
    assert record["mean_ssim_paper"] == pytest.approx(1.0)
    assert record["fraction_leaked_paper"] == 1.0
    assert "selected" not in record  # no selection flagged: no selection fields


def test_truth_free_selection_is_scored_against_truth_matching() -> None:
    truth = batch(4)
    # Candidates: noise, then copies of true images 0 and 3; the attack selected one noise
    # image and the two copies, and left true image 1's copy out.
    candidates = torch.cat([batch(6, seed=3), truth[[0, 3, 1]]])
    selected = torch.tensor([True] + [False] * 5 + [True, True, False])
    recon = Reconstruction(1, 0, candidates, None, confident=selected, matching="nearest")
    record = score(recon, Truth(1, 0, truth, torch.zeros(4))).record.to_dict()
    assert record["images_leaked"] == 3 and record["selected"] == 3
    assert record["selected_leaked"] == record["selected_leaked_paper"] == 2
    assert record["images_leaked_selected"] == record["images_leaked_selected_paper"] == 2
    nothing = Reconstruction(
        1, 0, candidates, None, confident=torch.zeros(9, dtype=torch.bool), matching="nearest"
    )
    empty = score(nothing, Truth(1, 0, truth, torch.zeros(4))).record.to_dict()
    assert empty["selected"] == 0 and empty["images_leaked_selected"] == 0


def test_class_samples_are_scored_in_both_windows() -> None:
    train, train_labels = batch(6, seed=4), torch.tensor([0, 0, 1, 1, 2, 2])
    samples, labels = torch.cat([train[[1, 4]], batch(1, seed=5)]), torch.tensor([0, 2, 1])
    recon = Reconstruction(1, -1, samples, labels, matching="training")
    record = score_round(
        [recon], [Truth(1, -1, train, train_labels)], training=lambda: (train, train_labels)
    )
    scores = record[0].record.to_dict()
    assert scores["images_leaked"] == scores["images_leaked_paper"] == 2
    assert scores["ssim_paper"][:2] == pytest.approx([1.0, 1.0]) and scores["ssim_paper"][2] < 0.4
    assert scores["noise_ssim_paper"] < 0.4 and 0.6 < scores["mean_ssim_paper"] < 0.8


def test_the_trace_is_named_for_what_the_attack_minimised() -> None:
    """A KKT trace holds its stationarity loss under its own key, and says so."""
    truth = batch(2)
    trace = [{"iteration": i, "kkt_stationarity": 1 / (i + 1), "seconds": 0.1} for i in (0, 5)]
    recon = Reconstruction(1, 0, truth.clone(), None, trace, objective="kkt-stationarity")
    record = score(recon, Truth(1, 0, truth, torch.zeros(2))).record
    assert record.objective == "kkt-stationarity"
    assert record.trace == [
        {"iteration": 0, "kkt_stationarity": 1.0}, {"iteration": 5, "kkt_stationarity": 1 / 6},
    ]  # fmt: skip
    assert "gradient_distance" not in json.dumps(record.to_dict())
    misnamed = [{"iteration": 0, "gradient_distance": 1.0, "seconds": 0.1}]
    with pytest.raises(ValueError, match="kkt_stationarity"):
        Reconstruction(1, 0, truth, None, misnamed, objective="kkt-stationarity")


def test_a_stated_guarantee_is_reported_beside_the_exact_shares() -> None:
    """predicted_share on the Reconstruction (the active attacks' bound) brings the shares
    at 60 and 30 dB into the record; without one, none of the three is written."""
    truth = batch(4)
    images = truth.clone()
    images[3] = 0.5
    closed = [{"iteration": 0, "seconds": 0.1}]
    bound = Reconstruction(1, 0, images, None, closed, objective="none", predicted_share=0.9)
    record = score(bound, Truth(1, 0, truth, torch.zeros(4))).record
    assert (record.recovered_60db, record.recovered_30db, record.predicted_share) == (
        0.75, 0.75, 0.9,
    )  # fmt: skip
    assert record.trace == [{"iteration": 0}]  # a closed form minimised nothing
    plain = score(Reconstruction(1, 0, images, None), Truth(1, 0, truth, torch.zeros(4)))
    written = plain.record.to_dict()
    assert not {"recovered_60db", "recovered_30db", "predicted_share"} & set(written)
