"""Defense interface and registry, keyed by the names scenario files use.

A defense acts at one of three places, its ``kind``:

- "update": transforms the update a client is about to send (:meth:`UpdateDefense.apply`).
  The update is the batch gradient (FedSGD) or the weight difference ``new - global`` (FedAvg;
  the caller adds the global weights back), so norms and thresholds mean the same in both.
- "training": changes how the client trains locally (DP-SGD, :mod:`defenses.dp_sgd`).
- "aggregation": changes what the server observes across clients (secure aggregation,
  :mod:`defenses.secure_aggregation`, which runs Flower's SecAgg+).
- "message": a Flower client mod that rewrites the client's reply message after all of the
  above (local DP through Flower's LocalDpMod, :mod:`defenses.local_dp`).

``changes_observation`` says whether the server's view differs from the undefended one: a
client-side transformation does; a defense applied after the server has observed (central DP)
would not, and so would not stop a malicious server. Scenario parameters are validated like
attack parameters (:mod:`simulator.params`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch

from simulator.params import PluginEntry, Registry, params_rows

Kind = Literal["update", "training", "aggregation", "message"]
KINDS: tuple[str, ...] = ("update", "training", "aggregation", "message")

# Modules whose import registers the built-in defenses; loaded lazily to avoid import cycles.
_BUILTIN_MODULES = (
    "defenses.noise",
    "defenses.clipping",
    "defenses.pruning",
    "defenses.quantization",
    "defenses.dp_sgd",
    "defenses.secure_aggregation",
    "defenses.local_dp",
)


@dataclass(frozen=True)
class NoParams:
    """Params of a defense that takes none."""


class Defense(ABC):
    """A defense: validated, immutable parameters, where it acts, and whether the server sees it.

    Subclasses set ``Params`` (a frozen dataclass), ``kind`` and ``changes_observation`` and are
    registered with :func:`register_defense`.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[Kind]
    changes_observation: ClassVar[bool]
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None) -> None:
        self.params: Any = params if params is not None else self.Params()

    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Only "update" defenses transform an update; the others act elsewhere."""
        raise TypeError(
            f"defense {self.name!r} acts on {self.kind}, not on the update; see its module"
        )

    def check_scenario(self, protocol: str, names: Sequence[str]) -> None:
        """Raise ValueError when this defense cannot run under ``protocol`` with ``names``.

        ``names`` are all the scenario's defenses; most defenses fit everywhere.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


class UpdateDefense(Defense):
    """A defense that transforms the update the client sends (so the server sees the result)."""

    kind: ClassVar[Kind] = "update"
    changes_observation: ClassVar[bool] = True

    @abstractmethod
    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The defended update (new tensors; ``update`` is left untouched).

        ``generator`` makes any randomness reproducible.
        """


DefenseEntry = PluginEntry
DEFENSES = Registry("defense", _BUILTIN_MODULES)
DefenseT = TypeVar("DefenseT", bound=type[Defense])


def register_defense(name: str, description: str) -> Callable[[DefenseT], DefenseT]:
    """Register a :class:`Defense` subclass (with a frozen ``Params`` dataclass) under ``name``."""

    def decorate(cls: DefenseT) -> DefenseT:
        subject = f"defense {name!r}"
        if getattr(cls, "kind", None) not in KINDS:
            raise TypeError(f"{subject}: kind must be one of {KINDS}")
        if not isinstance(getattr(cls, "changes_observation", None), bool):
            raise TypeError(f"{subject}: set changes_observation (bool)")
        return DEFENSES.add(name, description, cls)  # type: ignore[return-value]

    return decorate


def defense_entry(name: str) -> PluginEntry:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    return DEFENSES.entry(name)


def validate_params(name: str, raw: Mapping[str, Any]) -> Any:
    """Build the params dataclass of defense ``name`` from ``raw``, checking keys, types, ranges."""
    return DEFENSES.validate(name, raw)


def make_defense(name: str, params: Mapping[str, Any] | None = None) -> Defense:
    """Instantiate the defense a scenario names, with validated parameters."""
    return defense_entry(name).cls(validate_params(name, params or {}))


def params_help(name: str) -> list[tuple[str, str, Any, str]]:
    """(parameter, type, default, help) rows describing defense ``name``'s parameters."""
    return params_rows(defense_entry(name).params)


def compose(
    defenses: Sequence[Defense], update: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Apply the "update" defenses in order; the others act in training or aggregation instead.

    Order matters (clip then noise is the DP recipe; noise then clip is not).
    """
    for defense in defenses:
        if defense.kind == "update":
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
