"""Helpers for tests that run leaksim as a user does: a fresh process per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def leaksim(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """``leaksim ARGS`` in a fresh interpreter (its own server process), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run folder, in order."""
    return [json.loads(line) for line in (run_dir / "results.jsonl").open()]
