"""Defense plugin kinds, typed by where they act, and their registration.

- :class:`UpdateDefense` transforms the update a client is about to send (noise, clipping,
  pruning, quantization). The update is the batch gradient (FedSGD) or the weight difference
  ``new - global`` (FedAvg; the caller adds the global weights back), so norms and thresholds
  mean the same in both.
- :class:`TrainingDefense` replaces the client's local training (DP-SGD) and reports the
  privacy it spent.
- :class:`ClientModDefense` wraps the client's reply as a Flower client mod after everything
  above (Flower's LocalDpMod).
- :class:`AggregationDefense` changes what the server receives across clients: the run
  carries it out with Flower's SecAgg+ protocol, and the defense chooses the workflow's
  settings (the server then holds the aggregate only).

``changes_observation`` says whether the server's view differs from the undefended one: a
client-side transformation does; a defense applied after the server has observed (central DP)
would not, and so would not stop a malicious server. Parameters are validated by the one
plugin registry (:data:`simulator.core.registry.DEFENSES`), like attack parameters.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from flwr.server.workflow import SecAggPlusWorkflow
from torch import nn

from simulator.core.config import FederationConfig
from simulator.core.knowledge import DefenseKnowledge
from simulator.core.models import ModelSpec
from simulator.core.registry import DEFENSES


@dataclass(frozen=True)
class NoParams:
    """Params of a defense that takes none."""


class Defense(ABC):  # noqa: B024 (the four kinds below declare the abstract methods)
    """A defense: validated, immutable parameters and whether the server's view changes.

    Subclass one of the four kinds below (not this class) and register it with
    :func:`register_defense`.
    """

    name: ClassVar[str] = ""
    changes_observation: ClassVar[bool] = True
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None) -> None:
        self.params: Any = params if params is not None else self.Params()

    def check_scenario(self, federation: FederationConfig, defenses: Sequence[Defense]) -> None:
        """Raise ValueError when this defense cannot run in ``federation`` beside ``defenses``.

        ``defenses`` are all of the scenario's defenses (this one included); most fit anywhere.
        """
        return None

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge | None:
        """What this defense does to the update the server receives, in the terms an attack
        can use (its settings are the protocol's, so the server knows them); None when it
        leaves nothing an attack can use (the default). ``federation`` and ``shard_size`` (the
        examples per client, 0 where the partition decides) are the protocol's too: a defense
        inside local training needs them to say what reaches the update."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


class UpdateDefense(Defense):
    """Transforms the update the client sends (so the server sees the result)."""

    @abstractmethod
    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The defended update (new tensors; ``update`` is left untouched).

        ``generator`` makes any randomness reproducible.
        """


class TrainingDefense(Defense):
    """Replaces local training (FedSGD's batch gradient and FedAvg's local epochs)."""

    @abstractmethod
    def fedsgd_batch(
        self, shard_size: int, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Indices of the FedSGD batch this defense's accounting assumes."""

    @abstractmethod
    def gradient(
        self,
        model: nn.Module,
        spec: ModelSpec,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        *,
        denominator: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """The FedSGD update computed from one batch."""

    @abstractmethod
    def local_train(
        self,
        model: nn.Module,
        spec: ModelSpec,
        shard_inputs: torch.Tensor,
        shard_labels: torch.Tensor,
        epochs: int,
        batch_size: int,
        lr: float,
        generator: torch.Generator,
    ) -> float:
        """FedAvg local training of ``model`` in place; returns the last epoch's mean loss."""

    @abstractmethod
    def epsilon(self, sample_rate: float, steps: int) -> float:
        """The privacy spent by ``steps`` steps that sample each example with ``sample_rate``."""

    @property
    @abstractmethod
    def delta(self) -> float:
        """The delta of the (epsilon, delta) guarantee."""

    def rdp_curve(self, sample_rate: float, steps: int) -> list[tuple[float, float]] | None:
        """The composed RDP curve, (order, RDP epsilon) pairs, of the same steps as
        :meth:`epsilon`; None where the defense does not know it (the bound beside the
        measurement then comes from (epsilon, delta) alone)."""
        return None

    def check_scenario(self, federation: FederationConfig, defenses: Sequence[Defense]) -> None:
        training = [d.name for d in defenses if isinstance(d, TrainingDefense)]
        if len(training) > 1:
            raise ValueError(f"at most one training defense per scenario, got {training}")
        if federation.lr_schedule != "constant":
            raise ValueError(
                f"federation.lr_schedule = {federation.lr_schedule!r} is not supported with "
                f"the {self.name} defense, which does its own local training"
            )


ClientMod = Callable[[Any, Any, Callable[[Any, Any], Any]], Any]


class ClientModDefense(Defense):
    """Wraps the client's reply as a Flower client mod, after every other client defense."""

    @abstractmethod
    def mod(self) -> ClientMod:
        """The Flower mod ``(message, context, call_next) -> message``."""


class ReleaseAccounted(ABC):
    """A defense whose privacy guarantee holds per release: each update a client sends is
    (epsilon, delta)-DP on its own (local DP), so a client's releases compose."""

    @abstractmethod
    def release_epsilon(self, releases: int) -> float:
        """The epsilon, at :attr:`delta`, of ``releases`` updates of one client together."""

    def release_rdp_curve(self, releases: int) -> list[tuple[float, float]] | None:
        """The RDP curve of ``releases`` updates together; None where unknown."""
        return None

    @property
    @abstractmethod
    def delta(self) -> float:
        """The delta of the (epsilon, delta) guarantee."""


class AggregationDefense(Defense):
    """Changes what the server receives across clients: it sees only their aggregate.

    The run carries out every aggregation defense with Flower's SecAgg+ protocol: the clients
    mask their updates (``secaggplus_mod``), the server's fit workflow is the one
    :meth:`workflow` returns, and it can unmask only the example-weighted mean of the updates
    that arrived. The server observes that mean once a round, when at least
    :attr:`min_clients` updates are in it.
    """

    def known_to_server(
        self, federation: FederationConfig, shard_size: int = 0
    ) -> DefenseKnowledge | None:
        """The server sees only the clients' mean: what the other defenses did to each update
        no longer describes what it receives (:attr:`DefenseKnowledge.aggregated`)."""
        return DefenseKnowledge((self.name,), aggregated=True)

    @property
    @abstractmethod
    def min_clients(self) -> int:
        """The fewest updates whose aggregate the server may observe (fewer: nothing)."""

    @abstractmethod
    def workflow(self, federation: FederationConfig, largest_weight: float) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ fit workflow (or a subclass, e.g. ``SecAggWorkflow``) to run.

        ``largest_weight`` is the largest example count a client reports in ``federation``
        (the FedSGD batch, or the largest shard under FedAvg): SecAgg+ quantizes each
        client's weight relative to the workflow's ``max_weight``.
        """

    def check_scenario(self, federation: FederationConfig, defenses: Sequence[Defense]) -> None:
        """One aggregation per scenario; SecAgg+ masks between at least 2 sampled clients, and
        reveals the aggregate only when ``min_clients`` updates arrive: with fewer sampled,
        no round could ever end."""
        aggregation = [d.name for d in defenses if isinstance(d, AggregationDefense)]
        if len(aggregation) > 1:
            raise ValueError(f"at most one aggregation defense per scenario, got {aggregation}")
        sampled = max(1, int(federation.clients * federation.fraction))
        if sampled < 2:
            raise ValueError(
                f"defense {self.name!r} needs at least 2 clients sampled per round, got "
                f"{sampled} (federation.clients = {federation.clients} x federation.fraction "
                f"= {federation.fraction:g})"
            )
        if self.min_clients > sampled:
            raise ValueError(
                f"defense {self.name!r}: parameter 'min_clients' = {self.min_clients} exceeds "
                f"the {sampled} clients sampled per round; allowed: [1, {sampled}]"
            )


DEFENSE_KINDS: tuple[type[Defense], ...] = (
    UpdateDefense,
    TrainingDefense,
    ClientModDefense,
    AggregationDefense,
)
DefenseT = TypeVar("DefenseT", bound=type[Defense])


def register_defense(name: str, description: str) -> Callable[[DefenseT], DefenseT]:
    """Register a defense class (a subclass of one of the four kinds) under ``name``."""

    def decorate(cls: DefenseT) -> DefenseT:
        if not (isinstance(cls, type) and issubclass(cls, DEFENSE_KINDS)):
            kinds = ", ".join(k.__name__ for k in DEFENSE_KINDS)
            raise TypeError(f"defense {name!r}: {cls!r} must subclass one of {kinds}")
        if inspect.isabstract(cls):
            # Refused here, where a plugin file is loaded (one line), not when a run builds it.
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise TypeError(f"defense {name!r}: {cls.__name__} does not implement {missing}")
        return DEFENSES.decorator(name, description)(cls)

    return decorate


def compose(
    defenses: Sequence[UpdateDefense], update: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Apply update defenses in order (clip then noise is the DP recipe; noise then clip is not)."""
    for defense in defenses:
        update = defense.apply(update, generator)
    return update


def flatten(update: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All coordinates of ``update`` as one vector, in the dict's order (row-major per tensor)."""
    if not update:
        return torch.empty(0)
    return torch.cat([t.reshape(-1) for t in update.values()])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split ``flat`` back into tensors named, shaped and typed like ``like``."""
    pieces = flat.split([t.numel() for t in like.values()])
    return {
        name: piece.reshape(t.shape).to(t.dtype)
        for (name, t), piece in zip(like.items(), pieces, strict=True)
    }


def noise_like(
    flat: torch.Tensor, generator: torch.Generator, distribution: Literal["gaussian", "laplace"]
) -> torch.Tensor:
    """Unit-scale noise shaped like ``flat`` drawn from ``generator`` (on its device).

    Laplace(0, 1) is drawn as the difference of two Exp(1) variables: ``exponential_`` takes a
    generator and never returns log(0), unlike an inverse-CDF from ``rand``.
    """
    dtype = flat.dtype if flat.is_floating_point() else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "device": generator.device}
    if distribution == "gaussian":
        noise = torch.randn(flat.shape, generator=generator, **kwargs)
    else:
        first = torch.empty(flat.shape, **kwargs).exponential_(generator=generator)
        noise = first - torch.empty(flat.shape, **kwargs).exponential_(generator=generator)
    return noise.to(flat.device)
