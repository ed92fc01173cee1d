"""Attack interface and registry: attacks map observations to reconstructions.

Scenario files name an attack ("dlg", "idlg", "inverting-gradients", "analytic", ...) and give
it a flat dict of parameters; ``ATTACKS.create(name, params)`` checks that dict against the
attack's frozen params dataclass so that a typo or an out-of-range value fails loudly before
any compute.

This is the plugin interface (``from attacks.base import Attack, register_attack``). It is a
folder of its own so that every family can import it while the ``attacks`` package's
``__init__`` imports the families: in one folder with that ``__init__``, the two would import
each other (a folder cycle).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from simulator.core.knowledge import DefenseKnowledge
from simulator.core.protocol import Observation, PublicData, Reconstruction
from simulator.core.registry import ATTACKS

ParamsT = TypeVar("ParamsT")


class Attack(ABC, Generic[ParamsT]):
    """An attack: validated, immutable parameters plus :meth:`run`.

    Subclasses set ``Params`` to a frozen dataclass and are registered with
    :func:`register_attack`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type]
    # True for an attack that attacks nothing (the registered "none"): the malicious server
    # then selects no targets, so the round reads no truths and collects no garbage for it.
    observes_only: ClassVar[bool] = False
    # True for an attack that combines updates across rounds: the malicious server (which
    # holds one instance for the whole run) then shows it every round's updates
    # (:meth:`remember`), attacked or not, before it asks for reconstructions.
    keeps_history: ClassVar[bool] = False

    def __init__(self, params: ParamsT | None = None) -> None:
        self.params: ParamsT = params if params is not None else self.Params()
        # The server's labelled public data (its test split), set by the malicious server
        # before it calls the attack (``run``, and an active attack's ``manipulate``); None
        # where there is none (a unit test, a bare call).
        self.public: PublicData | None = None

    @abstractmethod
    def run(self, observations: Sequence[Observation]) -> list[Reconstruction]:
        """Attack every observation; one reconstruction per observation, in order."""

    def remember(self, observations: Sequence[Observation]) -> None:
        """Take note of one round's updates, every one the server received (only called on an
        attack that ``keeps_history``); nothing by default."""

    def knowing(self, knowledge: DefenseKnowledge) -> Attack[ParamsT] | None:
        """This attack told the public settings of the clients' defenses: a new instance that
        uses them, or None where it has no use for them (the default).
        :meth:`adapted_params` says how; an attack overrides that, not this."""
        changes = self.adapted_params(knowledge)
        if not changes:
            return None
        adapted = dataclasses.replace(self.params, **changes)  # type: ignore[type-var]
        return None if adapted == self.params else type(self)(adapted)

    def adapted_params(self, knowledge: DefenseKnowledge) -> dict[str, Any]:
        """The parameters this attack changes when it knows ``knowledge`` (none by default)."""
        return {}


AttackT = TypeVar("AttackT", bound=type)


def register_attack(name: str, description: str) -> Callable[[AttackT], AttackT]:
    """Register an :class:`Attack` subclass (with a frozen ``Params`` dataclass) under ``name``.

    Built-in attacks and a user's plugin files use this same decorator; scenario files then
    name the attack and :data:`ATTACKS` validates its parameters.
    """

    def decorate(cls: AttackT) -> AttackT:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise TypeError(f"attack {name!r}: {cls!r} is not an Attack subclass")
        return ATTACKS.decorator(name, description)(cls)

    return decorate
