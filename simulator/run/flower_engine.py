"""One narrow replacement inside Flower's simulation engine, guarded by its source.

Flower's simulation engine hands messages to the client actors through one thread
(``add_messages_to_queue`` in ``flwr.server.superlink.fleet.vce.vce_api``) that, every 0.1 s,
asks the in-memory link state for one undelivered message *per node*, and the state answers
each such question by scanning and re-validating every stored message. A round of M messages
among N nodes therefore waits up to 0.1 s before any client starts and costs N x M message
checks per sweep, every 0.1 s, for as long as the round lasts (about 10,000 checks a sweep at
100 sampled clients, 100,000 at 100 of 1,000), all of it under the GIL that the server's own
threads need.

:func:`add_messages_to_queue` does the same job with one pass over the stored messages and wakes
as soon as the server stores a message. It runs only where the installed Flower's functions are
the very ones it was written against (their source's SHA-256, :data:`EXPECTED_SOURCES`):
:func:`faster_message_delivery` leaves Flower alone otherwise, and a test fails when Flower's
functions change so the replacement can be reviewed against them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import threading
from collections.abc import Callable, Iterator
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

# The Flower functions the replacement stands in for or relies on, and the SHA-256 of the
# source each had when it was written (Flower 1.41.0).
EXPECTED_SOURCES: dict[str, str] = {
    "vce_api.add_messages_to_queue": (
        "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a"
    ),
    "InMemoryLinkState.get_message_ins": (
        "6547c8dcbc62e12f5b2aa5c69f4de8c7c7072c10d6c0876512cf37197d941056"
    ),
    "InMemoryLinkState.store_message_ins": (
        "a2b78afac51dc4a23d236ccf8d02958c8d0532aac179cd9ad9b1a0d939eecbea"
    ),
    "InMemoryLinkState._check_stored_messages": (
        "2be47567d2478a58b766c116f1f0cd0ae3aa791d4e7e3ee85cb20d31f15a8082"
    ),
}
FLOWER_EXTRACTOR = vce_api.add_messages_to_queue
WAKE_TIMEOUT_S = 0.1  # Flower's own period: how late the extractor sees that the run stopped


def _replaced() -> dict[str, Callable[..., Any]]:
    return {
        "vce_api.add_messages_to_queue": FLOWER_EXTRACTOR,
        "InMemoryLinkState.get_message_ins": InMemoryLinkState.get_message_ins,
        "InMemoryLinkState.store_message_ins": InMemoryLinkState.store_message_ins,
        "InMemoryLinkState._check_stored_messages": InMemoryLinkState._check_stored_messages,
    }


def source_digest(function: Callable[..., Any]) -> str:
    """SHA-256 of a function's source text."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def changed_functions(
    functions: dict[str, Callable[..., Any]] | None = None,
) -> list[str]:
    """The names of the guarded Flower functions whose source differs from the expected."""
    functions = _replaced() if functions is None else functions
    return [name for name, f in functions.items() if source_digest(f) != EXPECTED_SOURCES[name]]


def take_undelivered(state: InMemoryLinkState, nodes: set[int]) -> list[Message]:
    """Every message for ``nodes`` that no node has taken yet, marked delivered, in the order
    they were stored: what ``get_message_ins(node, limit=None)`` returns for each node, in one
    pass (expired or stray messages are dropped by the state's own check, as there)."""
    with state.lock:
        waiting = [
            message_id
            for message_id, message in state.message_ins_store.items()
            if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
        ]
        state._check_stored_messages(set(waiting))  # the state's own validation
        taken = [m for i in waiting if (m := state.message_ins_store.get(i)) is not None]
        delivered_at = now().isoformat()
        for message in taken:
            message.metadata.delivered_at = delivered_at
    return taken


def add_messages_to_queue(
    state: InMemoryLinkState,
    queue: Queue[Message],
    nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """Put the messages the server stores in the queue, as soon as it stores them."""
    if not isinstance(state, InMemoryLinkState):  # a database-backed state: Flower's own way
        FLOWER_EXTRACTOR(state, queue, nodes_mapping, f_stop)
        return
    stored = threading.Event()
    store = state.store_message_ins

    def store_and_wake(message: Message) -> str | None:
        message_id = store(message)
        stored.set()
        return message_id

    # The grid stores through the state instance, so this wrapper sees every message.
    state.store_message_ins = store_and_wake  # type: ignore[method-assign]
    nodes = set(nodes_mapping)
    try:
        while not f_stop.is_set():
            stored.clear()  # before the pass: a message stored during it wakes the next one
            for message in take_undelivered(state, nodes):
                queue.put(message)
            stored.wait(WAKE_TIMEOUT_S)
    finally:
        del state.store_message_ins  # the class's method again


@contextlib.contextmanager
def faster_message_delivery() -> Iterator[bool]:
    """Flower's message extractor replaced by :func:`add_messages_to_queue` for the block, when
    the installed Flower is the one it was written for; yields whether it was replaced."""

    if changed_functions():
        yield False
        return
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = FLOWER_EXTRACTOR
