"""Attack interface and registry: attacks map observations to reconstructions.

Scenario files name an attack ("dlg", "idlg", "inverting-gradients", "analytic") and give it a
flat dict of parameters; :func:`make_attack` checks that dict against the attack's frozen
params dataclass so that a typo or an out-of-range value fails loudly before any compute.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch

from attacks.observation import Observation
from simulator.params import PluginEntry, Registry, params_rows
from simulator.params import param as param  # re-exported: attack modules declare fields with it

Status = Literal["converged", "budget", "diverged"]
STATUSES: tuple[str, ...] = ("converged", "budget", "diverged")
Matching = Literal["hungarian", "nearest", "training"]

# Modules whose import registers the built-in attacks; loaded lazily to avoid import cycles.
_BUILTIN_MODULES = (
    "attacks.gradient_matching",
    "attacks.analytic",
    "attacks.kkt",
    "attacks.subspace",
    "attacks.inversion",
)


@dataclass
class Reconstruction:
    """What an attack recovered from one observation.

    ``images`` is (n, C, H, W) in [0, 1]; ``labels`` is (n,) int64 dataset labels, or None when
    the attack could not recover them (``notes`` says why). ``trace`` holds one dict per logged
    iteration (at least "iteration", "gradient_distance" and "seconds": wall time since the
    batched run started). ``snapshots`` are (iteration, images) pairs so that a scorer holding
    the truth can plot quality against iterations. ``confident`` optionally flags (n,) the
    images the attack vouches for (the analytic attack's single-sample recoveries);
    ``distance`` is the gradient distance of the reported images (NaN when not computed).
    ``matching``: "hungarian" pairs each true image with its own reconstruction (one-to-one);
    "nearest" means the images are candidates, more or fewer than the truth, and each true
    image is scored against its most similar candidate (dataset reconstruction); "training"
    means class samples, each scored against the nearest training image of its class
    (network inversion).
    ``status``: "converged" (distance under tolerance, or the optimiser can make no further
    progress, or a closed form), "budget" (iterations spent), "diverged" (non-finite values
    met; the images are the best finite iterate).
    """

    round: int
    client_id: int
    images: torch.Tensor
    labels: torch.Tensor | None
    trace: list[dict[str, float]] = field(default_factory=list)
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    status: Status = "budget"
    attack: str = ""
    notes: str = ""
    confident: torch.Tensor | None = None
    distance: float = math.nan
    matching: Matching = "hungarian"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if self.images.dim() != 4:
            raise ValueError(f"images must be (n, C, H, W), got shape {tuple(self.images.shape)}")


ParamsT = TypeVar("ParamsT")


class Attack(ABC, Generic[ParamsT]):
    """An attack: validated, immutable parameters plus :meth:`run`.

    Subclasses set ``Params`` to a frozen dataclass and are registered with
    :func:`register_attack`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type]

    def __init__(self, params: ParamsT | None = None) -> None:
        self.params: ParamsT = params if params is not None else self.Params()

    @abstractmethod
    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        """Attack every observation; one reconstruction per observation, in order."""


def snapshot_steps(total: int, count: int) -> set[int]:
    """``count`` evenly spaced steps in 1..``total`` at which an attack keeps image snapshots."""
    return {round(k * total / count) for k in range(1, count + 1)} if count else set()


AttackEntry = PluginEntry
ATTACKS = Registry("attack", _BUILTIN_MODULES)
AttackT = TypeVar("AttackT", bound=type)


def register_attack(name: str, description: str) -> Callable[[AttackT], AttackT]:
    """Register an :class:`Attack` subclass (with a frozen ``Params`` dataclass) under ``name``."""

    def decorate(cls: AttackT) -> AttackT:
        return ATTACKS.add(name, description, cls)  # type: ignore[return-value]

    return decorate


def attack_entry(name: str) -> PluginEntry:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    return ATTACKS.entry(name)


def validate_params(name: str, raw: Mapping[str, Any]) -> Any:
    """Build the params dataclass of attack ``name`` from ``raw``, checking keys, types, ranges."""
    return ATTACKS.validate(name, raw)


def make_attack(name: str, params: Mapping[str, Any] | None = None) -> Attack[Any]:
    """Instantiate the attack a scenario names, with validated parameters."""
    entry = attack_entry(name)
    return entry.cls(validate_params(name, params or {}))


def params_help(name: str) -> list[tuple[str, str, Any, str]]:
    """(parameter, type, default, help) rows describing attack ``name``'s parameters."""
    return params_rows(attack_entry(name).params)
