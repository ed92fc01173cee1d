"""The scorer: the one place where reconstructions meet the truth of the clients' updates.

Three ways, by :attr:`Reconstruction.matching`: "hungarian" (one reconstruction per true
image), "nearest" (candidate sets: each true image against its best candidate, by SSIM) and
"training" (network inversion's class samples against the clients' whole training data).

Each reconstruction is matched to its client's true batch (Hungarian on MSE) and scored per
image (MSE, PSNR, SSIM with a Gaussian window), with label accuracy and the fraction leaked
(PSNR >= threshold). Snapshots taken during the attack give PSNR against iteration.

Attacks that state a guarantee (the active attacks of :mod:`attacks.active`) set
:attr:`Reconstruction.predicted_share`; their records then also hold ``recovered_60db`` and
``recovered_30db`` (shares of the batch at PSNR >= 60 and >= 30 dB, whatever
``leak_threshold_db`` is) and that ``predicted_share``. Other records are unchanged.

The typed fields of :class:`AttackRecord` are common to every matching; the figures below,
particular to one, are its ``extra`` (written beside the others). One-to-one records add
``label_counts_right``.

Candidate sets ("nearest") and class samples ("training") are scored in two SSIM windows: ours
(11x11 Gaussian, the ``ssim``/``mean_ssim``/``images_leaked``/``fraction_leaked`` fields) and
Haim et al.'s (3x3 Gaussian, reflect padding; :func:`simulator.scoring.metrics.ssim_paper`):
``ssim_paper`` (per true image, or per class sample, its best SSIM in that window),
``mean_ssim_paper``, ``images_leaked_paper`` (count at SSIM >= ``leak_threshold_ssim`` in the
3x3 window) and, for candidate sets, ``fraction_leaked_paper``; class-sample records add
``noise_ssim_paper``. Candidate sets whose attack selected candidates without the truth
(``Reconstruction.confident``, e.g. KKT's ``select = "agreement"``) also hold ``selected``
(how many it selected), ``selected_leaked`` / ``selected_leaked_paper`` (selected candidates
whose best SSIM against any true image reaches the threshold: the selection's true picks) and
``images_leaked_selected`` / ``images_leaked_selected_paper`` (true images recovered by the
selected candidates alone, to compare with ``images_leaked``, which matches every candidate
by the truth).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simulator.core.objectives import objective_key
from simulator.core.protocol import Reconstruction, Truth
from simulator.core.records import AttackRecord
from simulator.scoring.inversion import random_noise_baseline, score_inversion
from simulator.scoring.metrics import (
    label_counts_right,
    leak_summary,
    match,
    nearest_candidates,
    psnr,
)

TrainingSet = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Scored:
    """One scored reconstruction: its record and the image pairs (and labels) for figures."""

    record: AttackRecord
    truth: np.ndarray
    reconstruction: np.ndarray
    labels: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """What the run folder stores beside the record."""
        arrays = {"truth": self.truth, "reconstruction": self.reconstruction}
        return arrays if self.labels is None else arrays | {"labels": self.labels}


def _attack_record(reconstruction: Reconstruction, **scores: Any) -> AttackRecord:
    """The record of one scored reconstruction: which update, which attack, how it ended,
    how it was matched and what it minimised, and its ``scores``."""
    return AttackRecord(
        round=reconstruction.round,
        client=reconstruction.client_id,
        attack=reconstruction.attack,
        status=reconstruction.status,
        notes=reconstruction.notes,
        matching=reconstruction.matching,
        objective=reconstruction.objective,
        trace=_objective_trace(reconstruction),
        **scores,
    )


def _objective_trace(reconstruction: Reconstruction) -> list[dict[str, float]]:
    """The attack's trace reduced to (iteration, objective value) for the convergence plot;
    the value under the objective's own key, none for a closed form."""
    if reconstruction.objective == "none":
        return [{"iteration": int(t["iteration"])} for t in reconstruction.trace]
    key = objective_key(reconstruction.objective)
    return [{"iteration": int(t["iteration"]), key: float(t[key])} for t in reconstruction.trace]


EXACT_DB = 60.0  # "recovered exactly": the bar closed-form attacks are held to


