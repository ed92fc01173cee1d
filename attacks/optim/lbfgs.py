"""L-BFGS on a batch of independent gradient-matching problems (DLG's and iDLG's optimiser).

Torch's L-BFGS treats its parameters as one problem: batched problems would share curvature
pairs, step sizes and line searches. :func:`lbfgs` keeps all of them per problem, so a batched
run follows the path each problem would follow alone, and only problems still running get
directions, line searches and evaluations (stopped problems cost nothing more).

L-BFGS keeps its curvature pairs in the compact form of Byrd, Nocedal and Schnabel
(:class:`History`: a few batched matrix products per iteration instead of a Python two-loop
over the memory). With ``box``, pixels that sit on a bound the gradient pushes against are
frozen (active set) and the line search path is projected onto [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from attacks.optim.tracker import Evaluate, Problems, Tracker, TrackerSettings

_ARMIJO = 1e-4
_LINE_SEARCH_STEPS = 12
# L-BFGS stops a problem whose distance fell by less than this fraction over the window.
_STALL_WINDOW = 10
_STALL_FRACTION = 1e-4


class LBFGSSettings(TrackerSettings, Protocol):
    """The settings L-BFGS reads (``GradientMatchingParams`` provides them)."""

    @property
    def lr(self) -> float: ...

    @property
    def history(self) -> int: ...

    @property
    def max_step(self) -> float: ...

    @property
    def box(self) -> bool: ...

    @property
    def stall_restarts(self) -> int: ...


# Fresh starting points for the given problem rows: (rows,) -> (len(rows), D).
Redraw = Callable[[torch.Tensor], torch.Tensor]


class History:
    """Per-problem L-BFGS curvature pairs, applied in the compact form of Byrd, Nocedal and
    Schnabel (1994): ``H g = gamma g + S w1 - gamma Y u`` with small triangular solves.

    Equivalent to the two-loop recursion, but a fixed handful of tensor operations per
    iteration instead of two Python loops over the memory (which cost as much as a gradient
    evaluation at memory 100+). ``S^T Y`` and ``Y^T Y`` are kept up to date one pair at a time.
    Slots are a ring (oldest at ``head``); a pair that is invalid for a problem is masked out,
    which decouples it exactly (zero row and column, unit diagonal).
    """

    def __init__(self, memory: int, problems: int, dims: int, like: torch.Tensor) -> None:
        self.memory = memory
        self.s = like.new_zeros(problems, memory, dims)  # (P, m, D): products are bmm
        self.y = like.new_zeros(problems, memory, dims)
        self.sy = like.new_zeros(problems, memory, memory)  # [p, i, j] = s_i . y_j
        self.yy = like.new_zeros(problems, memory, memory)
        self.valid = torch.zeros(memory, problems, dtype=torch.bool, device=like.device)
        self.head = 0
        self.pushed = 0

    def push(self, s: torch.Tensor, y: torch.Tensor, update: torch.Tensor) -> None:
        """Store a pair in the next slot for the ``update`` problems (an invalid slot else)."""
        h = self.head
        self.valid[h] = update
        self.s[:, h] = torch.where(update[:, None], s, 0.0)
        self.y[:, h] = torch.where(update[:, None], y, 0.0)
        # Inner products only for the problems that store a pair (the others' row is masked)
        # and only with the slots written so far: until the memory fills, the rest are zeros.
        rows = update.nonzero().squeeze(1)
        used = min(self.pushed + 1, self.memory)
        whole = rows.numel() == update.numel()
        s_all = self.s[:, :used] if whole else self.s[rows, :used]
        y_all = self.y[:, :used] if whole else self.y[rows, :used]
        # Two passes over the stored pairs (the products are memory-bound).
        with_y = torch.bmm(y_all, torch.stack([s_all[:, h], y_all[:, h]], dim=2))
        self.sy[rows, h, :used] = with_y[:, :, 0]
        self.sy[rows, :used, h] = torch.bmm(s_all, y_all[:, h, :, None])[:, :, 0]
        y_dot_y = with_y[:, :, 1]
        self.yy[rows, h, :used] = y_dot_y
        self.yy[rows, :used, h] = y_dot_y
        self.head = (h + 1) % self.memory
        self.pushed += 1

    def apply(self, g: torch.Tensor, gamma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``H g`` for problems ``rows`` (g, gamma given for those rows only)."""
        m = self.memory
        used = min(self.pushed, m)  # storage slots written so far: 0 .. used - 1
        if used == 0:
            return gamma[:, None] * g
        # Time order (oldest first): the ring once the memory is full, storage order before.
        slots = [(self.head + j) % m for j in range(m)] if self.pushed >= m else range(used)
        whole = rows.numel() == self.s.shape[0]
        s_all = self.s[:, :used] if whole else self.s[rows, :used]
        y_all = self.y[:, :used] if whole else self.y[rows, :used]
        order = torch.tensor(list(slots), device=g.device)
        valid = self.valid[:used, rows].T.to(g.dtype)  # (R, used), storage order
        # Products with the stored pairs in storage order; small (R, k) algebra in time order.
        a = (torch.bmm(s_all, g[:, :, None])[:, :, 0] * valid)[:, order, None]
        b = (torch.bmm(y_all, g[:, :, None])[:, :, 0] * valid)[:, order, None]
        v = valid[:, order]
        mask = v[:, :, None] * v[:, None, :]
        sy = self.sy[rows][:, order][:, :, order] * mask
        yy = self.yy[rows][:, order][:, :, order] * mask
        r = torch.triu(sy) + torch.diag_embed(1.0 - v)  # unit diagonal where invalid
        d = torch.diagonal(sy, dim1=1, dim2=2)[:, :, None]
        u = torch.linalg.solve_triangular(r, a, upper=True)
        scale = gamma[:, None, None]
        rhs = d * u + scale * (torch.bmm(yy, u) - b)
        w1 = torch.linalg.solve_triangular(r.transpose(1, 2), rhs, upper=False)
        coef_s = g.new_zeros(g.shape[0], 1, used)
        coef_y = g.new_zeros(g.shape[0], 1, used)
        coef_s[:, 0, order] = w1[:, :, 0]
        coef_y[:, 0, order] = -u[:, :, 0] * gamma[:, None]
        hg = gamma[:, None] * g
        return hg + (torch.bmm(coef_s, s_all) + torch.bmm(coef_y, y_all))[:, 0]


