"""The honest client: its shard, its defenses, and the update it computes for a round.

Update defenses (noise, clipping, pruning, quantization) transform what the client sends, in
the scenario's order: the gradient under FedSGD, the weight change under FedAvg (the global
weights are added back afterwards). A training defense (DP-SGD) replaces local training. Client
mods wrap the reply (:mod:`simulator.federation.client_mods`); aggregation defenses act on the
server's side (:mod:`simulator.federation.secagg`). The same :func:`compute_update` serves the
Message-API client and the SecAgg+ client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from defenses.base import TrainingDefense, UpdateDefense, compose
from simulator.core.config import FederationConfig, Scenario
from simulator.core.devices import move, resolve_device
from simulator.core.models import ModelSpec, model_with_weights
from simulator.core.protocol import NUM_EXAMPLES_KEY, Truth
from simulator.core.seeding import seeded_generator
from simulator.data.shards import Shard, load_shard
from simulator.federation.training import batch_gradient, local_train
from simulator.federation.truth import TruthStore


class InjectedCrash(RuntimeError):
    """A crash the scenario's ``[faults]`` table asked for."""


@dataclass(frozen=True)
class ClientDefenses:
    """The defenses one client applies: at most one training defense, then update defenses."""

    training: TrainingDefense | None
    update: Sequence[UpdateDefense]

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> ClientDefenses:
        defenses = scenario.built_defenses
        training = [d for d in defenses if isinstance(d, TrainingDefense)]
        return cls(
            training[0] if training else None,
            [d for d in defenses if isinstance(d, UpdateDefense)],
        )

    def batch(self, shard_size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The FedSGD batch: a seeded draw of ``batch_size``, or the training defense's draw."""
        if self.training is not None:
            return self.training.fedsgd_batch(shard_size, batch_size, generator)
        return torch.randperm(shard_size, generator=generator)[:batch_size]

    def gradient(
        self,
        model: nn.Module,
        spec: ModelSpec,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        expected_batch: int,
    ) -> dict[str, torch.Tensor]:
        """The FedSGD update: the (private) batch gradient, then the update defenses."""
        if self.training is not None:
            gradient = self.training.gradient(
                model, spec, inputs, labels, generator, denominator=float(expected_batch)
            )
        else:
            gradient = batch_gradient(model, spec, inputs, labels)
        return compose(self.update, gradient, generator)

    def train(
        self,
        model: nn.Module,
        spec: ModelSpec,
        shard: Shard,
        fed: FederationConfig,
        generator: torch.Generator,
    ) -> float:
        """FedAvg local training, private when DP-SGD is on; returns the last epoch's loss."""
        if self.training is not None:
            return self.training.local_train(
                model, spec, shard.inputs, shard.labels, fed.local_epochs, fed.batch_size,
                fed.lr, generator,
            )  # fmt: skip
        return local_train(
            model,
            spec,
            shard,
            fed.local_epochs,
            fed.batch_size,
            fed.lr,
            generator,
            fed.weight_decay,
            fed.lr_schedule,
        )

    def weights(
        self, sent: dict[str, torch.Tensor], model: nn.Module, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The FedAvg update: defenses act on the weight change, then it is added back."""
        trained = {name: p.detach() for name, p in model.named_parameters()}
        if not self.update:
            return trained
        change = compose(self.update, {k: trained[k] - sent[k] for k in sent}, generator)
        return {k: sent[k] + change[k] for k in sent}


@dataclass(frozen=True)
class ClientUpdate:
    """What one client computed in one round: the update and its public metrics, which it
    sends, and the truth behind them, which it never sends (the simulation's truth store
    takes it)."""

    update: dict[str, torch.Tensor]
    metrics: dict[str, int | float]
    truth: Truth

    @property
    def num_examples(self) -> int:
        return int(self.metrics[NUM_EXAMPLES_KEY])


def compute_update(
    scenario: Scenario,
    server_round: int,
    client_id: int,
    global_weights: Mapping[str, torch.Tensor],
) -> ClientUpdate:
    """This client's defended update for ``server_round`` from the global weights it was sent.

    FedSGD: the gradient of one seeded batch; FedAvg: the weights after local training. Raises
    :class:`InjectedCrash` where the scenario's faults say so.
    """
    torch.set_num_threads(1)  # bit-identical reruns, and no oversubscription of the workers
    faults = scenario.faults
    if client_id in faults.crash_clients and (
        not faults.crash_rounds or server_round in faults.crash_rounds
    ):
        raise InjectedCrash(f"injected crash of client {client_id} in round {server_round}")

    fed = scenario.federation
    spec = scenario.model
    # The seeded generator stays on the CPU whatever the device, so batches, shuffles and
    # noise are the same draws on a GPU; only the arithmetic moves.
    device = resolve_device(fed.device)
    model = model_with_weights(spec, global_weights).to(device)
    shard = load_shard(scenario.data, fed.clients, scenario.seed, client_id)
    generator = seeded_generator(scenario.seed, server_round, client_id)
    defenses = ClientDefenses.from_scenario(scenario)

    metrics: dict[str, int | float]
    if fed.protocol == "fedsgd":
        batch = defenses.batch(len(shard.labels), fed.batch_size, generator)
        inputs, labels = shard.inputs[batch], shard.labels[batch]
        expected = min(fed.batch_size, len(shard.labels))
        update = defenses.gradient(
            model, spec, inputs.to(device), labels.to(device), generator, expected
        )
        metrics = {NUM_EXAMPLES_KEY: len(labels)}
    else:
        inputs, labels = shard.inputs, shard.labels
        sent = {name: p.detach().clone() for name, p in model.named_parameters()}
        on_device = Shard(inputs.to(device), labels.to(device))
        loss = defenses.train(model, spec, on_device, fed, generator)
        update = defenses.weights(sent, model, generator)
        metrics = {NUM_EXAMPLES_KEY: len(labels), "train-loss": loss}
    update = move(update, torch.device("cpu"))  # messages carry CPU arrays
    truth = Truth(server_round, client_id, inputs, labels)
    store = TruthStore.from_environment()
    if store is not None:  # simulation: the referee's channel, never the reply message
        store.put(truth)
    return ClientUpdate(update, metrics, truth)
