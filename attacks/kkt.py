"""Dataset reconstruction from trained weights through the KKT conditions of margin maximisation.

Gradient descent on a logistic loss drives a ReLU network towards a KKT point of
``min ||theta||^2 s.t. y_i f(theta; x_i) >= 1`` (Haim et al. 2022), and with weight decay every
stationary point of the regularised loss has the same form (Buzaglo et al. 2023):

    theta = sum_i lambda_i y_i grad_theta f(theta; x_i),   lambda_i >= 0.

Given only theta, we optimise ``m`` candidates ``x_i`` and coefficients so that the right-hand
side reproduces theta. Loss terms (each scaled by its weight in :class:`KKTParams`):

* stationarity: ``sum_p ||theta_p - s g_p||^2 / ||theta_p||^2`` over parameter tensors p
  (normalised per tensor so that the wide hidden layers do not drown the first layer, which
  carries the image; ``normalise="global"`` divides by ``||theta||^2`` instead), where
  ``g = sum_i u_i y_i grad f(x_i)``. The global scale ``s`` of the
  coefficients is solved in closed form every iteration (the loss is quadratic in it), so the
  optimiser only learns the *relative* lambdas ``u`` and needs no knowledge of theta's scale;
  the reported lambdas are ``s u``.
* lambda: ``sum_i relu(lambda_min - u_i)^2``, keeping every candidate in play (a candidate
  whose lambda falls to 0 is unconstrained and drifts away from the data).
* range: squared distance of every pixel outside the model's input range (``[-1, 1]`` for
  ``centre_inputs`` models, else ``[0, 1]``), per candidate.

Multiclass models use margins ``f_y - f_j`` with coefficients ``lambda_ij`` (``j != y``).
Candidates get labels round-robin (binary: half +1, half -1). ReLU's derivative is replaced by
``sigmoid(alpha z)`` in every backward pass (forward values stay exact ReLU), as in the paper:
without it the candidates' activation pattern receives no gradient.

Hot path: for an MLP, ``sum_i c_i grad_theta f(x_i)`` is ordinary back-propagation of the
output weights ``c`` through one batched forward pass -- a handful of matmuls over all
candidates at once, no per-sample gradients. Autograd then differentiates that closed form with
respect to the candidates and coefficients. Only ReLU MLPs (Linear/ReLU/Flatten stacks) are
supported; other architectures raise ValueError.

Optimisation: candidates start at ``centre + init_scale * N(0, 1)`` (small, so they share one
activation pattern), relative lambdas at 1; Adam (or SGD with momentum) with separate steps for
candidates and lambdas, cosine-annealed to 0 when ``lr_decay``.

Known limits (measured, see benchmarks/bench_kkt.py): the toy set is recovered exactly, but on
MNIST the fit does not find the data: from random candidates few digits reach SSIM 0.4, and
started from the subspace candidates of a model at a stationary point it loses digits (51 to
37 of 100) while its residual stays above that of the true digits. The subspace start alone
recovers every digit of a 32-image FedAvg client.

Modes: ``"weights"`` takes ``update`` as theta (a trained model, or a FedAvg client's returned
weights); ``"difference"`` fits ``update - global_weights`` with gradients taken at the
client's weights and free-signed per-sample coefficients (the lambda loss acts on ``|u|``).
``init="subspace"`` starts the candidates from the training inputs recovered from the first
layer's change (:mod:`attacks.subspace`: that block of the stationarity condition is linear in
the inputs) and labels them with the model's own predictions; with ``iterations = 0`` those
candidates are returned as they are. A final stationarity residual above
``stationarity_tolerance`` is reported in ``notes``: such weights are not at a KKT point.
Returned images are candidates mapped from the model's input range to ``[0, 1]`` and clamped.

Selection: with ``select = "agreement"`` the attack also says, without the truth, which
candidates it reports as reconstructions (:func:`attacks.kkt_selection.select_candidates`:
clusters of near-duplicate candidates, weighted by their stationarity contribution
``||lambda_i y_i grad f(x_i)||`` and by how little noise they hold). The ``select_top`` best
(0: as many as the client's examples) come first among the returned candidates, best first,
flagged in ``Reconstruction.confident``; every candidate is still returned, so the scorer can
compare the selection with matching by the truth. ``notes`` says how many were selected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from attacks.base import Attack, register_attack, snapshot_steps
from attacks.kkt_selection import select_candidates
from attacks.subspace import model_labels, recover_inputs
from simulator.core.fields import param
from simulator.core.models import Centre, ModelSpec, build_model, is_binary
from simulator.core.protocol import Observation, Reconstruction, Status

Layer = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class KKTParams:
    """Settings of the KKT reconstruction attack.

    Defaults follow the paper authors' published MNIST settings where ours map onto theirs
    (ReLU surrogate slope ~150, candidate init std ~0.035, lambda floor ~0.45, here relative to
    the fitted lambda scale); the red/blue toy set needs ``alpha`` ~500 and ``init_scale`` 0.1.
    """

    iterations: int = param(3000, low=0, high=10_000_000, help="optimiser iterations")
    lr: float = param(0.01, low=0.0, low_open=True, high=10.0, help="Adam step for candidates")
    lambda_lr: float = param(0.01, low=0.0, low_open=True, high=10.0, help="Adam step, lambdas")
    lr_decay: bool = True
    optimizer: Literal["adam", "sgd"] = "adam"
    candidates: float = param(
        2.0, low=0.0, low_open=True, high=100.0, help="candidates per training example"
    )
    init_scale: float = param(0.035, low=0.0, high=10.0, help="std of the initial candidates")
    init_centre: float | None = param(
        None, low=-1e6, high=1e6, help="mean of the initial candidates (None: mid-range)"
    )
    lambda_min: float = param(0.5, low=0.0, high=1e3, help="relative lambda floor")
    alpha: float = param(150.0, low=0.0, low_open=True, high=1e6, help="ReLU surrogate slope")
    stationarity_weight: float = param(1.0, low=0.0, high=1e9, help="weight of stationarity")
    lambda_weight: float = param(1.0, low=0.0, high=1e9, help="weight of the lambda loss")
    range_weight: float = param(1.0, low=0.0, high=1e9, help="weight of the range loss")
    mode: Literal["weights", "difference"] = "weights"
    init: Literal["random", "subspace"] = "random"
    sparsity: float = param(
        0.03, low=0.0, low_open=True, high=100.0, help="subspace init: threshold x sqrt(D)"
    )
    subspace_starts: int = param(
        1000, low=0, high=1_000_000, help="subspace init: random starts besides the pixel ones"
    )
    stationarity_tolerance: float = param(
        0.5, low=0.0, low_open=True, high=1e9, help="residual above which theta is not a KKT point"
    )
    normalise: Literal["layer", "global"] = "layer"
    seed: int = param(0, low=0, help="candidate initialisation seed")
    log_every: int = param(100, low=1, help="iterations between trace records")
    snapshots: int = param(0, low=0, high=1000, help="evenly spaced image snapshots to keep")
    select: Literal["none", "agreement"] = "none"
    select_top: int = param(
        0, low=0, high=10_000_000, help="candidates to select (0: the client's example count)"
    )
    select_similarity: float = param(
        0.9, low=0.0, high=1.0, help="selection: cross-correlation of near-duplicates"
    )


def mlp_parameter_names(spec: ModelSpec) -> list[tuple[str, str | None]]:
    """(weight, bias or None) parameter names of every Linear layer of a ReLU MLP, in order.

    ValueError for any other architecture: the closed-form stationarity needs Linear/ReLU only.
    """
    model = build_model(spec, seed=0)
    modules = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    names: list[tuple[str, str | None]] = []
    for index, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            names.append((f"{index}.weight", f"{index}.bias" if module.bias is not None else None))
        elif not isinstance(module, (nn.Flatten, nn.ReLU, Centre)):
            raise ValueError(
                f"attack 'kkt' needs a ReLU MLP (Linear/ReLU layers); model {spec.kind!r} has "
                f"{type(module).__name__}"
            )
    if not names:
        raise ValueError(f"attack 'kkt': model {spec.kind!r} has no linear layer")
    return names


def input_range(spec: ModelSpec) -> tuple[float, float]:
    """Model-side values of a black and a white pixel: the units candidates live in."""
    return (-1.0, 1.0) if spec.centre_inputs else (0.0, 1.0)


def mlp_layers(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> list[Layer]:
    """(weight, bias or None) tensors of every Linear layer of a ReLU MLP, in order."""
    return [(weights[w], None if b is None else weights[b]) for w, b in mlp_parameter_names(spec)]


def _surrogate_relu(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """ReLU(z) in value, with derivative sigmoid(alpha z) (softplus straight-through)."""
    smooth = nn.functional.softplus(alpha * z) / alpha
    return torch.relu(z).detach() + smooth - smooth.detach()


def _forward(
    layers: Sequence[Layer], inputs: torch.Tensor, alpha: float
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
    layers: Sequence[Layer], inputs: torch.Tensor, coeff: torch.Tensor, alpha: float
) -> list[torch.Tensor]:
    """``sum_i sum_k coeff[i, k] grad_theta f_k(x_i)`` per parameter, in closed form.

    ``inputs`` (m, D), ``coeff`` (m, C). One forward pass over all candidates, then
    back-propagation of ``coeff`` with ReLU' replaced by ``sigmoid(alpha z)``; differentiable
    in ``inputs`` and ``coeff``. Returns tensors in the order weight, [bias] of each layer.
    """
    activations, pre = _forward(layers, inputs, alpha)
    delta = coeff
    grads: list[list[torch.Tensor]] = []
    for index in range(len(layers) - 1, -1, -1):
        weight, bias = layers[index]
        layer_grads = [delta.T @ activations[index]]
        if bias is not None:
            layer_grads.append(delta.sum(0))
        grads.append(layer_grads)
        if index > 0:
            delta = (delta @ weight) * torch.sigmoid(alpha * pre[index - 1])
    return [g for layer_grads in reversed(grads) for g in layer_grads]


def contributions(
    layers: Sequence[Layer], inputs: torch.Tensor, coeff: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Per candidate, ``||sum_k coeff[i, k] grad_theta f_k(x_i)||`` over all parameters (m,).

    Every layer's term of one candidate is an outer product ``delta_i a_i^T`` (plus ``delta_i``
    for a bias), whose norm is ``||delta_i|| ||a_i||``: one forward and backward pass, as
    :func:`combination`, with no per-sample gradients.
    """
    activations, pre = _forward(layers, inputs, alpha)
    delta = coeff
    squared = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
    for index in range(len(layers) - 1, -1, -1):
        weight, bias = layers[index]
        size = (activations[index] ** 2).sum(1) + (0.0 if bias is None else 1.0)
        squared = squared + (delta**2).sum(1) * size
        if index > 0:
            delta = (delta @ weight) * torch.sigmoid(alpha * pre[index - 1])
    return squared.sqrt()


