"""Actively malicious attacks: the server changes the model it sends, then reads the update.

An :class:`ActiveAttack` is an :class:`~attacks.base.Attack` with a second half. Before a
round, :meth:`ActiveAttack.manipulate` gets a :class:`Plan` (the round, the clients to
manipulate, the honest model) and returns, per client, the
:class:`~simulator.core.models.SentModel` the server sends in place of the honest global model;
its public statistics come from :attr:`~attacks.base.Attack.public`, which the malicious server
sets on every attack alike. After the round, :meth:`ActiveAttack.run` gets the observations of
the manipulated updates, like any attack, and reads the data out of them. Everything
:meth:`run` needs is in the observation: the model spec and the weights the server sent that
client (for a secure aggregate: their weighted mean), so the two halves share no state.

Active attacks are registered with :func:`~attacks.base.register_attack`, like every attack;
the malicious server tells them apart by their class.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from attacks.base import Attack
from simulator.core.config import FederationConfig
from simulator.core.fields import param
from simulator.core.models import IMPRINT, ModelSpec, SentModel, build_model
from simulator.core.protocol import Observation

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
    the client reported in an earlier round, or 0 when unknown).
    """

    round: int
    clients: tuple[int, ...]
    sampled: tuple[int, ...]
    spec: ModelSpec
    weights: Mapping[str, torch.Tensor]
    federation: FederationConfig
    samples: Mapping[int, int]
    secure_aggregation: bool


class ActiveAttack(Attack[ParamsT]):
    """An attack that manipulates the model it sends and attacks what comes back.

    Subclasses set ``Params`` to a frozen dataclass (with ``clients`` and ``aggregate``, see
    :class:`ActiveParams`) and are registered with :func:`~attacks.base.register_attack`.
    """

    @abstractmethod
    def manipulate(self, plan: Plan) -> dict[int, SentModel]:
        """The model to send each of ``plan.clients`` (clients left out get the honest one)."""

    def public_images(self) -> torch.Tensor:
        """The server's public images, (N, C, H, W) in [0, 1] (the test split it evaluates
        on), which the manipulated models are fitted to."""
        if self.public is None:
            raise ValueError(f"attack {self.name!r} needs the server's public data to plan")
        return self.public.images


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
