"""The scenario schema: one frozen dataclass per section, built by the one validator.

A scenario is a TOML file with one table per section (``[data]``, ``[model]``,
``[federation]``, ``[attack]``, ``[faults]``), ``[[defenses]]`` tables applied in order by the
clients, an optional ``[sweep]`` table mapping dotted keys to lists of values, and an optional
``plugins`` list of Python files that register more attacks, defenses, models or datasets.

:func:`parse` checks every key's type and range (:mod:`simulator.core.fields`); the checks
that need plugin files, registries or several keys at once are the loader's
(:mod:`simulator.scenario`), which is the only way a scenario enters a run. A scenario that
was validated there travels as JSON (:meth:`Scenario.to_json`) and is decoded on the other
side by :meth:`Scenario.from_json`, without validating it again. An error names the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from simulator.core.models import ModelSpec

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
    """A validated run description; :func:`simulator.scenario.expand` makes its points.

    ``model`` is the resolved :class:`ModelSpec` (its input shape and class count derived
    from the dataset and task); ``plugins`` are absolute paths of plugin files, imported
    before the scenario is read wherever it is read (the clients too).
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
        """The form messages carry: :meth:`to_dict` plus the derived model fields, so that the
        receiver decodes it (:meth:`from_json`) without the dataset registry."""
        raw = self.to_dict()
        raw["model"].update({f: getattr(self.model, f) for f in DERIVED_MODEL_FIELDS})
        return json.dumps(raw, sort_keys=True, default=list)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        """Decode :meth:`to_json` (a scenario validated by its sender); its plugin files must
        already be imported. Cached per process: every train message carries the scenario."""
        return _from_json(text)


DERIVED_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec) if is_derived(f))


def parse(raw: Mapping[str, Any]) -> Scenario:
    """The typed scenario of a nested dict: every key's type and range checked (ScenarioError).

    Plugin names and parameters, the derived model fields and the checks across keys are
    :func:`simulator.scenario.from_dict`'s, which calls this after importing the plugin files.
    """
    try:
        return _parse(raw)
    except FieldError as error:
        raise ScenarioError(str(error)) from None


def _parse(raw: Mapping[str, Any]) -> Scenario:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"a scenario must be a table, got {raw!r}")
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
    values["plugins"] = plugin_paths(raw)
    for name, section in SECTIONS.items():
        values[name] = build_section(section, raw.get(name, {}), name)
    values["defenses"] = _defenses(raw.get("defenses", []))
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, Mapping):
        raise ScenarioError(f"[sweep] must be a table of key = [values], got {sweep!r}")
    values["sweep"] = {k: tuple(_sweep_values(k, v)) for k, v in _flatten(sweep).items()}
    return Scenario(**values)


def plugin_paths(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``plugins`` list of a raw scenario, checked to be a list of paths."""
    try:
        return coerce(raw.get("plugins", []), tuple[str, ...], "plugins")  # type: ignore[no-any-return]
    except FieldError as error:
        raise ScenarioError(str(error)) from None


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


@functools.lru_cache(maxsize=16)
def _from_json(text: str) -> Scenario:
    raw = json.loads(text)
    derived = {f: raw["model"].pop(f) for f in DERIVED_MODEL_FIELDS}
    scenario = parse(raw)
    model = dataclasses.replace(
        scenario.model,
        input_shape=tuple(derived["input_shape"]),
        num_classes=int(derived["num_classes"]),
    )
    return dataclasses.replace(scenario, model=model)


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
