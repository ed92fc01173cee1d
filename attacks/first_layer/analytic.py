"""Closed-form reconstruction from a fully-connected first layer with bias.

For ``z = W x + b`` the gradient of the mean loss is ``dW[i] = mean_b d_bi x_b`` and
``db[i] = mean_b d_bi`` with ``d_bi = dL/dz_bi``. Every row with ``db[i] != 0`` therefore gives
``dW[i] / db[i]``, a weighted average of the samples that reach neuron i (Phong et al. 2017;
Fowl et al. 2021):

* batch size 1: every active row is the image itself. We take the least-squares combination
  ``sum_i db_i dW_i / sum_i db_i^2`` over all active rows, which is exact and well conditioned.
* batches: a row is exactly one sample when that sample alone is active on the neuron (common
  with ReLU, impossible with sigmoid/tanh where every neuron sees every sample). Such
  candidates repeat across neurons, while mixtures differ from row to row (their weights
  ``d_bi`` vary) and usually leave the pixel box. We keep candidates inside [0, 1] (with slack),
  link those closer than ``tolerance`` (pixel RMSE), and take connected groups of at least
  two rows, largest first, as recovered samples (each refit by least squares over its rows).
  Unfilled slots get the remaining in-box candidates, most-supported first, and are marked
  not confident in ``Reconstruction.confident``.

Under FedAvg the same holds for ``w_global - w_client`` (a sum of gradients over all local steps):
a sample alone on a neuron through every step is still exact; with several steps that is rarer.

Noise: when the update carries Gaussian noise of a known std (``noise_std``: a defense's
public setting), a row's candidate ``dW_i / db_i`` has pixel noise of std ``sigma / |db_i|``.
Rows are then kept only while that stays below ``max_pixel_noise``, two rows link when their
distance is within three standard deviations of their combined noise (or ``tolerance``), the
box slack widens by the row's noise, and each group's least-squares refit is the
inverse-variance average of its rows: the more neurons one image reaches, the cleaner it
comes back.

Labels: with all images known, the last layer's gradient ``n dW_L = (P - Y)^T [H, 1]`` is linear
in the one-hot labels Y given the features H and softmax P of the recovered images, so Y is
solved by least squares (exact when every sample was recovered). The binary model gets None.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch.func import functional_call

from attacks.base import Attack, register_attack
from attacks.common.layers import final_layer, image_layer
from attacks.common.updates import as_gradient, gradient_factor, num_samples
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge
from simulator.core.models import build_model, is_binary, task_loss
from simulator.core.protocol import Observation, Reconstruction


@dataclass(frozen=True)
class AnalyticParams:
    """Settings of the closed-form first-layer attack."""

    tolerance: float = param(1e-5, low=0.0, help="pixel RMSE linking two candidate rows")
    min_activation: float = param(1e-6, low=0.0, help="|db_i| / max |db| below which i is off")
    box_slack: float = param(0.05, low=0.0, help="how far outside [0, 1] a candidate may go")
    noise_std: float = param(
        0.0, low=0.0, help="std of the noise on each coordinate of the update the client sent"
    )
    max_pixel_noise: float = param(
        0.5, low=0.0, low_open=True, help="with noise: keep rows whose pixel noise std is below"
    )


def _least_squares_rows(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The image x minimising sum_i |dW_i - db_i x|^2 over the given rows."""
    return (bias @ weight) / (bias @ bias)


def _components(candidates: torch.Tensor, tolerance: torch.Tensor | float) -> np.ndarray:
    """Connected-component labels of candidates linked when their pixel RMSE < tolerance
    (a number, or a matrix of per-pair tolerances)."""
    rmse = torch.cdist(candidates, candidates) / math.sqrt(candidates.shape[1])
    adjacency = csr_matrix((rmse < tolerance).cpu().numpy())
    return connected_components(adjacency, directed=False)[1]


def _active(bias: torch.Tensor, params: AnalyticParams, noise: float) -> torch.Tensor:
    """Rows whose neuron fired, and (with noise) whose candidate is not drowned by it."""
    active = bias.abs() > params.min_activation * bias.abs().max()
    if noise > 0:
        active &= noise / bias.abs().clamp(min=1e-30) < params.max_pixel_noise
    return active


