"""The scenario schema: one frozen dataclass per section, built by the one validator.

A scenario is a TOML file with one table per section (``[data]``, ``[model]``,
``[federation]``, ``[attack]``, ``[faults]``), ``[[defenses]]`` tables applied in order by the
clients, an optional ``[sweep]`` table mapping dotted keys to lists of values, and an optional
``plugins`` list of Python files that register more attacks, defenses, models or datasets.

:func:`parse` checks every key's type and range (:mod:`simulator.core.fields`), and the keys
of the chosen model kind and partitioner (:data:`KINDED`): each is the ``Params`` of its
registry entry, written in the same table. The checks that need plugin files, other
registries or several keys at once are the loader's
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
    derived,
    is_derived,
    param,
    suggest,
)
from simulator.core.knowledge import combined, knowing_label
from simulator.core.models import ModelSpec
from simulator.core.registry import ATTACKS, DEFENSES, MODELS, PARTITIONERS, Registry

DEFAULT_SCENARIO = "quickstart"
# Seeds reach torch's generators (``torch.manual_seed``), which take at most 64 bits.
MAX_SEED = 2**64 - 1
# The shortest wait for a client's reply that a Ray round can meet: a client actor imports
# torch and Flower before its first reply, seconds on a busy machine.
MIN_TIMEOUT_S = 10.0
# Beyond these a federation is more than one machine runs (each client is a Flower node with
# a shard of its own; rounds run one after the other): refused before any work.
MAX_CLIENTS = 10_000
MAX_ROUNDS = 100_000


# How local training sizes its steps: "constant" (``lr`` throughout), or "loss-scaled" (Lyu
# and Li's eta_t = alpha_t / L(theta_t), full batch, alpha_t <= lr: simulator.federation.training).
LrSchedule = Literal["constant", "loss-scaled"]


class ScenarioError(InputError):
    """A scenario file or override is invalid; the message says which key and why."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset the clients hold and how it is sharded among them.

    ``params`` holds the ``[data]`` keys only the ``partition`` scheme reads (its registered
    ``Params``: dirichlet's ``alpha``, label-skew's ``classes_per_client``; None for iid); left
    out, the scheme's defaults.
    """

    dataset: str = "mnist"
    dir: str = ""
    # The training pool the clients share out: 0 = the whole split, else this many examples.
    train_examples: int = param(0, low=0)
    train_balance: Literal["none", "parity"] = "none"
    partition: str = "iid"
    examples_per_client: int = param(0, low=0)
    test_examples: int = param(0, low=0)
    params: Any = derived(None)  # noqa: RUF009  (None: immutable, like every derived default)

    def __post_init__(self) -> None:
        # The scheme's defaults, once the data layer has registered it (or a plugin file).
        if self.params is None and self.partition in PARTITIONERS:
            object.__setattr__(self, "params", PARTITIONERS.validate(self.partition, {}))


@dataclass(frozen=True)
class FederationConfig:
    """The FL protocol: who trains, how, for how long."""

    protocol: Literal["fedsgd", "fedavg"] = "fedsgd"
    clients: int = param(10, low=1, high=MAX_CLIENTS)
    fraction: float = param(0.2, low=0.0, high=1.0, low_open=True)
    rounds: int = param(3, low=1, high=MAX_ROUNDS)
    batch_size: int = param(8, low=1)
    local_epochs: int = param(1, low=1)
    lr: float = param(0.1, low=0.0, low_open=True)
    weight_decay: float = param(0.0, low=0.0)
    lr_schedule: LrSchedule = "constant"
    timeout_s: float = param(600.0, low=MIN_TIMEOUT_S)
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
    # Each attack that can use the point's defenses' public settings also runs told them, as
    # "<attack> knowing <defenses>" (simulator.core.knowledge): a defense is judged by the
    # attack that knows it. False: the attacks as listed only.
    adaptive: bool = True

    @functools.cached_property
    def built(self) -> tuple[tuple[str, Any], ...]:
        """(name, attack instance) for the attack, then each ``also`` entry: built on first use
        (the validator's check) and kept, so a process builds its attacks once. A bad name or
        parameter raises ValueError naming the entry."""
        tables = [("attack", {"name": self.name, **self.params})] + [
            (f"attack.also[{index}]", entry) for index, entry in enumerate(self.also)
        ]
        built = []
        for where, table in tables:
            name = table.get("name")
            if not isinstance(name, str):
                raise ValueError(f"{where} must be a table with a name, got {dict(table)!r}")
            try:
                built.append((name, ATTACKS.create(name, without_name(table))))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        return tuple(built)


@dataclass(frozen=True)
class FaultConfig:
    """Injected client crashes, to exercise fault handling: these clients raise when trained;
    and how many failed updates a point tolerates before it ends "degraded", not "ok"."""

    crash_clients: tuple[int, ...] = ()
    crash_rounds: tuple[int, ...] = ()
    # A point is degraded when some client failed more than this share of the updates it was
    # asked for (by default: in more than half of the rounds it was sampled).
    max_failed_share: float = param(0.5, low=0.0, high=1.0)


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
    # Per kinded section ("model", "data"): its keys that only kinds the sweep selects read
    # (``model.kind`` swept, one [model] table for them all); each such point reads them.
    for_swept_kinds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @functools.cached_property
    def built_defenses(self) -> tuple[Any, ...]:
        """The ``[[defenses]]`` tables as defense instances, in order: built on first use (the
        validator's check) and kept, so a process builds them once per scenario
        (:meth:`from_json` caches the scenario per process). A bad table raises ValueError
        naming its index."""
        built = []
        for index, entry in enumerate(self.defenses):
            try:
                built.append(DEFENSES.create(entry["name"], without_name(entry)))
            except ValueError as error:
                raise ValueError(f"defenses[{index}]: {error}") from None
        return tuple(built)

    @functools.cached_property
    def built_attacks(self) -> tuple[tuple[str, Any], ...]:
        """(label, attack instance) of every attack a point runs: :attr:`AttackConfig.built`,
        then, with ``attack.adaptive``, each of them that can use the public settings of this
        point's defenses told them (:meth:`attacks.base.Attack.knowing`), labelled
        ``"<name> knowing <defenses>"``. Built once per scenario, as the defenses are."""
        blind = self.attack.built
        knowledge = combined(
            d.known_to_server(self.federation, self.data.examples_per_client)
            for d in self.built_defenses
        )
        if not self.attack.adaptive or knowledge is None:
            return blind
        labels = {name for name, _ in blind}
        twins = []
        for name, attack in blind:
            adapted = attack.knowing(knowledge)
            label = knowing_label(name, knowledge)
            if adapted is not None and label not in labels:
                labels.add(label)
                twins.append((label, adapted))
        return blind + tuple(twins)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples), derived fields left out: the form written
        to run folders (only keys some kind of the scenario reads), read back by
        :func:`simulator.scenario.from_dict`. A kind's params are keys of its table."""
        raw = json.loads(json.dumps(dataclasses.asdict(self), default=list))
        extra = raw.pop("for_swept_kinds")
        for kinded in KINDED:
            table = raw[kinded.section]
            table.update(table.pop("params") or {})
            table.update(extra.get(kinded.section, {}))
        for name in DERIVED_MODEL_FIELDS:
            raw["model"].pop(name)
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


DERIVED_MODEL_FIELDS = ("input_shape", "num_classes")


def without_name(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A plugin table's parameters: every key but ``name``."""
    return {k: v for k, v in entry.items() if k != "name"}


@dataclass(frozen=True)
class Kinded:
    """A section whose other keys depend on one key: ``selector`` names an entry of
    ``registry``, whose ``Params`` are read from the same table into the field ``params``."""

    section: str
    selector: str
    registry: Registry[Any]

    def own_keys(self) -> set[str]:
        """The section's own keys (every kind reads them)."""
        fields = dataclasses.fields(SECTIONS[self.section])
        return {f.name for f in fields if not is_derived(f)}

    def readers(self) -> dict[str, set[str]]:
        """Every registered kind -> the keys its ``Params`` declare."""
        return {
            name: {f.name for f in dataclasses.fields(params)} if params is not None else set()
            for name in self.registry
            for params in [self.registry.entry(name).params]
        }

    def kinds(self, raw: Mapping[str, Any]) -> list[str]:
        """The kinds a raw scenario selects: its table's, then the swept ones."""
        table = raw.get(self.section, {})
        default = SECTIONS[self.section].__dataclass_fields__[self.selector].default
        chosen = table.get(self.selector, default) if isinstance(table, Mapping) else default
        sweep = raw.get("sweep", {})
        flat = _flatten(sweep) if isinstance(sweep, Mapping) else {}
        swept = flat.get(f"{self.section}.{self.selector}", [])
        return [chosen, *(swept if isinstance(swept, list | tuple) else [])]


KINDED = (Kinded("model", "kind", MODELS), Kinded("data", "partition", PARTITIONERS))


def drop_unread(raw: dict[str, Any], kinds_of: Mapping[str, Any] | None = None) -> None:
    """Remove from ``raw``'s kinded tables every key no selected kind reads: the kinds of
    ``kinds_of`` (``raw`` by default). A scenario's keys for a kind that an override or a sweep
    point no longer selects are then dropped, as that kind's own defaults are."""
    for kinded in KINDED:
        table = raw.get(kinded.section)
        if not isinstance(table, dict):
            continue
        readers = kinded.readers()
        kinds = [k for k in kinded.kinds(kinds_of or raw) if isinstance(k, str) and k in readers]
        read = kinded.own_keys().union(*(readers[k] for k in kinds))
        raw[kinded.section] = {k: v for k, v in table.items() if k in read}


def parse(raw: Mapping[str, Any]) -> Scenario:
    """The typed scenario of a nested dict: every key's type and range checked (ScenarioError),
    the model kind's and the partitioner's keys as their registered ``Params``.

    The plugin files must be imported first. Attack and defense names and parameters, the
    derived model fields and the checks across keys are :func:`simulator.scenario.from_dict`'s,
    which imports the plugin files and calls this.
    """
    try:
        return _parse(raw)
    except FieldError as error:
        raise ScenarioError(str(error)) from None


def _parse(raw: Mapping[str, Any]) -> Scenario:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"a scenario must be a table, got {raw!r}")
    top = [f.name for f in dataclasses.fields(Scenario) if f.name != "for_swept_kinds"]
    for key in raw:
        if key not in top:
            raise ScenarioError(f"unknown top-level key {key!r}{suggest(key, top)}")
    values: dict[str, Any] = {}
    for key, hint in (("name", str), ("description", str), ("seed", int)):
        if key in raw:
            values[key] = coerce(raw[key], hint, key)
    if values.get("seed", 0) < 0:
        raise ScenarioError(f"seed = {values['seed']} must be >= 0")
    if values.get("seed", 0) > MAX_SEED:
        raise ScenarioError(
            f"seed = {values['seed']} is too large; allowed: 0 to 2**64 - 1 (torch's generators)"
        )
    values["plugins"] = plugin_paths(raw)
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, Mapping):
        raise ScenarioError(f"[sweep] must be a table of key = [values], got {sweep!r}")
    values["sweep"] = {k: tuple(_sweep_values(k, v)) for k, v in _flatten(sweep).items()}
    kinded_sections = {kinded.section for kinded in KINDED}
    for name, section in SECTIONS.items():
        if name not in kinded_sections:
            values[name] = build_section(section, raw.get(name, {}), name)
    extra = {}
    for kinded in KINDED:
        values[kinded.section], extra[kinded.section] = _kinded(kinded, raw, values["sweep"])
    values["for_swept_kinds"] = {k: v for k, v in extra.items() if v}
    values["defenses"] = _defenses(raw.get("defenses", []))
    return Scenario(**values)


def _kinded(
    kinded: Kinded, raw: Mapping[str, Any], sweep: Mapping[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """(the section with its kind's params, its keys only other swept kinds read)."""
    name, own = kinded.section, kinded.own_keys()
    table = raw.get(name, {})
    if not isinstance(table, Mapping):
        raise FieldError(f"[{name}] must be a table, got {table!r}")
    readers = kinded.readers()
    kinds = [coerce(k, str, f"{name}.{kinded.selector}") for k in kinded.kinds(raw)]
    for kind in kinds:
        if kind not in readers:
            raise ScenarioError(
                f"{name}.{kinded.selector} = {kind!r} is not a known {kinded.registry.kind}; "
                f"choose one of {', '.join(readers)}"
            )
    read = set().union(*(readers[k] for k in kinds))
    swept = [k.split(".", 1)[1] for k in sweep if k.startswith(f"{name}.")]
    for key in [*table, *swept]:
        if key not in own and key not in read:
            raise ScenarioError(_unread(kinded, key, kinds, readers, own | read))
    try:
        params = kinded.registry.validate(
            kinds[0], {k: v for k, v in table.items() if k in readers[kinds[0]]}
        )
    except ValueError as error:  # "model 'mlp': parameter 'widths'[0] = 0 is out of range..."
        raise ScenarioError(str(error)) from None
    section = build_section(SECTIONS[name], {k: v for k, v in table.items() if k in own}, name)
    extra = {k: v for k, v in table.items() if k not in own and k not in readers[kinds[0]]}
    return dataclasses.replace(section, params=params), extra


def _unread(
    kinded: Kinded, key: str, kinds: list[str], readers: dict[str, set[str]], allowed: set[str]
) -> str:
    """A key of a kinded section that no selected kind reads: who does, or "unknown key"."""
    name = kinded.section
    by = [kind for kind, keys in readers.items() if key in keys]
    if not by:
        return f"unknown key {name}.{key}{suggest(key, sorted(allowed))}"
    chosen = " or ".join(repr(k) for k in dict.fromkeys(kinds))
    return (
        f"{name}.{key} is not read by {name}.{kinded.selector} {chosen}; "
        f"it is read by {', '.join(by)}"
    )


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
    # Each value is a point, and the same value twice is the same point run twice (the same
    # seed gives the same numbers): refused, not silently run or dropped.
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ScenarioError(
            f"sweep.{key} lists {repeated[0]!r} more than once; each value is one point"
        )
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
