"""The KKT reconstruction's tensor core: closed-form stationarity and R runs optimised as one.

Why a run dimension: Haim et al. sweep the reconstruction's hyper-parameters at random and
combine what the runs find. The runs share the model, so instead of R optimisations one after
the other, the candidates of every run are one ``(R, m, D)`` tensor and every matmul of the
closed-form back-propagation carries the run as a batch dimension: one forward and backward
pass per iteration for all runs (on a GPU, one kernel launch where R would otherwise be made).
The runs stay independent: run r's stationarity sums only its own candidates, its lambda scale
is fitted on its own, and the loss optimised is the sum of the runs' losses, whose gradient
with respect to run r's candidates is exactly that of run r's loss alone. Each run has its own
step sizes, ReLU-surrogate slope, lambda floor and candidate initialisation (its own seed), so
R separate runs of :class:`attacks.kkt.attack.KKT` with those settings give the same candidates to
float tolerance (``tests/unit/attacks/kkt/test_runs.py``).

Tensor shapes: candidates ``(R, m, D)``, relative lambdas ``(R, m)`` (binary) or
``(R, m, C)``, labels ``(R, m)``, per-run scalars ``(R,)``. The functions of the closed form
also take unbatched ``(m, D)`` inputs with a float ``alpha`` (the single-model form the tests
check against autograd).

The optimisers are written out (Adam, and SGD with momentum 0.9, as :mod:`torch.optim` defines
them, with a cosine-annealed step) because :mod:`torch.optim` has one step size per tensor, and
here each run has its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Layer = tuple[torch.Tensor, torch.Tensor | None]
Alpha = float | torch.Tensor  # a float, or (R, 1, 1) per run


@dataclass
class Problem:
    """Targets and evaluation point of one observation (the model's weights, per tensor)."""

    layers: list[Layer]
    targets: list[torch.Tensor]
    norms: list[float]
    classes: int
    dims: int
    count: int
    low: float
    high: float


@dataclass(frozen=True)
class RunSettings:
    """Per-run hyper-parameters, each ``(R,)``; ``seeds`` seed each run's initial candidates."""

    seeds: tuple[int, ...]
    lr: torch.Tensor
    lambda_lr: torch.Tensor
    alpha: torch.Tensor
    init_scale: torch.Tensor
    lambda_min: torch.Tensor

    @property
    def runs(self) -> int:
        return len(self.seeds)


def draw_settings(
    runs: int,
    seed: int,
    lr: float,
    lambda_lr: float,
    alpha: float,
    init_scale: float,
    lambda_min: float,
    spread: float = 1.0,
    lambda_spread: float = 0.0,
) -> RunSettings:
    """Run 0 keeps the given values; runs 1..R-1 draw theirs around them, as a random sweep.

    ``lr``, ``alpha`` and ``init_scale`` are multiplied by ``spread ** u``, ``u`` uniform in
    [-1, 1] (log-uniform in [x / spread, x * spread]); ``lambda_min`` moves by
    ``lambda_spread * u`` (floored at 0); ``lambda_lr`` stays. Run r's candidates use seed
    ``seed + r``. The draws come from their own generator (seeded by ``seed``), so they do not
    change the candidates' initialisation.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(runs, 4, generator=generator, dtype=torch.float64) * 2 - 1
    u[0] = 0.0  # run 0: the given values
    factor = torch.tensor(spread, dtype=torch.float64) ** u[:, :3]
    return RunSettings(
        seeds=tuple(seed + r for r in range(runs)),
        lr=lr * factor[:, 0],
        lambda_lr=torch.full((runs,), lambda_lr, dtype=torch.float64),
        alpha=alpha * factor[:, 1],
        init_scale=init_scale * factor[:, 2],
        lambda_min=(lambda_min + lambda_spread * u[:, 3]).clamp_min(0.0),
    )


def _surrogate_relu(z: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """ReLU(z) in value, with derivative sigmoid(alpha z) (softplus straight-through)."""
    smooth = nn.functional.softplus(alpha * z) / alpha
    return torch.relu(z).detach() + smooth - smooth.detach()


def _forward(
    layers: Sequence[Layer], inputs: torch.Tensor, alpha: Alpha
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's input activations (``inputs`` first) and hidden pre-activations, with
    the surrogate ReLU (ReLU in value, so the values are the network's own)."""
    activations = [inputs]
    pre: list[torch.Tensor] = []
    hidden = inputs
    for weight, bias in layers[:-1]:
        z = hidden @ weight.T
        if bias is not None:
            z = z + bias
        pre.append(z)
        hidden = _surrogate_relu(z, alpha)
        activations.append(hidden)
    return activations, pre


def combination(
    layers: Sequence[Layer],
    inputs: torch.Tensor,
    coeff: torch.Tensor,
    alpha: Alpha,
    first_only: bool = False,
) -> list[torch.Tensor]:
    """``sum_i sum_k coeff[i, k] grad_theta f_k(x_i)`` per parameter, in closed form.

    ``inputs`` (m, D) or (R, m, D), ``coeff`` (m, C) or (R, m, C): one forward pass over all
    candidates, then back-propagation of ``coeff`` with ReLU' replaced by ``sigmoid(alpha z)``;
    differentiable in ``inputs`` and ``coeff``. Returns tensors in the order weight, [bias] of
    each layer, each with the run dimension first when batched; with ``first_only`` only the
    first layer's (the deeper layers' products are then skipped, they are the costly ones).
    """
    activations, pre = _forward(layers, inputs, alpha)
    delta = coeff
    grads: list[list[torch.Tensor]] = []
    for index in range(len(layers) - 1, -1, -1):
        weight, bias = layers[index]
        if index == 0 or not first_only:
            layer_grads = [delta.mT @ activations[index]]
            if bias is not None:
                layer_grads.append(delta.sum(-2))
            grads.append(layer_grads)
        if index > 0:
            delta = (delta @ weight) * torch.sigmoid(alpha * pre[index - 1])
    return [g for layer_grads in reversed(grads) for g in layer_grads]


def contributions(
    layers: Sequence[Layer], inputs: torch.Tensor, coeff: torch.Tensor, alpha: Alpha
) -> torch.Tensor:
    """Per candidate, ``||sum_k coeff[i, k] grad_theta f_k(x_i)||`` over all parameters.

    Every layer's term of one candidate is an outer product ``delta_i a_i^T`` (plus ``delta_i``
    for a bias), whose norm is ``||delta_i|| ||a_i||``: one forward and backward pass, as
    :func:`combination`, with no per-sample gradients. (m,), or (R, m) when batched.
    """
    activations, pre = _forward(layers, inputs, alpha)
    delta = coeff
    squared = torch.zeros(inputs.shape[:-1], dtype=inputs.dtype, device=inputs.device)
    for index in range(len(layers) - 1, -1, -1):
        weight, bias = layers[index]
        size = (activations[index] ** 2).sum(-1) + (0.0 if bias is None else 1.0)
        squared = squared + (delta**2).sum(-1) * size
        if index > 0:
            delta = (delta @ weight) * torch.sigmoid(alpha * pre[index - 1])
    return squared.sqrt()


def output_weights(relative: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-candidate output coefficients (..., m, C) from relative lambdas.

    Binary (C = 1): ``u_i y_i`` with ``y = +1`` for label 1 and ``-1`` for label 0. Multiclass:
    ``relative`` is (..., m, C) = lambda_ij; margin f_y - f_j gives +lambda_ij on y, -lambda_ij
    on j.
    """
    if classes == 1:
        sign = labels.to(relative.dtype) * 2 - 1
        return (relative * sign)[..., None]
    own = nn.functional.one_hot(labels, classes).to(relative.dtype)
    others = relative * (1 - own)
    return own * others.sum(-1, keepdim=True) - others


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms, how lambdas are read, and which layers are fitted."""

    stationarity: float = 1.0
    lambda_: float = 1.0
    range: float = 1.0
    signed: bool = False  # "difference" mode: the lambda floor acts on |u|
    first_only: bool = False  # fit the first layer's stationarity only


def batched_losses(
    problem: Problem,
    inputs: torch.Tensor,
    relative: torch.Tensor,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    lambda_min: torch.Tensor,
    weights: LossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Per run (R,): the weighted total loss, the unweighted terms, and the fitted scale ``s``.

    ``alpha`` and ``lambda_min`` are (R,). The stationarity of run r is
    ``sum_p ||theta_p - s_r g_rp||^2 / norm_p`` with ``s_r`` solved in closed form (the loss is
    quadratic in it), over the first layer's tensors only with ``first_only``.
    """
    runs = inputs.shape[0]
    coeff = output_weights(relative, labels, problem.classes)
    grads = combination(problem.layers, inputs, coeff, alpha[:, None, None], weights.first_only)
    fitted = list(zip(problem.targets, problem.norms, strict=True))[: len(grads)]
    inner = sum(((t * g).flatten(1).sum(1) / n for (t, n), g in zip(fitted, grads, strict=True)))
    energy = sum(((g * g).flatten(1).sum(1) / n for (_, n), g in zip(fitted, grads, strict=True)))
    scale = inner / (energy + 1e-30)
    stationarity = sum(
        ((t - scale.view(-1, *[1] * t.dim()) * g) ** 2).flatten(1).sum(1) / n
        for (t, n), g in zip(fitted, grads, strict=True)
    )
    magnitude = relative.abs() if weights.signed else relative
    floor = lambda_min.view(-1, *[1] * (magnitude.dim() - 1))
    shortfall = torch.relu(floor - magnitude) ** 2
    if problem.classes > 1:  # only the margins against other classes carry a lambda
        own = nn.functional.one_hot(labels, problem.classes).bool()
        shortfall = shortfall.masked_fill(own, 0.0)
    lam = shortfall.reshape(runs, -1).sum(1)
    outside = torch.relu(inputs - problem.high) + torch.relu(problem.low - inputs)
    rng = (outside**2).reshape(runs, -1).sum(1) / inputs.shape[1]
    assert isinstance(stationarity, torch.Tensor) and isinstance(scale, torch.Tensor)
    terms = {"stationarity": stationarity, "lambda": lam, "range": rng}
    total = weights.stationarity * stationarity + weights.lambda_ * lam + weights.range * rng
    return total, terms, scale.detach()


class BatchedOptimizer:
    """Adam or SGD (momentum 0.9) over tensors whose first dimension is the run, with one step
    size per run, cosine-annealed to 0 over ``iterations`` when ``decay``.

    The update is :mod:`torch.optim`'s (Adam: betas 0.9 / 0.999, eps 1e-8, bias-corrected;
    SGD: ``buf = 0.9 buf + g``, ``buf = g`` at the first step), applied to each run with its
    own step size; runs whose ``active`` flag is off do not move.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        lrs: Sequence[torch.Tensor],
        kind: str,
        iterations: int,
        decay: bool,
    ) -> None:
        self.tensors = list(tensors)
        self.lrs = [
            lr.to(t.device, t.dtype).view(-1, *[1] * (t.dim() - 1))
            for lr, t in zip(lrs, self.tensors, strict=True)
        ]
        self.kind = kind
        self.iterations = iterations
        self.decay = decay
        self.step_count = 0
        self.first = [torch.zeros_like(t) for t in self.tensors]
        self.second = [torch.zeros_like(t) for t in self.tensors]

    def factor(self) -> float:
        """The schedule's multiplier of the step sizes for the coming step."""
        if not self.decay or self.iterations <= 0:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * self.step_count / self.iterations))

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One update from the tensors' ``.grad``; ``active`` (R,) bool."""
        factor = self.factor()
        self.step_count += 1
        t = self.step_count
        for index, tensor in enumerate(self.tensors):
            grad = tensor.grad
            if grad is None:
                continue
            shape = (-1, *[1] * (tensor.dim() - 1))
            mask = active.view(shape)
            grad = torch.where(mask, grad, torch.zeros_like(grad))  # dead runs: NaN-free
            lr = self.lrs[index] * factor * mask.to(tensor.dtype)
            if self.kind == "adam":
                first, second = self.first[index], self.second[index]
                first.lerp_(grad, 1 - 0.9)
                second.mul_(0.999).addcmul_(grad, grad, value=1 - 0.999)
                denom = second.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8
                tensor.sub_(lr / (1 - 0.9**t) * first / denom)
            else:
                buffer = self.first[index]
                if t == 1:
                    buffer.copy_(grad)
                else:
                    buffer.mul_(0.9).add_(grad)
                tensor.sub_(lr * buffer)