def _separate(
    weight: torch.Tensor, bias: torch.Tensor, n: int, params: AnalyticParams, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n images from single-sample neurons, filled up to n; and which are confident.

    ``noise`` is the noise std on each coordinate of this (pseudo-)gradient.
    """
    dims = weight.shape[1]
    active = _active(bias, params, noise)
    weight, bias = weight[active], bias[active]
    candidates = weight / bias[:, None]
    pixel_noise = noise / bias.abs()  # std of each candidate's pixels
    slack = params.box_slack + 3 * pixel_noise[:, None]
    inside = ((candidates >= -slack) & (candidates <= 1 + slack)).all(1)
    weight, bias, candidates = weight[inside], bias[inside], candidates[inside]
    pixel_noise = pixel_noise[inside]
    images = torch.full((n, dims), 0.5, dtype=weight.dtype)
    confident = torch.zeros(n, dtype=torch.bool)
    if candidates.shape[0] == 0:
        return images, confident
    # Two candidates of one image differ by noise of std sqrt(s_i^2 + s_j^2) per pixel.
    combined = (pixel_noise[:, None] ** 2 + pixel_noise[None, :] ** 2).sqrt()
    groups = torch.as_tensor(_components(candidates, combined.mul(3).clamp(min=params.tolerance)))
    sizes = torch.bincount(groups)
    support = torch.zeros(len(sizes), dtype=weight.dtype).index_add_(0, groups, bias.abs())
    # Most rows first, then most gradient mass: single samples repeat, mixtures do not.
    ranking = sorted(range(len(sizes)), key=lambda g: (-int(sizes[g]), -float(support[g])))
    for slot, group in enumerate(ranking[:n]):
        rows = groups == group
        images[slot] = _least_squares_rows(weight[rows], bias[rows])
        confident[slot] = bool(sizes[group] >= 2)
    return images, confident


def _labels(
    obs: Observation, images: torch.Tensor, gradient: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """Per-image labels solving the last layer's gradient equations by least squares."""
    spec = obs.model
    if is_binary(spec):
        return None
    model = build_model(spec, seed=0)
    layer = final_layer(spec, model)
    if layer is None:
        return None
    head = model.get_submodule(layer.module)
    features: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
    weights = {k: v.detach().double() for k, v in obs.global_weights.items()}
    with torch.no_grad():
        probs = functional_call(model.double(), weights, (images.double(),)).softmax(-1)
    handle.remove()
    h = features[0].flatten(1)
    observed = gradient[layer.weight].double()
    if layer.bias is not None:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
        observed = torch.cat([observed, gradient[layer.bias].double()[:, None]], dim=1)
    n = num_samples(obs)
    # (P - Y)^T H = n G  =>  Y = P - n (G H^+)^T
    y = probs - n * (observed @ torch.linalg.pinv(h)).T
    return y.argmax(-1).to(torch.int64)


def _gradient_distance(obs: Observation, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Squared-L2 distance of the update the reconstruction would send (FedSGD only)."""
    if obs.meta.protocol != "fedsgd":
        return math.nan
    model = build_model(obs.model, seed=0)
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in obs.global_weights.items()}
    loss = task_loss(obs.model, functional_call(model, weights, (images,)), labels)
    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    total = 0.0
    for name, g in zip(weights, grads, strict=True):
        g = torch.zeros_like(weights[name]) if g is None else g
        total += float(((g - obs.update[name]) ** 2).sum())
    return total


@register_attack(
    "analytic",
    "Closed form x = dW[i] / db[i] from a fully-connected first layer with bias.",
)
class Analytic(Attack[AnalyticParams]):
    """Exact first-layer inversion; raises ValueError for models it does not apply to.

    Closed form, so ``status`` is always "converged"; ``confident`` marks the images that came
    from at least two single-sample rows, and ``notes`` counts them.
    """

    Params = AnalyticParams

    def adapted_params(self, knowledge: DefenseKnowledge) -> dict[str, object]:
        """Rows weighed by the known noise's std."""
        return {"noise_std": knowledge.noise_std}

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        start = time.perf_counter()
        results = []
        for obs in observations:
            # One closed-form solve per observation; nothing iterative to batch.
            layer = image_layer(obs.model)
            if isinstance(layer, str):
                raise ValueError(f"attack 'analytic' does not apply to model {obs.model}: {layer}")
            gradient = {
                k: v.detach().double().cpu() for k, v in as_gradient(obs, "mean-step").items()
            }
            weight, bias = gradient[layer.weight], gradient[layer.bias]
            n = num_samples(obs)
            noise = self.params.noise_std * gradient_factor(obs, "mean-step")
            if n == 1:
                active = _active(bias, self.params, noise)
                if bool(active.any()):
                    flat = _least_squares_rows(weight[active], bias[active])[None]
                    confident = torch.ones(1, dtype=torch.bool)
                else:  # a zero first-layer gradient (no neuron fired, or nothing to learn)
                    flat = torch.full((1, weight.shape[1]), 0.5, dtype=weight.dtype)
                    confident = torch.zeros(1, dtype=torch.bool)
            else:
                flat, confident = _separate(weight, bias, n, self.params, noise)
            images = flat.reshape(n, *obs.model.input_shape).clamp(0, 1).float()
            labels = _labels(obs, images, gradient)
            distance = math.nan if labels is None else _gradient_distance(obs, images, labels)
            count = int(confident.sum())
            results.append(
                Reconstruction(
                    round=obs.round,
                    client_id=obs.client_id,
                    images=images,
                    labels=labels,
                    trace=[
                        {
                            "iteration": 0.0,
                            "gradient_distance": distance,
                            "seconds": time.perf_counter() - start,
                        }
                    ],
                    status="converged",
                    attack=self.name,
                    notes=f"{count} of {n} images from single-sample neurons"
                    + ("" if labels is not None else "; labels: binary model reveals parity only"),
                    confident=confident,
                    objective_value=distance,
                )
            )
        return results
