"""Leakage metrics: how close reconstructions are to the private images, vectorised over images.

All functions take image batches (n, C, H, W) with pixel values in [0, 1] and return one value
per image. Reconstructions come in an arbitrary order (dummies are exchangeable), so
:func:`leak_summary` first pairs them with the truth by :func:`match`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# Haim et al. (2022) score with kornia 0.6.8's ``metrics.ssim(x, y, window_size=3)``: a 3x3
# Gaussian window (sigma 1.5, as ours), the same K1/K2, reflect padding ("same" output size),
# averaged over channels and pixels (their ``get_ssim_pairs_kornia``).
SSIM_PAPER_WINDOW = 3
SSIM_PAPER_PADDING: Literal["reflect"] = "reflect"

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: (n, C, H, W) x2 -> (n,)."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; +inf for identical images."""
    return 10 * torch.log10(data_range**2 / mse(a, b))


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur(
    images: torch.Tensor, kernel: torch.Tensor, padding: Literal["valid", "reflect"] = "valid"
) -> torch.Tensor:
    """Separable Gaussian filter: "valid" keeps the windows fully inside the image, "reflect"
    mirrors the border (without repeating the edge pixel) and keeps the image's size."""
    channels = images.shape[1]
    size = kernel.numel()
    if padding == "reflect":
        half = (size - 1) // 2
        images = torch.nn.functional.pad(images, (half, size - 1 - half) * 2, mode="reflect")
    rows = kernel.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = kernel.view(1, 1, size, 1).expand(channels, 1, size, 1)
    images = torch.nn.functional.conv2d(images, rows, groups=channels)
    return torch.nn.functional.conv2d(images, cols, groups=channels)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    padding: Literal["valid", "reflect"] = "valid",
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), averaged over channels and pixels.

    Defaults (our SSIM): Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03,
    population (not sample) covariances, mean over the positions where the window fits inside
    the image. This equals torchmetrics' ``structural_similarity_index_measure`` defaults and
    scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``. Images must be at least ``window`` pixels
    on each side ("valid"), or more than half of it ("reflect": every pixel is a window centre,
    the border mirrored). :func:`ssim_paper` is the same function with the paper's window.
    """
    if padding == "valid" and min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}")
    if padding == "reflect" and min(a.shape[-2:]) <= (window - 1) // 2:
        raise ValueError(f"SSIM with reflect padding needs images larger than {window // 2} px")
    a, b = a.double(), b.double()
    kernel = _gaussian_kernel(window, sigma).to(a.device)
    stats = _blur(torch.cat([a, b, a * a, b * b, a * b]), kernel, padding).chunk(5)
    mu_a, mu_b, aa, bb, ab = stats
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (numerator / denominator).flatten(1).mean(1)


def ssim_paper(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM as Haim et al. (2022) score dataset reconstruction: :func:`ssim` with a 3x3
    Gaussian window (sigma 1.5) and reflect padding, averaged over every pixel.

    This is kornia 0.6.8's ``metrics.ssim(a, b, window_size=3)`` averaged per image, except
    kornia's ``eps = 1e-12`` added to the denominator (which the constants dwarf). The small
    window compares 3x3 neighbourhoods, so it rewards local detail more and tolerates a global
    shift in contrast more than the 11x11 window; the two thresholds at 0.4 count differently.
    Note that the authors also rescale each reconstruction to [0, 1] (min-max) before scoring;
    our candidates are scored as the attack returns them.
    """
    return ssim(a, b, data_range, window=SSIM_PAPER_WINDOW, padding=SSIM_PAPER_PADDING)


def pairwise_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """:func:`ssim` between every image of ``a`` (n) and of ``b`` (m): an (n, m) matrix.

    Each image's blurred mean and second moment are computed once; only the cross term is
    blurred per pair (one filter instead of five), in rows of ``a``.
    """
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    a, b = a.double(), b.double()
    kernel = _gaussian_kernel(SSIM_WINDOW, SSIM_SIGMA).to(a.device)
    mu_a, aa = _blur(torch.cat([a, a * a]), kernel).chunk(2)
    mu_b, bb = _blur(torch.cat([b, b * b]), kernel).chunk(2)
    var_a, var_b = aa - mu_a**2, bb - mu_b**2
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    rows = []
    for i in range(a.shape[0]):
        cov = _blur(a[i : i + 1] * b, kernel) - mu_a[i : i + 1] * mu_b
        numerator = (2 * mu_a[i : i + 1] * mu_b + c1) * (2 * cov + c2)
        denominator = (mu_a[i : i + 1] ** 2 + mu_b**2 + c1) * (var_a[i : i + 1] + var_b + c2)
        rows.append((numerator / denominator).flatten(1).mean(1))
    return torch.stack(rows)


def pairwise_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE between every image of ``a`` (n) and of ``b`` (m): an (n, m) matrix."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    return torch.cdist(flat_a, flat_b) ** 2 / flat_a.shape[1]


