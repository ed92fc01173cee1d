"""Scenario files: the validated, immutable description of a run, its overrides and sweeps.

A scenario is a TOML file with one table per section (``[data]``, ``[model]``,
``[federation]``, ``[attack]``, ``[faults]``), ``[[defenses]]`` tables applied in order by the
clients, and an optional ``[sweep]`` table mapping dotted
keys to lists of values; the sweep is the grid over those lists. Every key is checked on load:
an unknown key, a wrong type or an out-of-range value stops the run with a message that names
the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from simulator.models import MODELS, ModelSpec

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
DEFAULT_SCENARIO = "quickstart"


class ScenarioError(ValueError):
    """A scenario file or override is invalid; the message says which key and why."""


def _bounded(
    default: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> Any:
    """A field with a default and an allowed range, checked on load."""
    return field(default=default, metadata={"low": low, "high": high, "open_low": open_low})


@dataclass(frozen=True)
class DataConfig:
    """Which dataset the clients hold and how it is sharded among them."""

    dataset: Literal["mnist", "fashion-mnist", "red-blue"] = "mnist"
    dir: str = ""
    # The training pool the clients share out: 0 = the whole split, else this many examples.
    train_examples: int = _bounded(0, 0)
    train_balance: Literal["none", "parity"] = "none"
    partition: Literal["iid", "label-skew", "dirichlet"] = "iid"
    classes_per_client: int = _bounded(2, 1, 10)
    alpha: float = _bounded(0.5, 0.0, open_low=True)
    examples_per_client: int = _bounded(0, 0)
    test_examples: int = _bounded(0, 0)


@dataclass(frozen=True)
class ModelConfig:
    """The global model's architecture (see ``leaksim list`` for the kinds)."""

    kind: str = "mlp"
    widths: tuple[int, ...] = (100,)
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    bias: bool = True
    pooling: Literal["avg", "max"] = "avg"
    channels: tuple[int, ...] = (8, 16)
    init: Literal["default", "uniform"] = "default"
    init_scale: float = _bounded(1.0, 0.0, open_low=True)
    # "parity": one logit trained on odd/even (binary cross-entropy); binary-fc always is.
    task: Literal["classes", "parity"] = "classes"
    centre_inputs: bool = False

    def spec(self, dataset_shape: tuple[int, int, int] = (1, 28, 28)) -> ModelSpec:
        return ModelSpec(
            kind=self.kind,
            num_classes=1 if self.task == "parity" else 10,
            init_scale=self.init_scale,
            centre_inputs=self.centre_inputs,
            widths=self.widths,
            activation=self.activation,
            bias=self.bias,
            pooling=self.pooling,
            channels=self.channels,
            init=self.init,
            input_shape=dataset_shape,
        )


@dataclass(frozen=True)
class FederationConfig:
    """The FL protocol: who trains, how, for how long."""

    protocol: Literal["fedsgd", "fedavg"] = "fedsgd"
    clients: int = _bounded(10, 1)
    fraction: float = _bounded(0.2, 0.0, 1.0, open_low=True)
    rounds: int = _bounded(3, 1)
    batch_size: int = _bounded(8, 1)
    local_epochs: int = _bounded(1, 1)
    lr: float = _bounded(0.1, 0.0, open_low=True)
    weight_decay: float = _bounded(0.0, 0.0)
    timeout_s: float = _bounded(600.0, 0.0, open_low=True)
    cpus_per_client: float = _bounded(1.0, 0.0, open_low=True)


@dataclass(frozen=True)
class AttackConfig:
    """What the malicious server does with intercepted updates."""

    name: str = "none"
    rounds: tuple[int, ...] = ()
    max_clients: int = _bounded(0, 0)
    leak_threshold_db: float = _bounded(30.0, 0.0)
    # Attacks that return candidates (KKT, inversion) leak an image when its best match
    # reaches this SSIM (Haim et al. use 0.4).
    leak_threshold_ssim: float = _bounded(0.4, -1.0, 1.0)
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FaultConfig:
    """Injected client crashes, to exercise fault handling: these clients raise when trained."""

    crash_clients: tuple[int, ...] = ()
    crash_rounds: tuple[int, ...] = ()


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "federation": FederationConfig,
    "attack": AttackConfig,
    "faults": FaultConfig,
}


