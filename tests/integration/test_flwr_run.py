"""`flwr run .` drives the same ServerApp and ClientApp as `leaksim run`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from simulator.run.network import processes_mentioning
from tests.integration.conftest import quickstart_with

REPO = Path(__file__).resolve().parents[2]


def test_flwr_run_streams_the_same_records(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(quickstart_with(rounds=2, fraction=1.0))
    flwr_home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # flwr launches flower-superlink by name: the venv's scripts must be on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    flwr = Path(sys.executable).parent / "flwr"
    command = [str(flwr), "run", str(REPO), "--stream", "--run-config", f'scenario="{scenario}"']
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    finally:
        # flwr run leaves its local SuperLink (and children) running: end them by PID
        for pid in processes_mentioning(str(flwr_home)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kind"')]
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2], done.stdout[-3000:] + done.stderr[-3000:]
    updates = [(r["round"], r["client"]) for r in records if r["kind"] == "update"]
    # a fresh FLWR_HOME's local simulation has 2 SuperNodes: both train in both rounds
    assert sorted(updates) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"]
    # a real federation has no truth store: the attack runs, but nothing can be scored
    assert not [r for r in records if r["kind"] == "attack"]
