"""Faults a run meets from outside never end as ``ok`` (real runs through ``leaksim run``).

- A client's Ray actor killed mid-run (SIGKILL by PID, found in the run's own process tree):
  Flower keeps the dead actor in its pool, later clients fail on it, and the point ends
  ``degraded`` (exit 3), or ``failed`` (exit 1) should a round lose every client; never
  ``ok``. Each failure reason is one line; Ray's text is in client-errors.log.
- The run folder deleted mid-run: the run stops within a round, exit 1, a one-line error that
  says so, and the folder does not come back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from simulator.federation.traffic import CLIENT_PROCESS_DIED
from simulator.run.cluster import RAY_ADDRESS_ENV
from simulator.run.folder import CLIENT_ERRORS_FILE
from tests.integration.test_interrupt import Run, command_line, start, tree

CORES = os.cpu_count() or 1
# Tiny FedSGD rounds (~0.2 s each), many of them, so that the fault lands mid-run. Two client
# actors exactly (each asks for half the cores): one is killed, one lives on.
SCENARIO = f"""\
name = "faults"
seed = 0

[data]
dataset = "mnist"
partition = "label-skew"
test_examples = 100
examples_per_client = 40

[model]
kind = "mlp"
widths = [8]

[federation]
protocol = "fedsgd"
clients = 4
fraction = 1.0
rounds = 40
batch_size = 4
timeout_s = 60
cpus_per_client = {CORES / 2}
"""
END_WITHIN_S = 120.0


def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "faults.toml"
    path.write_text(SCENARIO)
    return path


def finish(run: Run) -> int:
    try:
        return run.process.wait(timeout=END_WITHIN_S)
    except subprocess.TimeoutExpired:
        run.process.kill()
        pytest.fail(f"the run did not end within {END_WITHIN_S:g} s:\n{run.output()}")


def round_seen(number: int) -> Callable[[Run], bool]:
    def seen(run: Run) -> bool:
        return any(r["kind"] == "round" and r["round"] == number for r in run.records())

    return seen


def client_actors(run: Run) -> list[int]:
    """PIDs of the run's client actors: Ray workers below its own process tree."""
    return sorted(
        pid for pid in tree(run.process.pid) if command_line(pid).startswith(b"ray::ClientApp")
    )


@pytest.mark.timeout(300)
def test_a_killed_client_actor_never_leaves_the_point_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)  # a head of its own: its actors below it
    run = start(tmp_path, "run", str(scenario_file(tmp_path)))
    run.wait_for(round_seen(1), "round 1")
    actors = client_actors(run)
    assert len(actors) == 2, actors
    os.kill(actors[0], signal.SIGKILL)
    code = finish(run)
    records = run.records()
    (point,) = [r for r in records if r["kind"] == "point"]
    failures = [r for r in records if r["kind"] == "failure"]
    print(f"exit {code}, {point['status']}, {len(failures)} failed updates: {point['error']}")
    assert point["status"] != "ok"
    assert (point["status"], code) in {("degraded", 3), ("failed", 1)}, run.output()
    assert failures and {f["reason"] for f in failures} == {CLIENT_PROCESS_DIED}
    assert min(f["round"] for f in failures) >= 2
    if point["status"] == "degraded":
        assert point["error"].startswith("Degraded: a client's Ray worker process died")
        assert point["rounds_completed"] == 40
        last = [line for line in run.output().splitlines() if line.strip()][-1]
        assert last.startswith("point 0 degraded: Degraded:"), run.output()
    log = (run.out / CLIENT_ERRORS_FILE).read_text()
    assert "ActorDiedError" in log or "RayActorError" in log


@pytest.mark.timeout(300)
def test_a_run_folder_deleted_mid_run_stops_it_and_never_comes_back(tmp_path: Path) -> None:
    run = start(tmp_path, "run", str(scenario_file(tmp_path)))
    run.wait_for(round_seen(1), "round 1")
    reached = max(r["round"] for r in run.records() if r["kind"] == "round")
    deadline = time.monotonic() + 10
    while run.out.exists() and time.monotonic() < deadline:  # the run writes as it is deleted
        shutil.rmtree(run.out, ignore_errors=True)
    assert not run.out.exists()
    deleted = time.monotonic()
    code = finish(run)
    ended_after = time.monotonic() - deleted
    output = run.output()
    print(f"exit {code} {ended_after:.1f} s after the deletion (at round {reached})")
    assert code == 1, output
    said = [line for line in output.splitlines() if line.startswith("run failed:")]
    assert len(said) == 1, output
    assert said[0].startswith(f"run failed: the run folder {run.out} disappeared"), output
    for dump in ("Traceback", "*** SIG"):
        assert dump not in output, output
    time.sleep(1.0)  # nothing of the run is left to write it again
    assert not run.out.exists()
