"""Model zoo: the classifiers clients train and attacks invert, built from a public spec.

A model is described by a small, hashable :class:`ModelSpec` that travels in messages and
observations, so the server (and the attacker sitting in it) rebuilds exactly the network the
clients train without ever touching client state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from simulator.core.fields import derived, param
from simulator.core.registry import MODELS

Activation = Literal["relu", "sigmoid", "tanh"]
Pooling = Literal["avg", "max"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@dataclass(frozen=True)
class ModelSpec:
    """The ``[model]`` section: the public description of the classifier everyone rebuilds.

    ``input_shape`` and ``num_classes`` are derived when a scenario is validated (from the
    dataset and ``task``), never written in a scenario file.
    """

    kind: str = "mlp"
    widths: tuple[int, ...] = (100,)
    activation: Activation = "relu"
    bias: bool = True
    pooling: Pooling = "avg"
    channels: tuple[int, ...] = (8, 16)
    # "uniform": every parameter drawn from U(-0.5, 0.5), the initialisation of the iDLG code.
    init: Literal["default", "uniform"] = "default"
    # Multiplies every initial weight (homogeneous-mlp only): small inits put gradient descent
    # in the rich regime whose limit is a KKT point of margin maximisation (Haim et al. 2022).
    init_scale: float = param(1.0, low=0.0, low_open=True)
    # Multiplies the first layer's initial weight and bias (homogeneous-mlp only), on top of
    # ``init_scale``: Haim et al. start the first layer at PyTorch's default x 1e-4 and the other
    # layers at their default, so the first layer is (almost) the sum of its gradient steps.
    first_layer_scale: float = param(
        1.0, low=0.0, low_open=True, help="extra factor on the first layer's initial weights"
    )
    # "parity": one logit trained on odd/even (binary cross-entropy); binary-fc always is.
    task: Literal["classes", "parity"] = "classes"
    # The network first maps its [0, 1] input to 2 x - 1 (a fixed layer, no parameters): the
    # centred inputs of Haim et al., whose KKT reconstruction depends on them.
    centre_inputs: bool = False
    # An imprint block with this many neurons in front of the model (0: none). Honest servers
    # leave it at 0; a malicious server sends it to the clients it manipulates
    # (attacks/active/imprint.py), and each client builds the model the spec describes.
    imprint_bins: int = param(0, low=0, help="neurons of an imprint block in front (0: none)")
    input_shape: tuple[int, int, int] = derived((1, 28, 28))
    num_classes: int = derived(10)


# ``[model]`` keys that hold for every kind (the rest are read only by the kinds whose
# ``uses`` name them; a scenario that sets a key no kind of it reads is refused).
SHARED_MODEL_KEYS = frozenset({"kind", "init", "task", "centre_inputs", "imprint_bins"})


@dataclass(frozen=True)
class ModelBuilder:
    """What the model registry holds: the builder and the ``[model]`` keys it reads."""

    build: Callable[[ModelSpec], nn.Module]
    uses: frozenset[str] = field(default_factory=frozenset)


def register_model(
    name: str, description: str, uses: tuple[str, ...] = ()
) -> Callable[[Callable[[ModelSpec], nn.Module]], Callable[[ModelSpec], nn.Module]]:
    """Register a builder under the name scenario files use for ``model.kind``."""

    def decorate(build: Callable[[ModelSpec], nn.Module]) -> Callable[[ModelSpec], nn.Module]:
        MODELS.add(name, description, ModelBuilder(build, frozenset(uses)))
        return build

    return decorate


def _flat_size(shape: tuple[int, int, int]) -> int:
    channels, height, width = shape
    return channels * height * width


@register_model(
    "mlp",
    "Fully-connected network: hidden `widths`, `activation`, `bias` on or off.",
    uses=("widths", "activation", "bias"),
)
def build_mlp(spec: ModelSpec) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = _flat_size(spec.input_shape)
    for width in spec.widths:
        layers += [nn.Linear(width_in, width, bias=spec.bias), ACTIVATIONS[spec.activation]()]
        width_in = width
    layers.append(nn.Linear(width_in, spec.num_classes, bias=spec.bias))
    return nn.Sequential(*layers)


class _LeNet(nn.Module):
    """LeNet of DLG/iDLG: three stride-2/1 5x5 convolutions with sigmoid, one linear layer."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        channels, height, width = spec.input_shape
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        feature_size = 12 * ((height + 3) // 4) * ((width + 3) // 4)
        self.head = nn.Linear(feature_size, spec.num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(inputs).flatten(1))


@register_model("lenet", "LeNet of DLG/iDLG: sigmoid convolutions, one linear head.")
def build_lenet(spec: ModelSpec) -> nn.Module:
    return _LeNet(spec)


@register_model(
    "cnn",
    "Small CNN: 3x3 conv blocks of `channels`, `pooling` avg or max, `activation`, linear head.",
    uses=("channels", "pooling", "activation"),
)
def build_cnn(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(*_conv_blocks(spec, dense=()))


@register_model(
    "cnn-fc",
    "CNN with a dense hidden part: 3x3 conv blocks of `channels`, then hidden `widths`, linear "
    "head (channels [32, 64], widths [100]: the FEMNIST CNN of Dimitrov et al. 2022).",
    uses=("channels", "pooling", "activation", "widths"),
)
def build_cnn_fc(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(*_conv_blocks(spec, dense=spec.widths))


def _conv_blocks(spec: ModelSpec, dense: tuple[int, ...]) -> list[nn.Module]:
    """3x3 conv blocks of ``spec.channels`` (activation, 2x2 pooling), then hidden dense layers
    of widths ``dense`` (activation), then the linear head."""
    channels_in, height, width = spec.input_shape
    pool = nn.AvgPool2d if spec.pooling == "avg" else nn.MaxPool2d
    layers: list[nn.Module] = []
    for channels_out in spec.channels:
        layers += [
            nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1),
            ACTIVATIONS[spec.activation](),
            pool(2),
        ]
        channels_in, height, width = channels_out, height // 2, width // 2
    layers.append(nn.Flatten())
    width_in = channels_in * height * width
    for width_out in dense:
        layers += [nn.Linear(width_in, width_out), ACTIVATIONS[spec.activation]()]
        width_in = width_out
    layers.append(nn.Linear(width_in, spec.num_classes))
    return layers


@register_model(
    "binary-fc",
    "One fully-connected layer to a single logit: the binary classifier of the seed study.",
    uses=("bias",),
)
def build_binary_fc(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(spec.input_shape), 1, bias=spec.bias))


@register_model(
    "homogeneous-mlp",
    "ReLU MLP, bias on the first layer only, weights scaled by `init_scale` (the first layer "
    'also by `first_layer_scale`); `task = "parity"` gives one logit (binary parity).',
    uses=("widths", "init_scale", "first_layer_scale"),
)
def build_homogeneous_mlp(spec: ModelSpec) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = _flat_size(spec.input_shape)
    for index, width in enumerate(spec.widths):
        layers += [nn.Linear(width_in, width, bias=index == 0), nn.ReLU()]
        width_in = width
    layers.append(nn.Linear(width_in, spec.num_classes, bias=not spec.widths))
    model = nn.Sequential(*layers)
    if spec.init_scale != 1.0:
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(spec.init_scale)
    if spec.first_layer_scale != 1.0:
        first = model[1]  # model[0] is the Flatten
        with torch.no_grad():
            for weight in first.parameters():  # weight and bias
                weight.mul_(spec.first_layer_scale)
    return model


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Build the model ``spec`` names; with ``seed``, its initial weights are reproducible.

    With ``imprint_bins``, an :class:`ImprintBlock` goes in front, built after the model so
    that the model's own initial weights are those of the spec without it.
    """
    builder: ModelBuilder = MODELS.entry(spec.kind).value
    if seed is None:
        return _imprinted(_initialised(builder.build(spec), spec), spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _imprinted(_initialised(builder.build(spec), spec), spec)


IMPRINT = "imprint"  # the name of the imprint block: its parameters are "imprint.*"


class ImprintBlock(nn.Module):
    """``x + decoder(relu(encoder(x)))``: a fully-connected block that returns an image.

    Fowl et al.'s imprint ("Robbing the Fed", 2022) with a residual connection: the model
    behind it sees its input plus whatever the decoder adds. Freshly built the decoder is zero,
    so the block is the identity; the weights a malicious server sends decide what it does.
    """

    def __init__(self, shape: tuple[int, int, int], bins: int) -> None:
        super().__init__()
        size = _flat_size(shape)
        self.encoder = nn.Linear(size, bins)
        self.decoder = nn.Linear(bins, size)
        with torch.no_grad():
            self.decoder.weight.zero_()
            self.decoder.bias.zero_()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.encoder(inputs.flatten(1)))
        return inputs + self.decoder(hidden).reshape(inputs.shape)


def _imprinted(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """``model`` behind an imprint block of ``spec.imprint_bins`` neurons (if any).

    A sequential model keeps its parameter names ("0.weight" stays "0.weight"); any other
    model becomes "model.*".
    """
    if not spec.imprint_bins:
        return model
    block = ImprintBlock(spec.input_shape, spec.imprint_bins)
    children = (
        list(model.named_children()) if isinstance(model, nn.Sequential) else [("model", model)]
    )
    return nn.Sequential(OrderedDict([(IMPRINT, block), *children]))


@dataclass(frozen=True)
class SentModel:
    """What a malicious server sends one client instead of the honest global model.

    ``spec`` is the model the client builds (the honest spec, or one with an added block) and
    ``weights`` its state; ``change`` says in one line what differs from the honest model, for
    the run's "manipulation" record. ``aggregate``: whether the reply joins aggregation (only
    the honest model's parameters of it); by default it does not, so the global model the
    federation trains is not corrupted.
    """

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    change: str
    aggregate: bool = False


INITS = ("default", "uniform")


class Centre(nn.Module):
    """Maps [0, 1] images to [-1, 1]: the fixed first layer of ``centre_inputs`` models."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * 2 - 1


def _initialised(model: nn.Module, spec: ModelSpec) -> nn.Module:
    if spec.init == "uniform":
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.uniform_(-0.5, 0.5)
    elif spec.init != "default":
        raise ValueError(f"unknown init {spec.init!r}; choose one of {INITS}")
    if spec.centre_inputs:
        layers = list(model.children()) if isinstance(model, nn.Sequential) else [model]
        return nn.Sequential(Centre(), *layers)
    return model


def is_binary(spec: ModelSpec) -> bool:
    """Binary models emit one logit and train with binary cross-entropy."""
    return spec.kind == "binary-fc" or (spec.kind == "homogeneous-mlp" and spec.num_classes == 1)


def task_targets(spec: ModelSpec, labels: torch.Tensor) -> torch.Tensor:
    """Training targets for dataset labels: binary models learn parity (odd = 1, even = 0)."""
    return (labels % 2).float() if is_binary(spec) else labels


def task_loss(spec: ModelSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean training loss the clients minimise: cross-entropy, or BCE for binary models."""
    if is_binary(spec):
        return nn.functional.binary_cross_entropy_with_logits(
            logits.squeeze(-1), task_targets(spec, labels)
        )
    return nn.functional.cross_entropy(logits, labels)