@dataclass
class RunsResult:
    """Final state of every run: candidates (R, m, D), relative lambdas, fitted scales (R,),
    which runs diverged (their best finite iterate is kept), the trace and snapshots."""

    inputs: torch.Tensor
    relative: torch.Tensor
    scale: torch.Tensor
    diverged: torch.Tensor
    trace: list[dict[str, float]]
    snapshots: list[tuple[int, torch.Tensor]]


def optimise(
    problem: Problem,
    inputs: torch.Tensor,
    relative: torch.Tensor,
    labels: torch.Tensor,
    settings: RunSettings,
    weights: LossWeights,
    optimizer: str,
    iterations: int,
    decay: bool,
    log_every: int,
    snap_at: set[int],
    snapshot: Callable[[torch.Tensor], torch.Tensor],
) -> RunsResult:
    """Fit every run's candidates and lambdas together (one batched problem).

    A run whose loss becomes non-finite stops (it keeps its best finite iterate); the loop ends
    when every run has. The trace records, every ``log_every`` iterations, the terms of the run
    with the lowest loss at that iteration (``run``: which one, with R > 1).
    """
    start = time.perf_counter()
    runs = inputs.shape[0]
    device = inputs.device
    alpha = settings.alpha.to(device, inputs.dtype)
    lambda_min = settings.lambda_min.to(device, inputs.dtype)
    inputs.requires_grad_(True)
    relative.requires_grad_(True)
    steps = BatchedOptimizer(
        [inputs, relative], [settings.lr, settings.lambda_lr], optimizer, iterations, decay
    )
    active = torch.ones(runs, dtype=torch.bool, device=device)
    best_value = torch.full((runs,), math.inf, dtype=torch.float64, device=device)
    best_inputs, best_relative = inputs.detach().clone(), relative.detach().clone()
    best_scale = torch.zeros(runs, dtype=inputs.dtype, device=device)
    scale = best_scale
    trace: list[dict[str, float]] = []
    snapshots: list[tuple[int, torch.Tensor]] = []
    for iteration in range(iterations + 1):
        total, terms, scale = batched_losses(
            problem, inputs, relative, labels, alpha, lambda_min, weights
        )
        values = total.detach().double()
        active &= torch.isfinite(values)
        if not bool(active.any()):
            break
        improved = active & (values < best_value)
        best_value = torch.where(improved, values, best_value)
        keep = improved.view(-1, *[1] * (inputs.dim() - 1))
        best_inputs = torch.where(keep, inputs.detach(), best_inputs)
        keep = improved.view(-1, *[1] * (relative.dim() - 1))
        best_relative = torch.where(keep, relative.detach(), best_relative)
        best_scale = torch.where(improved, scale, best_scale)
        if iteration % log_every == 0 or iteration == iterations:
            lowest = int(torch.where(active, values, math.inf).argmin())
            stats = {k: float(v[lowest].detach()) for k, v in terms.items()}
            row = {
                "iteration": float(iteration),
                "kkt_stationarity": stats["stationarity"],
                "loss": float(values[lowest]),
                **stats,
                "scale": float(scale[lowest]),
                "seconds": time.perf_counter() - start,
            }
            trace.append(row | ({"run": float(lowest)} if runs > 1 else {}))
        if iteration in snap_at:
            snapshots.append((iteration, snapshot(inputs.detach())))
        if iteration == iterations:
            break
        inputs.grad = relative.grad = None
        # Sum of the runs' losses: each run's gradient is that of its own loss alone.
        torch.where(active, total, torch.zeros_like(total)).sum().backward()
        steps.step(active)
    diverged = ~active
    # Report the last iterate of every finished run: the loss is not monotone under Adam but
    # the final, annealed iterate is the one the schedule converges; diverged runs keep their
    # best finite one.
    final_inputs = torch.where(diverged.view(-1, 1, 1), best_inputs, inputs.detach())
    shape = (-1, *[1] * (relative.dim() - 1))
    final_relative = torch.where(diverged.view(shape), best_relative, relative.detach())
    final_scale = torch.where(diverged, best_scale, scale)
    return RunsResult(
        inputs=final_inputs,
        relative=final_relative,
        scale=final_scale,
        diverged=diverged,
        trace=trace,
        snapshots=snapshots,
    )
