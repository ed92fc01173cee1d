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
paper's Gaussian start, which on small networks often saturates the softmax and stalls;
``"dark"`` (uniform in [0, 0.1]) starts near the background of digit images (iDLG's default:
on the iDLG LeNet, with 100 L-BFGS pairs, 30 dB at batch 1 takes ~50 iterations instead of
~150 from a uniform start with 30 pairs); ``"zeros"`` and
``"half"`` are constant starts (identical dummies stay identical under shared labels, so use
them for single images only).
The TV weight is absolute, as in the paper, but the cosine distance of these small MNIST
networks can be as small as 1e-6 at initialisation (LeNet: the head's gradient dominates), so
the default is 1e-6: the paper's 1e-2..0.2 (tuned for natural images) swamps it and blurs
strokes. ``box`` keeps images in [0, 1]: Adam projects after each step; L-BFGS freezes pixels
that sit on a bound the gradient pushes against and projects its line search path (without it,
L-BFGS results are clamped to [0, 1] only when reported). The box matters for batches of
digits (most pixels are exactly 0), little for single images.

Stopping: a problem stops below ``tolerance`` (absolute) or ``rel_tolerance`` times the
distance a zero update would have (``|g*|^2`` for L2, 1 for the normalised distances) per
private sample, which is scale-free across models and batch sizes (on the iDLG LeNet 1e-6 is
about 40 dB at batch 1 and 35-40 dB at batch 8); stopped (converged) problems cost nothing more:
the L-BFGS line search evaluates only the problems still running. ``distance="l2-layer"``
averages per-parameter L2 distances, each normalised by the target's norm. ``precision=
"float64"`` solves in double precision. A single problem is evaluated with plain autograd
(same numbers as the vectorised path, less dispatch).

The engine is batched: every observation passed to one ``run`` call, times ``restarts`` random
initialisations, becomes one problem in a tensor (problems, samples, C, H, W). Per-problem
updates are computed with ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``) and
differentiated by one plain autograd pass over their summed distances, so K clients cost one
vectorised double-backward per iteration instead of K. Problems never
interact: Adam is element-wise and the L-BFGS below keeps a separate history, step size and
line search per problem, so a batched run follows the same path as separate runs (up to
floating-point summation order). Observations whose model or protocol shapes differ are
solved as separate batches. The reported iterate is each problem's best (lowest distance) one,
and the restart with the lowest distance wins.

Label candidates: with ``label_candidates`` > 1, a batch whose label counts came from the
bias-count rule (uncertain, see :func:`attacks.labels.label_candidates`) is solved once per
candidate multiset (times ``restarts``), and the lowest distance picks the multiset: a wrong
multiset cannot reproduce the update. ``prune_after`` / ``prune_factor`` stop an observation's
problems that lag its best by that factor (checked every ``prune_after`` iterations), and as
soon as one of its problems reaches the tolerance the others stop, so the extra candidates
cost little once they separate (on the iDLG LeNet, batch 8: after ~100 iterations).

L-BFGS keeps its curvature pairs in the compact form of Byrd, Nocedal and Schnabel (a few
batched matrix products per iteration instead of a Python two-loop over the memory), and only
problems still running get directions, line searches and evaluations.

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
from torch.func import functional_call, grad, vmap

from attacks.base import Attack, Reconstruction, Status, param, register_attack
from attacks.labels import label_candidates, num_samples, recover_labels
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
    distance: Literal["l2", "cosine", "l2-layer"] = "l2"
    labels: Literal["learn", "recover"] = "learn"
    tv_weight: float = param(0.0, low=0.0, high=1e3, help="total-variation prior weight")
    signed: bool = False
    lr_decay: bool = False
    box: bool = False  # keep images in [0, 1] (Adam: projection; L-BFGS: active set)
    init: Literal["randn", "uniform", "zeros", "half", "dark"] = "uniform"
    precision: Literal["float32", "float64"] = "float32"
    restarts: int = param(1, low=1, high=256, help="random restarts per observation")
    label_candidates: int = param(
        1, low=1, high=64, help="recovered label multisets tried per batch observation"
    )
    prune_after: int = param(
        0, low=0, help="every this many iterations, stop lagging problems; 0: never"
    )
    prune_factor: float = param(
        100.0, low=1.0, help="lagging: distance above this multiple of the observation's best"
    )
    history: int = param(30, low=1, high=1000, help="L-BFGS memory")
    max_step: float = param(1.0, low=0.0, help="L-BFGS cap on any variable's change; 0: none")
    tolerance: float = param(1e-9, low=0.0, help="stop a problem below this distance")
    rel_tolerance: float = param(
        0.0, low=0.0, high=1.0, help="stop below this fraction of the target's own distance"
    )
    seed: int = param(0, low=0, help="seed of the dummy initialisation")
    log_every: int = param(10, low=1, help="trace every this many iterations")
    snapshots: int = param(4, low=0, high=1000, help="intermediate image batches kept")


