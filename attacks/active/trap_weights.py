"""Trap weights (Boenisch et al. 2023): a re-drawn first layer whose neurons each fire rarely.

The server keeps the architecture and re-draws the weights of the first fully-connected layer:
each row is a random unit direction, and its bias is set from public data (the test split the
server holds) so that the neuron fires for a share ``activation`` of inputs, by default
``2 / n`` for ``n`` expected inputs. A neuron that fires for one input of the batch only has
gradient rows ``dW_i = g x``, ``db_i = g``: the input, exactly (the analytic attack's ratio).

Reading more than those: the server knows every weight it sent, so for a candidate image and a
label it can compute the gradient that input alone would put on every neuron of the layer.
A candidate is a single input exactly when that computed gain matches its neuron's ``db_i``
for some label (a mixture of inputs matches none), which also gives the label. Each verified
input is then subtracted from every neuron it fires, and neurons shared with it yield new
single inputs: the decoder peels the batch apart. FedAvg's update sums several steps whose
gains change as the model trains, so verification holds for one local step only; with more,
the attack falls back to neurons whose ratio stays inside the pixel box. Measured (MNIST, 32
digits, 256 neurons): 79% at one local step (float32 rounding of the returned weights costs the
rest), 47% at 4, 32% at 8.

Disguise (against a client that inspects the model it is sent, :mod:`defenses.inspection`):
``row_scale = "honest"`` multiplies each trap neuron, row and bias together, so that its bias
has the scale of the honest layer's biases (relu is positively homogeneous: the neuron fires
for the same inputs, and ``dW_i / db_i`` is still the input), and ``honest_rows`` leaves that
share of the layer's rows (seeded choice) as the honest model has them. No tensor is added and
every tensor keeps about its honest root mean square; the rows' own scales give it away to the
per-row check (``inspection`` with ``rows = true``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from attacks.active.base import (
    ActiveAttack,
    ActiveParams,
    Plan,
    Weights,
    examples_behind,
)
from attacks.base import register_attack
from attacks.common.layers import LinearLayer, image_layer
from attacks.common.updates import as_gradient
from simulator.core.fields import param
from simulator.core.models import ModelSpec, SentModel, build_model, is_binary, task_loss
from simulator.core.protocol import Observation, Reconstruction

CLASSES = 10  # labels tried per candidate (dataset labels; parity models read them mod 2)


@dataclass(frozen=True)
class TrapWeightsParams(ActiveParams):
    """Settings of the trap-weights attack."""

    activation: float = param(
        0.0, low=0.0, high=0.5, help="share of public inputs each neuron fires for (0: 2 / n)"
    )
    seed: int = param(0, low=0, help="seed of the re-drawn directions")
    match: float = param(
        1e-3, low=0.0, low_open=True, help="relative gap under which a candidate's gain verifies"
    )
    row_scale: Literal["unit", "honest"] = param(
        "unit",
        help="unit rows (the paper), or each trap neuron scaled to the honest biases' scale",
    )
    honest_rows: float = param(
        0.0, low=0.0, high=0.99, help="share of the layer's rows left honest (a disguise)"
    )


def first_layer(spec: ModelSpec) -> LinearLayer:
    """The first layer of ``spec``; it must be fully connected with a bias on the raw image."""
    layer = image_layer(spec)
    if isinstance(layer, str):
        raise ValueError(
            f"attack 'trap-weights' needs a model whose first layer is fully connected with a "
            f"bias on the raw image; model {spec.kind!r} has none"
        )
    return layer


def seen_by_layer(spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
    """Flat images as the first layer sees them (``centre_inputs`` maps [0, 1] to [-1, 1])."""
    flat = images.flatten(1).double()
    return flat * 2 - 1 if spec.centre_inputs else flat


def as_images(spec: ModelSpec, seen: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`seen_by_layer`, as (m, C, H, W) images in [0, 1]."""
    flat = (seen + 1) / 2 if spec.centre_inputs else seen
    return flat.reshape(-1, *spec.input_shape).clamp(0, 1).float()


def trap_layer(
    public: torch.Tensor, spec: ModelSpec, width: int, activation: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (width, d), bias (width,)): random unit rows, biases at the public quantile
    ``1 - activation`` of each row's projections."""
    seen = seen_by_layer(spec, public)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(width, seen.shape[1], generator=generator, dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True)
    cuts = torch.quantile(seen @ rows.T, 1.0 - activation, dim=0)
    return rows, -cuts


