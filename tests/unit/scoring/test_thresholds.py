""" "Leaked" means at or above the threshold, on every scoring path.

Each test builds a reconstruction whose score is known, then sets the threshold to exactly that
score: the image must count as leaked. A strict comparison anywhere makes these fail.
"""

from __future__ import annotations

import torch

from simulator.core.protocol import Reconstruction, Truth
from simulator.scoring.best import best_of, leaked_images
from simulator.scoring.inversion import score_inversion
from simulator.scoring.metrics import leak_summary, nearest_candidates, psnr
from simulator.scoring.score import score
from tests.unit.report.synthetic_run import attack_record


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


TRUTH = images(3, seed=0)
# Each reconstruction a different distance from its image: distinct PSNRs around 20-40 dB.
NOISY = (TRUTH + torch.tensor([0.003, 0.03, 0.1])[:, None, None, None] * images(3, 1)).clamp(0, 1)


def test_an_image_exactly_at_the_psnr_threshold_is_leaked_in_hungarian_matching() -> None:
    at = float(leak_summary(NOISY, TRUTH).psnr[1])
    summary = leak_summary(NOISY, TRUTH, threshold_db=at)
    # image 0 is above, image 1 exactly at, image 2 below
    assert summary.fraction_leaked == 2 / 3
    record = score(Reconstruction(1, 0, NOISY, None), Truth(1, 0, TRUTH, torch.zeros(3)), at)
    assert record.record.fraction_leaked == 2 / 3


def test_a_psnr_curve_reaching_the_threshold_exactly_counts_as_reached() -> None:
    at = float(psnr(NOISY, TRUTH).clamp(max=100).mean())
    trace = [{"iteration": i, "gradient_distance": 1.0, "seconds": float(i)} for i in (0, 5)]
    recon = Reconstruction(1, 0, NOISY, None, trace, [(0, torch.full_like(TRUTH, 0.5)), (5, NOISY)])
    scored = score(recon, Truth(1, 0, TRUTH, torch.zeros(3)), at).record
    assert scored.psnr_curve[1][1] == at
    assert scored.iterations_to_threshold == 5


def test_an_image_exactly_at_the_ssim_threshold_is_leaked_by_nearest_candidate() -> None:
    at = float(nearest_candidates(TRUTH, NOISY).ssim[1])
    nearest = nearest_candidates(TRUTH, NOISY, threshold=at)
    assert nearest.ssim[1] == at
    assert nearest.recovered == 2 and nearest.fraction == 2 / 3
    recon = Reconstruction(1, 0, NOISY, None, matching="nearest")
    scored = score(recon, Truth(1, 0, TRUTH, torch.zeros(3)), threshold_ssim=at).record
    assert scored.extra["images_leaked"] == 2 and scored.fraction_leaked == 2 / 3


def test_an_image_exactly_at_the_ssim_threshold_is_leaked_against_the_training_set() -> None:
    labels = torch.tensor([0, 0, 0])
    at = float(score_inversion(NOISY, labels, TRUTH, labels)["nn_ssim"][1])
    found = score_inversion(NOISY, labels, TRUTH, labels, ssim_threshold=at)
    assert found["above_threshold"] == 2


def test_images_exactly_at_either_threshold_are_leaked_by_the_best_of_attacks() -> None:
    by_psnr = attack_record("dlg", [30.0, 29.9], ssim=[0.1, 0.1])
    by_ssim = attack_record("kkt", [10.0, 10.0], ssim=[0.2, 0.4], matching="nearest")
    assert by_psnr.leak_threshold_db == 30.0 and by_ssim.leak_threshold_ssim == 0.4
    assert leaked_images(by_psnr) == [True, False]
    assert leaked_images(by_ssim) == [False, True]
    best = best_of([by_psnr, by_ssim])
    assert best is not None
    assert best.leaked == [True, True] and best.fraction_leaked == 1.0
