"""The scorer: the one place where reconstructions meet the oracle (the clients' truth).

Each reconstruction is matched to its client's true batch (Hungarian on MSE) and scored per
image (MSE, PSNR, SSIM with a Gaussian window), with label accuracy and the fraction leaked
(PSNR >= threshold). Snapshots taken during the attack give PSNR against iteration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacks.base import Reconstruction
from attacks.metrics import leak_summary, match, nearest_candidates, psnr
from simulator.oracle import Oracle

Record = dict[str, Any]


@dataclass(frozen=True)
class Scored:
    """One scored reconstruction: its record and the image pair for figures."""

    record: Record
    truth: np.ndarray
    reconstruction: np.ndarray


def _padded(images: torch.Tensor, count: int) -> torch.Tensor:
    """Fill missing reconstructions with mid-grey images, which score as not leaked."""
    if images.shape[0] >= count:
        return images
    filler = torch.full((count - images.shape[0], *images.shape[1:]), 0.5, dtype=images.dtype)
    return torch.cat([images, filler])


def psnr_curve(reconstruction: Reconstruction, truth: torch.Tensor) -> list[tuple[int, float]]:
    """Mean PSNR (after matching) of each snapshot the attack kept, by iteration."""
    curve = []
    for iteration, images in reconstruction.snapshots:
        images = _padded(images.float(), truth.shape[0])
        paired = images[match(images, truth)]
        curve.append((int(iteration), float(psnr(paired, truth).clamp(max=100).mean())))
    return curve


def score(
    reconstruction: Reconstruction,
    oracle: Oracle,
    threshold_db: float = 30.0,
    parity: bool = False,
    threshold_ssim: float = 0.4,
) -> Scored:
    """Score one reconstruction against the true batch of the same (round, client).

    With ``parity`` (binary models, trained on digit parity) labels are compared modulo 2.
    Candidate sets (``matching == "nearest"``) are scored by :func:`score_candidates`.
    """
    if reconstruction.matching == "nearest":
        return score_candidates(reconstruction, oracle, threshold_ssim, parity)
    truth = oracle.inputs.float()
    images = _padded(reconstruction.images.detach().float().cpu(), truth.shape[0])
    labels = reconstruction.labels
    if labels is not None and labels.shape[0] < images.shape[0]:
        labels = torch.cat([labels, torch.full((images.shape[0] - labels.shape[0],), -1)])
    true_labels = oracle.labels % 2 if parity else oracle.labels
    if parity and labels is not None:
        labels = torch.where(labels >= 0, labels % 2, labels)
    summary = leak_summary(images, truth, labels, true_labels, threshold_db)
    curve = psnr_curve(reconstruction, truth)
    trace = reconstruction.trace
    reached = next((it for it, value in curve if value >= threshold_db), None)
    seconds_at = {int(t["iteration"]): t["seconds"] for t in trace}
    finite_psnr = summary.psnr.clamp(max=100)
    record: Record = {
        "kind": "attack",
        "round": reconstruction.round,
        "client": reconstruction.client_id,
        "attack": reconstruction.attack,
        "status": reconstruction.status,
        "notes": reconstruction.notes,
        "batch_size": int(truth.shape[0]),
        "recovered": int(reconstruction.images.shape[0]),
        "mean_psnr": float(finite_psnr.mean()),
        "median_psnr": float(finite_psnr.median()),
        "mean_ssim": float(summary.ssim.mean()),
        "label_accuracy": summary.label_accuracy,
        "fraction_leaked": summary.fraction_leaked,
        "leak_threshold_db": threshold_db,
        "psnr": finite_psnr.tolist(),
        "ssim": summary.ssim.tolist(),
        "iterations": int(trace[-1]["iteration"]) if trace else 0,
        "seconds": float(trace[-1]["seconds"]) if trace else math.nan,
        "iterations_to_threshold": reached,
        "seconds_to_threshold": seconds_at.get(reached) if reached is not None else None,
        "trace": [
            {"iteration": int(t["iteration"]), "gradient_distance": float(t["gradient_distance"])}
            for t in trace
        ],
        "psnr_curve": curve,
    }
    paired = images[summary.permutation]
    return Scored(record, truth.numpy(), paired.numpy())


def score_candidates(
    reconstruction: Reconstruction, oracle: Oracle, threshold_ssim: float, parity: bool = False
) -> Scored:
    """Score a candidate set as dataset-reconstruction papers do (Haim et al. 2022).

    Every true image is paired with its most similar candidate (shortlist by normalised
    cross-correlation and MSE, then SSIM; a candidate may serve several images), and counts
    as leaked when that SSIM reaches ``threshold_ssim``. The saved pairs are sorted by SSIM,
    best first, for the figure of best matches beside their originals.
    """
    truth = oracle.inputs.float()
    candidates = reconstruction.images.detach().float().cpu()
    nearest = nearest_candidates(truth, candidates, threshold=threshold_ssim)
    paired = candidates[nearest.index]
    scores = psnr(paired, truth).clamp(max=100)
    accuracy = None
    if reconstruction.labels is not None:
        guessed = reconstruction.labels[nearest.index]
        true_labels = oracle.labels
        if parity:
            guessed, true_labels = guessed % 2, true_labels % 2
        accuracy = float((guessed == true_labels).double().mean())
    trace = reconstruction.trace
    record: Record = {
        "kind": "attack",
        "round": reconstruction.round,
        "client": reconstruction.client_id,
        "attack": reconstruction.attack,
        "status": reconstruction.status,
        "notes": reconstruction.notes,
        "matching": "nearest",
        "batch_size": int(truth.shape[0]),
        "recovered": int(candidates.shape[0]),
        "mean_psnr": float(scores.mean()),
        "median_psnr": float(scores.median()),
        "mean_ssim": float(nearest.ssim.mean()),
        "median_ssim": float(nearest.ssim.median()),
        "label_accuracy": accuracy,
        "fraction_leaked": nearest.fraction,
        "images_leaked": nearest.recovered,
        "leak_threshold_ssim": threshold_ssim,
        "psnr": scores.tolist(),
        "ssim": nearest.ssim.tolist(),
        "residual": reconstruction.distance,
        "iterations": int(trace[-1]["iteration"]) if trace else 0,
        "seconds": float(trace[-1]["seconds"]) if trace else math.nan,
        "iterations_to_threshold": None,
        "seconds_to_threshold": None,
        "trace": [
            {"iteration": int(t["iteration"]), "gradient_distance": float(t["gradient_distance"])}
            for t in trace
        ],
        "psnr_curve": psnr_curve(reconstruction, truth),
    }
    order = nearest.ssim.argsort(descending=True)
    return Scored(record, truth[order].numpy(), paired[order].numpy())


def score_round(
    reconstructions: Sequence[Reconstruction],
    oracles: Sequence[Oracle],
    threshold_db: float = 30.0,
    parity: bool = False,
    threshold_ssim: float = 0.4,
) -> list[Scored]:
    """Score every reconstruction whose client sent an oracle (absent outside simulation)."""
    truth = {(o.round, o.client_id): o for o in oracles}
    return [
        score(r, truth[(r.round, r.client_id)], threshold_db, parity, threshold_ssim)
        for r in reconstructions
        if (r.round, r.client_id) in truth
    ]