def match(reconstructed: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Permutation pairing reconstructions with true images at minimum total MSE (Hungarian).

    Returns ``perm`` (m,) int64 such that ``reconstructed[perm][j]`` is the reconstruction of
    ``truth[j]``. Needs at least as many reconstructions as true images.
    """
    if reconstructed.shape[0] < truth.shape[0]:
        raise ValueError(
            f"cannot match {reconstructed.shape[0]} reconstructions to {truth.shape[0]} images"
        )
    cost = pairwise_mse(reconstructed, truth).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(truth.shape[0], dtype=torch.int64)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows, dtype=torch.int64)
    return perm


@dataclass(frozen=True)
class LeakSummary:
    """Per-image quality after matching, label accuracy and the fraction of images leaked."""

    permutation: torch.Tensor
    mse: torch.Tensor
    psnr: torch.Tensor
    ssim: torch.Tensor
    label_accuracy: float | None
    fraction_leaked: float
    threshold_db: float

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view (lists and floats; inf PSNR stays inf)."""
        return {
            "permutation": self.permutation.tolist(),
            "mse": self.mse.tolist(),
            "psnr": self.psnr.tolist(),
            "ssim": self.ssim.tolist(),
            "label_accuracy": self.label_accuracy,
            "fraction_leaked": self.fraction_leaked,
            "threshold_db": self.threshold_db,
            "mean_psnr": float(self.psnr.clamp(max=1e3).mean()) if self.psnr.numel() else math.nan,
        }


def label_counts_right(recovered: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of the true batch whose label the recovered multiset accounts for: the sum over
    classes of min(true count, recovered count), over the batch size. Order-free, so it
    scores label recovery apart from how images were paired (negative labels: none)."""
    recovered = recovered[recovered >= 0].long().cpu()
    truth = truth.long().cpu()
    if truth.numel() == 0:
        return 0.0
    size = int(torch.cat([truth, recovered]).max()) + 1
    found = torch.bincount(recovered, minlength=size)
    true = torch.bincount(truth, minlength=size)
    return float(torch.minimum(found, true).sum()) / truth.numel()


def leak_summary(
    reconstructed: torch.Tensor,
    truth: torch.Tensor,
    reconstructed_labels: torch.Tensor | None = None,
    true_labels: torch.Tensor | None = None,
    threshold_db: float = 30.0,
) -> LeakSummary:
    """Match reconstructions to the truth, then score each true image.

    An image counts as leaked when its matched reconstruction reaches ``threshold_db`` PSNR.
    Label accuracy compares the matched reconstruction's label with the true one (None when
    either side has no labels).
    """
    perm = match(reconstructed, truth)
    paired = reconstructed[perm].to(truth.device)
    scores = psnr(paired, truth)
    accuracy = None
    if reconstructed_labels is not None and true_labels is not None:
        hits = reconstructed_labels[perm].to(true_labels.device) == true_labels
        accuracy = float(hits.double().mean())
    return LeakSummary(
        permutation=perm,
        mse=mse(paired, truth),
        psnr=scores,
        ssim=ssim(paired, truth),
        label_accuracy=accuracy,
        fraction_leaked=float((scores >= threshold_db).double().mean()),
        threshold_db=threshold_db,
    )


@dataclass(frozen=True)
class NearestCandidates:
    """Per true image: its best candidate by SSIM, and how many images count as recovered.

    ``ssim``/``index``/``recovered`` use our SSIM (11x11 window); the ``*_paper`` fields the
    same thing with :func:`ssim_paper` (Haim et al.'s 3x3 window), over the same shortlist, so
    the best candidate may differ between the two.
    """

    ssim: torch.Tensor
    index: torch.Tensor
    recovered: int
    fraction: float
    threshold: float
    ssim_paper: torch.Tensor
    index_paper: torch.Tensor
    recovered_paper: int

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view."""
        return {
            "ssim": self.ssim.tolist(),
            "index": self.index.tolist(),
            "recovered": self.recovered,
            "fraction": self.fraction,
            "threshold": self.threshold,
            "ssim_paper": self.ssim_paper.tolist(),
            "index_paper": self.index_paper.tolist(),
            "recovered_paper": self.recovered_paper,
        }


def nearest_candidates(
    truth: torch.Tensor,
    candidates: torch.Tensor,
    threshold: float = 0.4,
    shortlist: int = 5,
    chunk: int = 4096,
) -> NearestCandidates:
    """For every true image, the candidate of highest SSIM (candidates may be reused).

    SSIM against every candidate is costly, so each true image first shortlists its
    ``shortlist`` best candidates by normalised cross-correlation (mean-removed cosine) and its
    ``shortlist`` nearest by MSE -- NCC is blind to constant images (the red/blue toy set), MSE
    to contrast -- and SSIM is computed on those pairs only, ``chunk`` pairs at a time, in both
    windows (ours and the paper's). An image is recovered when its best SSIM reaches
    ``threshold`` (Haim et al. use 0.4).
    """
    n, m = truth.shape[0], candidates.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"need true images and candidates, got {n} and {m}")
    flat_t, flat_c = truth.flatten(1).double(), candidates.flatten(1).double()
    cent_t = flat_t - flat_t.mean(1, keepdim=True)
    cent_c = flat_c - flat_c.mean(1, keepdim=True)
    unit_t = cent_t / cent_t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit_c = cent_c / cent_c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(shortlist, m)
    by_ncc = (unit_t @ unit_c.T).topk(k, dim=1).indices
    by_mse = torch.cdist(flat_t, flat_c).topk(k, dim=1, largest=False).indices
    pairs = torch.cat([by_ncc, by_mse], dim=1)
    rows = torch.arange(n).repeat_interleave(pairs.shape[1])
    cols = pairs.flatten()

    def best(metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.cat(
            [
                metric(candidates[cols[i : i + chunk]], truth[rows[i : i + chunk]])
                for i in range(0, rows.numel(), chunk)
            ]
        ).view(n, -1)
        value, where = scores.max(1)
        return value, pairs.gather(1, where[:, None]).squeeze(1)

    top, index = best(ssim)
    top_paper, index_paper = best(ssim_paper)
    recovered = int((top >= threshold).sum())
    return NearestCandidates(
        ssim=top,
        index=index,
        recovered=recovered,
        fraction=recovered / n,
        threshold=threshold,
        ssim_paper=top_paper,
        index_paper=index_paper,
        recovered_paper=int((top_paper >= threshold).sum()),
    )
