"""Scoring network inversion: how close generated images come to the model's training data.

Network inversion has no one-to-one truth (the generator draws *some* training-like image of a
class), so every generated image is scored against its nearest training image of its target
class: nearest by SSIM, with PSNR reported for that same pair. Nearest-neighbour search reuses
:func:`simulator.scoring.metrics.nearest_candidates` (shortlist by normalised cross-correlation
and MSE with matmuls, then SSIM on the shortlist only), one call per class. A run is summarised
by the mean and top-k NN-SSIM, the count at or above ``ssim_threshold`` (0.4, as Haim et al.), a
per-class breakdown and within-class diversity; :func:`random_noise_baseline` gives the same
numbers for uniform noise images, the floor a reconstruction must beat.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from simulator.scoring.metrics import nearest_candidates, psnr


def class_diversity(images: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per class: mean over pairs i != j of 1 - cos of mean-removed images (NaN for < 2 images).

    0 means every sample of the class is the same image up to brightness and contrast (mode
    collapse); independent noise images score about 1.
    """
    flat = images.flatten(1).double()
    unit = torch.nn.functional.normalize(flat - flat.mean(1, keepdim=True), dim=1)
    dissimilar = 1 - unit @ unit.T
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    # Pair counts and sums per class through one-hot matmuls instead of a loop over images.
    classes = torch.unique(labels)
    member = (labels[None, :] == classes[:, None]).double()
    sums = ((member @ (dissimilar * same)) * member).sum(1)
    pairs = ((member @ same.double()) * member).sum(1)
    return {
        int(c): float(s / n) if n > 0 else math.nan
        for c, s, n in zip(classes.tolist(), sums, pairs, strict=True)
    }


def score_inversion(
    images: torch.Tensor,
    labels: torch.Tensor,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    ssim_threshold: float = 0.4,
    top_k: int = 10,
    shortlist: int = 5,
) -> dict[str, Any]:
    """Score generated ``images`` (n, C, H, W) in [0, 1] with target ``labels`` (n,).

    Per image (lists of length n): ``nn_ssim``, ``nn_psnr`` and ``nn_index`` (row of
    ``train_images`` of the nearest same-class training image; -1 and NaN when the training set
    has no image of that class). Per run: ``mean_nn_ssim``, ``top_k_nn_ssim`` (mean of the
    ``top_k`` best), ``max_nn_ssim``, ``above_threshold`` (count with NN-SSIM >= threshold),
    ``fraction_above_threshold``, ``diversity`` (mean of the per-class values of
    :func:`class_diversity`) and ``per_class`` (by class, as a string key: count, mean and max
    NN-SSIM, mean NN-PSNR, above_threshold, diversity). ``nn_ssim_paper``,
    ``mean_nn_ssim_paper`` and ``above_threshold_paper``: the same in Haim et al.'s 3x3 window
    (:func:`simulator.scoring.metrics.ssim_paper`), for that window's best training image of the
    shortlist. JSON-friendly throughout.
    """
    n = images.shape[0]
    if n == 0:
        raise ValueError("score_inversion needs at least one generated image")
    if labels.shape != (n,) or train_labels.shape != (train_images.shape[0],):
        raise ValueError(
            f"labels {tuple(labels.shape)} / train_labels {tuple(train_labels.shape)} do not "
            f"match images {n} / train_images {train_images.shape[0]}"
        )
    images, train_images = images.detach().cpu(), train_images.detach().cpu()
    labels, train_labels = labels.detach().cpu().long(), train_labels.detach().cpu().long()
    nn_ssim = torch.full((n,), math.nan, dtype=torch.float64)
    nn_index = torch.full((n,), -1, dtype=torch.int64)
    nn_ssim_paper = torch.full((n,), math.nan, dtype=torch.float64)
    # One search per class (a handful), each vectorised over that class's images.
    for cls in torch.unique(labels).tolist():
        mine = (labels == cls).nonzero().squeeze(1)
        pool = (train_labels == cls).nonzero().squeeze(1)
        if pool.numel() == 0:
            continue
        found = nearest_candidates(
            images[mine], train_images[pool], threshold=ssim_threshold, shortlist=shortlist
        )
        nn_ssim[mine] = found.ssim
        nn_ssim_paper[mine] = found.ssim_paper
        nn_index[mine] = pool[found.index]
    has = nn_index >= 0
    nn_psnr = torch.full((n,), math.nan, dtype=torch.float64)
    if bool(has.any()):
        nn_psnr[has] = psnr(images[has], train_images[nn_index[has]])
    scored = nn_ssim[has]
    k = min(top_k, scored.numel())
    above = int((scored >= ssim_threshold).sum())
    scored_paper = nn_ssim_paper[has]
    diversity = class_diversity(images, labels)
    finite_div = [v for v in diversity.values() if not math.isnan(v)]

    def mean(values: torch.Tensor) -> float:
        return float(values.mean()) if values.numel() else math.nan

    per_class: dict[str, dict[str, float | int]] = {}
    for cls in torch.unique(labels).tolist():
        rows = (labels == cls) & has
        per_class[str(cls)] = {
            "count": int((labels == cls).sum()),
            "mean_nn_ssim": mean(nn_ssim[rows]),
            "max_nn_ssim": float(nn_ssim[rows].max()) if bool(rows.any()) else math.nan,
            "mean_nn_psnr": mean(nn_psnr[rows].clamp(max=1e3)),
            "above_threshold": int((nn_ssim[rows] >= ssim_threshold).sum()),
            "diversity": diversity[cls],
        }
    return {
        "count": n,
        "nn_ssim": nn_ssim.tolist(),
        "nn_psnr": nn_psnr.tolist(),
        "nn_index": nn_index.tolist(),
        "mean_nn_ssim": mean(scored),
        "top_k": k,
        "top_k_nn_ssim": mean(scored.topk(k).values) if k else math.nan,
        "max_nn_ssim": float(scored.max()) if k else math.nan,
        "mean_nn_psnr": mean(nn_psnr[has].clamp(max=1e3)),
        "threshold": ssim_threshold,
        "above_threshold": above,
        "nn_ssim_paper": nn_ssim_paper.tolist(),
        "mean_nn_ssim_paper": mean(scored_paper),
        "above_threshold_paper": int((scored_paper >= ssim_threshold).sum()),
        "fraction_above_threshold": above / n,
        "diversity": sum(finite_div) / len(finite_div) if finite_div else math.nan,
        "per_class": per_class,
    }


def random_noise_baseline(
    labels: torch.Tensor,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    seed: int = 0,
    ssim_threshold: float = 0.4,
    top_k: int = 10,
    shortlist: int = 5,
) -> dict[str, Any]:
    """:func:`score_inversion` of uniform-noise images, one per label, of the training shape.

    The floor: an attack whose NN-SSIM does not beat this recovered nothing.
    """
    shape = (labels.shape[0], *train_images.shape[1:])
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return score_inversion(
        noise, labels, train_images, train_labels, ssim_threshold, top_k, shortlist
    )
