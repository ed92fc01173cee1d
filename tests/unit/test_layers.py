"""The architecture, checked on the source: layers, no cycles, no imports hidden in functions.

Every ``import`` of the product's packages is read from the AST (module level and inside
functions). Layers, lowest first: ``simulator.core``; ``attacks`` and ``defenses`` (beside each
other, on core only); ``simulator.data``; ``simulator.scenario`` (loading and validating
scenarios, on core only); ``simulator.federation``; ``simulator.scoring``; ``simulator.run``
(with the composition root ``simulator.run.builtins``); ``simulator.report``; the top-level
``simulator`` modules (CLI, Python API).
A module may import its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("simulator", "attacks", "defenses")

# Each layer and the layers it may import (its own included).
ALLOWED: dict[str, set[str]] = {
    "simulator.core": {"simulator.core"},
    "attacks": {"attacks", "simulator.core"},
    "defenses": {"defenses", "simulator.core"},
    "simulator.data": {"simulator.data", "simulator.core"},
    "simulator.scenario": {"simulator.scenario", "simulator.core"},
    "simulator.federation": {
        "simulator.federation", "simulator.scenario", "simulator.data", "simulator.core",
        "defenses",
    },
    "simulator.scoring": {"simulator.scoring", "simulator.core"},
    "simulator.run": {
        "simulator.run", "simulator.scoring", "simulator.federation", "simulator.scenario",
        "simulator.data", "simulator.core", "attacks", "defenses",
    },
    "simulator.report": {"simulator.report", "simulator.run", "simulator.scoring",
                         "simulator.federation", "simulator.scenario", "simulator.data",
                         "simulator.core"},
    "simulator": {"simulator", "simulator.report", "simulator.run", "simulator.scoring",
                  "simulator.federation", "simulator.scenario", "simulator.data",
                  "simulator.core"},
}  # fmt: skip


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function?, line) for every import of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base] + [f"{base}.{alias.name}" for alias in child.names]
            for target in {resolve(n, known) for n in names} - {None, module}:
                found.append((target, in_function, child.lineno))  # type: ignore[arg-type]
            visit(child, nested)

    visit(tree, False)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "simulator":
        return parts[0]
    if len(parts) > 1 and f"simulator.{parts[1]}" in ALLOWED:
        return f"simulator.{parts[1]}"
    return "simulator"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (slow and obvious: reachability)."""
    nodes = set(graph) | {t for targets in graph.values() for t in targets}
    reach: dict[str, set[str]] = {}
    for start in nodes:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        reach[start] = seen
    groups = {frozenset({a} | {b for b in reach[a] if a in reach[b]}) for a in nodes}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def graphs(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(file graph, folder graph, function-local imports) of the product's packages."""
    known = modules(root)
    files: dict[str, set[str]] = defaultdict(set)
    folders: dict[str, set[str]] = defaultdict(set)
    local: list[str] = []
    for module, path in known.items():
        folder = str(path.parent.relative_to(root))
        for target, in_function, line in imports(module, path, known):
            files[module].add(target)
            target_folder = str(known[target].parent.relative_to(root))
            if target_folder != folder:
                folders[folder].add(target_folder)
            if in_function:
                local.append(f"{path.relative_to(root)}:{line} imports {target}")
    return files, folders, local


def test_no_import_cycles_between_files_or_folders() -> None:
    files, folders, _ = graphs()
    assert cycles(files) == []
    assert cycles(folders) == []


def test_no_project_imports_inside_functions() -> None:
    assert graphs()[2] == []


def test_every_import_goes_down_the_layers() -> None:
    known = modules()
    upward = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, path in known.items()
        for target, _, _ in imports(module, path, known)
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert upward == []


def test_attacks_and_defenses_import_only_the_core_layer() -> None:
    known = modules()
    for package in ("attacks", "defenses"):
        outside = {
            target
            for module, path in known.items()
            if module.split(".")[0] == package
            for target, _, _ in imports(module, path, known)
            if not target.startswith((package, "simulator.core"))
        }
        assert outside == set(), package


@pytest.mark.parametrize(
    ("planted", "expected"),
    [
        ("from simulator.run.folder import RunFolder\n", "cycle"),
        ("def sneak():\n    from simulator.federation.truth import TruthStore\n", "local"),
        ("from simulator.federation.truth import TruthStore\n", "layer"),
    ],
)
def test_the_checks_catch_what_they_claim(tmp_path: Path, planted: str, expected: str) -> None:
    """A copy of the packages with one bad import planted fails the matching check."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    planted_in = "simulator/core/registry.py" if expected == "cycle" else "attacks/base/__init__.py"
    target = tmp_path / planted_in
    target.write_text(target.read_text() + "\n" + planted)
    files, folders, local = graphs(tmp_path)
    if expected == "cycle":
        assert cycles(files) and cycles(folders)
    elif expected == "local":
        assert any("attacks/base/__init__.py" in line for line in local)
    else:
        known = modules(tmp_path)
        bad = [
            t
            for t, _, _ in imports("attacks.base", known["attacks.base"], known)
            if layer(t) not in ALLOWED["attacks"]
        ]
        assert bad == ["simulator.federation.truth"]
