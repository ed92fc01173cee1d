"""Sweep points in a worker process that this one watches, so that no stop leaves Ray behind.

The worker (``python -m simulator.run.worker``, in a session of its own, so that a terminal's
Ctrl-C reaches only this process) runs the points and sends each record, progress tick and
error here as one JSON line on a pipe (:mod:`simulator.run.channel`). This process is the only
writer of results.jsonl: it hands each record (typed again,
:func:`simulator.core.records.read`) to ``on_record`` as it arrives. On SIGINT or SIGTERM it
stops reading (so nothing the dying federation says, such as clients that stopped answering, is
recorded), calls ``on_interrupt`` and ends every process of the run: the worker at once
(SIGKILL: it is the Ray driver and nothing of it is kept), then Ray's processes (SIGTERM, then
SIGKILL after a short grace), orphans included (:mod:`simulator.run.processes`); then raises
:class:`Interrupted`. It ends the same processes whenever it returns or raises.

A worker that dies mid-point costs that point only: ``on_lost`` records it and a new worker
takes the points after it.

``lanes`` > 1 (``leaksim run --parallel N``) runs that many workers at once, each over every
N-th point, each on a Ray head of its own with its share of the cores; records of different
points then interleave in results.jsonl (every record names its point).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pickle
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.core.records import AttackRecord, BestRecord, PointRecord, Record, read
from simulator.run.cluster import RAY_ADDRESS_ENV, RAY_ENVIRONMENT
from simulator.run.handoff import without_data_settings
from simulator.run.processes import ProcessTree, SignalFlag, send, subreaper
from simulator.run.ray_head import RayHead, stop_head

WORKER_MODULE = "simulator.run.worker"
ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.1
GRACE_S = 2.0
END_TIMEOUT_S = 6.0


class Interrupted(Exception):
    """The run was stopped by a signal; every process of it has ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class WorkerError(RuntimeError):
    """The worker failed in a way that cannot be carried back as the original exception."""


class ExceptionsOnly(pickle.Unpickler):
    """Unpickles exceptions and nothing else: the worker runs plugin code, and a pickle that
    names any other callable would run it here, beside the run's truth key."""

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not an exception")


def rebuilt(payload: Mapping[str, Any]) -> BaseException:
    """The worker's exception, unpickled where possible, with its traceback as a note."""
    error: BaseException
    try:
        error = ExceptionsOnly(io.BytesIO(base64.b64decode(payload["pickle"]))).load()
        if not isinstance(error, BaseException):
            raise TypeError("not an exception")
    except Exception:
        error = WorkerError(f"{payload['type']}: {payload['message']}")
    error.add_note(f"raised in the run's worker process:\n{payload['trace']}")
    return error


