"""simulator.run.processes: a run's process tree is found whole (orphans too) and ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from simulator.run.processes import ProcessTree, SignalFlag, process_info, subreaper

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
    "time.sleep(60)"
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")


def alive(pid: int) -> bool:
    info = process_info(pid)
    return info is not None and info.alive


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    tree = ProcessTree.here()
    child = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline()  # its handler is in place
    tree.keep.add(child.pid)
    assert child.pid in tree.alive()
    started = time.monotonic()
    assert tree.end(grace_s=0.5, timeout_s=5.0) == set()
    assert 0.4 < time.monotonic() - started < 5.0
    assert child.wait(5) == -signal.SIGKILL


def test_orphans_are_reparented_to_a_subreaper_and_ended() -> None:
    with subreaper() as took:
        if not took:
            pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) not available")
        tree = ProcessTree.here()
        # the shell starts a sleeper in the background and exits: the sleeper is orphaned
        subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], check=True)
        deadline = time.monotonic() + 5
        while not (orphans := tree.alive()) and time.monotonic() < deadline:
            time.sleep(0.02)
        (orphan,) = orphans
        assert process_info(orphan).ppid == os.getpid()  # type: ignore[union-attr]
        assert tree.end(grace_s=1.0, timeout_s=5.0) == set()
        assert not alive(orphan)
        assert tree.members() == {}  # its zombie was reaped


def test_children_from_before_the_tree_are_left_alone() -> None:
    before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tree = ProcessTree.here()
        assert before.pid not in tree.alive()
        tree.end(grace_s=0.1, timeout_s=1.0)
        assert alive(before.pid)
    finally:
        before.kill()
        before.wait()


def test_the_first_signal_is_a_flag_the_second_calls_for_a_stop() -> None:
    again: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    with SignalFlag(on_again=again.append) as flag:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        deadline = time.monotonic() + 2
        while flag.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (flag.signum, flag.name, again) == (signal.SIGINT, "SIGINT", [])
        os.kill(os.getpid(), signal.SIGTERM)
        while not again and time.monotonic() < deadline:
            time.sleep(0.01)
        assert again == [signal.SIGTERM] and flag.again
    assert signal.getsignal(signal.SIGINT) is previous


WATCHER = """
import os, subprocess, sys, time
from simulator.run.processes import end_with_parent, set_subreaper
set_subreaper(True)
end_with_parent(int(sys.argv[1]), period_s=0.05)
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(os.getpid(), sleeper.pid, flush=True)
time.sleep(60)
"""


def test_a_worker_whose_parent_is_killed_ends_its_own_tree() -> None:
    # parent (a shell that waits) -> watcher (end_with_parent) -> sleeper
    parent = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -c "$0" $$; wait', WATCHER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert parent.stdout is not None
    watcher, sleeper = map(int, parent.stdout.readline().split())
    assert alive(watcher) and alive(sleeper)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while (alive(watcher) or alive(sleeper)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(watcher) and not alive(sleeper)
