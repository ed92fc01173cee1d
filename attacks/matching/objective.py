"""The batched gradient-matching problem: its objective, its setup and its starting point.

:func:`match_gradients <attacks.matching.attacks.match_gradients>` turns observations into
:class:`Batch` es of problems (observations x label candidates x restarts sharing a model and
shapes): :func:`make_plan` decides each observation's labels, :func:`batch_key` groups the
observations that can be solved together, :func:`make_batch` stacks their weights and targets
(the gradient, or the FedAvg step sum ``(w0 - w1) / lr`` with the replayed mini-batch
schedule), :func:`initial` seeds every problem's dummies and :func:`evaluator` gives the
optimisers of :mod:`attacks.optim` the objective, distance and gradient of any subset of
problems in one vectorised call (``torch.func``: ``vmap`` over ``grad`` of a
``functional_call``, then one plain autograd pass over the summed objectives).

Kept apart from the front-ends so that each module stays small; the settings are read through
:class:`MatchingSettings`, which ``GradientMatchingParams`` satisfies, so this module does not
import :mod:`attacks.matching.attacks` (no import cycle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.func import functional_call, grad, vmap

from attacks.common.intervals import KnownDefense, update_intervals
from attacks.common.priors import total_variation
from attacks.common.updates import as_gradient, epoch_batches, num_samples
from attacks.labels.recovery import COUNT_METHODS, label_candidates, recover_labels
from attacks.optim.tracker import Evaluate
from simulator.core.models import ModelSpec, build_model, is_binary
from simulator.core.protocol import Observation, PublicData

Params = dict[str, torch.Tensor]
# Distances that are a known noise's negative log-likelihood (``noise_scale`` its std or scale).
NOISE_LIKELIHOODS = ("gaussian", "laplace")


class MatchingSettings(Protocol):
    """The settings the problem setup reads (``GradientMatchingParams`` provides them)."""

    @property
    def distance(self) -> str: ...

    @property
    def noise_scale(self) -> float: ...

    @property
    def tv_weight(self) -> float: ...

    @property
    def labels(self) -> str: ...

    @property
    def label_candidates(self) -> int: ...

    @property
    def init(self) -> str: ...

    @property
    def restarts(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def known_defense(self) -> str: ...


@dataclass
class Plan:
    """Per-observation decisions taken before optimisation."""

    labels: torch.Tensor | None  # fixed labels per slot, or None to learn them
    notes: str
    candidates: list[torch.Tensor] = field(default_factory=list)  # label multisets to try


@dataclass
class Batch:
    """One vectorised problem set: observations x restarts sharing model and shapes."""

    observations: list[Observation]
    plans: list[Plan]
    restarts: int
    spec: ModelSpec
    samples: int
    classes: int
    fixed_labels: bool
    weights: Params  # (P, ...) or unbatched when shared
    weights_shared: bool
    target: Params  # (P, ...)
    # Half-widths of the intervals the true update lies in around ``target`` (P, ...), for a
    # known update defense (:mod:`attacks.common.intervals`); empty: ``target`` is exact.
    radius: Params
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
    batch: Batch, params: MatchingSettings
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

    def distance(mine: Params, theirs: Params, radius: Params, lr: torch.Tensor) -> torch.Tensor:
        if radius:  # a known defense: squared distance to the box of intervals, zero inside
            return sum(
                (torch.relu((mine[k] - theirs[k]).abs() - radius[k]) ** 2).sum() for k in theirs
            )
        if params.distance in NOISE_LIKELIHOODS:
            # The noise's negative log-likelihood (constants dropped). Noise of scale s on
            # the weights a FedAvg client sends is s / lr on the step sum matched here.
            scale = params.noise_scale if schedule is None else params.noise_scale / lr
            if params.distance == "gaussian":
                return sum(((mine[k] - theirs[k]) ** 2).sum() for k in theirs) / (2 * scale**2)
            return sum((mine[k] - theirs[k]).abs().sum() for k in theirs) / scale
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
        radius: Params,
        lr: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        produced_update = produced(weights, images, label_targets(label_vars), lr)
        dist = distance(produced_update, target, radius, lr)
        total = dist
        if params.tv_weight > 0:
            total = total + params.tv_weight * total_variation(images).mean()
        return total, dist

    return objective


def evaluator(batch: Batch, params: MatchingSettings) -> Evaluate:
    """Objective, distance and gradient of the given problems, in one vectorised call.

    Fixed (recovered) labels are not differentiated. A single problem skips ``vmap``, whose
    dispatch overhead dominates at that size.
    """
    objective = _objective(batch, params)
    weight_dims = None if batch.weights_shared else 0
    # The inner (produced update) per problem by vmap, the outer derivative by plain autograd
    # of the summed objective (problems are independent): ~25% less work than vmap(grad).
    vectorised = vmap(objective, in_dims=(0, 0, weight_dims, 0, 0, 0))

    def batched(
        images: torch.Tensor,
        labels: torch.Tensor,
        weights: Params,
        target: Params,
        radius: Params,
        lr: torch.Tensor,
    ) -> tuple[object, tuple[torch.Tensor, torch.Tensor]]:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            y = labels.detach().requires_grad_(not batch.fixed_labels)
            total, dist = vectorised(x, y, weights, target, radius, lr)
            inputs = [x] if batch.fixed_labels else [x, y]
            found = torch.autograd.grad(total.sum(), inputs)
        grads: object = found[0] if batch.fixed_labels else tuple(found)
        return grads, (total.detach(), dist.detach())

    def single(
        images: torch.Tensor,
        labels: torch.Tensor,
        weights: Params,
        target: Params,
        radius: Params,
        lr: torch.Tensor,
    ) -> tuple[object, tuple[torch.Tensor, torch.Tensor]]:
        # The outer derivative by plain autograd: same numbers, less dispatch than grad+vmap.
        if not batch.weights_shared:
            weights = {k: v[0] for k, v in weights.items()}
        first = {k: v[0] for k, v in target.items()}
        half_widths = {k: v[0] for k, v in radius.items()}
        with torch.enable_grad():
            x = images[0].detach().requires_grad_(True)
            y = labels[0].detach().requires_grad_(not batch.fixed_labels)
            total, dist = objective(x, y, weights, first, half_widths, lr[0])
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
        weights, target, radius, lr = batch.weights, batch.target, batch.radius, batch.lr
        if rows is not None:
            # A subset of problems (L-BFGS line search): no work for the others.
            if not batch.weights_shared:
                weights = {k: v[rows] for k, v in weights.items()}
            target = {k: v[rows] for k, v in target.items()}
            radius = {k: v[rows] for k, v in radius.items()}
            lr = lr[rows]
        images, labels = batch.split(z)
        solve = single if z.shape[0] == 1 else batched
        grads, (total, dist) = solve(images, labels, weights, target, radius, lr)
        if batch.fixed_labels:
            gradient = torch.cat([grads.flatten(1), torch.zeros_like(labels.flatten(1))], dim=1)
        else:
            g_images, g_labels = grads
            gradient = torch.cat([g_images.flatten(1), g_labels.flatten(1)], dim=1)
        return total.detach(), dist.detach(), gradient.detach()

    return evaluate


def _problem_seed(seed: int, obs: Observation, restart: int, draw: int = 0) -> int:
    # Depends only on the observation, not on its batch, so batched and single runs agree.
    key = (seed, obs.round, obs.client_id, restart) + ((draw,) if draw else ())
    return hash(key) % (2**62)


def initial(
    batch: Batch,
    params: MatchingSettings,
    device: torch.device,
    draws: Sequence[int] | None = None,
) -> torch.Tensor:
    """Seeded dummy images and label variables for every problem, flattened to (P, D).

    ``draws``: per problem, which draw of its start (0, the default: the first; a problem
    that stalled starts again from draw 1, 2, ...), each from a seed of its own.
    """
    rows = []
    shape = (batch.samples, *batch.spec.input_shape)
    problems = [
        (k, obs, candidate, restart)
        for k, obs in enumerate(batch.observations)
        for candidate in range(batch.candidates)
        for restart in range(batch.restarts)
    ]
    draws = draws if draws is not None else [0] * len(problems)
    for (k, obs, candidate, restart), draw in zip(problems, draws, strict=True):
        seed = _problem_seed(params.seed, obs, restart, draw)
        generator = torch.Generator().manual_seed(seed)
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
        steps += [order[batch] for batch in epoch_batches(samples, obs.meta.batch_size)]
    return steps


def _target(obs: Observation, known: KnownDefense) -> tuple[Params, Params]:
    """What the dummies must reproduce: the gradient, or the FedAvg step sum (w0 - w1) / lr;
    and, for a known update defense, the half-widths of the intervals around it (else none)."""
    if known == "none":
        return {k: v.detach() for k, v in as_gradient(obs, "step-sum").items()}, {}
    box = update_intervals(obs, known, "step-sum")
    centre, radius = box.centre(), box.radius()
    return {k: v.detach() for k, v in centre.items()}, {k: v.detach() for k, v in radius.items()}


def make_plan(obs: Observation, params: MatchingSettings, public: PublicData | None = None) -> Plan:
    """Learn the labels, or recover them (and the candidate multisets to try)."""
    if params.labels == "learn":
        return Plan(None, "labels learned jointly (soft labels)")
    recovered = recover_labels(obs, seed=params.seed, public=public)
    if recovered.labels is None:
        return Plan(None, f"label recovery failed ({recovered.reason}); labels learned instead")
    notes = f"labels recovered by {recovered.method}"
    if params.label_candidates > 1 and recovered.method in COUNT_METHODS:
        candidates = label_candidates(obs, params.label_candidates, seed=params.seed, public=public)
        return Plan(candidates[0], notes, candidates)
    return Plan(recovered.labels, notes)


def batch_key(obs: Observation, plan: Plan) -> tuple[object, ...]:
    """Observations with equal keys share model and shapes: one vectorised batch solves them."""
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


def make_batch(
    observations: list[Observation], plans: list[Plan], params: MatchingSettings
) -> Batch:
    """Stack the observations' weights (once if shared), targets and step sizes per problem."""
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
    known: KnownDefense = params.known_defense  # type: ignore[assignment]
    targets, radii = zip(*[_target(obs, known) for obs in observations], strict=True)
    samples = num_samples(first)
    return Batch(
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
        radius={k: stack([r[k] for r in radii]) for k in names} if known != "none" else {},
        lr=stack([torch.tensor(float(obs.meta.lr), device=device) for obs in observations]),
        schedule=_schedule(first, samples, params.seed),
        candidates=candidates,
    )
