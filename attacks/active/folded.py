"""The imprint folded into the model's own first layer: no added tensor, honest-looking scales.

A disguise against a client that inspects the model it is sent (:mod:`defenses.inspection`):
instead of an added block, ``bins`` rows of the existing first fully-connected layer become
imprint bins (rows along public principal directions, biases at the public quantiles), and the
columns of the next layer that read those neurons are all set to one column, so that each bin
passes the same gradient back from a given input. That is what the block's equal decoder
weights do, and it is all :func:`attacks.active.decoding.decode` needs: the bins' gradient
rows difference into single inputs as in the block. The rest of the layer stays honest.

Each bin neuron (row and bias together) is scaled so that its row has at most ``scale`` times
the median norm of the honest rows and its bias at most the root mean square of the honest
biases (relu is positively homogeneous: it fires for the same inputs, and the gradient rows it
gets do not depend on its scale). So every tensor keeps about its honest root mean square.
Which rows become bins is a seeded choice, so the reading half finds them again from the
attack's parameters alone.
"""

from __future__ import annotations

import torch
from torch import nn

from attacks.common.layers import LinearLayer, image_layer
from simulator.core.models import ModelSpec, build_model

Weights = dict[str, torch.Tensor]


def layers(spec: ModelSpec) -> tuple[LinearLayer, LinearLayer]:
    """The first layer (fully connected with a bias on the raw image) and the linear layer that
    reads its neurons; ValueError when the model has no such pair."""
    first = image_layer(spec)
    if isinstance(first, str):
        raise ValueError(f"a folded imprint needs a dense first layer with a bias: {first}")
    if spec.centre_inputs:
        raise ValueError("a folded imprint reads raw images; this model centres its inputs")
    model = build_model(spec, seed=0)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    width = model.get_submodule(first.module).out_features
    if len(linears) < 2 or linears[1][1].in_features != width:
        raise ValueError("a folded imprint needs a linear layer right after the first one")
    name, module = linears[1]
    prefix = f"{name}." if name else ""
    bias = f"{prefix}bias" if module.bias is not None else None
    return first, LinearLayer(name, f"{prefix}weight", bias, module.in_features)


def bin_rows(width: int, bins: int, seed: int) -> torch.Tensor:
    """The rows of a ``width``-neuron layer that hold the ``bins`` bins (seeded, ascending)."""
    if bins > width:
        raise ValueError(
            f"a folded imprint of {bins} bins needs as many first-layer neurons; "
            f"the layer has {width}"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(width, generator=generator)[:bins].sort().values


def fold(
    spec: ModelSpec,
    honest: Weights,
    directions: torch.Tensor,
    thresholds: torch.Tensor,
    scale: float,
    seed: int,
) -> Weights:
    """``honest`` with bins folded into the first layer: row ``i`` of the chosen rows fires
    when ``directions[i] . x > thresholds[i]``; the next layer reads them all with one column."""
    first, second = layers(spec)
    weights = {k: v.detach().clone() for k, v in honest.items()}
    rows = bin_rows(weights[first.weight].shape[0], directions.shape[0], seed)
    norm = float(weights[first.weight].double().norm(dim=1).median()) * scale
    bias = weights[first.bias or ""]
    bias_rms = float(bias.double().pow(2).mean().sqrt())
    factor = (bias_rms / thresholds.double().abs().clamp(min=1e-12)).clamp(max=norm)
    units = directions.double() / directions.double().norm(dim=1, keepdim=True)
    dtype = weights[first.weight].dtype
    weights[first.weight][rows] = (units * factor[:, None]).to(dtype)
    bias[rows] = (-thresholds.double() * factor).to(dtype)
    column = weights[second.weight][:, rows[0]].clone()
    weights[second.weight][:, rows] = column[:, None].expand(-1, len(rows))
    return weights
