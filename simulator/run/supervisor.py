"""Sweep points in a worker process that this one watches, so that no stop leaves Ray behind.

The worker (``python -m simulator.run.worker``, in a session of its own, so that a terminal's
Ctrl-C reaches only this process) runs the points and sends each record, progress tick and
error here as one JSON line on a pipe. This process is the only writer of results.jsonl: it
hands each record to ``on_record`` as it arrives. On SIGINT or SIGTERM it stops reading (so
nothing the dying federation says, such as clients that stopped answering, is recorded),
calls ``on_interrupt`` and ends every process of the run: the worker at once (SIGKILL: it is
the Ray driver and nothing of it is kept), then Ray's processes (SIGTERM, then SIGKILL after
a short grace), orphans included (:mod:`simulator.run.processes`); then raises
:class:`Interrupted`. It ends the same processes whenever it returns or raises.

A worker that dies mid-point costs that point only: ``on_lost`` records it and a new worker
takes the points after it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.run.cluster import RAY_ENVIRONMENT
from simulator.run.processes import ProcessTree, SignalFlag, subreaper

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


class Channel:
    """The worker's end of the pipe: one JSON object per line, ``{kind: payload}``."""

    def __init__(self, fd: int) -> None:
        self.stream = os.fdopen(fd, "w", buffering=1)

    def send(self, kind: str, payload: Any) -> None:
        self.stream.write(json.dumps({kind: payload}) + "\n")

    def record(self, record: Mapping[str, Any]) -> None:
        self.send("record", record)

    def progress(self, point: int, server_round: int) -> None:
        self.send("progress", [point, server_round])

    def error(self, error: BaseException) -> None:
        try:
            pickled = base64.b64encode(pickle.dumps(error)).decode()
        except Exception:  # an exception that cannot be pickled travels as text
            pickled = None
        text = "".join(traceback.format_exception(error))
        self.send(
            "error",
            {"type": type(error).__name__, "message": str(error), "pickle": pickled, "trace": text},
        )


def rebuilt(payload: Mapping[str, Any]) -> BaseException:
    """The worker's exception, unpickled where possible, with its traceback as a note."""
    error: BaseException
    try:
        error = pickle.loads(base64.b64decode(payload["pickle"]))
    except Exception:
        error = WorkerError(f"{payload['type']}: {payload['message']}")
    error.add_note(f"raised in the run's worker process:\n{payload['trace']}")
    return error


def worker_environment() -> dict[str, str]:
    """The worker's environment: this one, the project importable, Ray on loopback."""
    environment = {**RAY_ENVIRONMENT, **os.environ}
    paths = [str(ROOT), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environment


def _ending(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


@dataclass
class Supervisor:
    """Runs the given points of a run folder in worker processes; see the module docstring."""

    folder: Path
    on_record: Callable[[dict[str, Any]], None]
    on_progress: Callable[[int, int], None]
    on_interrupt: Callable[[str], None]
    on_lost: Callable[[int, str], None]
    verbose: bool = False
    tree: ProcessTree = field(default_factory=ProcessTree.here)
    flag: SignalFlag = field(default_factory=SignalFlag)
    _finished: set[int] = field(default_factory=set)

    def run(self, points: Sequence[int]) -> None:
        """Run ``points`` (indices) to the end; Interrupted on SIGINT or SIGTERM."""
        self.flag.on_again = lambda _signum: self.tree.kill_now()
        remaining = list(points)
        with subreaper(), self.flag:
            try:
                while remaining:
                    ending = self._worker(remaining)
                    remaining = [p for p in remaining if p not in self._finished]
                    self._stop_if_signalled()  # a signal as the worker ended is not lost
                    if remaining:  # the worker died during the first of them
                        self.on_lost(remaining.pop(0), ending)
            finally:
                self.tree.end(GRACE_S, END_TIMEOUT_S, hurry=lambda: self.flag.again)

    def _start(self, points: Sequence[int], fd: int) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", WORKER_MODULE, str(self.folder.resolve()),
            "--points", ",".join(map(str, points)), "--fd", str(fd),
            "--parent", str(os.getpid()),
        ] + (["--verbose"] if self.verbose else [])  # fmt: skip
        return subprocess.Popen(
            command,
            pass_fds=(fd,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            env=worker_environment(),
        )

    def _worker(self, points: Sequence[int]) -> str:
        """One worker over ``points``, until it ends; returns how it ended."""
        reading, writing = os.pipe()
        try:
            worker = self._start(points, writing)
        finally:
            os.close(writing)
        self.tree.keep.add(worker.pid)
        error: BaseException | None = None
        done = ready = False  # "done": it ran every point; "ready": it got to the first
        buffer = b""
        try:
            while True:
                self._stop_if_signalled(worker)
                if select.select([reading], [], [], POLL_S)[0]:
                    chunk = os.read(reading, 1 << 16)
                    if not chunk:
                        break  # the worker closed its end: it has ended
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        self._stop_if_signalled(worker)
                        message = json.loads(line)
                        ready = ready or "ready" in message
                        done = done or "done" in message
                        if "error" in message:
                            error = rebuilt(message["error"])
                        else:
                            self._dispatch(message)
                elif worker.poll() is not None and not select.select([reading], [], [], 0.5)[0]:
                    break  # ended, and nothing more came (its end was inherited and is held)
        finally:
            os.close(reading)
            with contextlib.suppress(subprocess.TimeoutExpired):  # a worker that has finished
                worker.wait(GRACE_S if done or error is not None else POLL_S)
            if worker.poll() is None:
                self.tree.end(0.0, END_TIMEOUT_S, first={worker.pid})
            worker.wait()
            self.tree.keep.discard(worker.pid)
        if error is not None:
            raise error
        if not ready:
            raise WorkerError(
                f"the run's worker process did not start ({_ending(worker.returncode)})"
            )
        return _ending(worker.returncode)

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        if "record" in message:
            record = message["record"]
            if record.get("kind") == "point":
                self._finished.add(record["point"])
            self.on_record(record)
        elif "progress" in message:
            self.on_progress(*message["progress"])

    def _stop_if_signalled(self, worker: subprocess.Popen[bytes] | None = None) -> None:
        """After SIGINT or SIGTERM: record the stop, end every process of the run (the worker
        first), raise Interrupted. Nothing the worker sends afterwards is read."""
        signum = self.flag.signum
        if signum is None:
            return
        self.on_interrupt(self.flag.name)
        first = None if worker is None else {worker.pid}
        self.tree.end(GRACE_S, END_TIMEOUT_S, first=first, hurry=lambda: self.flag.again)
        raise Interrupted(signum)
