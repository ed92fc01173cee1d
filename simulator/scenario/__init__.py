"""Scenarios as a run receives them: files, overrides, plugin files, validation, sweep points.

Above the core (whose :mod:`simulator.core.config` defines the schema) and beside the plugin
packages: validating a scenario reads files and the registries, which the core may not.
"""

from simulator.core.config import DEFAULT_SCENARIO, Scenario, ScenarioError
from simulator.scenario.files import (
    SCENARIO_DIR,
    Point,
    expand,
    load,
    parse_override,
    resolve_path,
)
from simulator.scenario.plugins import CHANGED, PluginError, load_plugin, load_plugins, provenance
from simulator.scenario.validation import (
    from_dict,
    from_message,
    with_overrides,
    with_sweep,
)

__all__ = [
    "CHANGED",
    "DEFAULT_SCENARIO",
    "SCENARIO_DIR",
    "PluginError",
    "Point",
    "Scenario",
    "ScenarioError",
    "expand",
    "from_dict",
    "from_message",
    "load",
    "load_plugin",
    "load_plugins",
    "parse_override",
    "provenance",
    "resolve_path",
    "with_overrides",
    "with_sweep",
]
