"""The attacker sees observations only: attack code cannot reach the clients' ground truth."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import attacks
from attacks.observation import Observation, PublicMeta

# __path__, not __file__: under plain `pytest` the editable install can import `attacks` as a
# namespace package (no __file__); its first path entry is still the source folder.
ATTACKS_DIR = Path(next(iter(attacks.__path__)))
ALLOWED_PROJECT_MODULES = {"attacks", "simulator.models", "simulator.params"}
ALLOWED_THIRD_PARTY = {"torch", "numpy", "scipy"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add("attacks")
    return names


def is_allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top == "attacks" or module in ALLOWED_PROJECT_MODULES:
        return True
    if top in {"simulator", "defenses"}:
        return False
    return top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names or top == "__future__"


def test_attack_modules_import_nothing_that_holds_ground_truth() -> None:
    offenders = {
        f"{path.name}: {module}"
        for path in ATTACKS_DIR.glob("*.py")
        for module in imported_modules(path)
        if not is_allowed(module)
    }
    assert not offenders, f"attack code imports modules it must not see: {sorted(offenders)}"


def test_importing_every_attack_module_loads_no_oracle_or_client_code() -> None:
    modules = [f"attacks.{p.stem}" for p in ATTACKS_DIR.glob("*.py") if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('simulator.', 'defenses')) "
        "and m not in {'simulator.models', 'simulator.params'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_observation_carries_only_what_a_server_receives() -> None:
    fields = {f.name for f in dataclasses.fields(Observation)}
    assert fields == {"round", "client_id", "model", "global_weights", "update", "meta"}
    meta = {f.name for f in dataclasses.fields(PublicMeta)}
    assert meta == {"protocol", "batch_size", "lr", "local_epochs", "num_examples"}


def test_the_detector_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from simulator.oracle import Oracle\nimport simulator.task\n")
    assert {m for m in imported_modules(bad) if not is_allowed(m)} == {
        "simulator.oracle",
        "simulator.task",
    }
