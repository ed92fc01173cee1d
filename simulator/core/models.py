"""Model zoo: the classifiers clients train and attacks invert, built from a public spec.

A model is described by a small, hashable :class:`ModelSpec` that travels in messages and
observations, so the server (and the attacker sitting in it) rebuilds exactly the network the
clients train without ever touching client state. The keys every kind reads are the spec's own
fields; the rest are the kind's ``params``, a frozen dataclass registered with its builder and
validated like an attack's parameters (``MODELS.validate``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

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

    The fields are the keys every kind reads; ``params`` holds the keys only ``kind`` reads
    (the ``Params`` its builder was registered with, None for a kind that takes none; left
    out, the kind's defaults), written in the same ``[model]`` table. ``input_shape`` and
    ``num_classes`` are derived when a scenario is validated (from the dataset and ``task``),
    never written in a scenario file. :func:`model_spec` builds one from flat keys.
    """

    kind: str = "mlp"
    # "uniform": every parameter drawn from U(-0.5, 0.5), the initialisation of the iDLG code.
    init: Literal["default", "uniform"] = "default"
    # "parity": one logit trained on odd/even (binary cross-entropy); binary-fc always is.
    task: Literal["classes", "parity"] = "classes"
    # The network first maps its [0, 1] input to 2 x - 1 (a fixed layer, no parameters): the
    # centred inputs of Haim et al., whose KKT reconstruction depends on them.
    centre_inputs: bool = False
    # An imprint block with this many neurons in front of the model (0: none). Honest servers
    # leave it at 0; a malicious server sends it to the clients it manipulates
    # (attacks/active/imprint.py), and each client builds the model the spec describes.
    imprint_bins: int = param(0, low=0, help="neurons of an imprint block in front (0: none)")
    params: Any = derived(None)  # noqa: RUF009  (None: immutable, like every derived default)
    input_shape: tuple[int, int, int] = derived((1, 28, 28))
    num_classes: int = derived(10)

    def __post_init__(self) -> None:
        if self.params is None:  # the kind's defaults (ValueError for an unknown kind)
            object.__setattr__(self, "params", MODELS.validate(self.kind, {}))


def model_spec(kind: str = "mlp", **keys: Any) -> ModelSpec:
    """A :class:`ModelSpec` from flat ``[model]`` keys (``model_spec("mlp", widths=(64,))``):
    the keys every kind reads go to the spec, the others are validated as ``kind``'s params."""
    shared = {k: keys.pop(k) for k in list(keys) if k in MODEL_SPEC_KEYS}
    return ModelSpec(kind, params=MODELS.validate(kind, keys), **shared)


# The keys of a [model] table that are the spec's own (every kind reads them).
MODEL_SPEC_KEYS = frozenset(
    {"kind", "init", "task", "centre_inputs", "imprint_bins", "input_shape", "num_classes"}
)


@dataclass(frozen=True)
class MlpParams:
    """Parameters of "mlp"."""

    widths: tuple[int, ...] = param((100,), low=1, help="hidden layer widths")
    activation: Activation = "relu"
    bias: bool = True


@dataclass(frozen=True)
class CnnParams:
    """Parameters of "cnn"."""

    channels: tuple[int, ...] = param((8, 16), low=1, help="channels of the 3x3 conv blocks")
    pooling: Pooling = "avg"
    activation: Activation = "relu"


@dataclass(frozen=True)
class CnnFcParams(CnnParams):
    """Parameters of "cnn-fc": the cnn's, and the widths of the dense hidden part."""

    widths: tuple[int, ...] = param((100,), low=1, help="hidden dense layer widths")


@dataclass(frozen=True)
class BinaryFcParams:
    """Parameters of "binary-fc"."""

    bias: bool = True


@dataclass(frozen=True)
class HomogeneousMlpParams:
    """Parameters of "homogeneous-mlp"."""

    widths: tuple[int, ...] = param((100,), low=1, help="hidden layer widths")
    # Multiplies every initial weight: small inits put gradient descent in the rich regime
    # whose limit is a KKT point of margin maximisation (Haim et al. 2022).
    init_scale: float = param(1.0, low=0.0, low_open=True, help="factor on every initial weight")
    # Multiplies the first layer's initial weight and bias, on top of ``init_scale``: Haim et
    # al. start the first layer at PyTorch's default x 1e-4 and the other layers at their
    # default, so the first layer is (almost) the sum of its gradient steps.
    first_layer_scale: float = param(
        1.0, low=0.0, low_open=True, help="extra factor on the first layer's initial weights"
    )


Builder = Callable[[ModelSpec], nn.Module]


def register_model(
    name: str, description: str, params: type | None = None
) -> Callable[[Builder], Builder]:
    """Register a builder under the name scenario files use for ``model.kind``; ``params``, a
    frozen dataclass, declares the ``[model]`` keys it reads besides the spec's own."""

    def decorate(build: Builder) -> Builder:
        MODELS.add(name, description, build, params)
        return build

    return decorate


def _flat_size(shape: tuple[int, int, int]) -> int:
    channels, height, width = shape
    return channels * height * width


