"""How a batched L-BFGS problem ends: converged below the tolerance, stalled above it."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from attacks.optim.lbfgs import lbfgs
from attacks.optim.tracker import Tracker, status_of


@dataclass(frozen=True)
class Settings:
    iterations: int = 200
    tolerance: float = 1e-9
    snapshots: int = 0
    log_every: int = 50
    prune_after: int = 0
    prune_factor: float = 10.0
    lr: float = 1.0
    history: int = 10
    max_step: float = 1e9
    box: bool = False
    stall_restarts: int = 0


@dataclass(frozen=True)
class Flat:
    image_size: int = 4

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z, z[:, :0]


def test_a_floor_above_the_tolerance_stalls_and_a_zero_floor_converges() -> None:
    floors = torch.tensor([0.0, 1.0, 0.0, 0.5], dtype=torch.float64)  # per problem

    def evaluate(z: torch.Tensor, _: object) -> tuple[torch.Tensor, ...]:
        # A quadratic bowl whose minimum value is the problem's floor.
        dist = ((z - 2.0) ** 2).sum(1) + floors
        return dist, dist, 2 * (z - 2.0)

    z = torch.zeros(4, 4, dtype=torch.float64)
    tracker = Tracker(z, Settings(), time.perf_counter())
    lbfgs(evaluate, z, Flat(), Settings(), tracker)
    assert [status_of(tracker, p) for p in range(4)] == [
        "converged", "stalled", "converged", "stalled",
    ]  # fmt: skip
    assert torch.allclose(tracker.best[1], torch.full((4,), 2.0, dtype=torch.float64))


def test_a_problem_out_of_iterations_reports_the_budget() -> None:
    def evaluate(z: torch.Tensor, _: object) -> tuple[torch.Tensor, ...]:
        # A long, steady slope: progress every step, never a stall, never the tolerance.
        dist = (z - 1e6).abs().sum(1)
        return dist, dist, torch.sign(z - 1e6)

    z = torch.zeros(1, 4, dtype=torch.float64)
    settings = Settings(iterations=5, lr=0.001, max_step=0.001)
    tracker = Tracker(z, settings, time.perf_counter())
    lbfgs(evaluate, z, Flat(), settings, tracker)
    assert status_of(tracker, 0) == "budget"


def test_a_stalled_problem_starts_again_from_a_new_draw_and_converges() -> None:
    """A double well: from z = 3 L-BFGS settles in the well at 2 whose floor (0.5) is above the
    tolerance, and stalls; its restart from the next draw (z = -3) finds the well at -2."""

    def evaluate(z: torch.Tensor, _: object) -> tuple[torch.Tensor, ...]:
        right, left = ((z - 2.0) ** 2).sum(1) + 0.5, ((z + 2.0) ** 2).sum(1)
        dist = torch.minimum(right, left)
        gradient = torch.where((right < left)[:, None], 2 * (z - 2.0), 2 * (z + 2.0))
        return dist, dist, gradient

    drawn: list[list[int]] = []

    def redraw(rows: torch.Tensor) -> torch.Tensor:
        drawn.append(rows.tolist())
        return torch.full((len(rows), 4), -3.0, dtype=torch.float64)

    start = torch.full((2, 4), 3.0, dtype=torch.float64)
    start[1] = -3.0  # already in the good well: never restarted
    blind = Tracker(start, Settings(), time.perf_counter())
    lbfgs(evaluate, start, Flat(), Settings(), blind, redraw)
    assert status_of(blind, 0) == "stalled" and drawn == []  # stall_restarts = 0: no restart

    settings = replace(Settings(), stall_restarts=2)
    again = Tracker(start, settings, time.perf_counter())
    lbfgs(evaluate, start, Flat(), settings, again, redraw)
    assert [status_of(again, p) for p in range(2)] == ["converged", "converged"]
    assert drawn == [[0]]  # one restart, of the stalled problem only
    assert torch.allclose(again.best[0], torch.full((4,), -2.0, dtype=torch.float64))
