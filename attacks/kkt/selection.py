"""Oracle-free choice of which KKT candidates to report as reconstructions.

Why: the KKT attack (:mod:`attacks.kkt.attack`) returns many candidates (by default two per training
example), and the scorer counts a true image as recovered when *some* candidate is close to it
-- a choice only someone holding the truth can make. An attacker has to say which candidates
it believes are training images. This module ranks them from what the attacker has: the
candidates and attack-side statistics (the KKT coefficients' contributions), never the truth;
its functions take no true image, label or score.

Three signals, combined per cluster of near-duplicates:

* agreement: candidates started apart that end on the same image (several candidates of one
  run, or restarts with other seeds passed in together) point at one stationary point the fit
  keeps finding. Candidates are grouped greedily, best first, by normalised cross-correlation
  (mean-removed cosine) >= ``similarity``; ``support`` is the group's size.
* stationarity contribution: ``||lambda_i y_i grad_theta f(x_i)||``, how much of theta the
  candidate explains, relative to the largest. On the red/blue toy set the candidates that
  became true images carry 0.25-0.54 of theta's scale, the rest at most 0.13 (most under
  0.02): the fit keeps the others alive only through the lambda floor.
* structure: training images are spatially smooth, while candidates the fit did not move keep
  their initial noise. ``smoothness = 1 - mean squared neighbour difference / (2 variance)``
  is about 0 for white noise and near 1 for digits (1 for constant images).

Score of a cluster: ``smoothness * log2(1 + support) * contribution / max contribution`` of
its representative (the member of highest ``smoothness * contribution weight``). Clusters
scoring under ``min_relative_score`` of the best are never reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """The reported candidates, best first, and the clustering they came from.

    ``index`` (k,) rows of the candidates; ``score`` (k,) their cluster's score; ``support``
    (k,) the size of their cluster; ``cluster`` (m,) the cluster of every candidate (clusters
    numbered in the order they were formed, best representative first); ``clusters`` how many
    clusters the candidates formed.
    """

    index: torch.Tensor
    score: torch.Tensor
    support: torch.Tensor
    cluster: torch.Tensor
    clusters: int


def smoothness(images: torch.Tensor) -> torch.Tensor:
    """Per image (m, C, H, W): 1 - mean squared neighbour difference / (2 variance), in [0, 1].

    White noise scores about 0 (neighbours differ by twice the variance on average), smooth
    images near 1; an image without variance scores 1.
    """
    x = images.double()
    rows = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    cols = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    variance = x.flatten(1).var(1, unbiased=False)
    rough = (rows + cols) / 2 / (2 * variance).clamp_min(1e-12)
    return (1 - rough).clamp(0.0, 1.0)


def contribution_weight(contributions: torch.Tensor | None, count: int) -> torch.Tensor:
    """``c_i / max(c)`` per candidate; all ones without contributions."""
    if contributions is None:
        return torch.ones(count, dtype=torch.float64)
    c = contributions.detach().double().abs().flatten()
    if c.numel() != count:
        raise ValueError(f"{c.numel()} contributions for {count} candidates")
    return c / c.max().clamp_min(1e-30)


def cross_correlation(images: torch.Tensor) -> torch.Tensor:
    """(m, m) normalised cross-correlation (mean-removed cosine) between flattened images."""
    flat = images.flatten(1).double()
    centred = flat - flat.mean(1, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True)
    unit = centred / norms.clamp_min(1e-12)
    similar = unit @ unit.T
    # Constant images have no direction: equal ones (within 1e-6 per pixel) agree.
    flat_pairs = (norms < 1e-9).squeeze(1)
    if bool(flat_pairs.any()):
        same = torch.cdist(flat, flat) <= 1e-6 * math.sqrt(flat.shape[1])
        both = flat_pairs[:, None] & flat_pairs[None, :]
        similar = torch.where(both, same.double(), similar)
    return similar


def cluster(
    order: torch.Tensor, similar: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy clustering: in ``order``, each unassigned candidate opens a cluster that takes
    every unassigned candidate at similarity >= ``threshold`` to it. Returns the (m,) cluster
    ids and, per cluster, the candidate that opened it (its representative)."""
    m = similar.shape[0]
    ids = torch.full((m,), -1, dtype=torch.int64)
    free = torch.ones(m, dtype=torch.bool)
    openers: list[int] = []
    for row in order.tolist():
        if not free[row]:
            continue
        members = free & (similar[row] >= threshold)
        members[row] = True
        ids[members] = len(openers)
        free &= ~members
        openers.append(row)
    return ids, torch.tensor(openers, dtype=torch.int64)


def select_candidates(
    candidates: torch.Tensor,
    contributions: torch.Tensor | None = None,
    top: int | None = None,
    similarity: float = 0.9,
    min_support: int = 2,
    min_smoothness: float = 0.5,
    min_relative_score: float = 0.1,
) -> Selection:
    """Rank the KKT ``candidates`` (m, C, H, W) in [0, 1] and pick those to report, without truth.

    ``contributions`` (m,): each candidate's stationarity term norm (None: not used, e.g. no
    fit). With ``top`` the ``top`` best clusters' representatives are reported, whatever their
    score (an attacker that knows the client's example count reports that many); without it,
    every cluster of at least ``min_support`` candidates whose representative's smoothness
    reaches ``min_smoothness``. Either way, clusters scoring under ``min_relative_score`` times
    the best cluster's score are left out. One representative per cluster: near-duplicates
    are one image.
    """
    m = candidates.shape[0]
    if candidates.dim() != 4 or m == 0:
        raise ValueError(f"candidates must be (m, C, H, W), m > 0; got {tuple(candidates.shape)}")
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    images = candidates.detach().cpu()
    smooth = smoothness(images)
    weight = contribution_weight(contributions, m)
    quality = smooth * weight
    order = quality.argsort(descending=True, stable=True)
    ids, first = cluster(order, cross_correlation(images), similarity)
    count = first.numel()
    sizes = torch.bincount(ids, minlength=count)
    support = sizes.double()
    scores = smooth[first] * torch.log2(1 + support) * weight[first]
    ranked = scores.argsort(descending=True, stable=True)
    ranked = ranked[scores[ranked] >= min_relative_score * scores.max()]
    if top is None:
        keep = (sizes[ranked] >= min_support) & (smooth[first[ranked]] >= min_smoothness)
        ranked = ranked[keep]
    else:
        ranked = ranked[:top]
    return Selection(
        index=first[ranked],
        score=scores[ranked],
        support=sizes[ranked],
        cluster=ids,
        clusters=count,
    )
