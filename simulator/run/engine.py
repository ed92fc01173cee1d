"""Runs a scenario: each sweep point is one Flower simulation, all on one Ray cluster.

:func:`execute` runs every point into a run folder and returns the folder and the records;
:func:`simulator.api.run` (behind ``leaksim run``) calls it and then writes the report. The
points go through :func:`run_points`, the one sweep loop, either in a worker process that
this one supervises (:mod:`simulator.run.supervisor`: SIGINT, SIGTERM and SIGHUP end the run
within seconds and leave no process behind) or, when ``taps`` must see each round in this
process, in this process. Either way the records are appended to results.jsonl here as they arrive.

A stopped run gets an ``interrupted`` record and raises :class:`RunInterrupted`;
``execute(..., resume=True)`` continues it in its folder from the first unfinished point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal as signal_module
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from simulator.core.config import Scenario
from simulator.core.devices import resolve_device
from simulator.core.records import (
    FailureRecord,
    InterruptedRecord,
    NoteRecord,
    PointRecord,
    Record,
    RecordT,
    RoundRecord,
    StartupRecord,
    of_kind,
)
from simulator.federation.client_app import app as client_app
from simulator.federation.secagg import app as secagg_client_app
from simulator.federation.traffic import CLIENT_PROCESS_DIED
from simulator.federation.traffic import LOG as CLIENT_ERRORS
from simulator.federation.truth import TruthKey
from simulator.run.cluster import connect
from simulator.run.driver import FederationDriver
from simulator.run.flower_engine import faster_message_delivery
from simulator.run.folder import CLIENT_ERRORS_FILE, RunFolder, RunFolderError, recorded
from simulator.run.handoff import Handoff
from simulator.run.privacy import PrivacyLedger
from simulator.run.ray_head import run_cluster
from simulator.run.referee import AttackedRound, Referee, Tap
from simulator.run.seal import Scorer, from_wire, truth_folder
from simulator.run.server_app import make_server_app
from simulator.run.supervisor import Interrupted, Supervisor
from simulator.run.tags import TagKeyService
from simulator.scenario import CHANGED, Point, expand, provenance

ProgressHook = Callable[[Point, int], None]


class RunFailed(RuntimeError):
    """At least one sweep point could not finish, or finished degraded; its record holds the
    reason."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped the run; every process of it has ended, its records
    are kept.

    ``exit_code`` is the shell's status for the signal (130, 143, 129); the message says where
    the results are and how to resume.
    """

    def __init__(self, folder: RunFolder, signal: str, point: int | None, reached: int) -> None:
        where = "after the last point" if point is None else f"at point {point}, round {reached}"
        super().__init__(
            f"interrupted by {signal} {where}: results in {folder.path}; "
            f"resume with: {resume_command(folder.path)}"
        )
        self.folder, self.signal, self.point, self.round = folder, signal, point, reached
        self.exit_code = 128 + int(signal_module.Signals[signal])


def resume_command(path: Path) -> str:
    return f"leaksim run --resume {path}"


@dataclass
class RunResult:
    """What a run left behind: its folder and every record it wrote."""

    folder: RunFolder
    records: list[Record]
    report_error: str | None = None

    def table(self, kind: type[RecordT] = PointRecord) -> list[RecordT]:  # type: ignore[assignment]
        """Records of one kind (``point`` records are the run's summary table)."""
        return of_kind(self.records, kind)


def client_gpus(scenario: Scenario) -> float:
    """The share of a GPU each client's Ray actor asks for: ``gpus_per_client`` when the
    clients train on a GPU (``"cuda"``, or ``"auto"`` where one is seen here), else 0."""
    fed = scenario.federation
    on_gpu = fed.device == "cuda" or resolve_device(fed.device).type == "cuda"
    return fed.gpus_per_client if on_gpu else 0.0


def backend_config(scenario: Scenario) -> dict[str, Any]:
    """The clients' Ray resources: ``cpus_per_client`` cores (and a GPU share) per actor.

    Ray itself is already running when Flower looks (the run's private head or the user's
    cluster, :mod:`simulator.run.ray_head`), so no start-up settings are passed.
    """
    fed = scenario.federation
    return {
        "client_resources": {"num_cpus": fed.cpus_per_client, "num_gpus": client_gpus(scenario)}
    }


@contextlib.contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Keep Flower's per-round INFO chatter out of the user's terminal unless asked for."""
    logger = logging.getLogger("flwr")
    previous = logger.level
    if not verbose:
        logger.setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(previous)


def defense_summary(scenario: Scenario) -> tuple[str, Any]:
    """How a point is defended, for tables and curves: names in order and a strength.

    The strength is the first numeric parameter of the last defense (noise std, pruning
    fraction, clipping norm, ...); the epsilon of DP-SGD is added by the server run.
    """
    names = [entry["name"] for entry in scenario.defenses]
    strength = None
    if scenario.defenses:
        numbers = [v for k, v in scenario.defenses[-1].items() if k != "name" and _is_number(v)]
        strength = numbers[0] if numbers else None
    return "+".join(names) or "none", strength


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


Judge = Callable[[int, AttackedRound], None]  # (point index, the round's reconstructions)


class _AppendLog(logging.Handler):
    """Appends each log line to a file of the run folder, never creating the folder: a folder
    that is gone is the records' writer's to report (:class:`RunFolderLost`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError), self.path.open("a") as stream:
            stream.write(self.format(record) + "\n")


@contextlib.contextmanager
def client_error_log(folder: RunFolder | None) -> Iterator[None]:
    """Ray's whole text of every client error, into the run folder's client-errors.log; the
    ``failure`` records keep one readable line each."""
    if folder is None:
        yield
        return
    handler, previous = _AppendLog(folder.path / CLIENT_ERRORS_FILE), CLIENT_ERRORS.level
    CLIENT_ERRORS.addHandler(handler)
    CLIENT_ERRORS.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        CLIENT_ERRORS.removeHandler(handler)
        CLIENT_ERRORS.setLevel(previous)


def degradation(scenario: Scenario, referee: Referee) -> str | None:
    """Why a point that finished is not ``ok`` (one line), or None.

    A client's Ray worker process that died is never replaced (Flower's actor pool keeps
    handing it clients), so one such failure degrades the point; otherwise it is degraded
    when some client failed more than ``faults.max_failed_share`` of the updates it was asked
    for (asked: its failures plus the rounds it took part in).
    """
    failed = Counter(f.client for f in referee.failures)
    if not failed:
        return None
    died = [f for f in referee.failures if f.reason == CLIENT_PROCESS_DIED]
    if died:
        return (
            f"Degraded: a client's Ray worker process died in round {died[0].round} and was "
            f"not replaced; {len(referee.failures)} updates failed (Ray's report: "
            f"{CLIENT_ERRORS_FILE})"
        )
    asked = {c: n + referee.privacy.participations[c] for c, n in failed.items()}
    worst = max(sorted(failed), key=lambda c: failed[c] / asked[c])
    bound = scenario.faults.max_failed_share
    if failed[worst] / asked[worst] <= bound:
        return None
    return (
        f"Degraded: client {worst} failed {failed[worst]} of the {asked[worst]} updates it was "
        f"asked for, more than faults.max_failed_share = {bound:g}"
    )


def run_point(
    point: Point,
    emit: Callable[[Record], None],
    judge: Judge,
    handoff: Handoff,
    on_round: Callable[[int], None] = lambda _r: None,
    verbose: bool = False,
    folder: RunFolder | None = None,
) -> PointRecord:
    """Run one sweep point through Flower; returns its summary (``point``) record.

    Each round's reconstructions go to ``judge`` (the scorer, in this process or across the
    worker's pipe); the point's clients write their sealed truths to its folder in the run's
    truth folder, which ``handoff`` names to them (and only to them).
    """
    scenario = point.scenario
    rounds: list[RoundRecord] = []

    def tagged(record: Record) -> None:
        if isinstance(record, RoundRecord):
            rounds.append(record)
        emit(dataclasses.replace(record, point=point.index))

    started = time.perf_counter()
    error: BaseException | None = None
    with quiet_flower(verbose), client_error_log(folder):
        referee = Referee(
            scenario, tagged, PrivacyLedger(scenario), lambda round_: judge(point.index, round_)
        )
        driver = FederationDriver(scenario, tagged, referee, on_progress=on_round)
        clients = secagg_client_app if driver.secure_aggregation else client_app
        try:
            with run_cluster() as address, faster_message_delivery():
                connect(address, handoff.client_environment(point.index))
                run_simulation(
                    server_app=make_server_app(driver),
                    client_app=clients,
                    num_supernodes=scenario.federation.clients,
                    backend_config=backend_config(scenario),  # type: ignore[arg-type]
                )
        except Exception as raised:  # Flower re-raises the ServerApp's error; keep its cause
            error = raised.__cause__ or raised
    defense, strength = defense_summary(scenario)
    degraded = None if error else degradation(scenario, referee)
    summary = PointRecord(
        point=point.index,
        swept=point.values,
        status="failed" if error else "degraded" if degraded else "ok",
        rounds_completed=max((r.round for r in rounds), default=0),
        defense=defense,
        strength=strength,
        final_accuracy=rounds[-1].test_accuracy if rounds else None,
        failed_updates=len(referee.failures),
        seconds=time.perf_counter() - started,
        error=degraded if error is None else f"{type(error).__name__}: {error}",
    )
    emit(summary)
    return summary


def run_points(
    points: Sequence[Point],
    emit: Callable[[Record], None],
    judge: Judge,
    handoff: Handoff,
    on_round: ProgressHook = lambda _p, _r: None,
    verbose: bool = False,
    folder: RunFolder | None = None,
    num_cpus: int | None = None,
) -> None:
    """The sweep loop: each point through Flower in turn (in the worker, or in-process), all
    of them on one Ray cluster (one Ray start per run; ``num_cpus`` for a private head)."""
    with run_cluster(num_cpus):
        for point in points:
            on_point = lambda r, p=point: on_round(p, r)  # noqa: E731
            run_point(point, emit, judge, handoff, on_point, verbose, folder)


@dataclass
class Progress:
    """How far each point of a sweep got, from the records as they are written."""

    pending: list[int]
    finished: set[int] = field(default_factory=set)
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)
    since: float = field(default_factory=time.perf_counter)

    def see(self, record: Record) -> None:
        point = record.point
        if point is None:
            return
        if isinstance(record, PointRecord):
            self.finished.add(point)
            self.since = time.perf_counter()
        elif isinstance(record, RoundRecord):
            self.rounds[point] = record
        elif isinstance(record, FailureRecord):
            self.failures[point] = self.failures.get(point, 0) + 1

    def current(self) -> int | None:
        """The point running now, points run one by one: the first pending one without a
        summary."""
        return next((p for p in self.pending if p not in self.finished), None)

    def reached(self, point: int) -> int:
        return self.rounds[point].round if point in self.rounds else 0

    def lost(self, point: Point, ending: str) -> PointRecord:
        """The summary of a point whose process died (``ending``: how) before writing one."""
        defense, strength = defense_summary(point.scenario)
        last = self.rounds.get(point.index)
        return PointRecord(
            point=point.index,
            swept=point.values,
            status="failed",
            rounds_completed=self.reached(point.index),
            defense=defense,
            strength=strength,
            final_accuracy=None if last is None else last.test_accuracy,
            failed_updates=self.failures.get(point.index, 0),
            seconds=time.perf_counter() - self.since,
            error=f"WorkerDied: the point's process ended ({ending})",
        )


