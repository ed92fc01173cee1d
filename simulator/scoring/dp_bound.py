"""The ceiling a differential-privacy guarantee puts on reconstruction, beside what leaked.

Reconstruction robustness (Balle, Cherubin and Hayes 2022; Hayes, Mahloujifar and Balle 2023):
let ``kappa`` be the prior baseline, the probability that the best guess made *without* the
update reconstructs a target drawn from the data distribution (at the run's leak threshold).
A mechanism that is (epsilon, delta)-DP under add-or-remove-one neighbours lets no attack, on
any output, reconstruct a target with probability above

    gamma_eps = min(1, e^epsilon * kappa + delta),

and one that is (alpha, rho(alpha))-RDP for every order alpha (the curve the RDP accountant
composes) above

    gamma_rdp = min(1, min_alpha (e^rho(alpha) * kappa)^((alpha - 1) / alpha)),

by RDP's probability preservation (Mironov 2017, Proposition 10) applied to the event "the
reconstruction succeeds", whose probability on the dataset without the target is at most
``kappa``, and Jensen's inequality over the target (the map is concave). The bound reported is
the smaller of the two. An attack that returns ``k`` candidates succeeds without the update
with probability at most ``k * kappa`` (each guess covers at most ``kappa``), so its bound
uses that prior.

The prior baseline is measured on the server's public data (:func:`prior_baseline`), and the
measured leakage is compared with the bound through confidence intervals
(:func:`broken_claim`), so that a flag means more than sampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.stats import beta

from simulator.scoring.metrics import SSIM_WINDOW, pairwise_mse, pairwise_ssim

CONFIDENCE = 0.95  # of the one-sided Clopper-Pearson bounds below
RdpCurve = Sequence[Sequence[float]]  # (order alpha, RDP epsilon at alpha) pairs


@dataclass(frozen=True)
class PriorBaseline:
    """What the best guess made without any update reconstructs.

    ``share``: the share of public targets the best guess leaks; ``upper``: the one-sided
    Clopper-Pearson upper bound on it at :data:`CONFIDENCE` (the value bounds use);
    ``targets``: how many public targets were scored; ``guess``: which guess was best.
    """

    share: float
    upper: float
    targets: int
    guess: str


def clopper_pearson(successes: int, trials: int) -> tuple[float, float]:
    """One-sided (lower, upper) Clopper-Pearson bounds on a binomial share, each at
    :data:`CONFIDENCE`; (0, 1) without trials."""
    if trials <= 0:
        return 0.0, 1.0
    tail = 1.0 - CONFIDENCE
    lower = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    upper = (
        1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    )
    return lower, upper


def _guesses(
    images: torch.Tensor, labels: torch.Tensor, per_class: int
) -> tuple[torch.Tensor, list[str]]:
    """The guesses a server can make without an update: the mean image, each class's mean, and
    each class's ``per_class`` images nearest its mean (the most typical ones)."""
    flat = images.flatten(1).double()
    guesses, names = [flat.mean(0)], ["public mean"]
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        centre = flat[members].mean(0)
        guesses.append(centre)
        names.append(f"mean of class {label}")
        nearest = ((flat[members] - centre) ** 2).sum(1).argsort()[:per_class]
        guesses += list(flat[members[nearest]])
        names += [f"public image {int(members[i])}" for i in nearest]
    return torch.stack(guesses), names


def prior_baseline(
    images: torch.Tensor,
    labels: torch.Tensor,
    threshold_db: float,
    threshold_ssim: float | None,
    targets: int = 500,
    per_class: int = 10,
) -> PriorBaseline:
    """The share of public targets the best update-free guess leaks (``images`` in [0, 1]).

    The public data is split in two: the even-indexed half supplies the guesses
    (:func:`_guesses`), the odd-indexed half (its first ``targets``) the targets, so no guess
    is scored against itself. A target leaks when the guess reaches ``threshold_db`` PSNR or
    ``threshold_ssim`` SSIM (either bar, as the run scores attacks by either; None: PSNR
    only). The best guess is searched among those above, so ``share`` estimates the prior
    from below; ``upper`` adds the sampling error of the targets only.
    """
    pool, pool_labels = images[0::2], labels[0::2]
    chosen = images[1::2][:targets].double()
    guesses, names = _guesses(pool, pool_labels, per_class)
    shape = chosen.shape[1:]
    guesses = guesses.reshape(-1, *shape)
    leaked = 10 * torch.log10(1 / pairwise_mse(guesses, chosen)) >= threshold_db
    if threshold_ssim is not None and min(shape[-2:]) >= SSIM_WINDOW:
        leaked |= pairwise_ssim(guesses, chosen) >= threshold_ssim
    counts = leaked.sum(1)
    best = int(counts.argmax())
    successes = int(counts[best])
    return PriorBaseline(
        share=successes / len(chosen),
        upper=clopper_pearson(successes, len(chosen))[1],
        targets=len(chosen),
        guess=names[best],
    )


def eps_delta_bound(epsilon: float, delta: float, prior: float) -> float:
    """``min(1, e^epsilon * prior + delta)``: the bound of an (epsilon, delta)-DP mechanism."""
    if prior <= 0:
        return min(1.0, delta)
    log_term = epsilon + math.log(prior)
    return 1.0 if log_term >= 0 else min(1.0, math.exp(log_term) + delta)


def rdp_bound(curve: RdpCurve, prior: float) -> float:
    """``min(1, min_alpha (e^rho(alpha) * prior)^((alpha - 1) / alpha))`` over the curve's
    orders above 1 (1 without any)."""
    if prior <= 0:
        return 0.0 if any(order > 1 for order, _ in curve) else 1.0
    best = 0.0  # log of the bound; the bound is at most 1
    for order, rho in curve:
        if order > 1 and math.isfinite(rho):
            best = min(best, (rho + math.log(prior)) * (order - 1) / order)
    return math.exp(best)


def reconstruction_bound(
    epsilon: float, delta: float, curve: RdpCurve | None, prior: float
) -> float:
    """The smaller of the (epsilon, delta) and RDP bounds for a guess that succeeds without the
    update with probability ``prior`` (at most 1)."""
    bound = eps_delta_bound(epsilon, delta, prior)
    return bound if not curve else min(bound, rdp_bound(curve, prior))


def broken_claim(leaked: int, images: int, bound: float) -> bool:
    """Whether ``leaked`` of ``images`` exceeds ``bound`` beyond sampling noise: the one-sided
    lower confidence bound on the leaked share is above it."""
    return clopper_pearson(leaked, images)[0] > bound
