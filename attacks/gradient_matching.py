"""Optimisation attacks that make dummy images reproduce an observed update.

DLG (Zhu et al. 2019), iDLG (Zhao et al. 2020) and Inverting Gradients (Geiping et al. 2020)
share one engine and differ in their defaults:

* ``dlg``: dummy images and soft labels (softmax of free logits) optimised jointly; squared-L2
  gradient distance; L-BFGS with step 1 as in the paper.
* ``idlg``: labels recovered analytically first (:mod:`attacks.labels`), images only.
* ``inverting-gradients``: recovered labels, cosine distance ``1 - cos(g, g*)`` over all
  parameters, total-variation prior, Adam on signed gradients, projection onto [0, 1] after
  every step, step decay x0.1 at 3/8, 5/8 and 7/8 of the budget.

Dummies start uniform in [0, 1] (the data range) by default; ``init="randn"`` gives the DLG
paper's Gaussian start, which on small networks often saturates the softmax and stalls.
The TV weight is absolute, as in the paper, but the cosine distance of these small MNIST
networks can be as small as 1e-6 at initialisation (LeNet: the head's gradient dominates), so
the default is 1e-6: the paper's 1e-2..0.2 (tuned for natural images) swamps it and blurs
strokes. ``box`` applies to Adam; L-BFGS results are clamped to [0, 1] only when reported.

The engine is batched: every observation passed to one ``run`` call, times ``restarts`` random
initialisations, becomes one problem in a tensor (problems, samples, C, H, W). Per-problem
gradients are computed with ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``),
so K clients cost one vectorised double-backward per iteration instead of K. Problems never
interact: Adam is element-wise and the L-BFGS below keeps a separate history, step size and
line search per problem, so a batched run follows the same path as separate runs (up to
floating-point summation order). Observations whose model or protocol shapes differ are
solved as separate batches. The reported iterate is each problem's best (lowest distance) one,
and the restart with the lowest distance wins.

FedAvg updates are attacked by replaying the client's local SGD (epochs, batch size, lr; all
``num_examples`` dummies) differentiably and matching ``(w_global - w_client) / lr``. The
client's shuffling is unknown: the first epoch uses slot order (no loss of generality, as
dummies are exchangeable), later epochs use seeded permutations, an approximation. Which
recovered labels shared a mini-batch is unknown too, so every restart spreads them over the
slots in its own random order and the best restart wins: use several restarts for FedAvg.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.func import functional_call, grad, grad_and_value, vmap

from attacks.base import Attack, Reconstruction, Status, param, register_attack
from attacks.labels import num_samples, recover_labels
from attacks.observation import Observation
from attacks.priors import total_variation
from simulator.models import ModelSpec, build_model, is_binary

Params = dict[str, torch.Tensor]
# (flat variables (R, D), problem rows (R,) or None for all) ->
# (objective (R,), gradient distance (R,), d objective / dz (R, D))
Evaluate = Callable[
    [torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]

_ARMIJO = 1e-4
_LINE_SEARCH_STEPS = 12
# L-BFGS stops a problem whose distance fell by less than this fraction over the window.
_STALL_WINDOW = 10
_STALL_FRACTION = 1e-4


@dataclass(frozen=True)
class GradientMatchingParams:
    """Settings shared by the gradient-matching attacks (defaults: DLG)."""

    iterations: int = param(300, low=1, high=1_000_000, help="optimiser iterations")
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float = param(1.0, low=0.0, low_open=True, high=1e3, help="step size")
    distance: Literal["l2", "cosine"] = "l2"
    labels: Literal["learn", "recover"] = "learn"
    tv_weight: float = param(0.0, low=0.0, high=1e3, help="total-variation prior weight")
    signed: bool = False
    lr_decay: bool = False
    box: bool = False  # project images onto [0, 1] after each Adam step (not L-BFGS)
    init: Literal["randn", "uniform"] = "uniform"
    restarts: int = param(1, low=1, high=256, help="random restarts per observation")
    history: int = param(30, low=1, high=1000, help="L-BFGS memory")
    max_step: float = param(1.0, low=0.0, help="L-BFGS cap on any variable's change; 0: none")
    tolerance: float = param(1e-9, low=0.0, help="stop a problem below this distance")
    seed: int = param(0, low=0, help="seed of the dummy initialisation")
    log_every: int = param(10, low=1, help="trace every this many iterations")
    snapshots: int = param(4, low=0, high=1000, help="intermediate image batches kept")


@dataclass(frozen=True)
class DLGParams(GradientMatchingParams):
    """DLG: joint images + soft labels, L2 distance, L-BFGS step 1."""


@dataclass(frozen=True)
class IDLGParams(GradientMatchingParams):
    """iDLG: labels recovered from the last layer, images optimised with L-BFGS."""

    labels: Literal["learn", "recover"] = "recover"


@dataclass(frozen=True)
class InvertingGradientsParams(GradientMatchingParams):
    """Inverting Gradients: cosine distance, TV prior, signed Adam, box, step decay."""

    iterations: int = param(2000, low=1, high=1_000_000, help="optimiser iterations")
    optimizer: Literal["lbfgs", "adam"] = "adam"
    lr: float = param(0.1, low=0.0, low_open=True, high=1e3, help="step size")
    distance: Literal["l2", "cosine"] = "cosine"
    labels: Literal["learn", "recover"] = "recover"
    tv_weight: float = param(1e-6, low=0.0, high=1e3, help="total-variation prior weight")
    signed: bool = True
    lr_decay: bool = True
    box: bool = True


# --------------------------------------------------------------------------------------------
# The batched problem


@dataclass
class _Plan:
    """Per-observation decisions taken before optimisation."""

    labels: torch.Tensor | None  # fixed labels per slot, or None to learn them
    notes: str


@dataclass
class _Batch:
    """One vectorised problem set: observations x restarts sharing model and shapes."""

    observations: list[Observation]
    plans: list[_Plan]
    restarts: int
    spec: ModelSpec
    samples: int
    classes: int
    fixed_labels: bool
    weights: Params  # (P, ...) or unbatched when shared
    weights_shared: bool
    target: Params  # (P, ...)
    lr: torch.Tensor  # (P,)
    schedule: list[torch.Tensor] | None  # FedAvg mini-batch indices, None for FedSGD
    image_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.image_size = self.samples * math.prod(self.spec.input_shape)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat variables (P, D) -> images (P, n, C, H, W) and label variables (P, n, K)."""
        images = z[:, : self.image_size].reshape(-1, self.samples, *self.spec.input_shape)
        labels = z[:, self.image_size :].reshape(-1, self.samples, self.classes)
        return images, labels


