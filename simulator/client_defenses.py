"""The scenario's defenses as a client applies them: in training (DP-SGD) and on the update.

Update defenses (noise, clipping, pruning, quantization) transform what the client sends, in
the scenario's order: the gradient under FedSGD, the weight change under FedAvg (the global
weights are added back afterwards). Aggregation defenses act on the server side instead
(SecAgg+, :mod:`simulator.secagg_app`); message defenses wrap the reply as Flower client mods
(:mod:`simulator.client_mods`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from defenses.base import Defense, compose, make_defense
from simulator.models import ModelSpec
from simulator.scenario import FederationConfig, Scenario
from simulator.task import Shard, batch_gradient, local_train


def build_defenses(scenario: Scenario) -> list[Defense]:
    """The scenario's ``[[defenses]]`` as plugin objects, in order."""
    return [
        make_defense(entry["name"], {k: v for k, v in entry.items() if k != "name"})
        for entry in scenario.defenses
    ]


def check_defenses(scenario: Scenario) -> None:
    """Raise ValueError when a defense cannot run with the scenario's protocol or the others.

    The checks that need more than a defense's own parameters (e.g. local-dp is FedAvg only).
    """
    defenses = build_defenses(scenario)
    names = [d.name for d in defenses]
    for defense in defenses:
        defense.check_scenario(scenario.federation.protocol, names)


@dataclass(frozen=True)
class ClientDefenses:
    """The defenses one client applies: at most one training defense, then update defenses."""

    training: Defense | None
    update: Sequence[Defense]

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> ClientDefenses:
        check_defenses(scenario)
        defenses = build_defenses(scenario)
        training = [d for d in defenses if d.kind == "training"]
        if len(training) > 1:
            raise ValueError("at most one training defense (dp-sgd) per scenario")
        return cls(training[0] if training else None, [d for d in defenses if d.kind == "update"])

    def batch(self, shard_size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The FedSGD batch: a seeded draw of ``batch_size``, Poisson-sampled under DP-SGD.

        DP-SGD's accountant assumes each example joins a step independently with probability
        batch_size / shard size, so the batch must be drawn that way for epsilon to hold.
        """
        if self.training is not None:
            from defenses.dp_sgd import poisson_batch

            return poisson_batch(shard_size, min(1.0, batch_size / shard_size), generator)
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
            gradient = self.training.gradient(  # type: ignore[attr-defined]
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
            return self.training.local_train(  # type: ignore[attr-defined]
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