@register_model(
    "mlp", "Fully-connected network: hidden `widths`, `activation`, `bias` on or off.", MlpParams
)
def build_mlp(spec: ModelSpec) -> nn.Module:
    params: MlpParams = spec.params
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = _flat_size(spec.input_shape)
    for width in params.widths:
        layers += [nn.Linear(width_in, width, bias=params.bias), ACTIVATIONS[params.activation]()]
        width_in = width
    layers.append(nn.Linear(width_in, spec.num_classes, bias=params.bias))
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
    CnnParams,
)
def build_cnn(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(*_conv_blocks(spec, dense=()))


@register_model(
    "cnn-fc",
    "CNN with a dense hidden part: 3x3 conv blocks of `channels`, then hidden `widths`, linear "
    "head (channels [32, 64], widths [100]: the FEMNIST CNN of Dimitrov et al. 2022).",
    CnnFcParams,
)
def build_cnn_fc(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(*_conv_blocks(spec, dense=spec.params.widths))


def _conv_blocks(spec: ModelSpec, dense: tuple[int, ...]) -> list[nn.Module]:
    """3x3 conv blocks of ``channels`` (activation, 2x2 pooling), then hidden dense layers of
    widths ``dense`` (activation), then the linear head."""
    params: CnnParams = spec.params
    channels_in, height, width = spec.input_shape
    pool = nn.AvgPool2d if params.pooling == "avg" else nn.MaxPool2d
    layers: list[nn.Module] = []
    for channels_out in params.channels:
        layers += [
            nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1),
            ACTIVATIONS[params.activation](),
            pool(2),
        ]
        channels_in, height, width = channels_out, height // 2, width // 2
    layers.append(nn.Flatten())
    width_in = channels_in * height * width
    for width_out in dense:
        layers += [nn.Linear(width_in, width_out), ACTIVATIONS[params.activation]()]
        width_in = width_out
    layers.append(nn.Linear(width_in, spec.num_classes))
    return layers


@register_model(
    "binary-fc",
    "One fully-connected layer to a single logit: the binary classifier of the seed study.",
    BinaryFcParams,
)
def build_binary_fc(spec: ModelSpec) -> nn.Module:
    bias = spec.params.bias
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(spec.input_shape), 1, bias=bias))


@register_model(
    "homogeneous-mlp",
    "ReLU MLP, bias on the first layer only, weights scaled by `init_scale` (the first layer "
    'also by `first_layer_scale`); `task = "parity"` gives one logit (binary parity).',
    HomogeneousMlpParams,
)
def build_homogeneous_mlp(spec: ModelSpec) -> nn.Module:
    params: HomogeneousMlpParams = spec.params
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = _flat_size(spec.input_shape)
    for index, width in enumerate(params.widths):
        layers += [nn.Linear(width_in, width, bias=index == 0), nn.ReLU()]
        width_in = width
    layers.append(nn.Linear(width_in, spec.num_classes, bias=not params.widths))
    model = nn.Sequential(*layers)
    if params.init_scale != 1.0:
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(params.init_scale)
    if params.first_layer_scale != 1.0:
        first = model[1]  # model[0] is the Flatten
        with torch.no_grad():
            for weight in first.parameters():  # weight and bias
                weight.mul_(params.first_layer_scale)
    return model


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Build the model ``spec`` names; with ``seed``, its initial weights are reproducible.

    With ``imprint_bins``, an :class:`ImprintBlock` goes in front, built after the model so
    that the model's own initial weights are those of the spec without it.
    """
    build: Builder = MODELS.entry(spec.kind).value
    if seed is None:
        return _imprinted(_initialised(build(spec), spec), spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _imprinted(_initialised(build(spec), spec), spec)


def model_with_weights(spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model ``spec`` names, holding ``weights`` (strict: every entry of its state).

    Built without drawing initial weights that would be overwritten at once (on the meta
    device, then given the tensors), which is most of the cost of a fresh model in a client's
    round; the global random state is left as it was. A model whose state is not all in
    ``weights`` (non-persistent buffers) is built and initialised the ordinary way.
    """
    with torch.device("meta"):
        model = build_model(spec)
    model.load_state_dict({k: v.clone() for k, v in weights.items()}, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_model(spec)
        model.load_state_dict(dict(weights), strict=True)
    return model


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


# Below this per-example log-loss argument, log(softplus(r)) is r to double precision (the
# next term, -exp(r) / 2, is below 1e-9 relative); the exact form would underflow to log(0).
_LOG_SOFTPLUS_TAIL = -20.0


def log_task_loss(spec: ModelSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log`` of :func:`task_loss`, in float64, finite however small the loss gets.

    Each example's loss is ``softplus(r_i)``: ``r = -(2 t - 1) z`` for a binary model,
    ``logsumexp_{j != y} (z_j - z_y)`` for cross-entropy. Once the data are fitted ``r`` runs
    to minus hundreds, where the loss underflows float32 (and later float64), but
    ``log softplus(r)`` does not, and nor does its gradient.
    """
    logits = logits.double()
    if is_binary(spec):
        r = -(task_targets(spec, labels).double() * 2 - 1) * logits.squeeze(-1)
    else:
        own = logits.gather(1, labels[:, None])
        others = logits.scatter(1, labels[:, None], -torch.inf)
        r = torch.logsumexp(others - own, dim=1)
    # The clamp keeps the unused branch finite, so that its (masked) gradient is not NaN.
    exact = torch.log(nn.functional.softplus(r.clamp_min(_LOG_SOFTPLUS_TAIL)))
    per_example = torch.where(r < _LOG_SOFTPLUS_TAIL, r - torch.exp(r) / 2, exact)
    return torch.logsumexp(per_example, dim=0) - torch.log(
        torch.tensor(float(r.shape[0]), dtype=torch.float64)
    )