def exact_shares(reconstruction: Reconstruction, psnrs: torch.Tensor) -> dict[str, Any]:
    """``recovered_60db``, ``recovered_30db`` and ``predicted_share`` when the attack states
    a prediction (:attr:`Reconstruction.predicted_share`); nothing otherwise."""
    if reconstruction.predicted_share is None:
        return {}
    predicted = float(reconstruction.predicted_share)
    return {
        "recovered_60db": float((psnrs >= EXACT_DB).double().mean()),
        "recovered_30db": float((psnrs >= 30.0).double().mean()),
        "predicted_share": None if math.isnan(predicted) else predicted,
    }


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
    true_batch: Truth,
    threshold_db: float = 30.0,
    parity: bool = False,
    threshold_ssim: float = 0.4,
) -> Scored:
    """Score one reconstruction against the true batch of the same (round, client).

    With ``parity`` (binary models, trained on digit parity) labels are compared modulo 2.
    Candidate sets (``matching == "nearest"``) are scored by :func:`score_candidates`.
    """
    if reconstruction.matching == "nearest":
        return score_candidates(reconstruction, true_batch, threshold_ssim, parity)
    truth = true_batch.inputs.float()
    images = _padded(reconstruction.images.detach().float().cpu(), truth.shape[0])
    labels = reconstruction.labels
    if labels is not None and labels.shape[0] < images.shape[0]:
        labels = torch.cat([labels, torch.full((images.shape[0] - labels.shape[0],), -1)])
    true_labels = true_batch.labels % 2 if parity else true_batch.labels
    if parity and labels is not None:
        labels = torch.where(labels >= 0, labels % 2, labels)
    summary = leak_summary(images, truth, labels, true_labels, threshold_db)
    curve = psnr_curve(reconstruction, truth)
    trace = reconstruction.trace
    reached = next((it for it, value in curve if value >= threshold_db), None)
    seconds_at = {int(t["iteration"]): t["seconds"] for t in trace}
    finite_psnr = summary.psnr.clamp(max=100)
    record = _attack_record(
        reconstruction,
        true_images=int(truth.shape[0]),
        recovered=int(reconstruction.images.shape[0]),
        mean_psnr=float(finite_psnr.mean()),
        median_psnr=float(finite_psnr.median()),
        mean_ssim=float(summary.ssim.mean()),
        label_accuracy=summary.label_accuracy,
        fraction_leaked=summary.fraction_leaked,
        leak_threshold_db=threshold_db,
        psnr=finite_psnr.tolist(),
        ssim=summary.ssim.tolist(),
        iterations=int(trace[-1]["iteration"]) if trace else 0,
        seconds=reconstruction.seconds,
        iterations_to_threshold=reached,
        seconds_to_threshold=seconds_at.get(reached) if reached is not None else None,
        psnr_curve=curve,
        **exact_shares(reconstruction, finite_psnr),
        extra={
            "label_counts_right": None
            if labels is None
            else label_counts_right(labels, true_labels)
        },
    )
    paired = images[summary.permutation]
    return Scored(record, truth.numpy(), paired.numpy())


def selection_scores(
    truth: torch.Tensor, candidates: torch.Tensor, selected: torch.Tensor, threshold: float
) -> dict[str, int]:
    """How an attack's truth-free choice of candidates (``selected``, a (m,) mask) fares.

    ``selected_leaked``: selected candidates within ``threshold`` SSIM of some true image
    (precision's numerator); ``images_leaked_selected``: true images whose best *selected*
    candidate reaches it (recall, against ``images_leaked`` over every candidate); ``_paper``:
    the same in the 3x3 window. Nothing leaks from an empty selection.
    """
    chosen = candidates[selected.bool().cpu()]
    out = {"selected": int(chosen.shape[0])}
    if chosen.shape[0] == 0:
        zero = ("selected_leaked", "images_leaked_selected")
        return out | {k + tail: 0 for k in zero for tail in ("", "_paper")}
    picks = nearest_candidates(chosen, truth, threshold=threshold)
    found = nearest_candidates(truth, chosen, threshold=threshold)
    return out | {
        "selected_leaked": picks.recovered,
        "selected_leaked_paper": picks.recovered_paper,
        "images_leaked_selected": found.recovered,
        "images_leaked_selected_paper": found.recovered_paper,
    }


def score_candidates(
    reconstruction: Reconstruction, true_batch: Truth, threshold_ssim: float, parity: bool = False
) -> Scored:
    """Score a candidate set as dataset-reconstruction papers do (Haim et al. 2022).

    Every true image is paired with its most similar candidate (shortlist by normalised
    cross-correlation and MSE, then SSIM; a candidate may serve several images), and counts
    as leaked when that SSIM reaches ``threshold_ssim``, in our window and in the paper's
    (``*_paper`` fields). When the attack flagged candidates (``confident``: its truth-free
    selection), :func:`selection_scores` adds how many of those leak. The saved pairs are
    sorted by SSIM, best first, for the figure of best matches beside their originals.
    """
    truth = true_batch.inputs.float()
    candidates = reconstruction.images.detach().float().cpu()
    nearest = nearest_candidates(truth, candidates, threshold=threshold_ssim)
    paired = candidates[nearest.index]
    scores = psnr(paired, truth).clamp(max=100)
    accuracy = None
    if reconstruction.labels is not None:
        guessed = reconstruction.labels[nearest.index]
        true_labels = true_batch.labels
        if parity:
            guessed, true_labels = guessed % 2, true_labels % 2
        accuracy = float((guessed == true_labels).double().mean())
    selection: dict[str, int] = {}
    if reconstruction.confident is not None:
        selection = selection_scores(truth, candidates, reconstruction.confident, threshold_ssim)
    trace = reconstruction.trace
    record = _attack_record(
        reconstruction,
        true_images=int(truth.shape[0]),
        recovered=int(candidates.shape[0]),
        mean_psnr=float(scores.mean()),
        median_psnr=float(scores.median()),
        mean_ssim=float(nearest.ssim.mean()),
        label_accuracy=accuracy,
        fraction_leaked=nearest.fraction,
        leak_threshold_ssim=threshold_ssim,
        psnr=scores.tolist(),
        ssim=nearest.ssim.tolist(),
        iterations=int(trace[-1]["iteration"]) if trace else 0,
        seconds=reconstruction.seconds,
        iterations_to_threshold=None,
        seconds_to_threshold=None,
        psnr_curve=psnr_curve(reconstruction, truth),
        extra={
            "median_ssim": float(nearest.ssim.median()),
            "images_leaked": nearest.recovered,
            "ssim_paper": nearest.ssim_paper.tolist(),
            "mean_ssim_paper": float(nearest.ssim_paper.mean()),
            "images_leaked_paper": nearest.recovered_paper,
            "fraction_leaked_paper": nearest.recovered_paper / truth.shape[0],
            **selection,
            "residual": reconstruction.objective_value,
        },
    )
    order = nearest.ssim.argsort(descending=True)
    return Scored(record, truth[order].numpy(), paired[order].numpy())


