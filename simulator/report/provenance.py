"""Which plugin files a run's figures depend on: every file that ran in the attack process or
the clients, with its SHA-256 (the ``startup`` records' ``plugins``), and what that means for
the scores. Shown in the terminal, ``summary.md`` and ``report.html``.
"""

from __future__ import annotations

from collections.abc import Sequence

from simulator.core.records import NoteRecord, Record, StartupRecord, of_kind
from simulator.scenario import CHANGED

TRUST_NOTE = (
    "The scores of plugin attacks (and of runs with plugin defenses) are only as trustworthy "
    "as these files: their code ran in the attack process and in the clients, with your "
    "privileges (and in the leaksim process when imported). The referee keeps the truth and "
    "the scorer out of an attack's reach, but it cannot stop code that reads another process's "
    "memory, runs code in the clients through Ray, or acts when its file is imported."
)


def plugin_files(records: Sequence[Record]) -> list[dict[str, str]]:
    """Every plugin file the run's startup records name (path and SHA-256), first seen first."""
    files: dict[tuple[str, str], dict[str, str]] = {}
    for record in of_kind(records, StartupRecord):
        for entry in record.plugins:
            files.setdefault((entry["path"], entry["sha256"]), entry)
    return list(files.values())


def provenance_lines(records: Sequence[Record]) -> list[str]:
    """Plain lines: one per plugin file (``sha256  path``), then the note on trust; none for a
    run of built-in code alone."""
    files = plugin_files(records)
    if not files:
        return []
    changed = [r.message for r in of_kind(records, NoteRecord) if CHANGED in r.message]
    return [f"{entry['sha256']}  {entry['path']}" for entry in files] + changed + [TRUST_NOTE]
