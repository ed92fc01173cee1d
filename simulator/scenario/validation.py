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

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from simulator.core.config import (
    Scenario,
    ScenarioError,
    assign,
    drop_unread,
    parse,
    plugin_paths,
)
from simulator.core.fields import FieldError
from simulator.core.models import ModelSpec
from simulator.core.registry import DATASETS
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
    """A new scenario with dotted keys (``federation.batch_size``) replaced, re-validated.

    When an override selects another model kind or partitioner, the scenario's keys that the
    new one does not read are dropped first; every key the overrides write must be read.
    """
    raw = scenario.to_dict()
    selected = copy.deepcopy(raw)
    for key, value in overrides.items():
        assign(selected, key, value)
    drop_unread(raw, kinds_of=selected)
    for key, value in overrides.items():
        assign(raw, key, value)
    return from_dict(raw)


def point_scenario(scenario: Scenario, values: Mapping[str, Any]) -> Scenario:
    """The scenario of one sweep point: ``values`` (dotted key -> one swept value) set, no
    sweep, and only the keys its model kind and partitioner read (one [model] table may serve
    several swept kinds)."""
    raw = scenario.to_dict()
    raw["sweep"] = {}
    for key, value in values.items():
        assign(raw, key, value)
    drop_unread(raw)
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
    drop_unread(raw)
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
    """Checks that involve several keys or the plugin registries (the model kind's and the
    partitioner's keys are :func:`~simulator.core.config.parse`'s)."""
    model, fed = scenario.model, scenario.federation
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
    _check_lr_schedule(scenario)
    for key, rounds in (
        ("attack.rounds", scenario.attack.rounds),
        ("faults.crash_rounds", scenario.faults.crash_rounds),
    ):
        if bad_rounds := [r for r in rounds if not 1 <= r <= fed.rounds]:
            raise ScenarioError(f"{key} = {bad_rounds} must be rounds in 1..{fed.rounds}")
    try:
        defenses = scenario.built_defenses
    except ValueError as error:
        raise ScenarioError(str(error)) from None
    for defense in defenses:
        try:
            defense.check_scenario(fed, defenses)
        except ValueError as error:
            raise ScenarioError(str(error)) from None
    try:
        attacks = scenario.built_attacks  # built and kept: their check
    except ValueError as error:
        raise ScenarioError(str(error)) from None
    if scenario.attack.also and attacks[0][1].observes_only:
        raise ScenarioError("attack.also needs a first attack: set attack.name")


def _check_lr_schedule(scenario: Scenario) -> None:
    """``federation.lr_schedule = "loss-scaled"`` is full-batch local training of the
    unregularised loss (its step divides by that loss, which weight decay keeps from 0)."""
    fed = scenario.federation
    if fed.lr_schedule == "constant":
        return
    if fed.protocol != "fedavg":
        raise ScenarioError(
            f"federation.lr_schedule = {fed.lr_schedule!r} needs federation.protocol 'fedavg' "
            f"(local training), got {fed.protocol!r}"
        )
    if fed.weight_decay:
        raise ScenarioError(
            f"federation.lr_schedule = {fed.lr_schedule!r} needs federation.weight_decay = 0, "
            f"got {fed.weight_decay}"
        )
    data = scenario.data
    # The shard size, where the scenario fixes it (else the client checks its own shard).
    shard = data.examples_per_client or (data.train_examples if fed.clients == 1 else 0)
    if fed.batch_size < shard:
        raise ScenarioError(
            f"federation.lr_schedule = {fed.lr_schedule!r} takes full-batch steps: "
            f"federation.batch_size = {fed.batch_size} must cover the client's {shard} examples"
        )
