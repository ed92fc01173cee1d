"""`leaksim run --ray-address` runs the simulation on a Ray cluster the user started.

The test starts a Ray head on loopback (``ray start --head --block``, in its own session so
that its whole process group can be ended by PID), runs a two-round scenario on it, and
stops it. The clients ran as the cluster's workers (their logs are in the head's session
folder), the truth reached the referee through Ray's runtime environment (the attacks were
scored), and no process of the cluster is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.network import free_port, wait_for_port
from tests.integration.test_flwr_run import processes_mentioning

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def ray_head(port: int) -> Iterator[Path]:
    """A Ray head on loopback for the duration; yields its temp folder (short: socket paths)."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]  # fmt: skip
    head = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield temp
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        # The cluster's daemons carry the temp folder in their command lines.
        deadline = time.monotonic() + 20
        while processes_mentioning(str(temp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in processes_mentioning(str(temp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_run_on_an_existing_cluster_is_scored_and_leaves_nothing(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        (REPO / "scenarios" / "quickstart.toml").read_text().replace("rounds = 10", "rounds = 2")
    )
    port = free_port()
    out = tmp_path / "run"
    with ray_head(port) as temp:
        assert wait_for_port(port, 60), "the Ray head did not start within 60 s"
        done = subprocess.run(
            [str(BIN / "leaksim"), "run", str(scenario), "--ray-address", f"127.0.0.1:{port}",
             "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        logs = list((temp / "session_latest" / "logs").glob("python-core-worker-*.log"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert logs, "no client ran as a worker of the cluster"
    assert not processes_mentioning(str(temp)), "a process of the Ray head was left running"
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