def lbfgs(
    evaluate: Evaluate,
    z: torch.Tensor,
    batch: Problems,
    params: LBFGSSettings,
    t: Tracker,
    redraw: Redraw | None = None,
) -> None:
    """L-BFGS with a separate history, step and Armijo backtracking per problem.

    Torch's L-BFGS treats its parameters as one problem: batched problems would share curvature
    pairs and step sizes. Here every scalar is per problem, so each problem follows the path it
    would follow alone. The first step (and any step after a reset) is ``lr * min(1, 1/|g|_1)``
    as in torch; later trial steps are ``lr``, halved until the Armijo condition holds. A
    problem stops below ``tolerance`` ("converged"), or ("stalled") when even steepest descent
    finds no decrease or its distance stops falling (torch's ``tolerance_change``, relative).

    With ``redraw`` and ``params.stall_restarts``, a problem that stalls above the tolerance
    starts again from a fresh draw (new history, first step), up to that many times, inside
    the same batched solve; the tracker keeps its best iterate over all of its starts.
    """
    problems, dims = z.shape
    history = History(params.history, problems, dims, z)
    valid = history.valid
    gamma = z.new_ones(problems)
    fresh = torch.ones(problems, dtype=torch.bool, device=z.device)
    restarted = torch.zeros(problems, dtype=torch.long, device=z.device)
    images = lambda v: batch.split(v)[0]  # noqa: E731
    total, dist, gradient = evaluate(z, None)
    recent: list[torch.Tensor] = []
    for iteration in range(params.iterations):
        t.converged |= dist <= t.threshold
        t.stalled |= ~t.converged & (gradient.abs().amax(1) == 0)
        recent.append(dist)
        if len(recent) > _STALL_WINDOW:
            before = recent.pop(0)
            t.stalled |= ~t.converged & (before - dist <= _STALL_FRACTION * before.abs())
        again = t.stalled & ~t.pruned & (restarted < params.stall_restarts)
        if redraw is not None and bool(again.any()):
            rows = again.nonzero().squeeze(1)
            z, total, dist, gradient = z.clone(), total.clone(), dist.clone(), gradient.clone()
            z[rows] = redraw(rows).to(z)
            total[rows], dist[rows], gradient[rows] = evaluate(z[rows], rows)
            restarted[rows] += 1
            t.stalled[rows] = False
            valid[:, rows] = False
            gamma[rows] = 1.0
            fresh[rows] = True
            for earlier in recent:  # the stall window starts again with the new start
                earlier[rows] = math.inf
        t.observe(iteration, z, total, dist, images)
        t.prune(iteration, params)
        if bool(t.stopped().all()):
            t.observe(iteration, z, total, dist, images, last=True)
            return
        # Directions only for the problems still running (stopped ones cost nothing).
        active = (~t.stopped()).nonzero().squeeze(1)
        direction = torch.zeros_like(gradient)
        direction[active] = -history.apply(gradient[active], gamma[active], active)
        if params.box:
            # Coordinates held at a bound by the gradient do not move (active set).
            pixels = z[:, : batch.image_size]
            g_pixels = gradient[:, : batch.image_size]
            held = ((pixels <= 0) & (g_pixels > 0)) | ((pixels >= 1) & (g_pixels < 0))
            held = torch.cat(
                [held, torch.zeros_like(z[:, batch.image_size :], dtype=torch.bool)], 1
            )
            direction = direction.masked_fill(held, 0.0)
            gradient_free = gradient.masked_fill(held, 0.0)
        else:
            gradient_free = gradient
        slope = (gradient * direction).sum(1)
        reset = ~(slope < 0)
        if bool(reset.any()):
            direction = torch.where(reset[:, None], -gradient_free, direction)
            slope = torch.where(reset, -(gradient_free**2).sum(1), slope)
            valid &= ~reset
            gamma = torch.where(reset, 1.0, gamma)
            fresh |= reset
        first = params.lr * (1.0 / gradient.abs().sum(1).clamp_min(1e-30)).clamp(max=1.0)
        step = torch.where(fresh, first, torch.full_like(first, params.lr))
        if params.max_step > 0:
            # A cap on the largest coordinate change keeps L-BFGS from leaping onto the flat,
            # saturated plateaus (softmax ~ one-hot, zero gradient) where DLG gets stuck.
            largest = direction.abs().amax(1).clamp_min(1e-30)
            step = torch.minimum(step, params.max_step / largest)
        pending = ~t.stopped()
        new_z, new_total, new_dist = z.clone(), total.clone(), dist.clone()
        new_grad = gradient.clone()
        for _ in range(_LINE_SEARCH_STEPS):
            rows = pending.nonzero().squeeze(1)
            trial = z[rows] + step[rows, None] * direction[rows]
            decrease = step[rows] * slope[rows]
            if params.box:
                # Projected search path: the images stay in the data range [0, 1].
                trial[:, : batch.image_size].clamp_(0, 1)
                decrease = (gradient[rows] * (trial - z[rows])).sum(1)
            trial_total, trial_dist, trial_grad = evaluate(trial, rows)
            ok = torch.isfinite(trial_total) & torch.isfinite(trial_grad).all(1)
            ok &= trial_total <= total[rows] + _ARMIJO * decrease
            accepted = rows[ok]
            new_z[accepted] = trial[ok]
            new_total[accepted] = trial_total[ok]
            new_dist[accepted] = trial_dist[ok]
            new_grad[accepted] = trial_grad[ok]
            pending[accepted] = False
            if not bool(pending.any()):
                break
            step = torch.where(pending, step * 0.5, step)
        # No acceptable step even along steepest descent: the problem is stuck (stationary).
        t.stalled |= pending & fresh & ~t.converged
        stalled = pending & ~fresh
        valid &= ~stalled
        gamma = torch.where(stalled, 1.0, gamma)
        moved = ~pending & ~t.converged & ~t.stalled
        s, y = new_z - z, new_grad - gradient
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        update = moved & (sy > 1e-10 * yy.clamp_min(1e-30).sqrt() * s.norm(dim=1))
        if bool(update.any()):
            history.push(s, y, update)
            gamma = torch.where(update, sy / yy.clamp_min(1e-30), gamma)
        fresh = (fresh & ~moved) | stalled
        z, total, dist, gradient = new_z, new_total, new_dist, new_grad
    t.converged |= dist <= t.threshold
    t.observe(params.iterations, z, total, dist, images, last=True)
