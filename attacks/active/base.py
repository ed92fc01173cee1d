"""Actively malicious attacks: the server changes the model it sends, then reads the update.

An :class:`ActiveAttack` has two halves. Before a round, :meth:`ActiveAttack.manipulate` gets a
:class:`Plan` (the round, the clients to manipulate, the honest model and public statistics)
and returns, per client, the :class:`~simulator.core.models.SentModel` the server sends in
place of the honest global model. After the round, :meth:`ActiveAttack.run` gets the
observations of the manipulated updates, like any attack, and reads the data out of them.
Everything :meth:`run` needs is in the observation: the model spec and the weights the server
sent that client (for a secure aggregate: their weighted mean), so the two halves share no state.

This folder is a leaf of ``attacks``: its modules import only :mod:`simulator.core` and each
other. :class:`ActiveAttack` therefore mirrors :class:`attacks.base.Attack` (validated
``Params``, ``run``) instead of subclassing it, and :func:`register_active_attack` registers
into the same :data:`~simulator.core.registry.ATTACKS` registry scenario files name attacks in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch

from simulator.core.config import FederationConfig
from simulator.core.fields import param
from simulator.core.models import IMPRINT, ModelSpec, SentModel, build_model
from simulator.core.protocol import Observation, Reconstruction
from simulator.core.registry import ATTACKS

ParamsT = TypeVar("ParamsT")
Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ActiveParams:
    """What every active attack takes (its own ``Params`` subclass this): whom to manipulate,
    and whether their replies still update the global model. The rounds are the scenario's
    ``attack.rounds`` (empty: every round)."""

    clients: tuple[int, ...] = param(
        (), help="clients sent the manipulated model (empty: every sampled client)"
    )
    aggregate: bool = param(
        False, help="let manipulated replies update the global model (default: leave them out)"
    )


@dataclass(frozen=True)
class Plan:
    """What the server knows when it manipulates a round, before any client has trained.

    ``clients`` are the sampled clients to manipulate (sorted), ``sampled`` all of the round's;
    ``weights`` are the honest global weights of ``spec``; ``samples`` the number of private
    samples expected behind each client's update (FedSGD: the batch size; FedAvg: the examples
    the client reported in an earlier round, or 0 when unknown); ``public`` holds public images
    (the test split the server evaluates on), (N, C, H, W) in [0, 1].
    """

    round: int
    clients: tuple[int, ...]
    sampled: tuple[int, ...]
    spec: ModelSpec
    weights: Mapping[str, torch.Tensor]
    federation: FederationConfig
    samples: Mapping[int, int]
    public: torch.Tensor
    secure_aggregation: bool


class ActiveAttack(ABC, Generic[ParamsT]):
    """An attack that manipulates the model it sends and attacks what comes back.

    Subclasses set ``Params`` to a frozen dataclass (with ``clients`` and ``aggregate``, see
    :class:`ActiveParams`) and are registered with :func:`register_active_attack`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type]

    def __init__(self, params: ParamsT | None = None) -> None:
        self.params: ParamsT = params if params is not None else self.Params()

    @abstractmethod
    def manipulate(self, plan: Plan) -> dict[int, SentModel]:
        """The model to send each of ``plan.clients`` (clients left out get the honest one)."""

    @abstractmethod
    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        """Attack every manipulated observation; one reconstruction per observation, in order."""


ActiveT = TypeVar("ActiveT", bound=type)


def register_active_attack(name: str, description: str) -> Callable[[ActiveT], ActiveT]:
    """Register an :class:`ActiveAttack` subclass under ``name`` in the attack registry."""

    def decorate(cls: ActiveT) -> ActiveT:
        if not (isinstance(cls, type) and issubclass(cls, ActiveAttack)):
            raise TypeError(f"attack {name!r}: {cls!r} is not an ActiveAttack subclass")
        return ATTACKS.decorator(name, description)(cls)

    return decorate


