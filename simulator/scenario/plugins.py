"""User plugin files: a researcher's attacks, defenses, models or datasets, without a fork.

A plugin file is plain Python that registers its classes with the decorators the built-in
plugins use (``register_attack``, ``register_defense``, ``register_model``,
``register_dataset``...). ``leaksim run SCENARIO --plugin FILE`` and a scenario's top-level
``plugins = [...]`` import it before the scenario is validated; its names are then usable in
the scenario and validated like the built-ins'. The paths travel in the scenario, so the
clients (other processes) import the same files before reading it. From Python,
:func:`load_plugin` does the same.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from simulator.core.fields import InputError


class PluginError(InputError):
    """A plugin file could not be imported; the message names the file and the cause."""


_LOADED: dict[Path, ModuleType] = {}


def module_name(path: Path) -> str:
    """The module name a plugin file is imported under (stable for one absolute path)."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return f"leaksim_plugin_{path.stem.replace('-', '_')}_{digest}"


def load_plugin(path: str | Path) -> ModuleType:
    """Import the plugin file at ``path`` once per process; PluginError if it cannot be."""
    resolved = Path(path).expanduser().resolve()
    if resolved in _LOADED:
        return _LOADED[resolved]
    if resolved.is_dir():
        raise PluginError(f"plugin file {str(path)!r} is a directory; name a Python file (.py)")
    if not resolved.is_file():
        raise PluginError(f"plugin file {str(path)!r} does not exist")
    if resolved.suffix != ".py":
        raise PluginError(f"plugin file {str(path)!r} must be a Python file (.py)")
    name = module_name(resolved)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module
    try:
        spec.loader.exec_module(module)
    except BaseException as error:  # sys.exit() and KeyboardInterrupt too: a file, not the user
        del sys.modules[name]
        raise PluginError(f"plugin file {str(path)!r}: {_raised(error)}") from None
    _LOADED[resolved] = module
    return module


def _raised(error: BaseException) -> str:
    """What a plugin file raised at import, on one line."""
    what = type(error).__name__
    if isinstance(error, SystemExit):
        return f"{what} (the file called sys.exit({error.code!r}) at import)"
    message = " ".join(str(error).split())
    return f"{what}: {message}" if message else f"{what} at import"


def load_plugins(paths: Iterable[str | Path]) -> list[ModuleType]:
    """Import every plugin file, in order."""
    return [load_plugin(path) for path in paths]
