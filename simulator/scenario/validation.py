"""Validating a scenario against the plugins: names, parameters, the checks across keys.

:func:`simulator.core.config.parse` checks each key's type and range; this module imports the
scenario's plugin files first, then checks what needs the registries (model kinds, datasets,
partitioners, defenses, attacks and their parameters) or several keys at once, and validates
every sweep value as its own point. The registries hold what the process imported: the
composition root :mod:`simulator.run.builtins` for the command line, the Python API and the
ServerApp. A client decodes the scenario its sender validated (:func:`from_message`): it
imports the plugin files and never looks an attack up, so it imports no attack module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from simulator.core.config import (
    Scenario,
    ScenarioError,
    assign,
    parse,
    plugin_paths,
)
from simulator.core.fields import FieldError
from simulator.core.models import SHARED_MODEL_KEYS, ModelSpec
from simulator.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS, PARTITIONERS
from simulator.scenario.plugins import load_plugins


def from_dict(raw: Mapping[str, Any]) -> Scenario:
    """Validate a nested dict (a parsed TOML file, plugin paths absolute) into a Scenario."""
    try:
        return _from_dict(raw)
    except FieldError as error:
        raise ScenarioError(str(error)) from None


def from_message(text: str) -> Scenario:
    """The scenario a train message carries (:meth:`Scenario.to_json`, validated by the
    server): its plugin files imported, then decoded. No attack is looked up."""
    _load_plugins(plugin_paths(json.loads(text)))
    return Scenario.from_json(text)


def with_overrides(scenario: Scenario, overrides: Mapping[str, Any]) -> Scenario:
    """A new scenario with dotted keys (``federation.batch_size``) replaced, re-validated."""
    raw = scenario.to_dict()
    for key, value in overrides.items():
        assign(raw, key, value)
    return from_dict(raw)


def with_sweep(scenario: Scenario, sweep: Mapping[str, Sequence[Any]]) -> Scenario:
    """A new scenario sweeping the grid over ``sweep`` (dotted key -> list of values)."""
    raw = scenario.to_dict()
    raw["sweep"] = {key: list(values) for key, values in sweep.items()}
    return from_dict(raw)


def _load_plugins(paths: Sequence[str]) -> None:
    try:
        load_plugins(paths)
    except ValueError as error:
        raise ScenarioError(str(error)) from None


def _from_dict(raw: Mapping[str, Any]) -> Scenario:
    if isinstance(raw, Mapping):
        _load_plugins(plugin_paths(raw))
    scenario = parse(raw)
    scenario = dataclasses.replace(
        scenario, model=_resolved_model(scenario.model, scenario.data.dataset)
    )
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
