"""The one plugin registry: attacks, defenses, models, datasets, partitioners, inversion losses.

Every kind of plugin is a :class:`Registry` of entries by the names scenario files use. The
built-in plugins and a user's plugin files (:mod:`simulator.scenario.plugins`) register with
the same decorators, ``leaksim list`` reads the registries, and scenario validation looks names
and parameters up here. A registry holds what the process has imported: the composition root
:mod:`simulator.run.builtins` imports every built-in package, and an honest client imports only
what it uses (models, datasets, partitioners, defenses), never an attack. The core layer never
imports the layers that register into it, neither by name nor by string.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from simulator.core.fields import build_params, check_params_class, params_rows

T = TypeVar("T")
V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class PluginEntry(Generic[T]):
    """A registered plugin: what it is, its parameters and the line ``leaksim list`` shows.

    ``value`` is what the registry holds (an attack or defense class, a model builder, a
    dataset, a loss term); ``params`` is the frozen dataclass its scenario parameters are
    validated against (None for plugins that take none through this registry); ``module`` is
    where it was defined (a built-in module or a user's plugin file).
    """

    name: str
    description: str
    value: T
    params: type | None
    module: str


class Registry(Mapping[str, str], Generic[T]):
    """Plugins of one kind by name; as a mapping, name -> description (sorted by name)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, PluginEntry[T]] = {}

    def add(
        self, name: str, description: str, value: T, params: type | None = None
    ) -> PluginEntry[T]:
        """Register ``value`` under ``name``; a frozen ``params`` dataclass validates its params.

        Registering the same name twice is an error unless it is the same object again (a module
        imported twice under its own name).
        """
        subject = f"{self.kind} {name!r}"
        if not name or not isinstance(name, str):
            raise TypeError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if params is not None:
            check_params_class(subject, params)
        module = getattr(value, "__module__", "") or ""
        previous = self._entries.get(name)
        if previous is not None and _qualname(previous.value) != _qualname(value):
            raise ValueError(f"{subject} is already registered (by {previous.module})")
        entry = PluginEntry(name, description, value, params, module)
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, description: str) -> Callable[[V], V]:
        """``@REGISTRY.decorator(name, description)``: register a class with a ``Params``."""

        def decorate(value: V) -> V:
            self.add(name, description, value, getattr(value, "Params", None))  # type: ignore[arg-type]
            if isinstance(value, type):
                value.name = name  # type: ignore[attr-defined]
            return value

        return decorate

    def entry(self, name: str) -> PluginEntry[T]:
        """The entry for ``name``; ValueError listing the known names otherwise."""
        if name not in self._entries:
            known = sorted(self._entries)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if not known:  # a process that validates scenarios without the composition root
                hint = " (none registered: import simulator.run.builtins first)"
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; known {self.kind}s: {known}")
        return self._entries[name]

    def validate(self, name: str, raw: Mapping[str, Any]) -> Any:
        """The params dataclass of plugin ``name`` built from ``raw`` (keys, types, ranges)."""
        entry = self.entry(name)
        if entry.params is None:
            if raw:
                raise ValueError(f"{self.kind} {name!r} takes no parameters, got {sorted(raw)}")
            return None
        return build_params(f"{self.kind} {name!r}", entry.params, raw)

    def create(self, name: str, raw: Mapping[str, Any] | None = None) -> Any:
        """An instance of class plugin ``name`` with its validated parameters."""
        entry = self.entry(name)
        return entry.value(self.validate(name, raw or {}))  # type: ignore[operator]

    def params_help(self, name: str) -> list[tuple[str, str, Any, str]]:
        """(parameter, type, default, help) rows describing plugin ``name``'s parameters."""
        params = self.entry(name).params
        return params_rows(params) if params is not None else []

    def __getitem__(self, name: str) -> str:
        return self._entries[name].description

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def _qualname(value: object) -> str:
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"


ATTACKS: Registry[Any] = Registry("attack")
DEFENSES: Registry[Any] = Registry("defense")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
PARTITIONERS: Registry[Any] = Registry("partitioner")
INVERSION_LOSSES: Registry[Any] = Registry("inversion loss")

REGISTRIES: dict[str, Registry[Any]] = {
    "models": MODELS,
    "datasets": DATASETS,
    "partitioners": PARTITIONERS,
    "attacks": ATTACKS,
    "defenses": DEFENSES,
    "inversion losses": INVERSION_LOSSES,
}
