"""What a user reads agrees with what ships: the README's scenario table, docs without issues."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[3]
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| (.+) \|$")


def scenario_table(readme: str) -> dict[str, str]:
    """{scenario: description} from the README table headed ``| scenario | description |``."""
    start = readme.index("| scenario | description |")
    rows: dict[str, str] = {}
    for line in readme[start:].splitlines()[2:]:
        match = ROW.match(line)
        if match is None:
            break
        rows[match[1]] = match[2]
    return rows


def test_the_readme_lists_every_shipped_scenario_with_its_own_description() -> None:
    table = scenario_table((ROOT / "README.md").read_text())
    shipped = {
        path.stem: tomllib.loads(path.read_text()).get("description", "")
        for path in (ROOT / "scenarios").glob("*.toml")
    }
    assert sorted(table) == sorted(shipped)
    assert table == shipped


def test_the_docs_speak_to_users_not_of_issues() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += sorted((ROOT / "scenarios").glob("*.toml"))
    found = [
        f"{page.name}:{n}: {line.strip()}"
        for page in pages
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if re.search(r"\b[Ii]ssues?\b( \d+|'s|s? (?:target|asks|says))", line)
    ]
    assert not found
