"""Book-keeping shared by the batched optimisers, and the interface they solve against.

:class:`Tracker` keeps each problem's best (lowest-distance) iterate, the trace, the snapshots
and which problems stopped (converged, stalled, diverged or pruned); :func:`status_of` turns
that into a reconstruction's status. The optimisers (:mod:`attacks.optim.adam`,
:mod:`attacks.optim.lbfgs`) see the problem only through :data:`Evaluate`, :class:`Problems`
and the settings protocols, so this package imports nothing from the attack modules that use
it (no import cycle; only torch and :mod:`simulator.core`):
:mod:`attacks.matching.objective` builds the evaluator and the batch, and
``GradientMatchingParams`` (:mod:`attacks.matching.attacks`) satisfies the settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import torch

from simulator.core.protocol import Status

# (flat variables (R, D), problem rows (R,) or None for all) ->
# (objective (R,), gradient distance (R,), d objective / dz (R, D))
Evaluate = Callable[
    [torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


class Problems(Protocol):
    """A batch of problems as the optimisers see it: flat variables that hold images first."""

    @property
    def image_size(self) -> int:
        """Number of leading image variables per problem (the box constraint applies to them)."""
        ...

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat variables (P, D) -> images (P, n, C, H, W) and label variables (P, n, K)."""
        ...


class TrackerSettings(Protocol):
    """The settings the tracker reads (``GradientMatchingParams`` provides them)."""

    @property
    def iterations(self) -> int: ...

    @property
    def tolerance(self) -> float: ...

    @property
    def snapshots(self) -> int: ...

    @property
    def log_every(self) -> int: ...

    @property
    def prune_after(self) -> int: ...

    @property
    def prune_factor(self) -> float: ...


def snapshot_steps(total: int, count: int, *, start: bool) -> set[int]:
    """The iterations of a run of ``total`` at which an iterative attack keeps its ``count``
    image snapshots: evenly spaced, the last one at ``total``.

    With ``start`` the first is iteration 0 (the starting point: the gradient-matching attacks,
    whose tracker shows how far the dummies moved); without, the spacing is ``total / count``
    and the first is one spacing in (KKT and network inversion, whose start is noise). Every
    iterative attack takes its snapshots from here.
    """
    if not count:
        return set()
    if start:
        return {round(i * total / max(count - 1, 1)) for i in range(count)}
    return {round(k * total / count) for k in range(1, count + 1)}


class Tracker:
    """Best iterate per problem, the trace and snapshots of a batched optimisation."""

    def __init__(
        self, z: torch.Tensor, params: TrackerSettings, start: float, group: int = 1
    ) -> None:
        problems = z.shape[0]
        self.group = group  # consecutive problems of one observation
        self.pruned = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.best = z.clone()
        self.best_distance = torch.full((problems,), math.inf, device=z.device)
        self.diverged = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.converged = torch.zeros(problems, dtype=torch.bool, device=z.device)
        # Stopped without reaching the tolerance: no progress left (reported "stalled").
        self.stalled = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.threshold = torch.full((problems,), params.tolerance, device=z.device)
        self.rows: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []
        self.snapshots: list[tuple[int, torch.Tensor]] = []
        self.snapshot_at = snapshot_steps(params.iterations, params.snapshots, start=True)
        self.log_every = params.log_every
        self.start = start

    def stopped(self) -> torch.Tensor:
        """Problems that get no more work: converged, stalled, or pruned as hopeless or
        redundant."""
        return self.converged | self.stalled | self.pruned

    def prune(self, iteration: int, params: TrackerSettings) -> None:
        """Stop the other problems of an observation that one problem solved, and, every
        ``prune_after`` iterations, those lagging ``prune_factor`` times behind its best."""
        if self.group == 1:
            return
        best = self.best_distance.view(-1, self.group)
        solved = (best <= self.threshold.view(-1, self.group)).any(1, keepdim=True)
        lagging = solved & ~self.converged.view(-1, self.group)
        if params.prune_after and iteration > 0 and iteration % params.prune_after == 0:
            lagging |= best > params.prune_factor * best.min(1, keepdim=True).values
        self.pruned |= lagging.flatten() & ~self.converged

    def observe(
        self,
        iteration: int,
        z: torch.Tensor,
        total: torch.Tensor,
        dist: torch.Tensor,
        images: Callable[[torch.Tensor], torch.Tensor],
        last: bool = False,
    ) -> None:
        finite = torch.isfinite(total) & torch.isfinite(dist)
        self.diverged |= ~finite
        better = finite & (dist < self.best_distance)
        self.best = torch.where(better[:, None], z, self.best)
        self.best_distance = torch.where(better, dist, self.best_distance)
        snap = iteration in self.snapshot_at or (last and bool(self.snapshot_at))
        # Snapshot iterations are traced too, so a scorer can time when quality was reached.
        logged = last or snap or iteration % self.log_every == 0
        if logged and (not self.rows or self.rows[-1][0] != iteration):
            seconds = time.perf_counter() - self.start
            self.rows.append((iteration, seconds, dist.clone(), total.clone()))
        if snap and (not self.snapshots or self.snapshots[-1][0] != iteration):
            self.snapshots.append((iteration, images(z).clamp(0, 1).clone()))


def status_of(t: Tracker, problem: int) -> Status:
    """How a problem ended: diverged, converged (its best distance under the tolerance),
    stalled (stopped for want of progress above it), or out of iterations."""
    # Divergence first: a NaN distance also stops progress, which would read as stalled.
    if t.diverged[problem] or not math.isfinite(float(t.best_distance[problem])):
        return "diverged"
    if t.converged[problem] or bool(t.best_distance[problem] <= t.threshold[problem]):
        return "converged"
    if t.stalled[problem]:
        return "stalled"
    return "budget"