def score_training_like(
    reconstruction: Reconstruction,
    training: tuple[torch.Tensor, torch.Tensor],
    threshold_ssim: float,
    top_k: int = 10,
) -> Scored:
    """Score class samples (network inversion) against the clients' training data.

    Each generated image is paired with its nearest training image of its target class
    (:func:`simulator.scoring.inversion.score_inversion`); uniform noise scored the same way
    gives the floor. The saved pairs keep the attack's class-major order, with labels.
    """
    if reconstruction.labels is None:
        raise ValueError("training-set scoring needs the target class of every image")
    images = reconstruction.images.detach().float().cpu()
    labels = reconstruction.labels.detach().cpu()
    train_images, train_labels = training
    found = score_inversion(images, labels, train_images, train_labels, threshold_ssim, top_k)
    noise = random_noise_baseline(labels, train_images, train_labels, 0, threshold_ssim, top_k)
    trace = reconstruction.trace
    last = trace[-1] if trace else {}
    psnrs = torch.tensor(found["nn_psnr"]).clamp(max=100)
    index = torch.tensor(found["nn_index"])
    record = _attack_record(
        reconstruction,
        generated=int(images.shape[0]),
        recovered=int(images.shape[0]),
        mean_psnr=found["mean_nn_psnr"],
        median_psnr=float(psnrs.nanmedian()),
        mean_ssim=found["mean_nn_ssim"],
        label_accuracy=None,
        fraction_leaked=found["fraction_above_threshold"],
        leak_threshold_ssim=threshold_ssim,
        psnr=psnrs.tolist(),
        ssim=found["nn_ssim"],
        iterations=int(last.get("iteration", 0)),
        seconds=reconstruction.seconds,
        iterations_to_threshold=None,
        seconds_to_threshold=None,
        psnr_curve=[],
        extra={
            "top_k_ssim": found["top_k_nn_ssim"],
            "max_ssim": found["max_nn_ssim"],
            "noise_ssim": noise["mean_nn_ssim"],
            "ssim_paper": found["nn_ssim_paper"],
            "mean_ssim_paper": found["mean_nn_ssim_paper"],
            "images_leaked_paper": found["above_threshold_paper"],
            "noise_ssim_paper": noise["mean_nn_ssim_paper"],
            "confidence": last.get("confidence"),
            "diversity": found["diversity"],
            "images_leaked": found["above_threshold"],
            "per_class": found["per_class"],
            "training_images": int(train_images.shape[0]),
        },
    )
    nearest = train_images[index.clamp(min=0)].float()
    return Scored(record, nearest.numpy(), images.numpy(), labels.numpy())


def score_round(
    reconstructions: Sequence[Reconstruction],
    truths: Sequence[Truth],
    threshold_db: float = 30.0,
    parity: bool = False,
    threshold_ssim: float = 0.4,
    training: TrainingSet | None = None,
) -> list[Scored]:
    """Score every reconstruction whose update has a truth (none outside simulation).

    Training-like samples (``matching == "training"``) are scored against ``training()``,
    the union of the clients' training data, loaded only when such a reconstruction exists.
    """
    by_update = {(t.round, t.client_id): t for t in truths}
    scored = []
    for reconstruction in reconstructions:
        if (reconstruction.round, reconstruction.client_id) not in by_update:
            continue
        if reconstruction.matching == "training":
            if training is None:
                raise ValueError("training-like samples need the clients' training data to score")
            scored.append(score_training_like(reconstruction, training(), threshold_ssim))
            continue
        true_batch = by_update[(reconstruction.round, reconstruction.client_id)]
        scored.append(score(reconstruction, true_batch, threshold_db, parity, threshold_ssim))
    return scored
