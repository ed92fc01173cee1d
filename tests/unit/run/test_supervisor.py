"""simulator.run.supervisor with a stand-in worker: records in order, errors carried back,
a dead worker costs one point, and a signal ends every process of the run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from simulator.core.records import PointRecord, Record
from simulator.run import supervisor
from simulator.run.processes import process_info
from simulator.run.ray_head import RayHead
from simulator.run.supervisor import Interrupted, Supervisor


@pytest.fixture(autouse=True)
def fake_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "WORKER_MODULE", "tests.unit.run.fake_worker")
    monkeypatch.setattr(supervisor, "GRACE_S", 0.5)


class Calls:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.progress: list[tuple[int, int]] = []
        self.interrupts: list[str] = []
        self.running: list[list[int]] = []
        self.lost: list[tuple[int, str]] = []

    def supervisor(self, folder: Path, lanes: int = 1) -> Supervisor:
        return Supervisor(
            folder,
            self.records.append,
            lambda p, r: self.progress.append((p, r)),
            self.stopped,
            lambda p, how: self.lost.append((p, how)),
            lanes=lanes,
        )

    def stopped(self, name: str, running: list[int]) -> None:
        self.interrupts.append(name)
        self.running.append(running)


def planned(tmp_path: Path, plan: str) -> Path:
    (tmp_path / "plan").write_text(plan)
    return tmp_path


def test_records_and_progress_arrive_in_order(tmp_path: Path) -> None:
    calls = Calls()
    calls.supervisor(planned(tmp_path, "ok")).run([0, 1])
    assert [(r.kind, r.point) for r in calls.records] == [
        ("round", 0), ("point", 0), ("round", 1), ("point", 1)
    ]  # fmt: skip
    assert calls.progress == [(0, 0), (1, 0)] and not calls.lost and not calls.interrupts


def test_a_dead_worker_costs_its_point_and_a_new_one_goes_on(tmp_path: Path) -> None:
    calls = Calls()
    calls.supervisor(planned(tmp_path, "crash ok")).run([0, 1, 2])
    assert calls.lost == [(0, "exit status 3")]
    assert [r.point for r in calls.records if isinstance(r, PointRecord)] == [1, 2]


def test_a_head_started_here_is_the_workers_and_ends_with_it(tmp_path: Path) -> None:
    """Each worker start gets a head of its own from ``start_head`` (its address in the
    worker's environment); the head ends when its worker does, the last with the run."""
    heads: list[RayHead] = []

    def start_head(cpus: int | None) -> RayHead:
        temp = tmp_path / f"head-{len(heads)}"
        temp.mkdir()
        sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
        heads.append(RayHead(f"127.0.0.1:{1000 + len(heads)}", sleeper, temp))
        return heads[-1]

    calls = Calls()
    watched = calls.supervisor(planned(tmp_path, "crash ok"))
    watched.start_head = start_head
    watched.run([0, 1])
    assert (tmp_path / "addresses").read_text().split() == [h.address for h in heads]
    assert len(heads) == 2
    assert all(h.process.poll() is not None and not h.temp.exists() for h in heads)


def test_a_workers_threads_wait_passively_unless_the_user_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spinning intra-op threads beside a busy process slow an attack several fold
    (benchmarks/bench_threads.py): the worker gets the passive policy, or the user's own."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    Calls().supervisor(planned(tmp_path, "ok")).run([0])
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    Calls().supervisor(planned(tmp_path, "ok")).run([0])
    assert (tmp_path / "wait-policies").read_text().split() == ["PASSIVE", "ACTIVE"]


def test_the_workers_exception_is_raised_here_with_its_traceback(tmp_path: Path) -> None:
    calls = Calls()
    with pytest.raises(ValueError, match="bad point 0") as info:
        calls.supervisor(planned(tmp_path, "error")).run([0])
    assert any("raised in the run's worker process" in note for note in info.value.__notes__)


def test_a_signal_records_the_stop_and_ends_every_process_of_the_run(tmp_path: Path) -> None:
    calls = Calls()
    run = calls.supervisor(planned(tmp_path, "hang"))
    sleeper_file = tmp_path / "sleeper"
    stopped = 0.0

    def on_record(record: Record) -> None:
        calls.records.append(record)
        deadline = time.monotonic() + 30
        while not (sleeper_file.is_file() and sleeper_file.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
        nonlocal stopped
        stopped = time.monotonic()

    run.on_record = on_record
    with pytest.raises(Interrupted) as info:
        run.run([0, 1])
    assert info.value.signum == signal.SIGTERM and calls.interrupts == ["SIGTERM"]
    assert calls.running == [[0]]  # the point under way when the signal came
    sleeper = int(sleeper_file.read_text())
    info_after = process_info(sleeper)
    assert info_after is None or not info_after.alive  # it ignored SIGTERM: killed
    assert time.monotonic() - stopped >= supervisor.GRACE_S
    assert len(calls.records) == 1  # nothing more was taken from the stopped worker


def test_lanes_run_their_points_at_the_same_time_each_in_order(tmp_path: Path) -> None:
    calls = Calls()
    # "together": each worker waits (bounded) until both have started, so the run can only
    # finish if the two lanes' workers ran at once.
    calls.supervisor(planned(tmp_path, "together together"), lanes=2).run([0, 1, 2, 3])
    finished = [r.point for r in calls.records if isinstance(r, PointRecord)]
    assert sorted(finished) == [0, 1, 2, 3]
    assert [p for p in finished if p % 2 == 0] == [0, 2]  # a lane keeps its points' order
    assert [p for p in finished if p % 2 == 1] == [1, 3]
    assert len(list(tmp_path.glob("started-*"))) == 2 and not calls.lost


def test_a_dead_worker_in_one_lane_costs_one_point_and_the_rest_finish(tmp_path: Path) -> None:
    calls = Calls()
    calls.supervisor(planned(tmp_path, "crash ok ok"), lanes=2).run([0, 1, 2, 3])
    assert len(calls.lost) == 1 and calls.lost[0][1] == "exit status 3"
    lost = calls.lost[0][0]
    assert lost in (0, 1)  # the first point of whichever lane's worker drew "crash"
    finished = sorted(r.point for r in calls.records if isinstance(r, PointRecord))
    assert finished == sorted({0, 1, 2, 3} - {lost})
