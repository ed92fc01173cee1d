"""Process trees and signals (Linux): find every process a run started, and end them all.

A run's processes are found through ``/proc`` parent links, from this process down. Ray
starts helper processes that outlive their parent when it is killed (its DashboardAgent and
RuntimeEnvAgent ignore SIGTERM), so the process that owns a run makes itself a *child
subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): orphans of its subtree are re-parented to it
instead of to init, stay in the walk, and are ended with the rest.

:class:`SignalFlag` turns SIGINT, SIGTERM and SIGHUP into a flag that the owner's loop polls, so no
exception lands in the middle of a write; a second signal kills the tree at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
DEAD_STATES = frozenset("ZXx")  # zombie (exited, not yet reaped) or dead
# Ctrl-C, kill's default, and the hang-up a closing terminal sends: each stops a run the same way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _prctl(option: int, value: object) -> int:
    """``prctl(option, value)``: 0 on success, -1 on failure or where there is no prctl."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0))
    except (OSError, AttributeError):  # not Linux: no prctl
        return -1


def is_subreaper() -> bool:
    """Whether orphaned descendants of this process are re-parented to it."""
    flag = ctypes.c_int(0)
    return _prctl(PR_GET_CHILD_SUBREAPER, ctypes.pointer(flag)) == 0 and bool(flag.value)


def set_subreaper(enabled: bool) -> bool:
    """Make this process the reaper of its orphaned descendants (or stop); True if it took."""
    return _prctl(PR_SET_CHILD_SUBREAPER, int(enabled)) == 0


def end_with_parent(parent: int, period_s: float = 0.25) -> threading.Thread:
    """When ``parent`` ends, however it ends (SIGKILL too), kill this process's tree and exit.

    A daemon thread watches the parent, so the kill does not wait on the main thread. Call
    :func:`set_subreaper` too, so that orphans of the tree stay below this process.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period_s)
        ProcessTree(os.getpid()).kill_now()
        os._exit(128 + signal.SIGKILL)

    thread = threading.Thread(target=watch, name="end-with-parent", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class ProcessInfo:
    """One line of the process table: parent, state letter and start time (clock ticks)."""

    ppid: int
    state: str
    started: int

    @property
    def alive(self) -> bool:
        return self.state not in DEAD_STATES


def process_info(pid: int) -> ProcessInfo | None:
    """``/proc/<pid>/stat`` of one process, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            text = stream.read().decode(errors="replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parens
    try:
        return ProcessInfo(int(fields[1]), fields[0], int(fields[19]))
    except (IndexError, ValueError):
        return None


def process_table() -> dict[int, ProcessInfo]:
    """Every process this user can see: {pid: info}."""
    table = {}
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and (info := process_info(int(entry.name))) is not None:
                table[int(entry.name)] = info
    return table


def descendants(root: int, table: dict[int, ProcessInfo] | None = None) -> set[int]:
    """The processes below ``root`` (children, their children...), dead or alive."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def send(pids: set[int], signum: int) -> None:
    """Signal each process, skipping those that are gone or not ours."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


@dataclass
class ProcessTree:
    """The processes started below this one since it was created (orphans included).

    Children this process already had are left alone, with their subtrees; ``keep`` holds
    children that their own owner waits for (a :class:`subprocess.Popen`), never reaped here.
    """

    root: int = field(default_factory=os.getpid)
    existing: frozenset[int] = frozenset()
    keep: set[int] = field(default_factory=set)

    @classmethod
    def here(cls) -> ProcessTree:
        root = os.getpid()
        table = process_table()
        return cls(root, frozenset(p for p, i in table.items() if i.ppid == root))

    def members(self) -> dict[int, ProcessInfo]:
        """Every process of the tree, zombies included; reaps this process's own zombies."""
        table = process_table()
        outside: set[int] = set(self.existing)
        for pid in self.existing:
            outside |= descendants(pid, table)
        members = {p: table[p] for p in descendants(self.root, table) - outside}
        for pid, info in members.items():
            if not info.alive and info.ppid == self.root and pid not in self.keep:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        return members

    def alive(self) -> set[int]:
        return {pid for pid, info in self.members().items() if info.alive}

    def end(
        self,
        grace_s: float = 2.0,
        timeout_s: float = 6.0,
        first: set[int] | None = None,
        hurry: Callable[[], bool] = lambda: False,
    ) -> set[int]:
        """SIGKILL ``first``, SIGTERM the rest, SIGKILL what is left after ``grace_s``.

        The tree is walked again every 50 ms, so processes started meanwhile (Ray spawns
        while it starts up) are signalled too. Returns those still alive after
        ``timeout_s`` (none, unless a process is stuck in the kernel). ``hurry`` skips the
        grace period (a second Ctrl-C).
        """
        started = time.monotonic()
        send(set(first or ()), signal.SIGKILL)
        terminated: set[int] = set()
        while alive := self.alive():
            elapsed = time.monotonic() - started
            if elapsed > timeout_s:
                return alive
            if elapsed < grace_s and not hurry():
                send(alive - terminated, signal.SIGTERM)
                terminated |= alive
            else:
                send(alive, signal.SIGKILL)
            time.sleep(0.05)
        return set()

    def kill_now(self, rounds: int = 5) -> None:
        """SIGKILL the whole tree a few times over, without waiting for it."""
        for _ in range(rounds):
            alive = self.alive()
            if not alive:
                return
            send(alive, signal.SIGKILL)
            time.sleep(0.02)


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """This process reaps its orphaned descendants while inside; yields whether it could."""
    before = is_subreaper()
    took = before or set_subreaper(True)
    try:
        yield took
    finally:
        if took and not before:
            set_subreaper(False)


@dataclass
class SignalFlag:
    """While entered (in the main thread), SIGINT, SIGTERM and SIGHUP set :attr:`signum`.

    The first signal only sets the flag, for the owner's loop to see. Any later one calls
    ``on_again`` (which should kill everything at once) and, should the main thread not
    have left the block two seconds later, ends the process with status 128 + the first
    signal.
    """

    on_again: Callable[[int], None] = lambda _signum: None
    signum: int | None = None
    again: bool = False
    _previous: dict[int, object] = field(default_factory=dict)
    _watchdog: threading.Timer | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self.again = True
        if self._watchdog is None:
            self._watchdog = threading.Timer(2.0, os._exit, (128 + self.signum,))
            self._watchdog.daemon = True
            self._watchdog.start()
        self.on_again(signum)

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._watchdog is not None:  # the main thread got out in time
            self._watchdog.cancel()
