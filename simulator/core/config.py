"""The scenario schema: one frozen dataclass per section, validated by the one validator.

A scenario is a TOML file with one table per section (``[data]``, ``[model]``,
``[federation]``, ``[attack]``, ``[faults]``), ``[[defenses]]`` tables applied in order by the
clients, an optional ``[sweep]`` table mapping dotted keys to lists of values, and an optional
``plugins`` list of Python files that register more attacks, defenses, models or datasets.
Every key is checked by :mod:`simulator.core.fields`; names of plugins (model kinds, datasets,
partitioners, attacks, defenses) and their parameters by :mod:`simulator.core.registry`. An
error names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from simulator.core.fields import (
    FieldError,
    InputError,
    build_section,
    coerce,
    is_derived,
    param,
    suggest,
)
from simulator.core.models import SHARED_MODEL_KEYS, ModelSpec
from simulator.core.plugins import load_plugins
from simulator.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS, PARTITIONERS

DEFAULT_SCENARIO = "quickstart"


class ScenarioError(InputError):
    """A scenario file or override is invalid; the message says which key and why."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset the clients hold and how it is sharded among them."""

    dataset: str = "mnist"
    dir: str = ""
    # The training pool the clients share out: 0 = the whole split, else this many examples.
    train_examples: int = param(0, low=0)
    train_balance: Literal["none", "parity"] = "none"
    partition: str = "iid"
    classes_per_client: int = param(2, low=1, high=10)
    alpha: float = param(0.5, low=0.0, low_open=True)
    examples_per_client: int = param(0, low=0)
    test_examples: int = param(0, low=0)


@dataclass(frozen=True)
class FederationConfig:
    """The FL protocol: who trains, how, for how long."""

    protocol: Literal["fedsgd", "fedavg"] = "fedsgd"
    clients: int = param(10, low=1)
    fraction: float = param(0.2, low=0.0, high=1.0, low_open=True)
    rounds: int = param(3, low=1)
    batch_size: int = param(8, low=1)
    local_epochs: int = param(1, low=1)
    lr: float = param(0.1, low=0.0, low_open=True)
    weight_decay: float = param(0.0, low=0.0)
    timeout_s: float = param(600.0, low=0.0, low_open=True)
    cpus_per_client: float = param(1.0, low=0.0, low_open=True)
    # Where clients train (simulator.core.devices); on a GPU each client's Ray actor asks for
    # this share of one, so 1 / gpus_per_client clients share a GPU.
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    gpus_per_client: float = param(0.1, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class AttackConfig:
    """What the malicious server does with intercepted updates."""

    name: str = "none"
    rounds: tuple[int, ...] = ()
    max_clients: int = param(0, low=0)
    leak_threshold_db: float = param(30.0, low=0.0)
    # Attacks that return candidates (KKT, inversion) leak an image when its best match
    # reaches this SSIM (Haim et al. use 0.4).
    leak_threshold_ssim: float = param(0.4, low=-1.0, high=1.0)
    params: Mapping[str, Any] = field(default_factory=dict)
    # More attacks on the same updates, each a table like ``{ name = "idlg", iterations = 50 }``:
    # every attacked update is then also scored by the per-image best of all the attacks.
    also: tuple[Mapping[str, Any], ...] = ()
    # Where the attacks run (simulator.core.devices): a GPU where torch sees one, by default.
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class FaultConfig:
    """Injected client crashes, to exercise fault handling: these clients raise when trained."""

    crash_clients: tuple[int, ...] = ()
    crash_rounds: tuple[int, ...] = ()


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelSpec,
    "federation": FederationConfig,
    "attack": AttackConfig,
    "faults": FaultConfig,
}


