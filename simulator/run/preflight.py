"""Checks a run needs before any work starts: the data files, this machine, the rules that
need data.

Scenario keys are validated when a scenario is loaded (:mod:`simulator.scenario`); what needs
the data or this machine is checked here, in the driver, before a run folder exists or Ray
starts: the CPU cores and devices a client or an attack asks for exist, every dataset file is
present and verified (MD5) once, every client's shard can be cut, and each sweep point's batch
fits its smallest shard (a larger batch would be clamped by the clients while the server is
told the configured size). Each failure is one line naming the key or file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from simulator.core.config import DataConfig, Scenario
from simulator.core.devices import DeviceError, check_device
from simulator.core.fields import InputError
from simulator.core.protocol import local_steps
from simulator.core.registry import DATASETS
from simulator.data.datasets import (
    DATA_DIR_ENV,
    DataError,
    DataNotFoundError,
    DatasetInfo,
    ensure_files,
    share_verified,
)
from simulator.data.shards import shard_size
from simulator.run.cluster import ClusterAddressError, check_address, ray_address
from simulator.scenario import expand


class PreflightError(InputError):
    """The run cannot start: one line saying which key or file, and what is allowed."""


# Costs of the federation alone on this project's 2-core reference machine
# (benchmarks/results/engine.json: FedSGD MLP runs of 100 and 1000 clients): a point's Ray
# start and client discovery, a round's own overhead, one client's update on one actor, and
# one local SGD step of a small MLP (dlg-defenses-fedavg: 15 points in 20 to 50 minutes).
POINT_START_S = 15.0
DISCOVERY_S_PER_CLIENT = 0.014
ROUND_S = 0.05
UPDATE_S = 0.056
STEP_S = 0.002
# A run whose federation alone is estimated longer than this gets a one-line warning.
WARN_AFTER_S = 3600.0


def check_data_files(data: DataConfig) -> None:
    """The dataset's files are present and intact (downloaded if they can be)."""
    for key, folder in (("data.dir", data.dir), (DATA_DIR_ENV, os.environ.get(DATA_DIR_ENV))):
        if folder and Path(folder).expanduser().exists() and not Path(folder).is_dir():
            raise PreflightError(f"{key} = {folder!r} is not a directory")
    if not isinstance(DATASETS.entry(data.dataset).value, DatasetInfo):
        return  # generated in memory: nothing to read
    try:
        ensure_files(data.dataset, None, data.dir or None)
        share_verified()  # the clients trust these hashes instead of hashing again
    except DataNotFoundError as error:
        files = ", ".join(error.missing)
        raise PreflightError(
            f"data: {data.dataset} files {files} are missing or damaged and could not be "
            f"downloaded; put the verified files in {error.target} or set {DATA_DIR_ENV}"
        ) from None
    except (DataError, OSError) as error:
        raise PreflightError(f"data: {_first_line(error)}") from None


def check_shards(scenario: Scenario) -> None:
    """Every client gets a shard, and the batch fits the smallest one."""
    data, fed = scenario.data, scenario.federation
    try:
        sizes = [shard_size(data, fed.clients, scenario.seed, c) for c in range(fed.clients)]
    except (DataError, OSError) as error:
        raise PreflightError(f"data: {_first_line(error)}") from None
    except ValueError as error:
        raise PreflightError(f"data.partition = {data.partition!r}: {error}") from None
    if fed.batch_size > min(sizes):
        raise PreflightError(
            f"federation.batch_size = {fed.batch_size} is larger than the smallest client "
            f"shard ({min(sizes)} examples); allowed: [1, {min(sizes)}]"
        )


def check_devices(scenario: Scenario, on_cluster: bool) -> None:
    """The attack's device exists here; so do the clients', unless they run on a cluster
    (whose nodes may have GPUs this machine lacks: Ray then places them)."""
    keys = [("attack.device", scenario.attack.device)]
    if not on_cluster:
        keys.append(("federation.device", scenario.federation.device))
    try:
        for key, choice in keys:
            check_device(key, choice)
    except DeviceError as error:
        raise PreflightError(str(error)) from None


def check_cores(scenario: Scenario, on_cluster: bool) -> None:
    """A client's CPU share fits this machine, unless the clients run on a cluster (whose
    nodes may have more cores: Ray then places them)."""
    cores = os.cpu_count() or 1
    cpus = scenario.federation.cpus_per_client
    if not on_cluster and cpus > cores:
        raise PreflightError(
            f"federation.cpus_per_client = {cpus:g} exceeds the {cores} CPU cores of this "
            f"machine; allowed: (0, {cores}]"
        )


def federation_seconds(scenario: Scenario, cores: int | None = None) -> float:
    """A lower bound on the time a run's federations take on ``cores`` cores (this machine's
    by default): Ray's start and discovery per point, then each round's client updates
    spread over the actors that fit. Attacks and scoring are not counted."""
    cores = cores or os.cpu_count() or 1
    total = 0.0
    for point in expand(scenario):
        fed = point.scenario.federation
        actors = max(1, int(cores / fed.cpus_per_client))
        sampled = max(1, int(fed.clients * fed.fraction))
        steps = 1
        if fed.protocol == "fedavg":
            shard = shard_size(point.scenario.data, fed.clients, point.scenario.seed, 0)
            steps = local_steps(shard, fed.batch_size, fed.local_epochs)
        per_round = ROUND_S + math.ceil(sampled / actors) * (UPDATE_S + STEP_S * steps)
        total += POINT_START_S + DISCOVERY_S_PER_CLIENT * fed.clients + fed.rounds * per_round
    return total


def workload_warning(scenario: Scenario) -> str | None:
    """One line when the run's federations alone are estimated to take over an hour here."""
    seconds = federation_seconds(scenario)
    if seconds <= WARN_AFTER_S:
        return None
    fed, points = scenario.federation, len(expand(scenario))
    return (
        f"this run needs at least about {seconds / 3600:.1f} h on {os.cpu_count() or 1} cores "
        f"({points} point(s) x {fed.rounds} rounds of {fed.clients} clients, attacks not "
        f"counted); lower federation.rounds or federation.clients for a shorter run"
    )


def preflight(scenario: Scenario) -> None:
    """Raise PreflightError unless every sweep point of ``scenario`` can run (and the Ray
    cluster it is to use, if any, answers)."""
    if (address := ray_address()) is not None:
        try:
            check_address(address)
        except ClusterAddressError as error:
            raise PreflightError(str(error)) from None
    checked: set[DataConfig] = set()
    for point in expand(scenario):
        check_cores(point.scenario, on_cluster=address is not None)
        check_devices(point.scenario, on_cluster=address is not None)
        data = point.scenario.data
        if data not in checked:
            check_data_files(data)
            checked.add(data)
        try:
            check_shards(point.scenario)
        except PreflightError as error:
            if not point.values:
                raise
            swept = ", ".join(f"{k} = {v!r}" for k, v in point.values.items())
            raise PreflightError(f"sweep point {point.index} ({swept}): {error}") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
