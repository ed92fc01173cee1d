"""Running the simulation on a Ray cluster the user already started.

``LEAKSIM_RAY_ADDRESS`` (set by ``leaksim run --ray-address HOST:PORT``) names the cluster's
head (the GCS address ``ray start --head`` prints); without it a run starts a private head of
its own (:mod:`simulator.run.ray_head`). Each sweep point connects to the cluster and Flower,
finding Ray initialised, uses it as is. What a client needs travels in Ray's runtime
environment of that connection, so only the point's own clients see it: the project on
``PYTHONPATH``, the data settings, the point's truth folder (a path every node must see: one
machine, or a shared filesystem; on nodes that cannot see it clients write no truth and
nothing is scored) and the run's public truth key (:mod:`simulator.run.handoff`). None of it
is set in this process's environment, which the processes it starts would inherit.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping

import ray
from ray._private import ray_constants

RAY_ADDRESS_ENV = "LEAKSIM_RAY_ADDRESS"
# The environment of every Ray process a run starts (its worker, its private head):
# - Ray picks its node address, and so where its servers listen, from the first switch, read
#   when Ray is imported: off (the single-machine setting), they bind to loopback only.
# - Objects up to 16 MiB (a model, an update) travel inside the actor call itself, not through
#   the shared-memory object store: about 4 ms less per client call for a 0.8 MB model.
# - torch's intra-op threads sleep between parallel regions instead of spinning: beside another
#   busy process (an actor, a second lane) spinning threads slowed the KKT toy attack from 2.7
#   to 7-9 s, for 2.3 s against 2.7 s alone (benchmarks/bench_threads.py, threads.json). Same
#   thread count, so the same numbers.
RAY_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_max_direct_call_object_size": str(16 * 2**20),
    "OMP_WAIT_POLICY": "PASSIVE",
}
CONNECT_TIMEOUT_S = 3.0


class ClusterAddressError(ValueError):
    """The address is not HOST:PORT, or nothing listens there."""


def ray_address() -> str | None:
    """The cluster this run uses, or None before the run has started its private head."""
    return os.environ.get(RAY_ADDRESS_ENV) or None


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterAddressError unless ``address`` is HOST:PORT and accepts a connection."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterAddressError(f"--ray-address = {address!r}: expected HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise ClusterAddressError(
            f"--ray-address = {address!r}: nothing answers there ({error.strerror or error}); "
            "start a head with `ray start --head` and give the address it prints"
        ) from None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def connect(address: str, clients: Mapping[str, str] | None = None) -> None:
    """Connect this process to the cluster; ``clients`` is the environment of its workers."""
    if address.rpartition(":")[0] in LOOPBACK:
        # With the switch above on in this process (Ray imported without it), Ray rewrites a
        # loopback address to this machine's network address, where a loopback head does not
        # listen, and retries for ever.
        ray_constants.ENABLE_RAY_CLUSTER = False
    paths = [*sys.path, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    variables = dict(clients or {})
    variables["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    ray.init(
        address=address,
        runtime_env={"env_vars": variables},
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
