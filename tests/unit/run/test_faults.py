"""Faults never end as ``ok``: too many failed updates or a dead client process degrade a
point; failure reasons are one line, Ray's text goes to client-errors.log; a run folder that
is gone is never made again."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator.core.protocol import Truth
from simulator.core.records import Record, RoundRecord
from simulator.federation.traffic import (
    CLIENT_PROCESS_DIED,
    Failure,
    RoundTraffic,
    client_error_message,
)
from simulator.federation.truth import TruthKey, TruthStore
from simulator.run.engine import RunInterrupted, client_error_log, degradation
from simulator.run.folder import CLIENT_ERRORS_FILE, RunFolder, RunFolderLost
from simulator.run.privacy import PrivacyLedger
from simulator.run.processes import SignalFlag
from simulator.run.referee import Referee
from simulator.scenario import load

# What Flower's simulation puts in an error reply: the exception's class, then its text.
ACTOR_DIED = (
    "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing "
    "this task.\n\tclass_name: ClientAppActor\n\tactor_id: 5f1a\n\tpid: 4242\n\tip: "
    "127.0.0.1\nThe actor is dead because its worker process has died.'>"
)
CLIENT_RAISED = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
    "ClientAppException occurred. Message: injected crash of client 2\n  in round 2'>"
)


def refereed(rounds: list[tuple[tuple[int, ...], dict[int, str]]], **overrides: object) -> tuple:
    """A referee that saw ``rounds`` of (sampled clients, {failed client: reason})."""
    scenario = load("quickstart", {"federation.clients": 4, **overrides})
    records: list[Record] = []
    judge = Referee(scenario, records.append, PrivacyLedger(scenario))
    for number, (sampled, failed) in enumerate(rounds, start=1):
        failures = tuple(Failure(number, c, reason) for c, reason in sorted(failed.items()))
        judge.on_round(RoundTraffic(number, sampled, (), failures))
    return scenario, judge


def test_a_client_failing_more_than_half_its_rounds_degrades_the_point() -> None:
    rounds = [((0, 1, 2), {2: "boom"}), ((0, 2), {2: "boom"}), ((1, 2), {})]
    scenario, judge = refereed(rounds)
    assert degradation(scenario, judge) == (
        "Degraded: client 2 failed 2 of the 3 updates it was asked for, more than "
        "faults.max_failed_share = 0.5"
    )


def test_half_is_not_more_than_half_and_the_bound_is_the_scenarios() -> None:
    rounds = [((0, 1), {1: "boom"}), ((0, 1), {})]
    scenario, judge = refereed(rounds)
    assert degradation(scenario, judge) is None
    strict, judge = refereed(rounds, **{"faults.max_failed_share": 0.0})
    assert degradation(strict, judge).startswith("Degraded: client 1 failed 1 of the 2")
    lenient, judge = refereed([((0,), {0: "boom"})], **{"faults.max_failed_share": 1.0})
    assert degradation(lenient, judge) is None
    assert degradation(*refereed([((0, 1), {}), ((2, 3), {})])) is None


def test_a_dead_client_process_degrades_the_point_whatever_the_share() -> None:
    rounds = [((0, 1, 2, 3), {}), ((0, 1, 2, 3), {3: CLIENT_PROCESS_DIED}), ((0, 1, 2, 3), {})]
    scenario, judge = refereed(rounds, **{"faults.max_failed_share": 1.0})
    message = degradation(scenario, judge)
    assert message is not None
    assert message.startswith("Degraded: a client's Ray worker process died in round 2")
    assert CLIENT_ERRORS_FILE in message


def test_failure_reasons_are_one_readable_line_and_rays_text_is_logged(tmp_path: Path) -> None:
    folder = RunFolder.create(load("quickstart"), path=tmp_path / "run")
    with client_error_log(folder):
        died = client_error_message(ACTOR_DIED, "round 2, client 3")
        raised = client_error_message(CLIENT_RAISED, "round 2, client 2")
    assert died == CLIENT_PROCESS_DIED
    assert raised == "injected crash of client 2 in round 2"
    assert client_error_message("<class 'TimeoutError'>:<'\n  late\n'>") == "TimeoutError: late"
    assert client_error_message("no reply\n  at all") == "at all"  # not Flower's form
    log = (folder.path / CLIENT_ERRORS_FILE).read_text()
    assert "round 2, client 3: <class 'ray.exceptions.ActorDiedError'>" in log
    assert "pid: 4242" in log and "round 2, client 2" in log
    # outside a run nothing is written anywhere, and nothing is printed
    before = log
    client_error_message(ACTOR_DIED)
    assert (folder.path / CLIENT_ERRORS_FILE).read_text() == before
    assert not logging.getLogger("simulator.federation.traffic").handlers


def test_a_deleted_run_folder_stops_every_writer_and_is_never_made_again(
    tmp_path: Path,
) -> None:
    folder = RunFolder.create(load("quickstart"), path=tmp_path / "run")
    folder.append(RoundRecord(0, 0.1, 2.3))
    (folder.path / ".truth-abc").mkdir()
    key = TruthKey.generate()
    store = TruthStore(folder.path / ".truth-abc" / "point-0", key.public, tag_key=key.tags)
    store.put(Truth(1, 0, torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)))
    for child in sorted(folder.path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    folder.path.rmdir()
    with pytest.raises(RunFolderLost, match=r"the run folder .*run disappeared .*it is gone"):
        folder.append(RoundRecord(1, 0.2, 2.0))
    with pytest.raises(RunFolderLost):
        folder.save_arrays("p0-attack-r1-c0", {"x": np.zeros(2)})
    with pytest.raises(OSError):
        store.put(Truth(2, 0, torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)))
    with client_error_log(folder):
        client_error_message(ACTOR_DIED)
    assert not folder.path.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_run_folder_stops_the_run(tmp_path: Path) -> None:
    folder = RunFolder.create(load("quickstart"), path=tmp_path / "run")
    folder.append(RoundRecord(0, 0.1, 2.3))
    folder.path.chmod(0o500)
    try:
        with pytest.raises(RunFolderLost, match="it cannot be written"):
            folder.append(RoundRecord(1, 0.2, 2.0))
    finally:
        folder.path.chmod(0o700)


def test_sighup_is_a_stop_signal_with_the_shells_status_129(tmp_path: Path) -> None:
    with SignalFlag() as flag:
        os.kill(os.getpid(), signal.SIGHUP)  # the default would end this process
        deadline = time.monotonic() + 2
        while flag.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.name == "SIGHUP"
    stop = RunInterrupted(RunFolder(tmp_path), "SIGHUP", 0, 1)
    assert stop.exit_code == 129
    assert "interrupted by SIGHUP at point 0, round 1" in str(stop)
    codes = {name: RunInterrupted(RunFolder(tmp_path), name, 0, 1).exit_code for name in (
        "SIGINT", "SIGTERM"
    )}  # fmt: skip
    assert codes == {"SIGINT": 130, "SIGTERM": 143}
