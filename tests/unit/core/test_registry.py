"""simulator.core.registry: registries hold what the process imported, nothing by string."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CORE_ONLY = """
import pkgutil, sys
import simulator.core
for module in pkgutil.iter_modules(simulator.core.__path__):
    __import__(f"simulator.core.{module.name}")
from simulator.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS
print(sorted(MODELS))
for registry, name in ((ATTACKS, "dlg"), (DEFENSES, "gaussian-noise"), (DATASETS, "mnist")):
    try:
        registry.entry(name)
    except ValueError as error:
        print(error)
layers = ("attacks", "defenses", "simulator.data", "simulator.federation", "simulator.run")
print(sorted(m for m in sys.modules if m.startswith(layers)))
"""


def test_the_core_imports_no_layer_above_it_even_when_a_registry_is_asked() -> None:
    """A process that imports every core module holds the core's own models and nothing else:
    looking an attack, a defense or a dataset up imports nothing (and says why it is absent)."""
    result = subprocess.run(
        [sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(["binary-fc", "cnn", "cnn-fc", "homogeneous-mlp", "lenet", "mlp"])
    assert all("none registered: import simulator.run.builtins first" in x for x in lines[1:4])
    assert lines[4] == "[]"
