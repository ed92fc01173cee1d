"""Stopping `leaksim run` with SIGINT or SIGTERM, and resuming it (real runs: Ray, ~15 s each).

Each test starts `leaksim run` as a user does, watches its process tree through /proc until a
moment of the run (Ray starting, a round under way, the second sweep point), signals it, and
checks that it ended within 10 s with the shell's status for the signal, an ``interrupted``
record, no ``failure`` record, a readable results.jsonl, a last line that says how to resume,
and no process of its tree left (by PID and start time, recorded before the signal). One
uninterrupted reference run, its two points at once, is shared; a resumed run must end with
its records, point by point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from benchmarks.compare_runs import compare, records
from simulator.cli import app
from simulator.run.cluster import RAY_ADDRESS_ENV
from simulator.run.folder import RunFolder
from tests.integration.conftest import ROOT, leaksim

# Small and quick: 3 clients, a 16-unit MLP, 200 test images, two rounds, two sweep points.
# The timeout is long on purpose: stopping must not wait for it. The numpy partitioner
# ("label-skew"): Flower's would import flwr-datasets in every process that cuts shards (the
# command's preflight, each client actor), seconds per run that have nothing to do with stopping.
SCENARIO = """\
name = "interrupt"
seed = 0

[data]
dataset = "mnist"
partition = "label-skew"
test_examples = 200
examples_per_client = 200

[model]
kind = "mlp"
widths = [16]

[federation]
protocol = "fedavg"
clients = 3
fraction = 1.0
rounds = 2
batch_size = 8
lr = 0.1
timeout_s = 600

[attack]
name = "analytic"
rounds = [1]

[sweep]
"federation.lr" = [0.1, 0.05]
"""
EXIT_WITHIN_S = 10.0
WATCH_S = 240.0  # the longest wait for a moment of the run (Ray starts slowly on 2 busy cores)


def process_table() -> dict[int, tuple[int, int, str]]:
    """{pid: (parent pid, start time, state)} of every visible process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stream:
                fields = stream.read().rpartition(")")[2].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def tree(root: int) -> dict[int, int]:
    """{pid: start time} of the processes below ``root``."""
    table = process_table()
    found: dict[int, int] = {}
    frontier = {root}
    while frontier:
        frontier = {p for p, (ppid, _, _) in table.items() if ppid in frontier} - set(found)
        found.update({p: table[p][1] for p in frontier})
    return found