def candidate_labels(count: int, classes: int) -> torch.Tensor:
    """Labels assigned to candidates: round-robin classes (binary: +1 / -1 alternating)."""
    return torch.arange(count) % max(classes, 2)


def _output_weights(relative: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-candidate output coefficients (m, C) from relative lambdas.

    Binary (C = 1): ``u_i y_i`` with ``y = +1`` for label 1 and ``-1`` for label 0. Multiclass:
    ``relative`` is (m, C) = lambda_ij; margin f_y - f_j gives +lambda_ij on y, -lambda_ij on j.
    """
    if classes == 1:
        sign = labels.to(relative.dtype) * 2 - 1
        return (relative * sign)[:, None]
    own = nn.functional.one_hot(labels, classes).to(relative.dtype)
    others = relative * (1 - own)
    return own * others.sum(1, keepdim=True) - others


@dataclass
class _Problem:
    """Targets and evaluation point of one observation."""

    layers: list[Layer]
    targets: list[torch.Tensor]
    norms: list[float]
    classes: int
    dims: int
    count: int
    low: float
    high: float


def _problem(obs: Observation, mode: str, candidates: float, normalise: str) -> _Problem:
    spec = obs.model
    weights = {k: v.detach().float().cpu() for k, v in obs.update.items()}
    layers = mlp_layers(spec, weights)
    names = [n for pair in mlp_parameter_names(spec) for n in pair if n is not None]
    targets = [weights[n] for n in names]
    if mode == "difference":
        targets = [
            t - obs.global_weights[n].detach().float().cpu()
            for t, n in zip(targets, names, strict=True)
        ]
    norms = [max(float((t**2).sum()), 1e-30) for t in targets]
    if normalise == "global":
        norms = [sum(norms)] * len(norms)
    classes = 1 if is_binary(spec) else layers[-1][0].shape[0]
    return _Problem(
        layers=layers,
        targets=targets,
        norms=norms,
        classes=classes,
        dims=layers[0][0].shape[1],
        count=max(2, math.ceil(candidates * obs.meta.num_examples)),
        low=input_range(spec)[0],
        high=input_range(spec)[1],
    )


def kkt_losses(
    problem: _Problem,
    inputs: torch.Tensor,
    relative: torch.Tensor,
    labels: torch.Tensor,
    params: KKTParams,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Weighted total loss, the unweighted terms, and the fitted lambda scale ``s``."""
    coeff = _output_weights(relative, labels, problem.classes)
    grads = combination(problem.layers, inputs, coeff, params.alpha)
    inner = sum(
        (t * g).sum() / n for t, g, n in zip(problem.targets, grads, problem.norms, strict=True)
    )
    energy = sum((g * g).sum() / n for g, n in zip(grads, problem.norms, strict=True))
    # Closed-form optimal scale of the coefficients: the loss is quadratic in it.
    scale = inner / (energy + 1e-30)
    stationarity = sum(
        ((t - scale * g) ** 2).sum() / n
        for t, g, n in zip(problem.targets, grads, problem.norms, strict=True)
    )
    magnitude = relative.abs() if params.mode == "difference" else relative
    if problem.classes > 1:
        own = nn.functional.one_hot(labels, problem.classes).bool()
        magnitude = magnitude[~own]
    lam = (torch.relu(params.lambda_min - magnitude) ** 2).sum()
    outside = torch.relu(inputs - problem.high) + torch.relu(problem.low - inputs)
    rng = (outside**2).sum() / inputs.shape[0]
    terms = {"stationarity": stationarity, "lambda": lam, "range": rng}
    total = (
        params.stationarity_weight * stationarity
        + params.lambda_weight * lam
        + params.range_weight * rng
    )
    return total, terms, scale.detach()


@register_attack(
    "kkt",
    "Reconstruct training sets from trained weights via the KKT conditions of margin "
    "maximisation (Haim et al. 2022; Buzaglo et al. 2023), ReLU MLPs.",
)
class KKT(Attack[KKTParams]):
    """Fit candidates and lambdas so that sum_i lambda_i y_i grad f(x_i) reproduces theta.

    ``status`` is "diverged" if the loss became non-finite (the best finite iterate is
    returned), else "budget". ``distance`` and the trace's "gradient_distance" hold the
    unweighted stationarity loss of the reported candidates.
    """

    Params = KKTParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return [self._attack(obs) for obs in observations]

    def _images(self, obs: Observation, inputs: torch.Tensor) -> torch.Tensor:
        low, high = input_range(obs.model)
        unit = (inputs.detach() - low) / (high - low)
        return unit.clamp(0, 1).reshape(-1, *obs.model.input_shape).clone()

    def _attack(self, obs: Observation, initial: torch.Tensor | None = None) -> Reconstruction:
        p = self.params
        start = time.perf_counter()
        problem = _problem(obs, p.mode, p.candidates, p.normalise)
        generator = torch.Generator().manual_seed(p.seed)
        labels: torch.Tensor | None = None
        notes: list[str] = []
        if p.init == "subspace":
            unit, subspace = recover_inputs(
                obs, problem.count, p.sparsity, p.subspace_starts, generator
            )
            inputs = problem.low + (problem.high - problem.low) * unit.flatten(1)
            problem.count = inputs.shape[0]  # fewer when the span has fewer distinct vectors
            labels = model_labels(obs, unit)
            notes.append(
                f"subspace init: rank {subspace.rank} of {problem.dims} input dims, decay "
                f"{subspace.decay:.4g}, energy outside the span {subspace.outside:.2g}"
            )
            if subspace.rank + 1 >= problem.dims:
                notes.append("subspace uninformative: as many examples as input dimensions")
        else:
            centre = (problem.low + problem.high) / 2 if p.init_centre is None else p.init_centre
            inputs = centre + p.init_scale * torch.randn(
                problem.count, problem.dims, generator=generator
            )
        if initial is not None:  # warm start (diagnostics): first rows replaced
            inputs[: initial.shape[0]] = initial.reshape(initial.shape[0], -1)
        inputs.requires_grad_(True)
        shape = (problem.count,) if problem.classes == 1 else (problem.count, problem.classes)
        relative = torch.ones(shape)
        if p.mode == "difference":
            relative = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
        relative.requires_grad_(True)
        if labels is None:
            labels = candidate_labels(problem.count, problem.classes)
        groups = [{"params": [inputs], "lr": p.lr}, {"params": [relative], "lr": p.lambda_lr}]
        optimizer = (
            torch.optim.Adam(groups)
            if p.optimizer == "adam"
            else torch.optim.SGD(groups, momentum=0.9)
        )
        schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, p.iterations, eta_min=0.0)
            if p.lr_decay
            else None
        )
        snap_at = snapshot_steps(p.iterations, p.snapshots)
        trace: list[dict[str, float]] = []
        snapshots: list[tuple[int, torch.Tensor]] = []
        status: Status = "budget"
        best = (math.inf, inputs.detach().clone(), relative.detach().clone(), 0.0)
        for iteration in range(p.iterations + 1):
            total, terms, scale = kkt_losses(problem, inputs, relative, labels, p)
            value = float(total.detach())
            if not math.isfinite(value):
                status = "diverged"
                break
            if value < best[0]:
                best = (value, inputs.detach().clone(), relative.detach().clone(), float(scale))
            if iteration % p.log_every == 0 or iteration == p.iterations:
                stats = {k: float(v.detach()) for k, v in terms.items()}
                trace.append(
                    {
                        "iteration": float(iteration),
                        "gradient_distance": stats["stationarity"],
                        "loss": value,
                        **stats,
                        "scale": float(scale),
                        "seconds": time.perf_counter() - start,
                    }
                )
            if iteration in snap_at:
                snapshots.append((iteration, self._images(obs, inputs)))
            if iteration == p.iterations:
                break
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        # Report the last iterate unless the run diverged: the loss is not monotone under Adam
        # but the final, annealed iterate is the one the schedule converges.
        final_inputs, final_relative, final_scale = inputs.detach(), relative.detach(), float(scale)
        if status == "diverged":
            _, final_inputs, final_relative, final_scale = best
        with torch.no_grad():
            _, terms, _ = kkt_losses(problem, final_inputs, final_relative, labels, p)
        lambdas = final_relative * final_scale
        # Without a fit the residual says nothing about theta (the lambdas were never solved).
        residual = float(terms["stationarity"]) if p.iterations else math.nan
        if residual > p.stationarity_tolerance:
            notes.append(
                f"theta is far from a KKT point: stationarity residual {residual:.3g} > "
                f"{p.stationarity_tolerance:g}, so the KKT conditions do not explain these weights"
            )
        fitted = (
            f"; lambda scale {final_scale:.3g}, {int((lambdas.abs() > 0).sum())} nonzero lambdas"
            if p.iterations
            else "; no KKT fit (iterations = 0)"
        )
        notes.insert(0, f"{problem.count} candidates, mode {p.mode}{fitted}")
        if problem.classes == 1:
            notes.append("binary model: candidate labels are parity only")
        images = self._images(obs, final_inputs)
        labels = labels.clone()
        confident = None
        if p.select == "agreement":
            weights = None
            if p.iterations:
                coeff = _output_weights(final_relative, labels, problem.classes) * final_scale
                with torch.no_grad():
                    weights = contributions(problem.layers, final_inputs, coeff, p.alpha)
            top = p.select_top or obs.meta.num_examples
            chosen = select_candidates(images, weights, top=top, similarity=p.select_similarity)
            rest = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
            rest[chosen.index] = False
            order = torch.cat([chosen.index, rest.nonzero().squeeze(1)])
            images, labels = images[order], labels[order]
            confident = torch.arange(images.shape[0], device=images.device) < chosen.index.numel()
            notes.append(
                f"agreement selection: {chosen.index.numel()} of {images.shape[0]} candidates "
                f"selected (first), {chosen.clusters} clusters, largest "
                f"{int(chosen.support.max()) if chosen.support.numel() else 0}"
            )
        return Reconstruction(
            round=obs.round,
            client_id=obs.client_id,
            images=images,
            labels=labels,
            confident=confident,
            trace=trace,
            snapshots=snapshots,
            status=status,
            attack=self.name,
            notes="; ".join(notes),
            distance=residual,
            matching="nearest",
        )
