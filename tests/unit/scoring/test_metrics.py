"""Leakage metrics: PSNR/MSE/SSIM (both windows), Hungarian matching and the leak summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.scoring.metrics import (
    leak_summary,
    match,
    mse,
    nearest_candidates,
    pairwise_mse,
    pairwise_ssim,
    psnr,
    ssim,
    ssim_paper,
)


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM written out window by window: the slow, obvious definition."""
    offsets = np.arange(11) - 5.0
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    values = []
    for channel in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                x = a[channel, i : i + 11, j : j + 11]
                y = b[channel, i : i + 11, j : j + 11]
                mx, my = (window * x).sum(), (window * y).sum()
                vx = (window * (x - mx) ** 2).sum()
                vy = (window * (y - my) ** 2).sum()
                cxy = (window * (x - mx) * (y - my)).sum()
                num = (2 * mx * my + c1) * (2 * cxy + c2)
                values.append(num / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def _mirror(index: int, size: int) -> int:
    """Reflect padding: -1 -> 1, size -> size - 2 (the edge pixel is not repeated)."""
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def _reference_ssim_paper(a: np.ndarray, b: np.ndarray) -> float:
    """Haim et al.'s SSIM (kornia, window 3): a 3x3 Gaussian (sigma 1.5) centred on every pixel,
    borders mirrored, SSIM per pixel averaged; written out pixel by pixel."""
    g = np.exp(-(np.array([-1.0, 0.0, 1.0]) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    channels, height, width = a.shape
    for channel in range(channels):
        for i in range(height):
            for j in range(width):
                rows = [_mirror(i + d, height) for d in (-1, 0, 1)]
                cols = [_mirror(j + d, width) for d in (-1, 0, 1)]
                x = a[channel][np.ix_(rows, cols)]
                y = b[channel][np.ix_(rows, cols)]
                mx, my = (window * x).sum(), (window * y).sum()
                vx = (window * x * x).sum() - mx**2
                vy = (window * y * y).sum() - my**2
                cxy = (window * x * y).sum() - mx * my
                num = (2 * mx * my + c1) * (2 * cxy + c2)
                values.append(num / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_of_identical_images_is_infinite() -> None:
    images = torch.rand(3, 1, 28, 28)
    assert torch.isinf(psnr(images, images)).all()
    assert torch.equal(mse(images, images), torch.zeros(3, dtype=torch.float64))


def test_psnr_and_mse_known_values_per_image() -> None:
    truth = torch.zeros(2, 1, 8, 8)
    noisy = truth.clone()
    noisy[0] += 0.1
    noisy[1] += 0.01
    assert torch.allclose(mse(noisy, truth), torch.tensor([1e-2, 1e-4], dtype=torch.float64))
    assert torch.allclose(psnr(noisy, truth), torch.tensor([20.0, 40.0], dtype=torch.float64))


def test_ssim_of_identical_images_is_one_and_drops_with_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 28, 28, generator=generator)
    assert torch.allclose(ssim(images, images), torch.ones(4, dtype=torch.float64))
    noisy = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert (ssim(noisy, images) < 0.9).all()


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


# Each window against its slow reference: ours (11x11, valid) on images at least the window's
# size, the paper's (3x3, reflected borders) on any image of two pixels or more.
WINDOWS = {
    "ours-11x11": (ssim, _reference_ssim, 11, 15),
    "paper-3x3": (ssim_paper, _reference_ssim_paper, 2, 9),
}


@pytest.mark.parametrize("window", list(WINDOWS))
@settings(max_examples=12, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16), noise=st.floats(0.0, 0.5))
def test_ssim_matches_its_windowed_definition(
    window: str, data: st.DataObject, seed: int, noise: float
) -> None:
    fast_ssim, slow_ssim, smallest, largest = WINDOWS[window]
    side = st.integers(smallest, largest)
    size = (data.draw(side), data.draw(side))
    channels = data.draw(st.integers(1, 3))
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(2, channels, *size, generator=generator, dtype=torch.float64)
    b = (a + noise * torch.randn(a.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    fast = fast_ssim(a, b)
    slow = [slow_ssim(a[i].numpy(), b[i].numpy()) for i in range(2)]
    assert fast.tolist() == pytest.approx(slow, abs=1e-9)


def test_the_paper_ssim_is_ours_with_a_3x3_window_and_reflected_borders() -> None:
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(2, 2, 9, 7, generator=generator, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    assert torch.equal(ssim(a, b, window=3, padding="reflect"), ssim_paper(a, b))


def test_paper_ssim_of_identical_images_is_one_and_needs_two_pixels() -> None:
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim_paper(images, images), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="larger than 1 px"):
        ssim_paper(torch.rand(1, 1, 1, 5), torch.rand(1, 1, 1, 5))


def test_windows_disagree_when_fine_detail_matches_and_coarse_shape_does_not() -> None:
    """Same fine checkerboard, opposite coarse wave: the 3x3 window sees mostly the shared
    detail (leaked at 0.4), the 11x11 window the inverted wave (not leaked)."""
    i = torch.arange(32.0)
    fine = ((i[:, None] + i[None, :]) % 2) * 2 - 1
    coarse = torch.sin(2 * math.pi * i / 32)[:, None].expand(32, 32)
    a = (0.5 + 0.1 * fine + 0.35 * coarse).clamp(0, 1)[None, None]
    b = (0.5 + 0.1 * fine - 0.35 * coarse).clamp(0, 1)[None, None]
    ours, paper = float(ssim(a, b)), float(ssim_paper(a, b))
    assert ours < 0.4 <= paper and paper - ours > 0.2
    report = nearest_candidates(a, torch.cat([b, torch.rand(3, 1, 32, 32)]))
    assert report.recovered == 0 and report.recovered_paper == 1
    assert report.ssim_paper.item() == pytest.approx(paper)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12))
def test_match_recovers_a_shuffled_permutation(seed: int, n: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    truth = torch.rand(n, 1, 12, 12, generator=generator)
    shuffle = torch.randperm(n, generator=generator)
    noisy = truth[shuffle] + 0.01 * torch.randn(truth.shape, generator=generator)
    perm = match(noisy, truth)
    assert torch.equal(noisy[perm], noisy[torch.argsort(shuffle)])
    assert torch.allclose(noisy[perm], truth, atol=0.1)


def test_match_with_extra_reconstructions_and_too_few() -> None:
    truth = torch.rand(2, 1, 12, 12)
    candidates = torch.cat([torch.rand(3, 1, 12, 12), truth.flip(0)])
    assert match(candidates, truth).tolist() == [4, 3]
    with pytest.raises(ValueError, match="cannot match"):
        match(truth[:1], truth)


def test_pairwise_mse_agrees_with_mse() -> None:
    a, b = torch.rand(3, 1, 10, 10), torch.rand(4, 1, 10, 10)
    table = pairwise_mse(a, b)
    assert table.shape == (3, 4)
    assert torch.allclose(table[1], mse(a[1:2].expand(4, -1, -1, -1), b))


def test_leak_summary_scores_after_matching() -> None:
    generator = torch.Generator().manual_seed(1)
    truth = torch.rand(4, 1, 28, 28, generator=generator)
    labels = torch.tensor([3, 1, 4, 1])
    shuffle = torch.tensor([2, 0, 3, 1])
    reconstructed = truth[shuffle].clone()
    reconstructed[0] = torch.rand(1, 28, 28, generator=generator)  # truth[2] is not leaked
    summary = leak_summary(reconstructed, truth, labels[shuffle], labels)
    assert summary.permutation.tolist() == [1, 3, 0, 2]
    assert summary.fraction_leaked == pytest.approx(0.75)
    assert summary.label_accuracy == pytest.approx(1.0)
    assert math.isinf(float(summary.psnr[0])) and float(summary.psnr[2]) < 15
    assert summary.ssim.shape == (4,) and float(summary.ssim[2]) < 0.5
    assert summary.as_dict()["label_accuracy"] == 1.0


def test_leak_summary_threshold_and_missing_labels() -> None:
    truth = torch.full((3, 1, 12, 12), 0.5)
    close = truth + 0.01  # 40 dB
    assert leak_summary(close, truth).fraction_leaked == 1.0
    summary = leak_summary(close, truth, threshold_db=45.0)
    assert summary.fraction_leaked == 0.0 and summary.label_accuracy is None


def test_pairwise_ssim_is_ssim_of_every_pair() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = (
        torch.rand(3, 1, 12, 12, generator=generator),
        torch.rand(4, 1, 12, 12, generator=generator),
    )
    expected = torch.stack([ssim(a[i : i + 1].expand_as(b), b) for i in range(3)])
    assert torch.allclose(pairwise_ssim(a, b), expected, atol=1e-12)
