"""The one validator: frozen dataclasses whose fields declare their type and allowed range.

Scenario sections (``[federation]``, ``[model]``, ...) and plugin parameters (an attack's or a
defense's ``Params``) are both frozen dataclasses, and both are built from a TOML table by
:func:`build_fields`: an unknown key, a wrong type or an out-of-range value fails loudly,
naming the key, the value and what is allowed, before any compute runs. Pure Python (no torch,
no data), so that attack code may import it without seeing anything the clients hold.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any, Literal

# A plugin parameter named ``seed`` seeds torch's generators (``torch.manual_seed`` takes at
# most 64 bits), and attacks derive more seeds from it by small offsets (seed + 1, seed + r):
# held to [0, 2**63 - 1], it leaves them that room, and a seed too large is refused before
# any work instead of failing in the attack.
SEED_PARAM = "seed"
SEED_RANGE: Mapping[str, Any] = {"low": 0, "high": 2**63 - 1}


class InputError(ValueError):
    """A user's input (scenario, plugin file, data) is invalid: one line saying which and why.

    The CLI prints it as it is and exits with status 2, before any work starts.
    """


class FieldError(InputError):
    """A value does not fit its field; the message names the key, the value and what fits."""


def param(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    help: str = "",
) -> Any:
    """Declare a dataclass field with an allowed range that :func:`build_fields` checks.

    The range is ``[low, high]``; ``low_open`` / ``high_open`` exclude that end.
    """
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "help": help}
    return field(default=default, metadata=meta)


def derived(default: Any) -> Any:
    """A field filled in by validation from other keys, never read from or written to a file."""
    return field(default=default, metadata={"derived": True})


def is_derived(item: dataclasses.Field[Any]) -> bool:
    return bool(item.metadata.get("derived", False))


def check_params_class(subject: str, params_cls: Any) -> type:
    """``params_cls`` itself if it is a frozen dataclass; TypeError naming ``subject`` otherwise."""
    if params_cls is None or not dataclasses.is_dataclass(params_cls):
        raise TypeError(f"{subject} needs a dataclass `Params` attribute")
    if not params_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{subject}: Params must be a frozen dataclass")
    return typing.cast(type, params_cls)


def describe_type(hint: Any) -> str:
    """A short human-readable name for a field's type hint ("int", "one of 'a', 'b'")."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {describe_type(typing.get_args(hint)[0])}"
    if origin in (Mapping, dict) or hint is Mapping:
        return "a table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(o) for o in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint``: lists become tuples, ints become floats.

    ``where`` names the key in messages ("federation.lr", "attack 'dlg': parameter 'lr'").
    """
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise FieldError(f"{where} = {value!r} is not allowed; {_choose(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except FieldError:
                continue
        raise FieldError(f"{where} = {value!r} has the wrong type; allowed: {describe_type(hint)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise FieldError(f"{where} = {value!r} must be {describe_type(hint)}")
        item = typing.get_args(hint)[0]
        return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise FieldError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and (
        not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool)
    ):
        raise FieldError(
            f"{where} = {value!r} has type {type(value).__name__}; allowed: {describe_type(hint)}"
        )
    return value


def _choose(choices: Sequence[Any]) -> str:
    return "choose one of " + ", ".join(repr(c) for c in choices)


def check_range(value: Any, meta: Mapping[str, Any], where: str) -> None:
    """Raise FieldError when a number is outside the field's range (NaN is always outside);
    the range of a list field holds for each of its items."""
    if isinstance(value, tuple):
        for index, item in enumerate(value):
            check_range(item, meta, f"{where}[{index}]")
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    low, high = meta.get("low"), meta.get("high")
    low_open, high_open = meta.get("low_open", False), meta.get("high_open", False)
    # Written so that NaN, which compares false with everything, is rejected too.
    above_low = low is None or (value > low if low_open else value >= low)
    below_high = high is None or (value < high if high_open else value <= high)
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(f"{where} = {value!r} must be a finite number")
    if not (above_low and below_high):
        lower = "-inf" if low is None else f"{low}"
        upper = "inf" if high is None else f"{high}"
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        raise FieldError(
            f"{where} = {value!r} is out of range; allowed: {left}{lower}, {upper}{right}"
        )


def suggest(key: str, allowed: Sequence[str]) -> str:
    """ " (did you mean 'x'?); allowed keys: ..." for a mistyped key."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; allowed keys: {', '.join(sorted(allowed))}"


def build_fields(
    cls: type,
    raw: Mapping[str, Any],
    key_name: Callable[[str], str],
    unknown_key: Callable[[str, Any, list[str]], str],
) -> Any:
    """An instance of the frozen dataclass ``cls`` from ``raw``: keys, types and ranges checked.

    ``key_name(key)`` names a key in messages; ``unknown_key(key, value, allowed)`` is the
    message for a key ``cls`` does not have. Derived fields (:func:`derived`) cannot be set.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if not is_derived(f)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise FieldError(unknown_key(str(key), value, list(fields)))
        values[key] = coerce(value, hints[key], key_name(key))
        check_range(values[key], fields[key].metadata, key_name(key))
    return cls(**values)


def build_params(subject: str, params_cls: type, raw: Mapping[str, Any]) -> Any:
    """A plugin's frozen ``params_cls`` from ``raw``; ``subject`` ("attack 'dlg'") starts
    every error message. A parameter named ``seed`` is held to :data:`SEED_RANGE` too,
    whatever range the plugin declares."""
    params = build_fields(
        params_cls,
        raw,
        lambda key: f"{subject}: parameter {key!r}",
        lambda key, value, allowed: (
            f"{subject}: unknown parameter {key!r} = {value!r}; "
            f"allowed parameters: {sorted(allowed)}"
        ),
    )
    seed = getattr(params, SEED_PARAM, None)
    check_range(seed, SEED_RANGE, f"{subject}: parameter {SEED_PARAM!r}")
    return params


def build_section(cls: type, raw: Any, section: str) -> Any:
    """A scenario section (``[federation]``...) from its TOML table."""
    if not isinstance(raw, Mapping):
        raise FieldError(f"[{section}] must be a table, got {raw!r}")
    return build_fields(
        cls,
        raw,
        lambda key: f"{section}.{key}",
        lambda key, _value, allowed: f"unknown key {section}.{key}{suggest(key, allowed)}",
    )


def params_rows(params_cls: type) -> list[tuple[str, str, Any, str]]:
    """(parameter, type, default, help) rows describing a params dataclass."""
    hints = typing.get_type_hints(params_cls)
    return [
        (f.name, describe_type(hints[f.name]), f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(params_cls)
        if not is_derived(f)
    ]