def open_folder(
    scenario: Scenario, out_dir: Path | str | None, runs_root: Path | str, resume: bool
) -> tuple[RunFolder, list[Record], int]:
    """(the run folder, the records it keeps, the first point to run)."""
    if not resume:
        return RunFolder.create(scenario, root=runs_root, path=out_dir), [], 0
    if out_dir is None:
        raise RunFolderError("resuming needs the run folder (out_dir)")
    folder = RunFolder.open(out_dir)
    if folder.scenario().to_dict() != recorded(scenario).to_dict():
        raise RunFolderError(f"{out_dir} holds a run of another scenario; cannot resume it")
    kept, first = folder.rewind(len(expand(scenario)))
    return folder, kept, first


def execute(
    scenario: Scenario,
    out_dir: Path | str | None = None,
    runs_root: Path | str = "runs",
    on_round: ProgressHook = lambda _p, _r: None,
    verbose: bool = False,
    raise_on_failure: bool = True,
    taps: Sequence[Tap] = (),
    finish: Callable[[Path], object] = lambda _path: None,
    resume: bool = False,
    isolate: bool | None = None,
    parallel: int = 1,
) -> RunResult:
    """Run every point of ``scenario``'s sweep, writing records as they complete.

    ``finish`` is called with the run folder once every point has ended (the report layer's
    summary writer, from :func:`simulator.api.run`); its error is kept, not raised.

    ``taps`` are called with each refereed round (its traffic, then its truths, read after
    the attacks returned); they need the points run in this process, so ``isolate`` (run
    them in a supervised worker process) defaults to "no taps".

    ``resume``: continue the run in ``out_dir`` (a folder of this scenario) from its first
    unfinished point; the records of that point and later ones move to interrupted.jsonl.

    ``parallel``: points run at once, each worker on its own Ray head with an equal share of
    the cores (a user's cluster is shared); their records interleave, each naming its point.
    """
    isolate = not taps if isolate is None else isolate
    if isolate and taps:
        raise ValueError("taps see each round in this process: they need isolate=False")
    if parallel < 1 or (parallel > 1 and not isolate):
        raise ValueError("parallel >= 1, and parallel points need worker processes (no taps)")
    folder, records, first = open_folder(scenario, out_dir, runs_root, resume)
    points = expand(scenario)
    pending = points[first:]
    progress = Progress([p.index for p in pending])
    key, truth_root = TruthKey.generate(), truth_folder(folder)
    plugins = provenance(scenario.plugins)  # hashed here, where the worker cannot say otherwise

    def emit(record: Record) -> None:
        if isinstance(record, StartupRecord):
            record = dataclasses.replace(record, plugins=plugins)
        folder.append(record)
        records.append(record)
        progress.see(record)
        if isinstance(record, PointRecord) and record.point is not None:
            scorer.end_point(record.point)

    scorer = Scorer(
        {p.index: p.scenario for p in points}, key, truth_root, emit, folder.save_attack, taps
    )

    stopped: list[RunInterrupted] = []

    def stop(signal: str, running: Sequence[int] = ()) -> None:
        """Write the running points' ``interrupted`` records (before their processes end)."""
        current = progress.current()
        running = list(running) or ([] if current is None else [current])
        for point in running:
            emit(InterruptedRecord(point, signal, progress.reached(point)))
        first = min(running, default=None)
        reached = 0 if first is None else progress.reached(first)
        stopped.append(RunInterrupted(folder, signal, first, reached))

    tags = TagKeyService(key.tags)
    try:
        handoff = Handoff.build(truth_root, key.public, pending, tags.client_environment())
        if isolate:
            Supervisor(
                folder.path,
                emit,
                lambda index, server_round: on_round(points[index], server_round),
                stop,
                lambda index, ending: emit(progress.lost(points[index], ending)),
                verbose,
                lanes=min(parallel, len(pending)) or 1,
                cpus=max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None,
                on_refereed=lambda values: scorer.take(*from_wire(values)),
                handoff=handoff.issue,
                each_read=folder.synced_together,
                start_head=tags.start_head,
            ).run(progress.pending)
        else:
            tags.trust(os.getpid())  # the clients are below this process's own Ray head
            run_points(pending, emit, scorer.take, handoff, on_round, verbose, folder)
    except Interrupted:
        pass  # stop() has run
    except KeyboardInterrupt:  # points in this process: Ctrl-C arrives as an exception
        stop("SIGINT")
    finally:
        tags.close()
        shutil.rmtree(truth_root, ignore_errors=True)
    for now, then in zip(provenance(scenario.plugins), plugins, strict=True):
        if now != then:
            emit(NoteRecord(f"plugin file {then['path']} {CHANGED}: SHA-256 {now['sha256']}"))
    if stopped:
        folder.tidy()
        raise stopped[0]
    result = RunResult(folder, records)
    try:
        finish(folder.path)
    except KeyboardInterrupt:  # every point has ended: resuming draws the report again
        raise RunInterrupted(folder, "SIGINT", None, 0) from None
    except Exception as error:  # the records are safe on disk; `leaksim report` can retry
        result.report_error = f"{type(error).__name__}: {error}"
    failed = [r for r in result.table() if r.status != "ok"]
    if failed and raise_on_failure:
        lines = "\n".join(f"  point {r.point} ({r.status}): {r.error}" for r in failed)
        raise RunFailed(
            f"{len(failed)} of {len(points)} points failed or degraded (records in "
            f"{folder.path}):\n{lines}"
        )
    return result
