"""simulator.report.landscape: the gradient-matching loss around the true batch."""

from __future__ import annotations

import numpy as np

from simulator.report.landscape import compute, render
from simulator.scenario import load


def test_landscape_is_zero_at_the_truth_and_positive_around_it(tmp_path) -> None:
    scenario = load("binary-fc-seed")
    landscape = compute(scenario, resolution=7, radius=0.5)
    centre = landscape.distance[3, 3]
    assert centre < 1e-10 and np.all(np.delete(landscape.distance.ravel(), 24) > 1e3 * centre)
    path = render(landscape, tmp_path / "landscape.png")
    assert path.stat().st_size > 1000 and (tmp_path / "landscape.npz").is_file()