@dataclass(frozen=True)
class Scenario:
    """A validated run description; :func:`expand` turns its sweep into concrete points."""

    name: str = DEFAULT_SCENARIO
    description: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    defenses: tuple[Mapping[str, Any], ...] = ()
    sweep: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples): the form written to run folders and messages."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        return from_dict(json.loads(text))

    def with_overrides(self, overrides: Mapping[str, Any]) -> Scenario:
        """A new scenario with dotted keys (``federation.batch_size``) replaced, re-validated."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _assign(raw, key, value)
        return from_dict(raw)

    def with_sweep(self, sweep: Mapping[str, Sequence[Any]]) -> Scenario:
        """A new scenario sweeping the grid over ``sweep`` (dotted key -> list of values)."""
        raw = self.to_dict()
        raw["sweep"] = {key: list(values) for key, values in sweep.items()}
        return from_dict(raw)

    def model_spec(self) -> ModelSpec:
        from simulator.data import image_shape

        return self.model.spec(image_shape(self.data.dataset))


def _section(name: str, raw: Mapping[str, Any]) -> Any:
    return _build(SECTIONS[name], raw, name)


def _suggest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; allowed keys: {', '.join(sorted(allowed))}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ScenarioError(
                f"{where} = {value!r} is not allowed; choose one of {', '.join(map(repr, choices))}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ScenarioError(f"{where} = {value!r} must be a list")
        item_hint = typing.get_args(hint)[0]
        return tuple(_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ScenarioError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"unsupported hint {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{where} = {value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where} = {value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{where} = {value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{where} = {value!r} must be a string")
        return value
    return value


def _check_bounds(value: Any, meta: Mapping[str, Any], where: str) -> None:
    low, high, open_low = meta.get("low"), meta.get("high"), meta.get("open_low", False)
    if low is not None and (value <= low if open_low else value < low):
        relation = ">" if open_low else ">="
        raise ScenarioError(f"{where} = {value!r} must be {relation} {low}")
    if high is not None and value > high:
        raise ScenarioError(f"{where} = {value!r} must be <= {high}")


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"[{where}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ScenarioError(f"unknown key {where}.{key}{_suggest(key, list(fields))}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _coerce(value, hints[name], f"{where}.{name}")
        _check_bounds(values[name], fields[name].metadata, f"{where}.{name}")
    return cls(**values)


def _validate_cross(scenario: Scenario) -> None:
    """Checks that involve several keys or other registries."""
    if scenario.model.kind not in MODELS:
        raise ScenarioError(
            f"model.kind = {scenario.model.kind!r} is not a known model; "
            f"choose one of {', '.join(sorted(MODELS))}"
        )
    for key in ("widths", "channels"):
        if any(v < 1 for v in getattr(scenario.model, key)):
            raise ScenarioError(f"model.{key} = {list(getattr(scenario.model, key))} must be >= 1")
    fed = scenario.federation
    for key in ("crash_clients",):
        bad = [c for c in getattr(scenario.faults, key) if not 0 <= c < fed.clients]
        if bad:
            raise ScenarioError(f"faults.{key} = {bad} must be client ids in 0..{fed.clients - 1}")
    if scenario.model.task == "parity" and scenario.model.kind != "homogeneous-mlp":
        raise ScenarioError(
            f"model.task = 'parity' needs model.kind 'homogeneous-mlp' ('binary-fc' is always "
            f"binary), got {scenario.model.kind!r}"
        )
    if fed.weight_decay and any(entry["name"] == "dp-sgd" for entry in scenario.defenses):
        raise ScenarioError("federation.weight_decay is not supported with the dp-sgd defense")
    bad_rounds = [r for r in scenario.attack.rounds if not 1 <= r <= fed.rounds]
    if bad_rounds:
        raise ScenarioError(f"attack.rounds = {bad_rounds} must be rounds in 1..{fed.rounds}")
    from attacks.server import validate_attack  # late: attacks import simulator.models

    for index, entry in enumerate(scenario.defenses):
        from defenses.base import make_defense

        params = {k: v for k, v in entry.items() if k != "name"}
        try:
            make_defense(entry["name"], params)
        except ValueError as error:
            raise ScenarioError(f"defenses[{index}]: {error}") from error

    from simulator.client_defenses import check_defenses

    try:
        check_defenses(scenario)
    except ValueError as error:
        raise ScenarioError(str(error)) from error
    try:
        validate_attack(scenario.attack.name, scenario.attack.params)
    except ValueError as error:
        raise ScenarioError(f"attack: {error}") from error


def from_dict(raw: Mapping[str, Any]) -> Scenario:
    """Validate a nested dict (a parsed TOML file) into a :class:`Scenario`."""
    top = {f.name for f in dataclasses.fields(Scenario)}
    for key in raw:
        if key not in top:
            raise ScenarioError(f"unknown top-level key {key!r}{_suggest(key, sorted(top))}")
    values: dict[str, Any] = {}
    for key in ("name", "description"):
        if key in raw:
            values[key] = _coerce(raw[key], str, key)
    if "seed" in raw:
        values["seed"] = _coerce(raw["seed"], int, "seed")
    for name in SECTIONS:
        values[name] = _section(name, raw.get(name, {}))
    values["defenses"] = _defenses(raw.get("defenses", []))
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, Mapping):
        raise ScenarioError(f"[sweep] must be a table of key = [values], got {sweep!r}")
    values["sweep"] = {k: tuple(_sweep_values(k, v)) for k, v in _flatten(sweep).items()}
    scenario = Scenario(**values)
    _validate_cross(scenario)
    for key, options in scenario.sweep.items():
        for option in options:  # every grid value must itself be valid
            _check_point(scenario, key, option)
    return scenario


def _defenses(raw: Any) -> tuple[dict[str, Any], ...]:
    """``[[defenses]]`` tables, applied in order: each a ``name`` and that defense's params."""
    if not isinstance(raw, list | tuple):
        raise ScenarioError(f"defenses must be a list of tables ([[defenses]]), got {raw!r}")
    entries = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ScenarioError(f"defenses[{index}] must be a table with a name, got {entry!r}")
        entries.append(dict(entry))
    return tuple(entries)