def worker_environment(address: str | None = None) -> dict[str, str]:
    """The worker's environment: this one without the data settings (:mod:`simulator.run.
    handoff`), the project importable, Ray on loopback (at ``address``, a head started here)."""
    environment = {**RAY_ENVIRONMENT, **without_data_settings(os.environ)}
    if address is not None:
        environment[RAY_ADDRESS_ENV] = address
    paths = [str(ROOT), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environment


def _ending(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


@dataclass
class Lane:
    """One worker process and the points it still has to run, in order."""

    points: list[int]
    worker: subprocess.Popen[bytes]
    reading: int
    buffer: bytes = b""
    ready: bool = False  # it got to its first point
    done: bool = False  # it ran every point
    error: BaseException | None = None
    head: RayHead | None = None  # the Ray head started here for it, if any

    @property
    def running(self) -> int | None:
        return self.points[0] if self.points else None


@dataclass
class Supervisor:
    """Runs the given points of a run folder in worker processes; see the module docstring.

    ``lanes`` workers run at once, each over every ``lanes``-th point (in order); each runs on
    a Ray head of its own with ``cpus`` CPUs (None: the machine's), or joins the user's
    cluster. ``start_head(cpus)`` starts a worker's head here (the run's clients then run
    below this process, not below the worker: :mod:`simulator.run.tags`); returning None, it
    leaves the worker to start its own or to join the user's cluster.
    """

    folder: Path
    on_record: Callable[[Record], None]
    on_progress: Callable[[int, int], None]
    on_interrupt: Callable[[str, list[int]], None]
    on_lost: Callable[[int, str], None]
    verbose: bool = False
    lanes: int = 1
    cpus: int | None = None
    # Each round's reconstructions, for the scorer; a fresh handoff file for each worker.
    on_refereed: Callable[[Mapping[str, Any]], None] = lambda _values: None
    handoff: Callable[[], Path] | None = None
    # Wraps the handling of each read of a worker's pipe (the run folder's synced_together).
    each_read: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    start_head: Callable[[int | None], RayHead | None] = lambda _cpus: None
    tree: ProcessTree = field(default_factory=ProcessTree.here)
    flag: SignalFlag = field(default_factory=SignalFlag)
    _finished: set[int] = field(default_factory=set)
    _open: list[Lane] = field(default_factory=list)

    def run(self, points: Sequence[int]) -> None:
        """Run ``points`` (indices) to the end; Interrupted on SIGINT, SIGTERM or SIGHUP."""
        self.flag.on_again = lambda _signum: self.tree.kill_now()
        shares = [list(points[k :: self.lanes]) for k in range(max(1, self.lanes))]
        with subreaper(), self.flag:
            try:
                self._open = [self._start(share) for share in shares if share]
                while self._open:
                    self._stop_if_signalled()
                    self._read()
            finally:
                # Workers still running here are left by an error (the run folder gone): like
                # a stop, they are killed at once, before Ray's processes.
                workers = {lane.worker.pid for lane in self._open}
                heads = [lane.head for lane in self._open if lane.head is not None]
                for lane in self._open:
                    with contextlib.suppress(OSError):
                        os.close(lane.reading)
                self._open = []
                self.tree.end(GRACE_S, END_TIMEOUT_S, first=workers, hurry=lambda: self.flag.again)
                for head in heads:
                    stop_head(head)

    def running(self) -> list[int]:
        """The point each worker is on now."""
        return sorted(p for lane in self._open if (p := lane.running) is not None)

    def _start(self, points: Sequence[int]) -> Lane:
        reading, writing = os.pipe()
        command = [
            sys.executable, "-m", WORKER_MODULE, str(self.folder.resolve()),
            "--points", ",".join(map(str, points)), "--fd", str(writing),
            "--parent", str(os.getpid()),
        ] + (["--verbose"] if self.verbose else []) + (
            ["--cpus", str(self.cpus)] if self.cpus else []
        ) + (["--handoff", str(self.handoff())] if self.handoff else [])  # fmt: skip
        head = None
        try:
            head = self.start_head(self.cpus)
            if head is not None:
                self.tree.keep.add(head.process.pid)  # stop_head waits for it
            worker = subprocess.Popen(
                command,
                pass_fds=(writing,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                env=worker_environment(None if head is None else head.address),
            )
        except BaseException:
            os.close(reading)
            if head is not None:
                stop_head(head)
            raise
        finally:
            os.close(writing)
        self.tree.keep.add(worker.pid)
        return Lane(list(points), worker, reading, head=head)

    def _read(self) -> None:
        """Take what the workers sent within one poll; close the lanes whose worker ended."""
        by_fd = {lane.reading: lane for lane in self._open}
        readable = set(select.select(list(by_fd), [], [], POLL_S)[0])
        for fd, lane in by_fd.items():
            if fd in readable:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    with self.each_read():
                        self._take(lane, chunk)
                    continue
            elif lane.worker.poll() is None or select.select([fd], [], [], 0.5)[0]:
                continue  # still running, or it ended and more came (its end is held)
            self._close(lane)  # it closed its end, or it ended and nothing more came

    def _take(self, lane: Lane, chunk: bytes) -> None:
        *lines, lane.buffer = (lane.buffer + chunk).split(b"\n")
        for line in lines:
            self._stop_if_signalled()
            message = json.loads(line)
            lane.ready = lane.ready or "ready" in message
            lane.done = lane.done or "done" in message
            if "error" in message:
                lane.error = rebuilt(message["error"])
            else:
                self._dispatch(message)
                lane.points = [p for p in lane.points if p not in self._finished]

    def _close(self, lane: Lane) -> None:
        """End ``lane``'s worker; raise its error, or hand its unfinished points on."""
        self._open.remove(lane)
        os.close(lane.reading)
        worker = lane.worker
        with contextlib.suppress(subprocess.TimeoutExpired):  # a worker that has finished
            worker.wait(GRACE_S if lane.done or lane.error is not None else POLL_S)
        if worker.poll() is None:  # its own processes only: other lanes' workers run on
            ProcessTree(worker.pid).end(0.0, END_TIMEOUT_S)
            send({worker.pid}, signal.SIGKILL)
        worker.wait()
        self.tree.keep.discard(worker.pid)
        if lane.head is not None:
            stop_head(lane.head)
        if lane.error is not None:
            raise lane.error
        if not lane.ready:
            raise WorkerError(
                f"the run's worker process did not start ({_ending(worker.returncode)})"
            )
        self._stop_if_signalled()  # a signal as the worker ended is not lost
        remaining = list(lane.points)  # kept free of finished points as records arrive
        if remaining:  # the worker died during the first of them
            self.on_lost(remaining.pop(0), _ending(worker.returncode))
        if remaining:
            self._open.append(self._start(remaining))

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        if "record" in message:
            record = read(message["record"])
            if isinstance(record, AttackRecord | BestRecord):
                raise WorkerError(
                    f"the run's worker process sent a score ({record.kind} record); only the "
                    "referee scores: a plugin tried to write its own"
                )
            if isinstance(record, PointRecord):
                self._finished.add(record.point)
            self.on_record(record)
        elif "progress" in message:
            self.on_progress(*message["progress"])
        elif "refereed" in message:
            self.on_refereed(message["refereed"])

    def _stop_if_signalled(self) -> None:
        """After SIGINT or SIGTERM: record the stop, end every process of the run (the workers
        first), raise Interrupted. Nothing the workers send afterwards is read."""
        signum = self.flag.signum
        if signum is None:
            return
        self.on_interrupt(self.flag.name, self.running())
        first = {lane.worker.pid for lane in self._open}
        self.tree.end(GRACE_S, END_TIMEOUT_S, first=first, hurry=lambda: self.flag.again)
        raise Interrupted(signum)
