"""docs/architecture.md names every module of the code, under the folder it lives in."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("simulator", "attacks", "defenses")
FOLDER = re.compile(r"^- `([a-z_/]+/)`")


def named_by_folder(doc: str) -> dict[str, set[str]]:
    """{folder: every `*.py` named in its bullet} from the "Where things live" section."""
    section = doc.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    named: dict[str, set[str]] = {}
    folder = None
    for line in section.splitlines():
        match = FOLDER.match(line)
        if match:
            folder = match[1]
            named.setdefault(folder, set())
        if folder is not None:
            named[folder] |= set(re.findall(r"`(?:[a-z_]+/)*([a-z_]+\.py)`", line))
    return named


def modules() -> list[Path]:
    found = []
    for package in PACKAGES:
        found += [
            p.relative_to(ROOT)
            for p in (ROOT / package).rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts
        ]
    return sorted(found)


def test_every_module_is_named_under_its_folder() -> None:
    named = named_by_folder((ROOT / "docs" / "architecture.md").read_text())
    missing = []
    for module in modules():
        path = module.as_posix()
        folders = [f for f in named if path.startswith(f)]
        folder = max(folders, key=len, default=None)
        if folder is None or module.name not in named[folder]:
            missing.append(path)
    assert not missing, f"docs/architecture.md does not name: {missing}"