def rms(tensor: torch.Tensor) -> float:
    """Root mean square of ``tensor`` (0 for an empty one)."""
    return float(tensor.double().pow(2).mean().sqrt()) if tensor.numel() else 0.0


def disguise(
    rows: torch.Tensor,
    biases: torch.Tensor,
    honest_weight: torch.Tensor,
    honest_bias: torch.Tensor,
    params: TrapWeightsParams,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Trap ``rows`` and ``biases`` disguised per ``params`` next to the honest layer; and how
    many rows are traps.

    ``"honest"``: neuron i is multiplied by ``min(bias RMS / |b_i|, honest row RMS x sqrt(d))``
    (its bias at the honest biases' scale, its row never above an honest row's norm). The
    ``honest_rows`` share of rows (a seeded choice) keeps the honest weights.
    """
    rows, biases = rows.clone(), biases.clone()
    if params.row_scale == "honest":
        row_norm = honest_weight.double().norm(dim=1).median()
        factor = (rms(honest_bias) / biases.abs().clamp(min=1e-12)).clamp(max=float(row_norm))
        rows, biases = rows * factor[:, None], biases * factor
    width = rows.shape[0]
    kept = round(params.honest_rows * width)
    if kept:
        generator = torch.Generator().manual_seed(params.seed + 1)
        honest = torch.randperm(width, generator=generator)[:kept]
        rows[honest] = honest_weight[honest].double()
        biases[honest] = honest_bias[honest].double()
    return rows, biases, width - kept


def candidate_gains(
    spec: ModelSpec, weights: Weights, layer: LinearLayer, images: torch.Tensor, n: int
) -> torch.Tensor:
    """(m, classes, width): each image's gradient on the layer's pre-activations, per label,
    for the mean loss over ``n`` inputs (what it adds to ``db`` alone)."""
    model = build_model(spec).double()
    captured: list[torch.Tensor] = []

    def leaf(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = model.get_submodule(layer.module).register_forward_hook(leaf)
    state = {k: v.detach().double() for k, v in weights.items()}
    width = state[layer.bias].shape[0]
    gains = torch.zeros(images.shape[0], CLASSES, width, dtype=torch.float64)
    try:
        for label in range(CLASSES):
            captured.clear()
            logits = functional_call(model, state, (images.double(),))
            labels = torch.full((images.shape[0],), label, dtype=torch.int64)
            loss = task_loss(spec, logits, labels) * images.shape[0] / n
            gains[:, label] = torch.autograd.grad(loss, captured[0])[0]
    finally:
        handle.remove()
    return gains


@dataclass(frozen=True)
class Peeled:
    """Recovered inputs (as the layer sees them), their labels (-1: unverified), verified."""

    seen: torch.Tensor
    labels: torch.Tensor
    verified: int


def peel(
    obs: Observation, layer: LinearLayer, n: int, params: TrapWeightsParams, slack: float = 0.01
) -> Peeled:
    """Verified single inputs peeled off the first layer's gradient, then unverified fill."""
    gradient = {k: v.detach().double() for k, v in as_gradient(obs, "change").items()}
    if obs.meta.protocol == "fedavg":  # one local step: sent - returned = lr * gradient
        # The mean step in float64 (the gains are verified to 1e-3 of db), not as_gradient's
        # float32 "mean-step".
        steps = obs.meta.local_steps
        gradient = {k: v / (obs.meta.lr * steps) for k, v in gradient.items()}
    d_w, d_b = gradient[layer.weight].clone(), gradient[layer.bias].clone()
    low, high = (-1.0, 1.0) if obs.model.centre_inputs else (0.0, 1.0)
    floor = 1e-6 * float(d_b.abs().max())
    found: list[torch.Tensor] = []
    labels: list[int] = []
    for _ in range(4 * n + 8):
        live = (d_b.abs() > floor).nonzero().flatten()
        seen = d_w[live] / d_b[live, None]
        inside = ((seen >= low - slack) & (seen <= high + slack)).all(1)
        live, seen = live[inside], seen[inside].clamp(low, high)
        if len(live) == 0 or len(found) >= n:
            break
        images = as_images(obs.model, seen)
        gains = candidate_gains(obs.model, obs.global_weights, layer, images, n)
        own = gains[torch.arange(len(live)), :, live]
        gap, label = ((own - d_b[live, None]).abs() / d_b[live, None].abs()).min(1)
        accepted = 0
        for r in (gap < params.match).nonzero().flatten().tolist():
            if len(found) >= n:
                break
            if any(float((seen[r] - f).pow(2).mean().sqrt()) < 1e-4 for f in found):
                continue
            d_w -= gains[r, label[r], :, None] * seen[r][None, :]
            d_b -= gains[r, label[r]]
            found.append(seen[r])
            labels.append(int(label[r]))
            accepted += 1
        if not accepted:
            break
    verified = len(found)
    live = (d_b.abs() > floor).nonzero().flatten()
    order = live[d_b[live].abs().argsort(descending=True)]
    for row in order.tolist():  # the rest: in-box ratios, strongest neurons first
        if len(found) >= n:
            break
        seen_row = d_w[row] / d_b[row]
        inside = bool(((seen_row >= low - slack) & (seen_row <= high + slack)).all())
        if inside and all(float((seen_row - f).pow(2).mean().sqrt()) >= 1e-4 for f in found):
            found.append(seen_row.clamp(low, high))
            labels.append(-1)
    dims = d_w.shape[1]
    stacked = torch.stack(found) if found else torch.zeros(0, dims, dtype=torch.float64)
    return Peeled(stacked, torch.tensor(labels, dtype=torch.int64), verified)


def expected_alone(width: int, activation: float, samples: int) -> float:
    """Share of inputs alone on at least one neuron if neurons fired independently."""
    if samples <= 0:
        return math.nan
    alone = activation * (1 - activation) ** (samples - 1)
    return 1.0 - (1.0 - alone) ** width


@register_attack(
    "trap-weights",
    "Active: a re-drawn first layer whose neurons fire for few inputs; single inputs are "
    "verified and peeled off (Boenisch et al. 2023).",
)
class TrapWeights(ActiveAttack[TrapWeightsParams]):
    """Re-draws the first fully-connected layer; reads inputs and labels from its gradient."""

    Params = TrapWeightsParams

    def activation(self, samples: int) -> float:
        """The share of inputs each neuron should fire for, given ``samples`` expected."""
        return self.params.activation or min(0.5, 2.0 / max(samples, 1))

    def manipulate(self, plan: Plan) -> dict[int, SentModel]:
        layer = first_layer(plan.spec)
        width = plan.weights[layer.bias].shape[0]
        offers = {}
        for client in plan.clients:
            samples = plan.samples[client] or plan.federation.batch_size
            share = self.activation(samples)
            public = self.public_images()
            rows, biases = trap_layer(public, plan.spec, width, share, self.params.seed)
            weights = {k: v.detach().clone() for k, v in plan.weights.items()}
            rows, biases, traps = disguise(
                rows, biases, weights[layer.weight], weights[layer.bias], self.params
            )
            weights[layer.weight] = rows.to(weights[layer.weight].dtype)
            weights[layer.bias] = biases.to(weights[layer.bias].dtype)
            change = (
                f"first layer re-drawn: {width} trap neurons, each firing for "
                f"{share:.3g} of public inputs"
            )
            if traps < width or self.params.row_scale != "unit":  # the disguise, when used
                change += f"; disguised: {traps} trap rows, {self.params.row_scale} row scale"
            offers[client] = SentModel(plan.spec, weights, change, self.params.aggregate)
        return offers

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        start = time.perf_counter()
        results = []
        for obs in observations:
            layer = first_layer(obs.model)
            n = examples_behind(obs)
            found = peel(obs, layer, n, self.params)
            width = obs.global_weights[layer.bias].shape[0]
            predicted = expected_alone(width, self.activation(n), n)
            images = as_images(obs.model, found.seen)
            labels: torch.Tensor | None = found.labels
            if images.shape[0] == 0:
                images = torch.full((1, *obs.model.input_shape), 0.5)
                labels = torch.full((1,), -1, dtype=torch.int64)
            if is_binary(obs.model):
                labels = None
            trace = {"iteration": 0.0, "seconds": time.perf_counter() - start}
            results.append(
                Reconstruction(
                    round=obs.round,
                    client_id=obs.client_id,
                    images=images,
                    labels=labels,
                    trace=[trace],
                    status="converged",
                    notes=(
                        f"{found.verified} of {n} inputs verified and peeled from {width} trap "
                        f"neurons; {images.shape[0] - found.verified} unverified"
                    ),
                    confident=torch.arange(images.shape[0]) < found.verified,
                    objective="none",
                    predicted_share=predicted,
                )
            )
        return results
