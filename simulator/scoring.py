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
from attacks.metrics import leak_summary, match, psnr
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
    reconstruction: Reconstruction, oracle: Oracle, threshold_db: float = 30.0, parity: bool = False
) -> Scored:
    """Score one reconstruction against the true batch of the same (round, client).

    With ``parity`` (binary models, trained on digit parity) labels are compared modulo 2.
    """
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


def score_round(
    reconstructions: Sequence[Reconstruction],
    oracles: Sequence[Oracle],
    threshold_db: float = 30.0,
    parity: bool = False,
) -> list[Scored]:
    """Score every reconstruction whose client sent an oracle (absent outside simulation)."""
    truth = {(o.round, o.client_id): o for o in oracles}
    return [
        score(r, truth[(r.round, r.client_id)], threshold_db, parity)
        for r in reconstructions
        if (r.round, r.client_id) in truth
    ]
