"""Adam on a batch of independent gradient-matching problems (Inverting Gradients' optimiser).

Adam is element-wise, so one ``torch.optim.Adam`` over the stacked variables (problems, D)
follows every problem's own path. Added here: optional signed gradients, projection of the
images onto [0, 1] after each step, step decay x0.1 at 3/8, 5/8 and 7/8 of the budget, a
restart from the best iterate for a problem that blows up, and stopped problems held in place.
"""

from __future__ import annotations

from typing import Protocol

import torch

from attacks.optim.tracker import Evaluate, Problems, Tracker, TrackerSettings


class AdamSettings(TrackerSettings, Protocol):
    """The settings Adam reads (``GradientMatchingParams`` provides them)."""

    @property
    def lr(self) -> float: ...

    @property
    def signed(self) -> bool: ...

    @property
    def lr_decay(self) -> bool: ...

    @property
    def box(self) -> bool: ...


def adam(
    evaluate: Evaluate, z: torch.Tensor, batch: Problems, params: AdamSettings, t: Tracker
) -> None:
    """Adam (optionally on signed gradients, boxed, step-decayed) on all problems at once."""
    z = z.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=params.lr)
    milestones = [round(params.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    images = lambda v: batch.split(v)[0]  # noqa: E731
    for iteration in range(params.iterations):
        total, dist, gradient = evaluate(z.detach(), None)
        t.converged |= dist <= t.threshold
        t.observe(iteration, z.detach(), total, dist, images)
        t.prune(iteration, params)
        done = bool(t.stopped().all())
        if done:
            t.observe(iteration, z.detach(), total, dist, images, last=True)
        if done:
            return
        bad = ~torch.isfinite(total) | ~torch.isfinite(gradient).all(1)
        if bool(bad.any()):
            # Restart a blown-up problem from its best iterate with fresh moments.
            with torch.no_grad():
                z[bad] = t.best[bad]
            state = optimizer.state.get(z, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][bad] = 0
            gradient = torch.where(bad[:, None], 0.0, gradient)
        if params.signed:
            gradient = gradient.sign()
        z.grad = gradient
        stopped = t.stopped()
        frozen = z.detach()[stopped].clone()
        optimizer.step()
        with torch.no_grad():
            # Stopped problems stay put (Adam's momentum would move them on).
            z[stopped] = frozen
        if params.lr_decay:
            decay.step()
        if params.box:
            with torch.no_grad():
                z[:, : batch.image_size].clamp_(0, 1)
    total, dist, _ = evaluate(z.detach(), None)
    t.converged |= dist <= t.threshold
    t.observe(params.iterations, z.detach(), total, dist, images, last=True)
