"""The first-layer subspace attack over every round a client took part in ("subspace-rounds").

A client's shard is fixed, so each update it sends is computed from the same images. Under
FedAvg its first-layer change lies in the span of its whole shard in every round
(:mod:`attacks.first_layer.subspace`); under FedSGD each round's gradient lies in the span of
that round's batch, drawn from the same shard. Stacking the changes of every update one client
sent, one above the other, keeps that span (the union of the batches' under FedSGD) while the
signal's singular values add up across rounds and independent noise adds up only in
quadrature: with ``T`` updates the signal grows like ``T`` in energy and the noise's edge like
``sqrt(T out) + sqrt(D)``, so a known noise floor (``noise_std``) is cleared by directions
that no single round lifts above it.

What the server must know, all of which a server has:

- the client id of each update (it receives the update from that client; the
  :class:`Observation`'s ``client_id``);
- the model it sent that round (``global_weights``) and what came back (``update``);
- the public protocol settings (``meta``: FedSGD or FedAvg, the example count the client
  reports) and, for ``noise_std``, the defense's public configuration.

It never needs the client's data, its sampling, or which images a round used. The attack keeps
one first-layer change per update it has seen (:meth:`RoundsAttack.remember` gets every round's
updates, attacked or not: :attr:`attacks.base.Attack.keeps_history`); ``updates`` caps how
many of a client's most recent ones a reconstruction uses (0: all), which is how leakage is
measured against the number of updates.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attacks.base import Attack, register_attack
from attacks.common.layers import first_linear
from attacks.first_layer.subspace import (
    SubspaceParams,
    first_layer_subspace,
    fit_decay,
    select_candidates,
    span_reconstruction,
    sparse_vectors,
)
from simulator.core.fields import param
from simulator.core.knowledge import DefenseKnowledge
from simulator.core.protocol import Observation, Reconstruction


@dataclass(frozen=True)
class RoundsParams(SubspaceParams):
    """Settings of "subspace-rounds": the subspace attack's, and how many updates to use."""

    updates: int = param(
        0, low=0, help="the client's most recent updates a reconstruction uses; 0: all seen"
    )


@dataclass(frozen=True)
class Seen:
    """One update as the attack keeps it: the round, its first-layer change (out, D) and the
    example count the client reported."""

    round: int
    change: torch.Tensor
    examples: int


def first_layer_change(obs: Observation) -> torch.Tensor:
    """The update's first-layer change, (out, D) in float64: the FedSGD gradient itself, or
    the FedAvg weights sent back less the fitted decay of the global ones."""
    layer = first_linear(obs.model)
    if isinstance(layer, str):  # convolutions mix pixels before any dense layer sees them
        raise ValueError(
            f"subspace-rounds needs a fully-connected first layer; model {obs.model.kind!r} "
            "starts with another parameterised layer"
        )
    sent = obs.update[layer.weight].detach().double().cpu()
    sent = sent.reshape(sent.shape[0], -1)
    if obs.meta.protocol == "fedsgd":
        return sent
    initial = obs.global_weights[layer.weight].detach().double().cpu().reshape(sent.shape)
    return sent - fit_decay(sent, initial, max(1, obs.meta.num_examples)) * initial


@register_attack(
    "subspace-rounds",
    "First-layer subspace from every update one client sent over the rounds seen (stacked "
    "changes; known noise thresholded at its edge); needs a fully-connected first layer.",
)
class RoundsAttack(Attack[RoundsParams]):
    """Candidates from the stacked first-layer changes of a client's updates, scored by
    nearest match; labels as the subspace attack's (the client's own model, FedAvg only)."""

    Params = RoundsParams
    keeps_history = True

    def adapted_params(self, knowledge: DefenseKnowledge) -> dict[str, object]:
        """The stacked span above the known noise's edge (intervals are not used here)."""
        return {"noise_std": knowledge.noise_std}

    def __init__(self, params: RoundsParams | None = None) -> None:
        super().__init__(params)
        self.history: dict[int, list[Seen]] = defaultdict(list)

    def remember(self, observations: Sequence[Observation]) -> None:
        for obs in observations:
            if not isinstance(obs, Observation):
                raise TypeError(f"subspace-rounds takes Observations, got {type(obs)}")
            if obs.client_id < 0:  # an aggregate is no one client's update
                continue
            seen = self.history[obs.client_id]
            if any(s.round == obs.round for s in seen):
                continue
            seen.append(Seen(obs.round, first_layer_change(obs), obs.meta.num_examples))

    def used(self, obs: Observation) -> list[Seen]:
        """The client's updates up to ``obs``'s round, the most recent ``updates`` of them."""
        seen = [s for s in self.history.get(obs.client_id, []) if s.round <= obs.round]
        if not any(s.round == obs.round for s in seen):  # run() without remember()
            seen.append(Seen(obs.round, first_layer_change(obs), obs.meta.num_examples))
        seen.sort(key=lambda s: s.round)
        return seen[-self.params.updates :] if self.params.updates else seen

    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        return [self._attack(obs) for obs in observations]

    def _attack(self, obs: Observation) -> Reconstruction:
        p = self.params
        start = time.perf_counter()
        used = self.used(obs)
        stacked = torch.cat([s.change for s in used])
        # FedAvg trains on the whole shard every round; FedSGD's batches differ, so their
        # spans add up (to at most the shard, which the server does not know).
        fedsgd = obs.meta.protocol == "fedsgd"
        rank = sum(s.examples for s in used) if fedsgd else max(s.examples for s in used)
        subspace = first_layer_subspace(stacked, None, rank, noise_std=p.noise_std)
        count = max(2, math.ceil(p.candidates * subspace.rank))
        generator = torch.Generator().manual_seed(p.seed)
        vectors = sparse_vectors(subspace.basis, p.starts, p.sparsity, generator=generator)
        images = select_candidates(vectors, count).float().reshape(-1, *obs.model.input_shape)
        notes = (
            f"{images.shape[0]} candidates from {len(used)} update(s) of client "
            f"{obs.client_id} (rounds {used[0].round}-{used[-1].round}); rank "
            f"{subspace.rank} of {subspace.basis.shape[1]} input dims"
        )
        return span_reconstruction(obs, images, subspace, self.name, notes, start)