def is_active(name: str) -> bool:
    """Whether the registered attack ``name`` manipulates the model it sends."""
    value = ATTACKS.entry(name).value
    return isinstance(value, type) and issubclass(value, ActiveAttack)


def pseudo_gradient(obs: Observation) -> Weights:
    """The update as a positive multiple of the summed gradients: FedSGD as sent, FedAvg
    ``sent - returned`` (SGD steps subtract lr times each gradient)."""
    if obs.meta.protocol == "fedsgd":
        return {k: v.detach().double() for k, v in obs.update.items()}
    return {k: (obs.global_weights[k] - v).detach().double() for k, v in obs.update.items()}


def predicted_share(bins: int, samples: int) -> float:
    """Fowl et al.'s guarantee: the expected share of ``samples`` inputs alone in one of
    ``bins`` equal-mass bins, ``(1 - 1/k)^(n - 1)``."""
    if samples <= 0:
        return math.nan
    return (1.0 - 1.0 / bins) ** (samples - 1)


def principal_directions(public: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading principal directions of the public images, (count, d), unit norm.

    Signs are fixed (largest entry positive) so the same data always gives the same rows.
    """
    flat = public.flatten(1).double()
    centred = flat - flat.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    directions = vh[:count]
    signs = torch.sign(directions.gather(1, directions.abs().argmax(1, keepdim=True)))
    return directions * signs


def quantile_thresholds(projections: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins`` ascending cut points cutting ``projections`` into equal-mass bins.

    The first lies one spread below every public projection, so that every input fires the
    first neuron and lands in exactly one bin; the others are the public quantiles
    ``1/k, ..., (k-1)/k``.
    """
    values = projections.double()
    levels = torch.arange(1, bins, dtype=torch.float64) / bins
    cuts = torch.quantile(values, levels) if bins > 1 else values[:0]
    spread = float(values.max() - values.min()) or 1.0
    floor = values.min() - spread
    return torch.cat([floor.reshape(1), cuts])


def examples_behind(obs: Observation) -> int:
    """How many private samples produced the update (the union of batches for an aggregate)."""
    return int(obs.meta.num_examples)


def with_block(spec: ModelSpec, honest: Mapping[str, torch.Tensor], block: Weights) -> Weights:
    """The weights of ``spec`` (the honest spec plus an imprint block): the honest weights
    for the model behind the block, ``block`` ("imprint.*") for the block, in the order the
    client's model lists them."""
    names = list(build_model(spec, seed=0).state_dict())
    body = [n for n in names if not n.startswith(f"{IMPRINT}.")]
    if len(body) != len(honest):
        raise ValueError(f"model {spec.kind!r}: {len(body)} body tensors, {len(honest)} sent")
    renamed = dict(zip(body, honest.values(), strict=True))
    return {n: (block[n] if n in block else renamed[n]).detach().clone() for n in names}


def imprint_block(
    spec: ModelSpec,
    directions: torch.Tensor,
    thresholds: torch.Tensor,
    gain: float,
    scale: float,
) -> Weights:
    """An imprint block of ``spec.imprint_bins`` neurons: neuron i fires when
    ``directions[i] . x > thresholds[i]``; muted neurons (zero direction) never fire.

    Rows and thresholds are multiplied by ``scale`` (the bins stay: relu is positively
    homogeneous), and every decoder weight is ``gain / bins``, so that each neuron passes the
    same gradient back ("cumulative" bins) and the image the model behind sees moves by at most
    ``gain * scale`` times the largest projection.
    """
    bins = spec.imprint_bins
    size = math.prod(spec.input_shape)
    return {
        f"{IMPRINT}.encoder.weight": (directions * scale).float(),
        f"{IMPRINT}.encoder.bias": (-thresholds * scale).float(),
        f"{IMPRINT}.decoder.weight": torch.full((size, bins), gain / bins),
        f"{IMPRINT}.decoder.bias": torch.zeros(size),
    }
