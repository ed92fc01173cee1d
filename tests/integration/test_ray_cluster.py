"""`leaksim run --ray-address` runs the simulation on a Ray cluster the user started.

The test starts a Ray head on loopback (``ray start --head --block``, in its own session so
that its whole process group can be ended by PID, as a run starts its private one), runs a
two-round scenario on it, and stops it. The clients ran as the cluster's workers (their logs
are in the head's session folder), the truth reached the referee through Ray's runtime
environment (the attacks were scored), and no process of the cluster is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.run.ray_head import start_head, stop_head
from tests.integration.conftest import quickstart_with

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_a_run_on_an_existing_cluster_is_scored_and_leaves_nothing(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(quickstart_with(rounds=2, fraction=0.3))
    out = tmp_path / "run"
    head = start_head(num_cpus=2)  # the user's cluster: a head of its own session
    try:
        done = subprocess.run(
            [str(BIN / "leaksim"), "run", str(scenario), "--ray-address", head.address,
             "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        logs = list((head.temp / "session_latest" / "logs").glob("python-core-worker-*.log"))
        assert head.process.poll() is None, "the run ended the user's cluster"
    finally:
        left = stop_head(head)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert logs, "no client ran as a worker of the cluster"
    assert not left, "a process of the Ray head was left running"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["kind"] == "round"] == [0, 1, 2]
    attacks = [r for r in records if r["kind"] == "attack"]
    assert attacks and all(r["mean_psnr"] > 30 for r in attacks)  # the truth arrived


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:1"])
def test_a_bad_cluster_address_is_refused_before_any_work(tmp_path: Path, address: str) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [str(BIN / "leaksim"), "run", "quickstart", "--ray-address", address, "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--ray-address" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