def _check_point(scenario: Scenario, key: str, value: Any) -> None:
    raw = scenario.to_dict()
    raw["sweep"] = {}
    _assign(raw, key, value)
    from_dict(raw)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"federation": {"lr": [..]}}`` and ``{"federation.lr": [..]}`` both mean the same key."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _sweep_values(key: str, values: Any) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ScenarioError(f"sweep.{key} must be a non-empty list of values, got {values!r}")
    return values


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    section, key = (parts[0], ".".join(parts[1:])) if len(parts) > 1 else ("", parts[0])
    if section == "defenses" or dotted == "defenses":
        _assign_defense(raw, parts[1:], value, dotted)
        return
    if not section:
        if key not in {"name", "description", "seed"}:
            raise ScenarioError(
                f"cannot set {dotted!r}: use section.key, sections: {', '.join(SECTIONS)}"
            )
        raw[key] = value
        return
    if section not in SECTIONS:
        raise ScenarioError(
            f"unknown section {section!r} in {dotted!r}{_suggest(section, list(SECTIONS))}"
        )
    table = raw.setdefault(section, {})
    if section == "attack" and key.startswith("params."):
        table.setdefault("params", {})[key.removeprefix("params.")] = value
        return
    table[key] = value


def _assign_defense(raw: dict[str, Any], path: list[str], value: Any, dotted: str) -> None:
    """``defenses`` (the whole list) or ``defenses.<index>.<param>`` (one defense's param)."""
    if not path:
        raw["defenses"] = value
        return
    defenses = raw.setdefault("defenses", [])
    if len(path) != 2 or not path[0].isdigit() or int(path[0]) >= len(defenses):
        raise ScenarioError(
            f"cannot set {dotted!r}: use defenses.<index>.<param> with an index below "
            f"{len(defenses)} (the scenario's [[defenses]] tables, from 0)"
        )
    defenses[int(path[0])] = {**defenses[int(path[0])], path[1]: value}


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as TOML (``1e-3``, ``[1, 2]``) or else a string."""
    if "=" not in text:
        raise ScenarioError(f"override {text!r} must look like section.key=value")
    key, value_text = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return key, value


def resolve_path(name_or_path: str | Path | None) -> Path:
    """A scenario file path, or the name of a file in ``scenarios/`` (``quickstart``)."""
    if name_or_path is None:
        name_or_path = DEFAULT_SCENARIO
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SCENARIO_DIR / f"{path.stem}.toml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
    raise ScenarioError(f"no scenario file {str(name_or_path)!r}; shipped scenarios: {known}")


def load(
    name_or_path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> Scenario:
    """Load and validate a scenario file; ``overrides`` are ``key=value`` strings or a dict."""
    path = resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path.name}: not valid TOML: {error}") from None
    raw.setdefault("name", path.stem)
    pairs = (
        dict(overrides) if isinstance(overrides, Mapping) else dict(map(parse_override, overrides))
    )
    try:
        scenario = from_dict(raw)
        return scenario.with_overrides(pairs) if pairs else scenario
    except ScenarioError as error:
        raise ScenarioError(f"{path.name}: {error}") from None


@dataclass(frozen=True)
class Point:
    """One concrete run of a sweep: its index, the swept values and the resolved scenario."""

    index: int
    values: Mapping[str, Any]
    scenario: Scenario


def expand(scenario: Scenario) -> list[Point]:
    """The grid of a scenario's sweep (a single point when it has none)."""
    keys = list(scenario.sweep)
    base = dataclasses.replace(scenario, sweep={})
    grid = itertools.product(*(scenario.sweep[k] for k in keys))
    return [
        Point(
            i,
            dict(zip(keys, combo, strict=True)),
            base.with_overrides(dict(zip(keys, combo, strict=True))),
        )
        for i, combo in enumerate(grid)
    ]