@dataclass(frozen=True)
class DLGParams(GradientMatchingParams):
    """DLG: joint images + soft labels, L2 distance, L-BFGS step 1."""


@dataclass(frozen=True)
class IDLGParams(GradientMatchingParams):
    """iDLG: labels recovered from the last layer, images optimised with L-BFGS.

    Tuned on the paper's setting (MNIST, sigmoid LeNet, U(-0.5, 0.5) weights): a dark start
    (most of a digit is background), a long L-BFGS memory and a stop at a relative distance of
    1e-6 (about 40 dB at batch 1) take ~75 iterations per image where a uniform start with
    30 pairs needed 150+ and never stopped.
    """

    labels: Literal["learn", "recover"] = "recover"
    init: Literal["randn", "uniform", "zeros", "half", "dark"] = "dark"
    history: int = param(100, low=1, high=1000, help="L-BFGS memory")
    rel_tolerance: float = param(
        1e-6, low=0.0, high=1.0, help="stop below this fraction of the target's own distance"
    )


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
    candidates: list[torch.Tensor] = field(default_factory=list)  # label multisets to try


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
    candidates: int = 1  # label multisets per observation (each with ``restarts`` starts)
    image_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.image_size = self.samples * math.prod(self.spec.input_shape)

    @property
    def slots(self) -> int:
        """Problems per observation: label candidates x restarts."""
        return self.candidates * self.restarts

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
        if params.distance == "l2-layer":
            return sum(
                ((mine[k] - theirs[k]) ** 2).sum() / (theirs[k] ** 2).sum().clamp_min(1e-30)
                for k in theirs
            ) / len(theirs)
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
    """Objective, distance and gradient of the given problems, in one vectorised call.

    Fixed (recovered) labels are not differentiated. A single problem skips ``vmap``, whose
    dispatch overhead dominates at that size.
    """
    objective = _objective(batch, params)
    weight_dims = None if batch.weights_shared else 0
    # The inner (produced update) per problem by vmap, the outer derivative by plain autograd
    # of the summed objective (problems are independent): ~25% less work than vmap(grad).
    vectorised = vmap(objective, in_dims=(0, 0, weight_dims, 0, 0))

    def batched(
        images: torch.Tensor,
        labels: torch.Tensor,
        weights: Params,
        target: Params,
        lr: torch.Tensor,
    ) -> tuple[object, tuple[torch.Tensor, torch.Tensor]]:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            y = labels.detach().requires_grad_(not batch.fixed_labels)
            total, dist = vectorised(x, y, weights, target, lr)
            inputs = [x] if batch.fixed_labels else [x, y]
            found = torch.autograd.grad(total.sum(), inputs)
        grads: object = found[0] if batch.fixed_labels else tuple(found)
        return grads, (total.detach(), dist.detach())

    def single(
        images: torch.Tensor,
        labels: torch.Tensor,
        weights: Params,
        target: Params,
        lr: torch.Tensor,
    ) -> tuple[object, tuple[torch.Tensor, torch.Tensor]]:
        # The outer derivative by plain autograd: same numbers, less dispatch than grad+vmap.
        if not batch.weights_shared:
            weights = {k: v[0] for k, v in weights.items()}
        with torch.enable_grad():
            x = images[0].detach().requires_grad_(True)
            y = labels[0].detach().requires_grad_(not batch.fixed_labels)
            total, dist = objective(x, y, weights, {k: v[0] for k, v in target.items()}, lr[0])
            inputs = [x] if batch.fixed_labels else [x, y]
            found = torch.autograd.grad(total, inputs)
        grads: object
        if batch.fixed_labels:
            grads = found[0].unsqueeze(0)
        else:
            grads = tuple(g.unsqueeze(0) for g in found)
        return grads, (total.detach().reshape(1), dist.detach().reshape(1))

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
        solve = single if z.shape[0] == 1 else batched
        grads, (total, dist) = solve(images, labels, weights, target, lr)
        if batch.fixed_labels:
            gradient = torch.cat([grads.flatten(1), torch.zeros_like(labels.flatten(1))], dim=1)
        else:
            g_images, g_labels = grads
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
    problems = [
        (k, obs, candidate, restart)
        for k, obs in enumerate(batch.observations)
        for candidate in range(batch.candidates)
        for restart in range(batch.restarts)
    ]
    for k, obs, candidate, restart in problems:
        generator = torch.Generator().manual_seed(_problem_seed(params.seed, obs, restart))
        if params.init == "uniform":
            images = torch.rand(shape, generator=generator)
        elif params.init == "dark":
            images = 0.1 * torch.rand(shape, generator=generator)
        elif params.init == "zeros":
            images = torch.zeros(shape)
        elif params.init == "half":
            images = torch.full(shape, 0.5)
        else:
            images = torch.randn(shape, generator=generator)
        fixed = batch.plans[k].labels
        if batch.plans[k].candidates:
            fixed = batch.plans[k].candidates[candidate]
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
    notes = f"labels recovered by {recovered.method}"
    if params.label_candidates > 1 and recovered.method == "bias-counts":
        candidates = label_candidates(obs, params.label_candidates, seed=params.seed)
        return _Plan(candidates[0], notes, candidates)
    return _Plan(recovered.labels, notes)


