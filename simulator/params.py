"""Validated plugin parameters: frozen dataclasses whose fields declare their allowed range.

Attacks and defenses take a flat dict of parameters from a scenario file; :func:`build_params`
checks it against the plugin's frozen ``Params`` dataclass so that a typo or an out-of-range
value fails loudly, naming the key, the value and what is allowed, before any compute runs.
Pure Python (no torch, no data), so that attack code may import it without seeing anything the
clients hold.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import field
from typing import Any, Literal


def param(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    help: str = "",
) -> Any:
    """Declare a params-dataclass field with an allowed range that :func:`build_params` checks.

    The range is ``[low, high]``; ``low_open`` / ``high_open`` exclude that end.
    """
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "help": help}
    return field(default=default, metadata=meta)


def check_params_class(subject: str, params_cls: Any) -> type:
    """``params_cls`` itself if it is a frozen dataclass; TypeError naming ``subject`` otherwise."""
    if params_cls is None or not dataclasses.is_dataclass(params_cls):
        raise TypeError(f"{subject} needs a dataclass `Params` attribute")
    if not params_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{subject}: Params must be a frozen dataclass")
    return typing.cast(type, params_cls)


def describe_type(hint: Any) -> str:
    """A short human-readable name for a field's type hint ("int", "one of 'a', 'b'")."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def check_type(subject: str, key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` coerced to ``hint`` (int -> float only) or raise ValueError."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ValueError(
                f"{subject}: parameter {key!r} = {value!r} is not allowed; "
                f"allowed: {describe_type(hint)}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(subject, key, value, option)
            except ValueError:
                continue
        allowed = " or ".join(describe_type(o) for o in options)
        raise ValueError(
            f"{subject}: parameter {key!r} = {value!r} has the wrong type; allowed: {allowed}"
        )
    ok = isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ValueError(
            f"{subject}: parameter {key!r} = {value!r} has type {type(value).__name__}; "
            f"allowed: {describe_type(hint)}"
        )
    return value


def check_range(subject: str, key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise ValueError when a numeric ``value`` falls outside the field's declared range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high = meta.get("low"), meta.get("high")
    low_open, high_open = meta.get("low_open", False), meta.get("high_open", False)
    # Written so that NaN, which compares false with everything, is rejected too.
    above_low = low is None or (value > low if low_open else value >= low)
    below_high = high is None or (value < high if high_open else value <= high)
    if not (above_low and below_high):
        lower = "-inf" if low is None else f"{low}"
        upper = "inf" if high is None else f"{high}"
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        raise ValueError(
            f"{subject}: parameter {key!r} = {value!r} is out of range; "
            f"allowed: {left}{lower}, {upper}{right}"
        )


def build_params(subject: str, params_cls: type, raw: Mapping[str, Any]) -> Any:
    """An instance of the frozen ``params_cls`` from ``raw``, checking keys, types and ranges.

    ``subject`` (e.g. "attack 'dlg'") starts every error message.
    """
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(
                f"{subject}: unknown parameter {key!r} = {value!r}; "
                f"allowed parameters: {sorted(fields)}"
            )
        value = check_type(subject, key, value, hints[key])
        check_range(subject, key, value, fields[key].metadata)
        values[key] = value
    return params_cls(**values)


def params_rows(params_cls: type) -> list[tuple[str, str, Any, str]]:
    """(parameter, type, default, help) rows describing a params dataclass."""
    hints = typing.get_type_hints(params_cls)
    return [
        (f.name, describe_type(hints[f.name]), f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(params_cls)
    ]


@dataclasses.dataclass(frozen=True)
class PluginEntry:
    """A registered plugin: its class, params dataclass and the line ``leaksim list`` shows."""

    name: str
    description: str
    cls: type
    params: type


class Registry(Mapping[str, str]):
    """Plugins of one kind (attacks, defenses) by the names scenario files use.

    As a mapping it is name -> description. Built-in plugin modules are imported on first use,
    so registering modules can import the registry without an import cycle.
    """

    def __init__(self, kind: str, builtin_modules: tuple[str, ...]) -> None:
        self.kind = kind
        self._builtin_modules = builtin_modules
        self._entries: dict[str, PluginEntry] = {}

    def add(self, name: str, description: str, cls: type) -> type:
        """Register ``cls`` (which declares a frozen ``Params`` dataclass) under ``name``."""
        subject = f"{self.kind} {name!r}"
        params_cls = check_params_class(subject, getattr(cls, "Params", None))
        if name in self._entries and self._entries[name].cls is not cls:
            raise ValueError(f"{subject} is already registered")
        cls.name = name  # type: ignore[attr-defined]
        self._entries[name] = PluginEntry(name, description, cls, params_cls)
        return cls

    def _load(self) -> None:
        for module in self._builtin_modules:
            importlib.import_module(module)

    def entry(self, name: str) -> PluginEntry:
        """The entry for ``name``; ValueError listing the known names otherwise."""
        self._load()
        if name not in self._entries:
            known = sorted(self._entries)
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        return self._entries[name]

    def validate(self, name: str, raw: Mapping[str, Any]) -> Any:
        """The params dataclass of plugin ``name`` built from ``raw`` (keys, types, ranges)."""
        return build_params(f"{self.kind} {name!r}", self.entry(name).params, raw)

    def __getitem__(self, name: str) -> str:
        self._load()
        return self._entries[name].description

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)
