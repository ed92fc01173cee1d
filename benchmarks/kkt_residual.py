"""The true training digits' KKT stationarity residual of trained weights: a benchmark
diagnostic that uses the truth, so it is never part of an attack.

At a KKT point of margin maximisation (or a stationary point of the loss with weight decay) the
weights are ``theta = sum_i lambda_i y_i grad_theta f(theta; x_i)`` with ``lambda_i >= 0``
(:mod:`attacks.kkt.attack`). Given the true inputs, the best coefficients are a least-squares
problem; its residual, normalised per parameter tensor as the attack's stationarity loss
(``sum_p ||theta_p - g_p||^2 / ||theta_p||^2``), says how far the weights are from such a
point: 0 at one, the number of fitted tensors with every coefficient 0.

Why a Gram matrix: the per-example gradient of an MLP's weight matrix is an outer product
``delta_i a_i^T``, so the inner products the least-squares problem needs are
``(delta_i . delta_j)(a_i . a_j)`` -- (n, n) matrices from one forward and backward pass, where
the design matrix itself (1.8 million parameters by n examples for 784-1000-1000-1) does not
fit in memory at n = 500. ReLU's derivative is the exact step ``z > 0``.
"""

from __future__ import annotations

import torch

from attacks.kkt.attack import _problem
from simulator.core.models import task_targets
from simulator.core.protocol import Observation

# Block principal pivoting (below) exchanges every infeasible index while their count falls,
# and falls back to one index at a time after this many rounds without progress.
_PIVOT_BACKUP = 3


def gram_system(
    obs: Observation, images: torch.Tensor, labels: torch.Tensor | None, first_only: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(G, b, t2)``: the normalised least-squares problem ``min_c ||t - D c||^2 =
    t2 - 2 b.c + c G c``, with column i of D example i's output gradient (times ``y_i`` when
    ``labels`` are given), all in float64. ``images`` in [0, 1]; the victim centres them."""
    problem = _problem(obs, "weights", 1.0, "layer")
    layers = [(w.double(), None if b is None else b.double()) for w, b in problem.layers]
    targets = [t.double() for t in problem.targets]
    hidden = images.flatten(1).double()
    if obs.model.centre_inputs:
        hidden = hidden * 2 - 1
    activations, gates = [hidden], []
    for weight, bias in layers[:-1]:
        pre = hidden @ weight.T + (0.0 if bias is None else bias)
        gates.append((pre > 0).double())
        hidden = pre.clamp_min(0)
        activations.append(hidden)
    n = hidden.shape[0]
    delta = torch.ones(n, 1, dtype=torch.float64)
    if labels is not None:
        delta = delta * (task_targets(obs.model, labels).double() * 2 - 1)[:, None]
    gram = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(n, dtype=torch.float64)
    t2 = 0.0
    first_target = [0]  # index in ``targets`` of each layer's weight (its bias follows)
    for _, bias in layers[:-1]:
        first_target.append(first_target[-1] + (1 if bias is None else 2))
    for index in range(len(layers) - 1, -1, -1):
        weight, bias = layers[index]
        if index == 0 or not first_only:
            at = first_target[index]
            target, norm = targets[at], problem.norms[at]
            gram += (delta @ delta.T) * (activations[index] @ activations[index].T) / norm
            cross += ((delta @ target) * activations[index]).sum(1) / norm
            t2 += float((target**2).sum()) / norm
            if bias is not None:  # a bias's per-example gradient is delta_i itself
                target, norm = targets[at + 1], problem.norms[at + 1]
                gram += delta @ delta.T / norm
                cross += delta @ target / norm
                t2 += float((target**2).sum()) / norm
        if index > 0:
            delta = (delta @ weight) * gates[index - 1]
    return gram, cross, t2


def nnls_gram(gram: torch.Tensor, cross: torch.Tensor, max_rounds: int = 500) -> torch.Tensor:
    """``argmin_{c >= 0} c G c - 2 b.c`` by block principal pivoting (Kim and Park 2011).

    Guess the free set, solve the unconstrained problem on it, and exchange every index whose
    coefficient is negative or whose gradient says it should enter; converges in a few rounds
    where one-at-a-time active sets (Lawson-Hanson) take one round per positive coefficient.
    """
    n = cross.shape[0]
    free = torch.ones(n, dtype=torch.bool)
    best, backup = n + 1, _PIVOT_BACKUP
    coeff = torch.zeros(n, dtype=gram.dtype)
    for _ in range(max_rounds):
        coeff = torch.zeros(n, dtype=gram.dtype)
        if free.any():
            sub = gram[free][:, free]
            coeff[free] = torch.linalg.lstsq(sub, cross[free, None]).solution[:, 0]
        slope = gram @ coeff - cross  # the gradient / 2; >= 0 wherever c is held at 0
        scale = 1e-12 * max(float(cross.abs().max()), 1e-300)
        wrong = (free & (coeff < -scale)) | (~free & (slope < -scale))
        count = int(wrong.sum())
        if count == 0:
            return coeff.clamp_min(0)
        if count < best:
            best, backup = count, _PIVOT_BACKUP
        elif backup > 0:
            backup -= 1
        else:  # no progress: exchange only the last infeasible index (finite by Murty's rule)
            last = int(wrong.nonzero()[-1])
            wrong = torch.zeros_like(wrong)
            wrong[last] = True
        free = free ^ wrong
    return coeff.clamp_min(0)


def truth_residual(
    obs: Observation,
    images: torch.Tensor,
    first_only: bool = False,
    labels: torch.Tensor | None = None,
) -> float:
    """Stationarity residual of the true images (the attack's per-tensor normalisation): near 0
    only when the weights sit at a KKT point. Without ``labels`` the coefficients are free in
    sign (least squares); with them, ``lambda_i >= 0`` on ``y_i``'s side (non-negative least
    squares), as the KKT conditions require. With ``first_only``, of the first layer's
    tensors only (``fit = "first"``)."""
    gram, cross, t2 = gram_system(obs, images, labels, first_only)
    if labels is None:
        coeff = torch.linalg.lstsq(gram, cross[:, None], driver="gelsd").solution[:, 0]
    else:
        coeff = nnls_gram(gram, cross)
    return max(t2 - 2 * float(cross @ coeff) + float(coeff @ gram @ coeff), 0.0)
