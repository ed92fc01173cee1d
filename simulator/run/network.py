"""Loopback ports for servers a run or a test starts (Ray heads, SuperLinks)."""

from __future__ import annotations

import contextlib
import os
import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        time.sleep(0.3)
    return False


def processes_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text`` (a unique path of our own).

    Daemons that leave their parent's process group (Ray's) are found this way, by the
    temporary folder they were started with, never by program name.
    """
    pids = []
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as stream:
                    if text in stream.read().decode(errors="ignore"):
                        pids.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in pids if pid != os.getpid()]
