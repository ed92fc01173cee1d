"""Scenario files: finding and reading them, command-line overrides, sweep points.

The schema lives in :mod:`simulator.core.config` and the validation in
:mod:`simulator.scenario.validation`; this module turns a name or a path (plus ``key=value``
overrides and plugin files) into a validated :class:`~simulator.core.config.Scenario`, and a
scenario's sweep into its points.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from simulator.core.config import DEFAULT_SCENARIO, Scenario, ScenarioError
from simulator.scenario.validation import from_dict, point_scenario, with_overrides

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"


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
    """A scenario file path, or the name of a file in ``scenarios/`` (``quickstart``).

    Anything that looks like a path (a folder part or a suffix) must be a file: a mistyped
    path is an error, never a shipped scenario that happens to share its name.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_SCENARIO
    path = Path(name_or_path)
    if path.is_file():
        return path
    if len(path.parts) > 1 or path.suffix:
        raise ScenarioError(f"no scenario file {str(name_or_path)!r}: no such file")
    shipped = SCENARIO_DIR / f"{path.name}.toml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
    raise ScenarioError(f"no scenario file {str(name_or_path)!r}; shipped scenarios: {known}")


def load(
    name_or_path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    plugins: Sequence[str | Path] = (),
) -> Scenario:
    """Load and validate a scenario file; ``overrides`` are ``key=value`` strings or a dict.

    ``plugins`` (files, as ``--plugin`` gives them) join the file's own ``plugins`` list,
    whose paths are relative to the scenario file.
    """
    path = resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path.name}: not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not a text file (TOML must be UTF-8)") from None
    except OSError as error:
        raise ScenarioError(f"{path}: cannot read: {error.strerror}") from None
    raw.setdefault("name", path.stem)
    listed = raw.get("plugins", [])
    if isinstance(listed, list) and all(isinstance(p, str) for p in listed):
        base = path.resolve().parent
        raw["plugins"] = [str((base / p).resolve()) for p in listed]
        raw["plugins"] += [str(Path(p).resolve()) for p in plugins]
    pairs = (
        dict(overrides) if isinstance(overrides, Mapping) else dict(map(parse_override, overrides))
    )
    try:
        # The file's keys against the file's kinds: an override of model.kind alone does not
        # make the file's keys for its own kind an error (with_overrides drops them).
        scenario = from_dict(raw)
        return with_overrides(scenario, pairs) if pairs else scenario
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
    grid = itertools.product(*(scenario.sweep[k] for k in keys))
    return [
        Point(
            i,
            dict(zip(keys, combo, strict=True)),
            point_scenario(scenario, dict(zip(keys, combo, strict=True))),
        )
        for i, combo in enumerate(grid)
    ]
