"""An example leaksim plugin file: one attack and one defense (walked through in docs/plugins.md).

    leaksim list --plugin docs/examples/my_plugins.py
    leaksim run docs/examples/my_plugins.toml     # the scenario lists this file in `plugins`

Plugin files register with the decorators the built-ins use; their names are then valid in
scenario files and their parameters are validated like the built-ins' (frozen dataclasses whose
fields declare ranges with ``param``). Like the built-in attacks and defenses, this file imports
only ``attacks.base`` and ``attacks.common`` (the helpers the built-in attacks share),
``defenses.base`` and ``simulator.core``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attacks.base import Attack, register_attack
from attacks.common.layers import image_layer
from attacks.common.updates import as_gradient
from defenses.base import UpdateDefense, flatten, register_defense, unflatten
from simulator.core.fields import param
from simulator.core.protocol import Observation, Reconstruction

# --- The attack -------------------------------------------------------------------------------
# For a first layer z = W x + b, row i of the gradient is dW[i] = mean_b d_bi x_b and
# db[i] = mean_b d_bi, so dW[i] / db[i] is an image whenever one sample alone reaches neuron i.
# The attack turns the rows with the most gradient mass into candidate images.


@dataclass(frozen=True)
class RowRatioParams:
    """Parameters of "row-ratio" (scenario: ``[attack.params]``)."""

    candidates: int = param(64, low=1, help="how many first-layer rows become candidate images")
    box_slack: float = param(
        0.05, low=0.0, high=1.0, help="how far outside [0, 1] a candidate's pixels may go"
    )


@register_attack("row-ratio", "Example plugin: candidate images dW[i] / db[i] of first-layer rows.")
class RowRatio(Attack[RowRatioParams]):
    """Closed form; reads nothing but the Observation (what the server received)."""

    Params = RowRatioParams

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        start = time.perf_counter()
        return [self.attack_one(obs, start) for obs in observations]

    def attack_one(self, obs: Observation, start: float) -> Reconstruction:
        # The first layer's names, from the public model description (or why it has none).
        layer = image_layer(obs.model)
        if isinstance(layer, str):
            raise ValueError(f"row-ratio needs a fully-connected first layer with a bias: {layer}")
        # FedSGD: the gradient; FedAvg: global minus returned weights, a sum of gradient steps
        # (any positive multiple of the gradients gives the same ratios).
        gradient = as_gradient(obs, "change")
        d_weight, d_bias = gradient[layer.weight].double(), gradient[layer.bias].double()
        rows = d_bias.abs().argsort(descending=True)
        rows = rows[d_bias[rows].abs() > 1e-12]  # neurons no sample reached carry no image
        ratios = d_weight[rows] / d_bias[rows, None]
        if obs.model.centre_inputs:  # such a model's first layer sees 2x - 1, not x
            ratios = (ratios + 1) / 2
        slack = self.params.box_slack
        inside = ((ratios >= -slack) & (ratios <= 1 + slack)).all(dim=1)
        kept = ratios[inside][: self.params.candidates]
        if len(kept) == 0:  # nothing image-like: one grey guess, so scoring stays defined
            kept = torch.full((1, d_weight.shape[1]), 0.5, dtype=torch.float64)
        images = kept.reshape(-1, *obs.model.input_shape).clamp(0, 1).float()
        seconds = time.perf_counter() - start
        return Reconstruction(
            round=obs.round,
            client_id=obs.client_id,
            images=images,
            labels=None,
            trace=[{"iteration": 0, "seconds": seconds}],
            status="converged",  # a closed form (the server fills in `attack`)
            objective="none",  # nothing minimised, so the trace holds no objective value
            notes=f"{int(inside.sum())} of {len(rows)} active rows inside the pixel box",
            matching="nearest",  # candidates: each true image is scored against its best one
        )


# --- The defense ------------------------------------------------------------------------------
# signSGD-style compression: the client sends only signs, scaled by one magnitude, and zeroes
# all but the largest `fraction` of coordinates. Under FedAvg it acts on the weight change.


@dataclass(frozen=True)
class SignCompressionParams:
    """Parameters of "sign-compression" (scenario: keys of its ``[[defenses]]`` table)."""

    fraction: float = param(
        1.0,
        low=0.0,
        high=1.0,
        low_open=True,
        help="share of coordinates (largest magnitudes first) that keep their sign",
    )


@register_defense(
    "sign-compression", "Example plugin: sign of each coordinate times the mean kept magnitude."
)
class SignCompression(UpdateDefense):
    """Changes what the server observes: only signs and one scale per update leave the client."""

    Params = SignCompressionParams
    params: SignCompressionParams

    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        flat = flatten(update)
        if flat.numel() == 0:
            return {name: tensor.clone() for name, tensor in update.items()}
        keep = max(1, math.ceil(self.params.fraction * flat.numel()))
        threshold = flat.abs().kthvalue(flat.numel() - keep + 1).values  # keep-th largest |x|
        kept = flat.abs() >= threshold
        scale = flat.abs()[kept].mean()
        return unflatten(torch.sign(flat) * kept * scale, update)  # deterministic: no generator
