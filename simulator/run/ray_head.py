"""One Ray start per run: a private Ray head that every sweep point of the run connects to.

Flower's Ray backend starts Ray when no Ray is connected and shuts it down when the
simulation ends, so a sweep that let Flower start Ray paid Ray's start-up (6-10 s here) once
per point. Instead, a run that is not given a user's cluster starts its own head on loopback
before its first point (``ray start --head --block``, in a session of its own) and names it in
``LEAKSIM_RAY_ADDRESS`` for the points, which then connect to it exactly as they connect to a
user's cluster (:func:`simulator.run.cluster.connect`; Flower's shutdown after a point only
disconnects that point's driver). One mechanism serves both: a point always runs on a cluster.

The head's daemons are ended when the run ends: its process group first (SIGTERM, then
SIGKILL), then any daemon that left the group, found by the head's unique temporary folder in
its command line. Every wait is bounded. A run interrupted by a signal ends the head with the
rest of its process tree (:mod:`simulator.run.supervisor`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from simulator.run.cluster import RAY_ADDRESS_ENV, RAY_ENVIRONMENT, ray_address
from simulator.run.network import free_port, processes_mentioning, wait_for_port

GUARD_MODULE = "simulator.run.guard"
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
STOP_TIMEOUT_S = 15.0


class RayHeadError(RuntimeError):
    """The private Ray head did not start; the message holds the end of its log."""


@dataclass(frozen=True)
class RayHead:
    """A running head: its address (``127.0.0.1:PORT``), its process, its temporary folder."""

    address: str
    process: subprocess.Popen[bytes]
    temp: Path


def ray_command() -> list[str]:
    """The ``ray`` command of this interpreter's environment (not whatever is on PATH)."""
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def start_head(
    num_cpus: int, timeout_s: float = START_TIMEOUT_S, guarded_by: int | None = None
) -> RayHead:
    """Start a head on loopback with ``num_cpus`` CPUs; RayHeadError if it is not up in time.

    Every port it opens is picked free here, so that two runs on one machine do not collide
    on Ray's fixed defaults (the client server's 10001, the agents' ports). ``guarded_by``: a
    PID whose end, however it ends, ends the head's every process (:mod:`simulator.run.guard`
    runs it); the head's ``process`` is then the guard.
    """
    # Short and under /tmp: Ray's socket paths live in it and Unix sockets allow ~107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="leaksim-ray-", dir="/tmp"))
    port = free_port()
    command = [
        *ray_command(), "start", "--head", "--block", f"--port={port}",
        f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--min-worker-port=0",  # workers on ports the OS picks: two heads cannot collide
    ]  # fmt: skip
    environment = {**os.environ, **RAY_ENVIRONMENT}
    if guarded_by is not None:
        command = [sys.executable, "-m", GUARD_MODULE, str(guarded_by), *command]
        paths = [str(ROOT), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
        environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    log = (temp / "head.log").open("wb")
    process = subprocess.Popen(
        command,
        env=environment,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    head = RayHead(f"127.0.0.1:{port}", process, temp)
    deadline = time.monotonic() + timeout_s
    while not wait_for_port(port, 0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = (temp / "head.log").read_text(errors="replace")[-600:].strip()
            stop_head(head)
            ending = "exited" if process.returncode is not None else f"not up in {timeout_s} s"
            raise RayHeadError(f"the run's Ray head {ending}: {tail or 'no output'}")
    return head


def stop_head(head: RayHead) -> set[int]:
    """End every process of ``head`` (bounded); returns any still alive (none, normally).

    SIGKILL at once: nothing of a run's head is kept, and on SIGTERM ``ray start --block``
    spends seconds ending its daemons one by one.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(head.process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(STOP_GRACE_S)
    # Daemons that left the head's group still carry its temporary folder in their command line.
    deadline = time.monotonic() + STOP_TIMEOUT_S
    left = set(processes_mentioning(str(head.temp)))
    while left and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        left = set(processes_mentioning(str(head.temp)))
    shutil.rmtree(head.temp, ignore_errors=True)
    return left


@contextlib.contextmanager
def run_cluster(num_cpus: int | None = None) -> Iterator[str]:
    """The Ray cluster a run's points use: the user's (``--ray-address``) when given, else a
    private head started here and ended on the way out. Yields its address."""
    if (address := ray_address()) is not None:
        yield address
        return
    head = start_head(num_cpus or os.cpu_count() or 1)
    previous = os.environ.get(RAY_ADDRESS_ENV)
    os.environ[RAY_ADDRESS_ENV] = head.address
    try:
        yield head.address
    finally:
        if previous is None:
            os.environ.pop(RAY_ADDRESS_ENV, None)
        else:
            os.environ[RAY_ADDRESS_ENV] = previous
        stop_head(head)