def _soft_loss(spec: ModelSpec, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The client's ``task_loss`` with soft targets; equal to it for one-hot targets."""
    if is_binary(spec):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits.squeeze(-1), targets.squeeze(-1)
        )
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def _objective(
    batch: _Batch, params: GradientMatchingParams
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Per-problem (objective, distance) as a pure function for ``torch.func`` transforms."""
    model = build_model(batch.spec, seed=0)
    spec, schedule = batch.spec, batch.schedule

    def loss(weights: Params, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _soft_loss(spec, functional_call(model, weights, (images,)), targets)

    def produced(
        weights: Params, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor
    ) -> Params:
        """The update these dummies would send: a gradient, or replayed local SGD steps."""
        if schedule is None:
            return grad(loss)(weights, images, targets)
        current = weights
        for index in schedule:
            step = grad(loss)(current, images[index], targets[index])
            current = {k: current[k] - lr * step[k] for k in current}
        return {k: (weights[k] - current[k]) / lr for k in weights}

    def distance(mine: Params, theirs: Params) -> torch.Tensor:
        if params.distance == "l2":
            return sum(((mine[k] - theirs[k]) ** 2).sum() for k in theirs)
        # 1 - cos(a, b) = |a/|a| - b/|b||^2 / 2: no cancellation when cos is near 1, which is
        # where the attack lives (float32 rounds 1 - 0.9999999 to 0).
        norm_mine = sum((mine[k] ** 2).sum() for k in theirs).sqrt().clamp_min(1e-30)
        norm_theirs = sum((theirs[k] ** 2).sum() for k in theirs).sqrt().clamp_min(1e-30)
        return sum(((mine[k] / norm_mine - theirs[k] / norm_theirs) ** 2).sum() for k in theirs) / 2

    def label_targets(variables: torch.Tensor) -> torch.Tensor:
        if batch.fixed_labels:
            return variables
        return variables.sigmoid() if is_binary(spec) else variables.softmax(-1)

    def objective(
        images: torch.Tensor,
        label_vars: torch.Tensor,
        weights: Params,
        target: Params,
        lr: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dist = distance(produced(weights, images, label_targets(label_vars), lr), target)
        total = dist
        if params.tv_weight > 0:
            total = total + params.tv_weight * total_variation(images).mean()
        return total, dist

    return objective


def _evaluator(batch: _Batch, params: GradientMatchingParams) -> Evaluate:
    """Objective, distance and gradient of the given problems, in one vectorised call."""
    per_problem = grad_and_value(_objective(batch, params), argnums=(0, 1), has_aux=True)
    weight_dims = None if batch.weights_shared else 0
    batched = vmap(per_problem, in_dims=(0, 0, weight_dims, 0, 0))

    def evaluate(
        z: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights, target, lr = batch.weights, batch.target, batch.lr
        if rows is not None:
            # A subset of problems (L-BFGS line search): no work for the others.
            if not batch.weights_shared:
                weights = {k: v[rows] for k, v in weights.items()}
            target = {k: v[rows] for k, v in target.items()}
            lr = lr[rows]
        images, labels = batch.split(z)
        (g_images, g_labels), (total, dist) = batched(images, labels, weights, target, lr)
        if batch.fixed_labels:
            g_labels = torch.zeros_like(g_labels)
        gradient = torch.cat([g_images.flatten(1), g_labels.flatten(1)], dim=1)
        return total.detach(), dist.detach(), gradient.detach()

    return evaluate


def _problem_seed(seed: int, obs: Observation, restart: int) -> int:
    # Depends only on the observation, not on its batch, so batched and single runs agree.
    return hash((seed, obs.round, obs.client_id, restart)) % (2**62)


def _initial(batch: _Batch, params: GradientMatchingParams, device: torch.device) -> torch.Tensor:
    """Seeded dummy images and label variables for every problem, flattened to (P, D)."""
    rows = []
    shape = (batch.samples, *batch.spec.input_shape)
    for k, obs in enumerate(batch.observations):
        for restart in range(batch.restarts):
            generator = torch.Generator().manual_seed(_problem_seed(params.seed, obs, restart))
            if params.init == "uniform":
                images = torch.rand(shape, generator=generator)
            else:
                images = torch.randn(shape, generator=generator)
            fixed = batch.plans[k].labels
            if fixed is not None:
                if batch.schedule is not None:
                    # FedAvg: which labels shared a mini-batch is unknown and matters once
                    # the model moves; each restart tries another arrangement.
                    fixed = fixed[torch.randperm(fixed.numel(), generator=generator)]
                if batch.classes == 1:  # binary model: the target is the parity bit itself
                    labels = fixed.float().unsqueeze(-1)
                else:
                    labels = torch.nn.functional.one_hot(fixed, batch.classes).float()
            else:
                labels = torch.randn((batch.samples, batch.classes), generator=generator)
            rows.append(torch.cat([images.flatten(), labels.flatten()]))
    return torch.stack(rows).to(device)


def _schedule(obs: Observation, samples: int, seed: int) -> list[torch.Tensor] | None:
    """Mini-batch indices of the replayed FedAvg local training, None under FedSGD."""
    if obs.meta.protocol == "fedsgd":
        return None
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for epoch in range(obs.meta.local_epochs):
        shuffled = torch.randperm(samples, generator=generator)
        order = torch.arange(samples) if epoch == 0 else shuffled
        steps += list(order.split(obs.meta.batch_size))
    return steps


def _target(obs: Observation) -> Params:
    """What the dummies must reproduce: the gradient, or the FedAvg step sum (w0 - w1) / lr."""
    if obs.meta.protocol == "fedsgd":
        return {k: v.detach() for k, v in obs.update.items()}
    return {k: (obs.global_weights[k] - v).detach() / obs.meta.lr for k, v in obs.update.items()}


def _plan(obs: Observation, params: GradientMatchingParams) -> _Plan:
    if params.labels == "learn":
        return _Plan(None, "labels learned jointly (soft labels)")
    recovered = recover_labels(obs, seed=params.seed)
    if recovered.labels is None:
        return _Plan(None, f"label recovery failed ({recovered.reason}); labels learned instead")
    return _Plan(recovered.labels, f"labels recovered by {recovered.method}")


def _batch_key(obs: Observation, plan: _Plan) -> tuple[object, ...]:
    meta = obs.meta
    shape = (meta.batch_size, meta.local_epochs) if meta.protocol == "fedavg" else ()
    return (obs.model, meta.protocol, num_samples(obs), shape, plan.labels is None)


def _make_batch(
    observations: list[Observation], plans: list[_Plan], params: GradientMatchingParams
) -> _Batch:
    first = observations[0]
    restarts = params.restarts
    names = list(first.update)
    device = first.update[names[0]].device

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors).repeat_interleave(restarts, dim=0)

    globals_ = [obs.global_weights for obs in observations]
    shared = all(all(torch.equal(g[k], globals_[0][k]) for k in names) for g in globals_[1:])
    if shared:
        weights = {k: globals_[0][k].detach() for k in names}
    else:
        weights = {k: stack([g[k].detach() for g in globals_]) for k in names}
    targets = [_target(obs) for obs in observations]
    samples = num_samples(first)
    return _Batch(
        observations=observations,
        plans=plans,
        restarts=restarts,
        spec=first.model,
        samples=samples,
        classes=1 if is_binary(first.model) else first.model.num_classes,
        fixed_labels=plans[0].labels is not None,
        weights=weights,
        weights_shared=shared,
        target={k: stack([t[k] for t in targets]) for k in names},
        lr=stack([torch.tensor(float(obs.meta.lr), device=device) for obs in observations]),
        schedule=_schedule(first, samples, params.seed),
    )


# --------------------------------------------------------------------------------------------
# Batched optimisers


class _Tracker:
    """Best iterate per problem, the trace and snapshots of a batched optimisation."""

    def __init__(self, z: torch.Tensor, params: GradientMatchingParams, start: float) -> None:
        problems = z.shape[0]
        self.best = z.clone()
        self.best_distance = torch.full((problems,), math.inf, device=z.device)
        self.diverged = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.converged = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.rows: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []
        self.snapshots: list[tuple[int, torch.Tensor]] = []
        count = params.snapshots
        self.snapshot_at = (
            {round(i * params.iterations / max(count - 1, 1)) for i in range(count)}
            if count
            else set()
        )
        self.log_every = params.log_every
        self.start = start

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


def _adam(
    evaluate: Evaluate, z: torch.Tensor, batch: _Batch, params: GradientMatchingParams, t: _Tracker
) -> None:
    """Adam (optionally on signed gradients, boxed, step-decayed) on all problems at once."""
    z = z.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=params.lr)
    milestones = [round(params.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    images = lambda v: batch.split(v)[0]  # noqa: E731
    for iteration in range(params.iterations):
        total, dist, gradient = evaluate(z.detach(), None)
        t.converged |= dist <= params.tolerance
        done = bool(t.converged.all())
        t.observe(iteration, z.detach(), total, dist, images, last=done)
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
        frozen = z.detach()[t.converged].clone()
        optimizer.step()
        with torch.no_grad():
            # Converged problems stay put (Adam's momentum would move them on).
            z[t.converged] = frozen
        if params.lr_decay:
            decay.step()
        if params.box:
            with torch.no_grad():
                z[:, : batch.image_size].clamp_(0, 1)
    total, dist, _ = evaluate(z.detach(), None)
    t.converged |= dist <= params.tolerance
    t.observe(params.iterations, z.detach(), total, dist, images, last=True)


def _lbfgs(
    evaluate: Evaluate, z: torch.Tensor, batch: _Batch, params: GradientMatchingParams, t: _Tracker
) -> None:
    """L-BFGS with a separate history, step and Armijo backtracking per problem.

    Torch's L-BFGS treats its parameters as one problem: batched problems would share curvature
    pairs and step sizes. Here every scalar is per problem, so each problem follows the path it
    would follow alone. The first step (and any step after a reset) is ``lr * min(1, 1/|g|_1)``
    as in torch; later trial steps are ``lr``, halved until the Armijo condition holds. A
    problem stops ("converged") below ``tolerance``, when even steepest descent finds no
    decrease, or when its distance stalls (torch's ``tolerance_change``, made relative).
    """
    problems, dims = z.shape
    memory = params.history
    s_hist = z.new_zeros(memory, problems, dims)
    y_hist = z.new_zeros(memory, problems, dims)
    rho = z.new_zeros(memory, problems)
    valid = torch.zeros(memory, problems, dtype=torch.bool, device=z.device)
    gamma = z.new_ones(problems)
    fresh = torch.ones(problems, dtype=torch.bool, device=z.device)
    head = 0
    images = lambda v: batch.split(v)[0]  # noqa: E731
    total, dist, gradient = evaluate(z, None)
    recent: list[torch.Tensor] = []
    for iteration in range(params.iterations):
        t.converged |= (dist <= params.tolerance) | (gradient.abs().amax(1) == 0)
        recent.append(dist)
        if len(recent) > _STALL_WINDOW:
            before = recent.pop(0)
            t.converged |= before - dist <= _STALL_FRACTION * before.abs()
        done = bool(t.converged.all())
        t.observe(iteration, z, total, dist, images, last=done)
        if done:
            return
        # Two-loop recursion, newest pair first; invalid pairs contribute nothing.
        q = gradient.clone()
        alphas: dict[int, torch.Tensor] = {}
        order = [(head - 1 - j) % memory for j in range(memory)]
        for i in order:
            if bool(valid[i].any()):
                alphas[i] = rho[i] * (s_hist[i] * q).sum(1) * valid[i]
                q -= alphas[i][:, None] * y_hist[i]
        r = gamma[:, None] * q
        for i in reversed(order):
            if i in alphas:
                beta = rho[i] * (y_hist[i] * r).sum(1) * valid[i]
                r += s_hist[i] * (alphas[i] - beta)[:, None]
        direction = -r
        slope = (gradient * direction).sum(1)
        reset = ~(slope < 0)
        if bool(reset.any()):
            direction = torch.where(reset[:, None], -gradient, direction)
            slope = torch.where(reset, -(gradient**2).sum(1), slope)
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
        pending = ~t.converged
        new_z, new_total, new_dist = z.clone(), total.clone(), dist.clone()
        new_grad = gradient.clone()
        for _ in range(_LINE_SEARCH_STEPS):
            rows = pending.nonzero().squeeze(1)
            trial = z[rows] + step[rows, None] * direction[rows]
            trial_total, trial_dist, trial_grad = evaluate(trial, rows)
            ok = torch.isfinite(trial_total) & torch.isfinite(trial_grad).all(1)
            ok &= trial_total <= total[rows] + _ARMIJO * step[rows] * slope[rows]
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
        t.converged |= pending & fresh
        stalled = pending & ~fresh
        valid &= ~stalled
        gamma = torch.where(stalled, 1.0, gamma)
        moved = ~pending & ~t.converged
        s, y = new_z - z, new_grad - gradient
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        update = moved & (sy > 1e-10 * yy.clamp_min(1e-30).sqrt() * s.norm(dim=1))
        if bool(update.any()):
            s_hist[head] = torch.where(update[:, None], s, 0.0)
            y_hist[head] = torch.where(update[:, None], y, 0.0)
            rho[head] = torch.where(update, 1.0 / sy.clamp_min(1e-30), 0.0)
            valid[head] = update
            head = (head + 1) % memory
            gamma = torch.where(update, sy / yy.clamp_min(1e-30), gamma)
        fresh = (fresh & ~moved) | stalled
        z, total, dist, gradient = new_z, new_total, new_dist, new_grad
    t.converged |= dist <= params.tolerance
    t.observe(params.iterations, z, total, dist, images, last=True)


# --------------------------------------------------------------------------------------------
# Running an attack


def _status(t: _Tracker, problem: int) -> Status:
    if t.converged[problem]:
        return "converged"
    if t.diverged[problem] or not math.isfinite(float(t.best_distance[problem])):
        return "diverged"
    return "budget"


def _solve(
    batch: _Batch, params: GradientMatchingParams, attack: str, start: float
) -> list[Reconstruction]:
    """Optimise all problems of ``batch`` together; keep the best restart per observation."""
    device = next(iter(batch.target.values())).device
    z = _initial(batch, params, device)
    evaluate = _evaluator(batch, params)
    tracker = _Tracker(z, params, start)
    (_lbfgs if params.optimizer == "lbfgs" else _adam)(evaluate, z, batch, params, tracker)

    images, label_vars = batch.split(tracker.best)
    distance = torch.nan_to_num(tracker.best_distance, nan=math.inf)
    results = []
    for k, obs in enumerate(batch.observations):
        block = slice(k * batch.restarts, (k + 1) * batch.restarts)
        p = k * batch.restarts + int(distance[block].argmin())
        plan = batch.plans[k]
        labels: torch.Tensor | None
        notes = plan.notes
        if is_binary(batch.spec):
            labels, notes = None, notes + "; binary model: learned targets are parity bits"
        else:
            labels = label_vars[p].argmax(-1).to(torch.int64)
        trace = [
            {
                "iteration": float(it),
                "gradient_distance": float(d[p]),
                "objective": float(o[p]),
                "seconds": sec,
            }
            for it, sec, d, o in tracker.rows
        ]
        results.append(
            Reconstruction(
                round=obs.round,
                client_id=obs.client_id,
                images=images[p].clamp(0, 1).detach().clone(),
                labels=labels,
                trace=trace,
                snapshots=[(it, snap[p]) for it, snap in tracker.snapshots],
                status=_status(tracker, p),
                attack=attack,
                notes=f"{notes}; best of {batch.restarts} restart(s)",
                distance=float(distance[p]),
            )
        )
    return results


def match_gradients(
    observations: Sequence[Observation], params: GradientMatchingParams, attack: str = ""
) -> list[Reconstruction]:
    """Run a gradient-matching attack on all ``observations`` as few batched problems."""
    start = time.perf_counter()
    plans = [_plan(obs, params) for obs in observations]
    groups: dict[tuple[object, ...], list[int]] = {}
    for index, (obs, plan) in enumerate(zip(observations, plans, strict=True)):
        groups.setdefault(_batch_key(obs, plan), []).append(index)
    results: list[Reconstruction | None] = [None] * len(observations)
    for indices in groups.values():
        batch = _make_batch([observations[i] for i in indices], [plans[i] for i in indices], params)
        solved = _solve(batch, params, attack, start)
        for index, reconstruction in zip(indices, solved, strict=True):
            results[index] = reconstruction
    return [r for r in results if r is not None]


class GradientMatchingAttack(Attack[GradientMatchingParams]):
    """Shared ``run`` of the gradient-matching attacks."""

    Params = GradientMatchingParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return match_gradients(observations, self.params, self.name)


@register_attack("dlg", "Deep Leakage from Gradients: images + soft labels, L2, L-BFGS.")
class DLG(GradientMatchingAttack):
    Params = DLGParams


@register_attack("idlg", "iDLG: labels from the last layer's gradient, then images by L-BFGS.")
class IDLG(GradientMatchingAttack):
    Params = IDLGParams


@register_attack(
    "inverting-gradients",
    "Inverting Gradients: cosine distance, total variation, signed Adam in [0, 1].",
)
class InvertingGradients(GradientMatchingAttack):
    Params = InvertingGradientsParams
