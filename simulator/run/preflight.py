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

import os
from pathlib import Path

from simulator.core.config import DataConfig, Scenario
from simulator.core.devices import DeviceError, check_device
from simulator.core.fields import InputError
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
