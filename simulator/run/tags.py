"""The run's tag-key service: the secret that authenticates truths, for the run's clients only.

A client tags each sealed truth with the run's tag key (:mod:`simulator.federation.truth`),
so that the scorer can tell the clients' truths from ones the attack process sealed to the
public key it hands them. The key must therefore reach the clients without passing through the
attack process: not in Ray's runtime environment (the worker sets it) nor in any process's
environment (the same user reads ``/proc/<pid>/environ``). The scoring process serves it on an
abstract Unix socket, whose name the clients are told, and hands it to a peer only when the
kernel's credentials of the connection (``SO_PEERCRED``) name a process below one of its
anchors: the Ray heads it started itself (whose Ray workers are the clients), or, for a run
in one process, that process. The worker, started beside the heads and not below them, is
refused, and so is anything it starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass, field

from simulator.federation.truth import TRUTH_TAG_KEY_ENV, TRUTH_TAGS_ENV
from simulator.run.cluster import ray_address
from simulator.run.processes import process_info
from simulator.run.ray_head import RayHead, start_head

ACCEPT_POLL_S = 0.2
_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid


def below(pid: int, anchors: set[int]) -> bool:
    """Whether ``pid`` is a descendant (not itself) of a process in ``anchors``."""
    seen: set[int] = set()
    info = process_info(pid)
    while info is not None and info.ppid > 1 and info.ppid not in seen:
        if info.ppid in anchors:
            return True
        seen.add(info.ppid)
        info = process_info(info.ppid)
    return False


@dataclass
class TagKeyService:
    """Serves ``key`` on the abstract socket ``name`` to descendants of :meth:`trust`'s PIDs."""

    key: bytes
    name: str = field(default_factory=lambda: f"leaksim-tags-{secrets.token_hex(16)}")
    anchors: set[int] = field(default_factory=set)
    _socket: socket.socket = field(init=False)
    _closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind("\0" + self.name)
        self._socket.listen(64)
        self._socket.settimeout(ACCEPT_POLL_S)
        threading.Thread(target=self._serve, name="tag-key-service", daemon=True).start()

    def trust(self, pid: int) -> None:
        """Hand the key to the processes below ``pid`` from now on."""
        self.anchors.add(pid)

    def start_head(self, cpus: int | None) -> RayHead | None:
        """A Ray head started here (guarded: it ends with this process) whose processes get
        the key; None on the user's cluster, which the worker joins."""
        if ray_address() is not None:
            return None
        head = start_head(cpus or os.cpu_count() or 1, guarded_by=os.getpid())
        self.trust(head.process.pid)
        return head

    def client_environment(self) -> dict[str, str]:
        """How the run's clients get the key: this service's name; on a Ray cluster the user
        started, whose processes are below none of ours, the key itself (in the runtime
        environment that the worker sets, so such a run's seal does not cover forged
        truths)."""
        if ray_address() is not None:
            return {TRUTH_TAG_KEY_ENV: self.key.hex()}
        return {TRUTH_TAGS_ENV: self.name}

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._socket.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            with connection:
                credentials = connection.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size
                )
                pid = _CREDENTIALS.unpack(credentials)[0]
                if below(pid, set(self.anchors)):
                    with contextlib.suppress(OSError):
                        connection.sendall(self.key)