def command_line(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return stream.read()
    except OSError:
        return b""


@dataclass
class Run:
    """A `leaksim run` subprocess, watched: every process of its tree is remembered."""

    out: Path
    process: subprocess.Popen[bytes]
    log: Path
    seen: dict[int, int] = field(default_factory=dict)
    exit_s: float = 0.0

    def records(self) -> list[dict[str, Any]]:
        path = self.out / "results.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def wait_for(self, moment: Callable[[Run], bool], what: str) -> None:
        """Record the tree every 50 ms until ``moment`` (bounded by WATCH_S)."""
        deadline = time.monotonic() + WATCH_S
        while not moment(self):
            if self.process.poll() is not None:
                pytest.fail(f"the run ended before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"no {what} within {WATCH_S:g} s:\n{self.output()}")
            self.seen.update(tree(self.process.pid))
            time.sleep(0.05)
        self.seen.update(tree(self.process.pid))

    def stop(self, *signals: signal.Signals) -> int:
        """Send the signals (0.3 s apart); returns the exit status and times the exit."""
        started = time.monotonic()
        for index, signum in enumerate(signals):
            if index:
                time.sleep(0.3)
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the run did not end within 60 s of {signals}:\n{self.output()}")
        self.exit_s = time.monotonic() - started
        return code

    def survivors(self) -> list[str]:
        """Processes of the run's tree still alive (same PID and start time), described."""
        table = process_table()
        return [
            f"{pid} {command_line(pid)[:120]!r}"
            for pid, started in self.seen.items()
            if pid in table and table[pid][1] == started and table[pid][2] not in "ZX"
        ]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(tmp_path: Path, name: str, *args: str) -> Run:
    out = tmp_path / name
    log = tmp_path / f"{name}.log"
    with log.open("wb") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "simulator.cli", "run", *args, "--out", str(out)],
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"},
            stdout=stream,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Run(out, process, log)


def exposed_sockets(run: Run) -> list[str]:
    """Listening TCP sockets of the run's processes not bound to loopback (``ss -ltnp``)."""
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    exposed = []
    for line in listing.stdout.splitlines():
        fields = line.split()
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        local = fields[3] if len(fields) > 3 else ""
        loopback = local.startswith(("127.", "[::1]", "[::ffff:127."))
        if pids & set(run.seen) and not loopback:
            exposed.append(line)
    return exposed


def ray_starting(run: Run) -> bool:
    return any(b"raylet" in command_line(pid) for pid in run.seen)


def record_seen(kind: str, point: int) -> Callable[[Run], bool]:
    def seen(run: Run) -> bool:
        return any(r["kind"] == kind and r.get("point") == point for r in run.records())

    return seen


def check_stopped(run: Run, code: int, signum: signal.Signals, point: int) -> dict[str, Any]:
    """What every stop must leave; returns the ``interrupted`` record."""
    output = run.output()
    print(f"{signum.name}: ended {run.exit_s:.2f} s after the signal, status {code}")
    assert code == 128 + signum, output
    assert run.exit_s < EXIT_WITHIN_S, f"ended {run.exit_s:.1f} s after {signum.name}"
    assert run.survivors() == [], f"{len(run.seen)} processes seen"
    assert len(run.seen) >= 2, "the watch saw no worker: the test did not test much"
    records = run.records()  # every line parses
    lines = (run.out / "results.jsonl").read_text().splitlines()
    assert len(records) == len(lines)
    (stopped,) = [r for r in records if r["kind"] == "interrupted"]
    assert stopped["point"] == point and stopped["signal"] == signum.name
    assert not [r for r in records if r["kind"] == "failure"]
    assert not [r for r in records if r["kind"] == "point" and r["point"] == point]
    for dump in ("Traceback", "*** SIG", "Aborted"):
        assert dump not in output, output
    last = output.strip().splitlines()[-1]
    assert f"interrupted by {signum.name}" in last and str(run.out) in last, output
    assert f"leaksim run --resume {run.out}" in last
    assert not list(run.out.glob(".truth-*"))
    return stopped


@pytest.fixture(autouse=True)
def own_ray_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted runs start and end their own Ray head, not the suite's shared one: its
    ending is part of what is checked. (The module's reference run may use the shared one.)"""
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scenario") / "interrupt.toml"
    path.write_text(SCENARIO)
    return path


@pytest.fixture(scope="module")
def reference(scenario: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same sweep, never interrupted, its two points run at once (``--parallel 2``)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = leaksim("run", str(scenario), "--out", str(out), "--parallel", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def point_by_point(first: Path, second: Path) -> list[str]:
    """Differences between two runs of the same sweep, each point's records in their own order
    (points run at once interleave theirs), artifacts included."""
    a, b = records(first), records(second)
    problems = [] if len(a) == len(b) else [f"{len(a)} records against {len(b)}"]
    for point in sorted({r.get("point") for r in a + b}, key=str):
        mine, theirs = ([r for r in x if r.get("point") == point] for x in (a, b))
        if mine != theirs:
            problems.append(f"point {point}: the records differ")
    problems += [p for p in compare(first, second) if p.startswith("artifact")]
    return problems


@pytest.mark.timeout(600)
def test_sigint_in_the_middle_of_a_round(scenario: Path, tmp_path: Path) -> None:
    run = start(tmp_path, "run", str(scenario))
    # round 0 is the initial model's test; round 1 (training, then the attack) is under way
    run.wait_for(record_seen("round", 0), "round 1")
    if shutil.which("ss"):  # Ray is up, clients and all: it listens on loopback only
        assert exposed_sockets(run) == []
    stopped = check_stopped(run, run.stop(signal.SIGINT), signal.SIGINT, 0)
    assert stopped["round"] == 0


@pytest.mark.timeout(900)
def test_sigint_in_the_second_point_then_resume_gives_the_uninterrupted_records(
    scenario: Path, reference: Path, tmp_path: Path
) -> None:
    """The resumed serial run ends with the records of the uninterrupted run, whose points ran
    at once: resuming and running points in parallel each leave every point's records as one
    uninterrupted serial point writes them (checked against each other, one run fewer)."""
    run = start(tmp_path, "run", str(scenario))
    run.wait_for(record_seen("startup", 1), "the second point's federation")
    check_stopped(run, run.stop(signal.SIGINT), signal.SIGINT, 1)
    assert [r["status"] for r in run.records() if r["kind"] == "point"] == ["ok"]
    stopped_lines = (run.out / "results.jsonl").read_text().splitlines()

    done = leaksim("run", "--resume", str(run.out))
    assert done.returncode == 0, done.stderr
    assert point_by_point(reference, run.out) == []
    in_order = [r["point"] for r in records(run.out) if r.get("point") is not None]
    assert in_order == sorted(in_order)  # serial: point 0's records, then point 1's
    moved = (run.out / "interrupted.jsonl").read_text().splitlines()
    assert json.loads(moved[-1])["kind"] == "interrupted"
    assert {json.loads(line)["point"] for line in moved} == {1}
    # nothing lost: the stopped run's lines are the kept ones, then the moved ones
    kept = (run.out / "results.jsonl").read_text().splitlines()[: len(stopped_lines) - len(moved)]
    assert kept + moved == stopped_lines


@pytest.mark.timeout(600)
def test_sigint_while_ray_starts_leaves_none_of_its_processes(
    scenario: Path, tmp_path: Path
) -> None:
    run = start(tmp_path, "run", str(scenario))
    run.wait_for(ray_starting, "Ray's start")
    stopped = check_stopped(run, run.stop(signal.SIGINT), signal.SIGINT, 0)
    assert stopped["round"] == 0


@pytest.mark.timeout(600)
def test_sigterm_ends_the_run_with_status_143(scenario: Path, tmp_path: Path) -> None:
    run = start(tmp_path, "run", str(scenario))
    run.wait_for(record_seen("round", 0), "round 1")
    check_stopped(run, run.stop(signal.SIGTERM), signal.SIGTERM, 0)


@pytest.mark.timeout(600)
def test_sighup_closing_the_terminal_ends_the_run_with_status_129_resumably(
    scenario: Path, tmp_path: Path
) -> None:
    run = start(tmp_path, "run", str(scenario))
    run.wait_for(record_seen("round", 0), "round 1")
    check_stopped(run, run.stop(signal.SIGHUP), signal.SIGHUP, 0)
    assert sorted(p.name for p in run.out.iterdir() if p.name.startswith(".")) == []
    assert RunFolder.open(run.out).rewind(2) == ([], 0)  # resumable, from its first point


@pytest.mark.timeout(600)
def test_a_second_sigint_stops_at_once(scenario: Path, tmp_path: Path) -> None:
    run = start(tmp_path, "run", str(scenario))
    run.wait_for(ray_starting, "Ray's start")
    check_stopped(run, run.stop(signal.SIGINT, signal.SIGINT), signal.SIGINT, 0)


@pytest.mark.timeout(600)
def test_even_sigkill_of_leaksim_leaves_no_process_behind(scenario: Path, tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the worker sees its parent gone and ends its own tree."""
    run = start(tmp_path, "run", str(scenario))
    run.wait_for(ray_starting, "Ray's start")
    assert run.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while run.survivors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.survivors() == []


def test_out_onto_a_non_empty_folder_and_resume_misuse_are_refused(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.jsonl").write_text('{"kind": "round"}\n')
    runner = CliRunner()
    refused = runner.invoke(app, ["run", "quickstart", "--out", str(tmp_path / "old")])
    assert refused.exit_code == 2
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert "not empty" in refused.output and "--resume" in refused.output
    assert (tmp_path / "old" / "results.jsonl").read_text() == '{"kind": "round"}\n'
    mixed = runner.invoke(app, ["run", "quickstart", "--resume", str(tmp_path / "old")])
    assert mixed.exit_code == 2 and "drop SCENARIO" in mixed.output
    not_a_run = runner.invoke(app, ["run", "--resume", str(tmp_path / "old")])
    assert not_a_run.exit_code == 2 and "not a leaksim run folder" in not_a_run.output
