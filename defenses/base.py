"""The defense interface and its registry, keyed by the names scenario files use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


class Defense(ABC):
    """Transforms the update a client is about to send (named tensors in, named tensors out)."""

    @abstractmethod
    def apply(
        self, update: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The defended update; ``generator`` makes any randomness reproducible."""


@dataclass(frozen=True)
class DefenseEntry:
    """A registered defense: its factory and the line ``leaksim list`` shows."""

    factory: Callable[..., Defense]
    description: str


DEFENSES: dict[str, DefenseEntry] = {}


def register_defense(name: str, description: str) -> Callable[[type[Defense]], type[Defense]]:
    """Register a defense class under ``name``."""

    def decorate(cls: type[Defense]) -> type[Defense]:
        DEFENSES[name] = DefenseEntry(cls, description)
        return cls

    return decorate
