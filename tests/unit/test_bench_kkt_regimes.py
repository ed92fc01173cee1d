"""Helpers of benchmarks/bench_kkt_regimes.py: alive units, effective rank, first-layer init."""

from __future__ import annotations

import torch

from benchmarks.bench_kkt_regimes import alive_units, effective_rank, first_layer_initial
from tests.fixtures.trained_model import homogeneous_spec


def test_alive_units_counts_units_positive_somewhere() -> None:
    generator = torch.Generator().manual_seed(0)
    pre = torch.rand(20, 10, generator=generator) + 0.1
    pre[:, [2, 5, 7]] = -torch.rand(20, 3, generator=generator)  # three dead units
    pre[3, 0] = -1.0  # negative on one example only: still alive
    assert alive_units(pre) == 7


def test_effective_rank_of_a_rank_two_matrix() -> None:
    generator = torch.Generator().manual_seed(1)
    left, right = torch.randn(50, 2, generator=generator), torch.randn(2, 30, generator=generator)
    report = effective_rank(left @ right)
    assert report["rank"] == 2
    top3 = report["top3"]
    assert isinstance(top3, list) and len(top3) == 3
    assert abs(top3[0] ** 2 + top3[1] ** 2 - 1) < 1e-3 and top3[2] < 1e-3


def test_effective_rank_of_zero_matrix() -> None:
    assert effective_rank(torch.zeros(4, 3)) == {"rank": 0, "top3": [0.0, 0.0, 0.0]}


def test_first_layer_initial_scales_the_first_layer_only() -> None:
    spec = homogeneous_spec((1, 4, 4), widths=(5, 5), init_scale=1.0)
    default = first_layer_initial(spec, 1.0, seed=0)
    small = first_layer_initial(spec, 1e-4, seed=0)
    keys = list(default)
    assert torch.allclose(small[keys[0]], default[keys[0]] * 1e-4)
    assert torch.allclose(small[keys[1]], default[keys[1]] * 1e-4)
    for key in keys[2:]:
        assert torch.equal(small[key], default[key])
