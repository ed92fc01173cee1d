"""Oracle-free selection of KKT candidates: planted sets, ranking signals, no truth in reach."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import attacks.kkt.selection as selection_module
from attacks.kkt.selection import select_candidates, smoothness


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _smooth_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Digit-like stand-ins: coarse random 7x7 patterns upsampled to 28x28."""
    coarse = torch.rand(n, 1, 7, 7, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear")


def _planted(
    seed: int, copies: int = 4, noise: int = 100, grey: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """10 true images, each as ``copies`` slightly noised copies, among uniform-noise and
    KKT-init-like grey-noise candidates, shuffled. Returns candidates and each one's source
    (0..9 for copies, -1 for noise)."""
    generator = torch.Generator().manual_seed(seed)
    truth = _smooth_images(10, generator)
    copies_ = truth.repeat_interleave(copies, 0)
    copies_ = (copies_ + 0.02 * torch.randn(copies_.shape, generator=generator)).clamp(0, 1)
    uniform = torch.rand(noise, 1, 28, 28, generator=generator)
    grey_ = (0.5 + 0.035 * torch.randn(grey, 1, 28, 28, generator=generator)).clamp(0, 1)
    candidates = torch.cat([copies_, uniform, grey_])
    source = torch.cat(
        [torch.arange(10).repeat_interleave(copies), torch.full((noise + grey,), -1)]
    )
    order = torch.randperm(candidates.shape[0], generator=generator)
    return candidates[order], source[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_picks_every_planted_image_and_little_else(seed: int) -> None:
    candidates, source = _planted(seed)
    chosen = select_candidates(candidates)
    picked = source[chosen.index]
    assert set(picked[picked >= 0].tolist()) == set(range(10))  # every planted image, once
    assert int((picked < 0).sum()) <= 1 and picked.numel() <= 11
    assert (chosen.support[picked >= 0] == 4).all()
    assert (chosen.score[:-1] >= chosen.score[1:]).all()  # ranked, best first
    top = select_candidates(candidates, top=10)
    assert sorted(source[top.index].tolist()) == list(range(10))


def test_selection_without_agreement_falls_back_on_structure() -> None:
    """One copy per image (nothing agrees): ``top`` still ranks the smooth images first."""
    candidates, source = _planted(3, copies=1)
    assert select_candidates(candidates).index.numel() == 0  # nothing has support 2
    top = select_candidates(candidates, top=10)
    assert sorted(source[top.index].tolist()) == list(range(10))


def test_small_stationarity_contributions_rank_last() -> None:
    candidates, source = _planted(4, noise=0, grey=0)
    weak = source >= 5  # the fit hardly uses images 5..9
    contributions = torch.where(weak, 0.02, 1.0)
    chosen = select_candidates(candidates, contributions, top=10)
    assert sorted(source[chosen.index].tolist()) == list(range(5))  # weak ones fall under 0.1
    with pytest.raises(ValueError, match="contributions"):
        select_candidates(candidates, contributions[:3])


def test_smoothness_separates_noise_from_images() -> None:
    generator = torch.Generator().manual_seed(5)
    noise = torch.rand(20, 1, 28, 28, generator=generator)
    images = _smooth_images(20, generator)
    assert (smoothness(noise) < 0.1).all() and (smoothness(images) > 0.8).all()
    assert torch.equal(
        smoothness(torch.full((1, 3, 4, 4), 0.5)), torch.ones(1, dtype=torch.float64)
    )


def test_selection_never_receives_the_truth() -> None:
    """Its inputs are the candidates and attack-side statistics; the module cannot reach the
    scorer or the federation's truth."""
    names = list(inspect.signature(select_candidates).parameters)
    assert names == ["candidates", "contributions", "top", "similarity", "min_support",
                     "min_smoothness", "min_relative_score"]  # fmt: skip
    source = Path(selection_module.__file__).read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import", "from"))]
    assert all("simulator" not in line and "truth" not in line for line in imports), imports