def _batch_key(obs: Observation, plan: _Plan) -> tuple[object, ...]:
    meta = obs.meta
    shape = (meta.batch_size, meta.local_epochs) if meta.protocol == "fedavg" else ()
    return (
        obs.model,
        meta.protocol,
        num_samples(obs),
        shape,
        plan.labels is None,
        max(len(plan.candidates), 1),
    )


def _make_batch(
    observations: list[Observation], plans: list[_Plan], params: GradientMatchingParams
) -> _Batch:
    first = observations[0]
    candidates = max(len(plans[0].candidates), 1)
    restarts = params.restarts
    slots = candidates * restarts
    names = list(first.update)
    device = first.update[names[0]].device

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors).repeat_interleave(slots, dim=0)

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
        candidates=candidates,
    )


# --------------------------------------------------------------------------------------------
# Batched optimisers


class _Tracker:
    """Best iterate per problem, the trace and snapshots of a batched optimisation."""

    def __init__(
        self, z: torch.Tensor, params: GradientMatchingParams, start: float, group: int = 1
    ) -> None:
        problems = z.shape[0]
        self.group = group  # consecutive problems of one observation
        self.pruned = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.best = z.clone()
        self.best_distance = torch.full((problems,), math.inf, device=z.device)
        self.diverged = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.converged = torch.zeros(problems, dtype=torch.bool, device=z.device)
        self.threshold = torch.full((problems,), params.tolerance, device=z.device)
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

    def stopped(self) -> torch.Tensor:
        """Problems that get no more work: converged, or pruned as hopeless or redundant."""
        return self.converged | self.pruned

    def prune(self, iteration: int, params: GradientMatchingParams) -> None:
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


