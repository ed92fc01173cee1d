"""Helpers for tests that run leaksim as a user does: a fresh process per command.

Every run of the integration tests connects to one Ray head started for the session (as a
user's cluster, ``LEAKSIM_RAY_ADDRESS``), so that the suite pays Ray's start-up once, not
once per run. Tests of a run's own head and of its ending (interrupts) unset the variable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.run.ray_head import run_cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def session_ray_cluster() -> Iterator[str]:
    """The suite's Ray head (or the cluster named in the environment), for every run."""
    with run_cluster() as address:
        yield address


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


def quickstart_with(**keys: object) -> str:
    """The shipped quickstart file with some keys of its ``[federation]`` table rewritten
    (``rounds=2`` sets ``rounds = 2``): a small federation as a user would write it. Each key
    must be in that table, so a change to the quickstart cannot leave a test running it whole."""
    text = (ROOT / "scenarios" / "quickstart.toml").read_text()
    head, table, rest = text.partition("[federation]\n")
    body, next_table, tail = rest.partition("\n[")
    for key, value in keys.items():
        line = f"{key} = {json.dumps(value)}"
        body, found = re.subn(rf"^{key} = .*$", line, body, flags=re.MULTILINE)
        assert found == 1, f"quickstart.toml's [federation] has no line '{key} = ...'"
    return head + table + body + next_table + tail