@dataclass(frozen=True)
class Scenario:
    """A validated run description; :func:`simulator.core.scenario.expand` makes its points.

    ``model`` is the resolved :class:`ModelSpec` (its input shape and class count derived
    from the dataset and task); ``plugins`` are absolute paths of plugin files, imported
    before validation wherever the scenario is read (the clients too).
    """

    name: str = DEFAULT_SCENARIO
    description: str = ""
    seed: int = 0
    plugins: tuple[str, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    federation: FederationConfig = field(default_factory=FederationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    defenses: tuple[Mapping[str, Any], ...] = ()
    sweep: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples), derived fields left out: the form written
        to run folders and messages, and read back by :func:`from_dict`."""
        raw = json.loads(json.dumps(dataclasses.asdict(self), default=list))
        for item in dataclasses.fields(ModelSpec):
            if is_derived(item):
                raw["model"].pop(item.name)
        if not raw["plugins"]:
            del raw["plugins"]
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        return _from_json(text)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Scenario:
        """A new scenario with dotted keys (``federation.batch_size``) replaced, re-validated."""
        raw = self.to_dict()
        for key, value in overrides.items():
            assign(raw, key, value)
        return from_dict(raw)

    def with_sweep(self, sweep: Mapping[str, Sequence[Any]]) -> Scenario:
        """A new scenario sweeping the grid over ``sweep`` (dotted key -> list of values)."""
        raw = self.to_dict()
        raw["sweep"] = {key: list(values) for key, values in sweep.items()}
        return from_dict(raw)


def from_dict(raw: Mapping[str, Any]) -> Scenario:
    """Validate a nested dict (a parsed TOML file, plugin paths absolute) into a Scenario."""
    try:
        return _from_dict(raw)
    except FieldError as error:
        raise ScenarioError(str(error)) from None


def model_kinds(scenario: Scenario) -> set[str]:
    """Every ``model.kind`` a point of ``scenario`` may have (its own and the swept ones)."""
    return {scenario.model.kind, *scenario.sweep.get("model.kind", ())}


def model_keys_read(scenario: Scenario) -> set[str]:
    """The ``[model]`` keys some kind of ``scenario`` reads."""
    uses = (MODELS.entry(kind).value.uses for kind in model_kinds(scenario))
    return set(SHARED_MODEL_KEYS).union(*uses)


def check_model_keys(written: set[str], scenario: Scenario) -> None:
    """Refuse a ``[model]`` key the user wrote that no model kind of ``scenario`` reads.

    ``written``: the keys of the file's ``[model]`` table (checked against the file's own
    scenario) or of the overrides (against the scenario they give); swept ``model.*`` keys
    always count. Only written keys can be checked (``to_dict`` spells out every default), and
    a key is fine if any swept kind reads it: one ``[model]`` table may serve several kinds.
    """
    written = written | {k.split(".", 1)[1] for k in scenario.sweep if k.startswith("model.")}
    for key in sorted(written - model_keys_read(scenario)):
        names = " or ".join(repr(k) for k in sorted(model_kinds(scenario)))
        readers = [k for k in MODELS if key in MODELS.entry(k).value.uses]
        raise ScenarioError(
            f"model.{key} is not read by model.kind {names}; it is read by "
            f"{', '.join(readers) or 'no model kind'}"
        )


def _from_dict(raw: Mapping[str, Any]) -> Scenario:
    top = [f.name for f in dataclasses.fields(Scenario)]
    for key in raw:
        if key not in top:
            raise ScenarioError(f"unknown top-level key {key!r}{suggest(key, top)}")
    values: dict[str, Any] = {}
    for key, hint in (("name", str), ("description", str), ("seed", int)):
        if key in raw:
            values[key] = coerce(raw[key], hint, key)
    if values.get("seed", 0) < 0:
        raise ScenarioError(f"seed = {values['seed']} must be >= 0")
    values["plugins"] = coerce(raw.get("plugins", []), tuple[str, ...], "plugins")
    try:
        load_plugins(values["plugins"])
    except ValueError as error:
        raise ScenarioError(str(error)) from None
    for name, section in SECTIONS.items():
        values[name] = build_section(section, raw.get(name, {}), name)
    values["model"] = _resolved_model(values["model"], values["data"].dataset)
    values["defenses"] = _defenses(raw.get("defenses", []))
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, Mapping):
        raise ScenarioError(f"[sweep] must be a table of key = [values], got {sweep!r}")
    values["sweep"] = {k: tuple(_sweep_values(k, v)) for k, v in _flatten(sweep).items()}
    scenario = Scenario(**values)
    check_rules(scenario)
    for key, options in scenario.sweep.items():
        for option in options:  # every grid value must itself be valid
            _check_point(scenario, key, option)
    return scenario


def _check_point(scenario: Scenario, key: str, value: Any) -> None:
    raw = scenario.to_dict()
    raw["sweep"] = {}
    assign(raw, key, value)
    _from_dict(raw)


def _resolved_model(model: ModelSpec, dataset: str) -> ModelSpec:
    """The model with the input shape of ``dataset`` and the class count of its task."""
    if dataset not in DATASETS:
        raise ScenarioError(
            f"data.dataset = {dataset!r} is not a known dataset; "
            f"choose one of {', '.join(DATASETS)}"
        )
    source = DATASETS.entry(dataset).value
    classes = 1 if model.task == "parity" else int(source.num_classes)
    shape = tuple(source.shape)
    return dataclasses.replace(model, input_shape=shape, num_classes=classes)


def check_rules(scenario: Scenario) -> None:
    """Checks that involve several keys or the plugin registries."""
    model, fed = scenario.model, scenario.federation
    for registry, key, value in (
        (MODELS, "model.kind", model.kind),
        (PARTITIONERS, "data.partition", scenario.data.partition),
    ):
        if value not in registry:
            raise ScenarioError(
                f"{key} = {value!r} is not a known {registry.kind}; "
                f"choose one of {', '.join(registry)}"
            )
    for key in ("widths", "channels"):
        if any(v < 1 for v in getattr(model, key)):
            raise ScenarioError(f"model.{key} = {list(getattr(model, key))} must be >= 1")
    bad = [c for c in scenario.faults.crash_clients if not 0 <= c < fed.clients]
    if bad:
        raise ScenarioError(
            f"faults.crash_clients = {bad} must be client ids in 0..{fed.clients - 1}"
        )
    if model.task == "parity" and model.kind != "homogeneous-mlp":
        raise ScenarioError(
            f"model.task = 'parity' needs model.kind 'homogeneous-mlp' ('binary-fc' is always "
            f"binary), got {model.kind!r}"
        )
    for key, rounds in (
        ("attack.rounds", scenario.attack.rounds),
        ("faults.crash_rounds", scenario.faults.crash_rounds),
    ):
        if bad_rounds := [r for r in rounds if not 1 <= r <= fed.rounds]:
            raise ScenarioError(f"{key} = {bad_rounds} must be rounds in 1..{fed.rounds}")
    cores = os.cpu_count() or 1
    if fed.cpus_per_client > cores:
        raise ScenarioError(
            f"federation.cpus_per_client = {fed.cpus_per_client:g} exceeds the {cores} CPU "
            f"cores of this machine; allowed: (0, {cores}]"
        )
    defenses = []
    for index, entry in enumerate(scenario.defenses):
        params = {k: v for k, v in entry.items() if k != "name"}
        try:
            defenses.append(DEFENSES.create(entry["name"], params))
        except ValueError as error:
            raise ScenarioError(f"defenses[{index}]: {error}") from None
    for defense in defenses:
        try:
            defense.check_scenario(fed, defenses)
        except ValueError as error:
            raise ScenarioError(str(error)) from None
    try:
        ATTACKS.validate(scenario.attack.name, scenario.attack.params)
    except ValueError as error:
        raise ScenarioError(f"attack: {error}") from None
    for index, entry in enumerate(scenario.attack.also):
        if not isinstance(entry.get("name"), str):
            raise ScenarioError(f"attack.also[{index}] must be a table with a name, got {entry!r}")
        try:
            ATTACKS.validate(entry["name"], {k: v for k, v in entry.items() if k != "name"})
        except ValueError as error:
            raise ScenarioError(f"attack.also[{index}]: {error}") from None
    if scenario.attack.also and scenario.attack.name == "none":
        raise ScenarioError("attack.also needs a first attack: set attack.name")


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


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"federation": {"lr": [..]}}`` and ``{"federation.lr": [..]}`` both mean the same key."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _sweep_values(key: str, values: Any) -> Sequence[Any]:
    if not isinstance(values, list) or not values:
        raise ScenarioError(f"sweep.{key} must be a non-empty list of values, got {values!r}")
    return values


def assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set the dotted key ``dotted`` of a raw scenario dict (an override or a sweep value)."""
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
    if section == "sweep":  # one swept key's values: sweep.defenses=[[]], sweep.seed=[0, 1]
        raw.setdefault("sweep", {})[key] = value
        return
    if section not in SECTIONS:
        raise ScenarioError(
            f"unknown section {section!r} in {dotted!r}{suggest(section, list(SECTIONS))}"
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


@functools.lru_cache(maxsize=16)
def _from_json(text: str) -> Scenario:
    """Parsed and validated once per process: every client message carries the scenario, and
    validating it again costs about a millisecond a client a round (the scenario is frozen)."""
    return from_dict(json.loads(text))