class _History:
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
        # Inner products only for the problems that store a pair: the others' row is masked.
        rows = update.nonzero().squeeze(1)
        whole = rows.numel() == update.numel()
        s_all = self.s if whole else self.s[rows]
        y_all = self.y if whole else self.y[rows]
        # Two passes over the stored pairs (the products are memory-bound).
        with_y = torch.bmm(y_all, torch.stack([s_all[:, h], y_all[:, h]], dim=2))
        self.sy[rows, h, :] = with_y[:, :, 0]
        self.sy[rows, :, h] = torch.bmm(s_all, y_all[:, h, :, None])[:, :, 0]
        y_dot_y = with_y[:, :, 1]
        self.yy[rows, h, :] = y_dot_y
        self.yy[rows, :, h] = y_dot_y
        self.head = (h + 1) % self.memory
        self.pushed += 1

    def apply(self, g: torch.Tensor, gamma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``H g`` for problems ``rows`` (g, gamma given for those rows only)."""
        m = self.memory
        slots = [(self.head + j) % m for j in range(m)] if self.pushed >= m else []
        slots = slots or list(range(self.pushed))  # written slots, oldest first
        if not slots:
            return gamma[:, None] * g
        whole = rows.numel() == self.s.shape[0]
        s_all = self.s if whole else self.s[rows]
        y_all = self.y if whole else self.y[rows]
        order = torch.tensor(slots, device=g.device)
        valid = self.valid[:, rows].T.to(g.dtype)  # (R, m), storage order
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
        coef_s = g.new_zeros(g.shape[0], 1, m)
        coef_y = g.new_zeros(g.shape[0], 1, m)
        coef_s[:, 0, order] = w1[:, :, 0]
        coef_y[:, 0, order] = -u[:, :, 0] * gamma[:, None]
        hg = gamma[:, None] * g
        return hg + (torch.bmm(coef_s, s_all) + torch.bmm(coef_y, y_all))[:, 0]


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
    history = _History(params.history, problems, dims, z)
    valid = history.valid
    gamma = z.new_ones(problems)
    fresh = torch.ones(problems, dtype=torch.bool, device=z.device)
    images = lambda v: batch.split(v)[0]  # noqa: E731
    total, dist, gradient = evaluate(z, None)
    recent: list[torch.Tensor] = []
    for iteration in range(params.iterations):
        t.converged |= (dist <= t.threshold) | (gradient.abs().amax(1) == 0)
        recent.append(dist)
        if len(recent) > _STALL_WINDOW:
            before = recent.pop(0)
            t.converged |= before - dist <= _STALL_FRACTION * before.abs()
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
        t.converged |= pending & fresh
        stalled = pending & ~fresh
        valid &= ~stalled
        gamma = torch.where(stalled, 1.0, gamma)
        moved = ~pending & ~t.converged
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


# --------------------------------------------------------------------------------------------
# Running an attack


def _status(t: _Tracker, problem: int) -> Status:
    # Divergence first: a NaN distance also looks "stalled", which would read as converged.
    if t.diverged[problem] or not math.isfinite(float(t.best_distance[problem])):
        return "diverged"
    if t.converged[problem]:
        return "converged"
    return "budget"


def _solve(
    batch: _Batch, params: GradientMatchingParams, attack: str, start: float
) -> list[Reconstruction]:
    """Optimise all problems of ``batch`` together; keep the best restart per observation."""
    device = next(iter(batch.target.values())).device
    z = _initial(batch, params, device)
    if params.precision == "float64":
        z = z.double()
        batch.weights = {k: v.double() for k, v in batch.weights.items()}
        batch.target = {k: v.double() for k, v in batch.target.items()}
        batch.lr = batch.lr.double()
    evaluate = _evaluator(batch, params)
    tracker = _Tracker(z, params, start, group=batch.slots)
    # Distance of a dummy whose update is zero: |g*|^2 (L2), 1 for the normalised distances;
    # per private sample, as a batch's images share the distance.
    if params.distance == "l2":
        reference = sum((v.flatten(1) ** 2).sum(1) for v in batch.target.values())
    else:
        reference = torch.ones_like(batch.lr)
    reference = reference / batch.samples
    tracker.threshold = torch.clamp(params.rel_tolerance * reference, min=params.tolerance)
    (_lbfgs if params.optimizer == "lbfgs" else _adam)(evaluate, z, batch, params, tracker)

    images, label_vars = batch.split(tracker.best)
    distance = torch.nan_to_num(tracker.best_distance, nan=math.inf)
    results = []
    for k, obs in enumerate(batch.observations):
        block = slice(k * batch.slots, (k + 1) * batch.slots)
        p = k * batch.slots + int(distance[block].argmin())
        plan = batch.plans[k]
        labels: torch.Tensor | None
        notes = plan.notes
        if batch.candidates > 1:
            chosen = (p - k * batch.slots) // batch.restarts
            notes += f"; label multiset {chosen + 1} of {batch.candidates} candidates"
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
                images=images[p].clamp(0, 1).detach().float().clone(),
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
