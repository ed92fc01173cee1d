"""Where an attack reads a model: its first linear layer (the closed-form first-layer attacks,
trap weights, the KKT subspace start) and its last one (label recovery).

Each is found on a model built from the public spec, so the names are those of the weights
the server sent. An attack that needs more of a layer (a bias, the raw image as input) checks
it here too, with the reason it gives when the model does not qualify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from simulator.core.models import ModelSpec, build_model, is_binary


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of a model: its module name, its parameter names, its input width."""

    module: str
    weight: str
    bias: str | None
    in_features: int


def _linear(name: str, module: nn.Linear) -> LinearLayer:
    prefix = f"{name}." if name else ""
    bias = f"{prefix}bias" if module.bias is not None else None
    return LinearLayer(name, f"{prefix}weight", bias, module.in_features)


def first_linear(spec: ModelSpec) -> LinearLayer | str:
    """The model's first layer with parameters, if it is an ``nn.Linear``; else why not.

    Parameter-free modules before it (``Flatten``, the fixed ``Centre`` of ``centre_inputs``
    models) are passed over; a convolution or any other parameterised layer first mixes the
    pixels before a dense layer sees them.
    """
    model = build_model(spec, seed=0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return _linear(name, module)
        if isinstance(module, nn.Conv2d):
            return f"first layer {name!r} is a convolution, not fully connected"
        if any(True for _ in module.parameters(recurse=False)):
            return f"first layer {name!r} is a {type(module).__name__}, not fully connected"
    return "the model has no linear layer"


def image_layer(spec: ModelSpec) -> LinearLayer | str:
    """The first layer if it is fully connected, has a bias and sees the raw image (the layer
    whose rows ``dW_i / db_i`` are the inputs); else why not."""
    layer = first_linear(spec)
    if isinstance(layer, str):
        return layer
    if layer.bias is None:
        return f"first layer {layer.module!r} has no bias: dW[i] / db[i] is undefined"
    if layer.in_features != math.prod(spec.input_shape):
        return f"first layer {layer.module!r} does not see the raw image"
    return layer


def final_layer(spec: ModelSpec, model: nn.Module | None = None) -> LinearLayer | None:
    """The last ``nn.Linear`` if it maps onto the classes (one logit for a binary model), else
    None. ``model``: the spec's model, when the caller has built it already."""
    model = model if model is not None else build_model(spec, seed=0)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, layer = linears[-1]
    if layer.out_features != (1 if is_binary(spec) else spec.num_classes):
        return None
    return _linear(name, layer)
