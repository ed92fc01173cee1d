"""The DP bound on reconstruction: hand computations, and the broken-claim flag on real DP-SGD."""

from __future__ import annotations

import math

import pytest
import torch

from defenses.dp_sgd import DpSgd, DpSgdParams, private_gradient
from defenses.local_dp import LocalDp, LocalDpParams
from simulator.core.models import build_model, model_spec
from simulator.core.protocol import Observation, PublicMeta
from simulator.core.registry import ATTACKS
from simulator.scoring.dp_bound import (
    broken_claim,
    clopper_pearson,
    eps_delta_bound,
    prior_baseline,
    rdp_bound,
    reconstruction_bound,
)
from simulator.scoring.metrics import psnr


def test_the_bounds_agree_with_a_hand_computation() -> None:
    assert eps_delta_bound(1.0, 1e-5, 0.1) == pytest.approx(math.e * 0.1 + 1e-5)
    assert eps_delta_bound(5.0, 1e-5, 0.1) == 1.0  # capped
    # (e^rho kappa)^((a - 1) / a) at each order; the smallest wins.
    curve = [(2.0, 0.5), (4.0, 3.0)]
    hand = min((math.exp(0.5) * 0.1) ** 0.5, (math.exp(3.0) * 0.1) ** 0.75)
    assert rdp_bound(curve, 0.1) == pytest.approx(hand)
    assert reconstruction_bound(1.0, 1e-5, curve, 0.1) == pytest.approx(
        min(hand, math.e * 0.1 + 1e-5)
    )


def test_local_dp_composes_its_releases_and_gives_a_curve() -> None:
    local = LocalDp(LocalDpParams(epsilon=0.5, delta=1e-5))
    assert local.release_epsilon(1) <= 0.5  # never above the calibration's own epsilon
    assert local.release_epsilon(4) > local.release_epsilon(2) > local.release_epsilon(1)
    multiplier = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    order, rho = local.release_rdp_curve(3)[10]
    assert rho == pytest.approx(3 * order / (2 * multiplier**2), rel=1e-6)  # Gaussian RDP


def test_the_prior_baseline_counts_the_best_guess_on_held_out_targets() -> None:
    # Half the public images are one constant image: the guess "that image" leaks those.
    images = torch.rand(400, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    images[::4] = 0.25
    images[1::4] = 0.25
    prior = prior_baseline(images, torch.zeros(400, dtype=torch.long), 40.0, None, per_class=50)
    assert prior.share == pytest.approx(0.5) and prior.upper > 0.5
    assert clopper_pearson(0, 100)[1] == pytest.approx(1 - 0.05 ** (1 / 100))


def _leaked_share(noise_multiplier: float, trials: int, threshold_db: float) -> int:
    """How many of ``trials`` single-image DP-SGD gradients the analytic attack reconstructs
    at ``threshold_db`` with this much noise actually added."""
    spec = model_spec(
        kind="mlp", widths=(4,), activation="relu", input_shape=(1, 4, 4), num_classes=2
    )
    model = build_model(spec, seed=0)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    params = DpSgdParams(noise_multiplier=noise_multiplier, max_grad_norm=0.01)
    leaked = 0
    for _ in range(trials):
        image = torch.rand(1, 1, 4, 4, generator=generator)
        label = torch.randint(0, 2, (1,), generator=generator)
        gradient = private_gradient(model, spec, image, label, params, generator)
        meta = PublicMeta("fedsgd", batch_size=1, lr=0.1, local_epochs=1, num_examples=1)
        obs = Observation(1, 0, spec, weights, gradient, meta)
        reconstruction = ATTACKS.create("analytic").run([obs])[0]
        leaked += int(psnr(reconstruction.images.clamp(0, 1), image) >= threshold_db)
    return leaked


def test_the_broken_dp_flag_fires_on_noise_ten_times_smaller_than_claimed() -> None:
    """One DP-SGD step (q = 1) on one 4x4 image; the accountant assumes noise multiplier 0.5.
    Honest DP-SGD leaks nothing; the planted fault adds a tenth of that noise and leaks about
    half the images, far above what epsilon allows."""
    torch.set_num_threads(1)
    threshold = 15.0
    public = torch.rand(100_000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    prior = prior_baseline(public, torch.zeros(100_000, dtype=torch.long), threshold, None,
                           targets=50_000)  # fmt: skip
    claimed = DpSgd(DpSgdParams(noise_multiplier=0.5, max_grad_norm=0.01))
    bound = reconstruction_bound(
        claimed.epsilon(1.0, 1), claimed.delta, claimed.rdp_curve(1.0, 1), prior.upper
    )
    assert bound < 0.3  # 0.25 measured (epsilon 10.7; the RDP curve does most of the work)
    trials = 120
    honest = _leaked_share(0.5, trials, threshold)
    faulty = _leaked_share(0.05, trials, threshold)
    assert not broken_claim(honest, trials, bound), honest
    assert broken_claim(faulty, trials, bound), (faulty, bound)
