"""What a run hands the process that runs its attacks, so that it needs no data folder and no
truth key: the clients' settings, the public data as arrays, and the shard sizes.

The worker (:mod:`simulator.run.worker`: Flower's ServerApp, the malicious server, every
plugin) starts with no data folder in its environment (:func:`worker_environment` strips
it). The supervising process writes a :class:`Handoff` to the run's private truth folder once;
the worker reads it before it imports any plugin file and serves the test split and the shard
sizes from it (:func:`simulator.data.shards.hand_test_split`). What the clients need (the data
folder, the hashes of its verified files, the point's truth folder and the run's public key)
goes to them in Ray's runtime environment of the point's connection only
(:func:`simulator.run.cluster.connect`), never into this process's environment.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulator.data.datasets import DATA_DIR_ENV, VERIFIED_ENV, data_folder
from simulator.data.shards import hand_shard_sizes, hand_test_split, shard_size, test_split
from simulator.federation.truth import (
    TRUTH_DIR_ENV,
    TRUTH_KEY_ENV,
    TRUTH_TAG_KEY_ENV,
    TRUTH_TAGS_ENV,
)
from simulator.run.seal import point_store
from simulator.scenario import Point

# The data folder settings a client reads and the attack process must not hold.
DATA_ENVIRONMENT = (DATA_DIR_ENV, VERIFIED_ENV)


def data_environment(environment: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The clients' data settings found in ``environment``."""
    return {name: environment[name] for name in DATA_ENVIRONMENT if name in environment}


def without_data_settings(environment: Mapping[str, str]) -> dict[str, str]:
    """``environment`` without the data folder settings nor any truth folder or key."""
    hidden = {*DATA_ENVIRONMENT, TRUTH_DIR_ENV, TRUTH_KEY_ENV, TRUTH_TAGS_ENV, TRUTH_TAG_KEY_ENV}
    return {name: value for name, value in environment.items() if name not in hidden}


@dataclass(frozen=True)
class Handoff:
    """The run's private truth folder and public key, the clients' data settings, and per
    point the public arrays and shard sizes the attack process may use."""

    truth_root: Path
    public_key: bytes
    clients: Mapping[str, str]
    sizes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    tests: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # Per point whose scenario names a data folder (``data.dir``): the folder its dataset's
    # files were found in, for its clients' LEAKSIM_DATA_DIR (the scenario the worker holds
    # and sends them names none: simulator.run.folder.recorded).
    data_dirs: Mapping[int, str] = field(default_factory=dict)
    # How the clients get the run's tag key (simulator.run.tags.TagKeyService).
    tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        truth_root: Path,
        public_key: bytes,
        points: Iterable[Point],
        tags: Mapping[str, str] | None = None,
    ) -> Handoff:
        """Read in this process (which holds the data settings) what ``points`` need."""
        sizes, tests, data_dirs = {}, {}, {}
        for point in points:
            scenario = point.scenario
            data, clients = scenario.data, scenario.federation.clients
            sizes[point.index] = tuple(
                shard_size(data, clients, scenario.seed, c) for c in range(clients)
            )
            tests.setdefault(data.dataset, test_split(data))
            if data.dir and (found := data_folder(data.dataset, data.dir)) is not None:
                data_dirs[point.index] = str(found)
        environment = data_environment()
        return cls(truth_root, public_key, environment, sizes, tests, data_dirs, dict(tags or {}))

    def client_environment(self, point: int) -> dict[str, str]:
        """What the clients of ``point`` are told: data settings, truth folder, public key and
        how to get the tag key."""
        data_dir = {DATA_DIR_ENV: self.data_dirs[point]} if point in self.data_dirs else {}
        return {
            **self.clients,
            **data_dir,
            **self.tags,
            TRUTH_DIR_ENV: str(point_store(self.truth_root, point)),
            TRUTH_KEY_ENV: self.public_key.hex(),
        }

    def serve(self, points: Iterable[Point]) -> None:
        """Serve ``points``' test splits and shard sizes in this process from the handoff."""
        for dataset, (images, labels) in self.tests.items():
            hand_test_split(dataset, images, labels)
        for point in points:
            scenario = point.scenario
            if point.index in self.sizes:
                hand_shard_sizes(
                    scenario.data, scenario.federation.clients, scenario.seed,
                    self.sizes[point.index],
                )  # fmt: skip

    def issue(self) -> Path:
        """A fresh file of this handoff for one worker, which deletes it once read."""
        return self.write(self.truth_root / f"handoff-{secrets.token_hex(8)}.npz")

    def write(self, path: Path) -> Path:
        settings = {
            "truth_root": str(self.truth_root),
            "public_key": self.public_key.hex(),
            "clients": dict(self.clients),
            "sizes": {str(k): list(v) for k, v in self.sizes.items()},
            "data_dirs": {str(k): v for k, v in self.data_dirs.items()},
            "tags": dict(self.tags),
            "datasets": list(self.tests),
        }
        arrays = {"settings": np.array(json.dumps(settings))}
        for index, (images, labels) in enumerate(self.tests.values()):
            arrays[f"images-{index}"], arrays[f"labels-{index}"] = images, labels
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as stream:
            np.savez(stream, **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def take(cls, path: Path) -> Handoff:
        """Read the handoff at ``path`` and delete the file."""
        try:
            return cls.read(path)
        finally:
            path.unlink(missing_ok=True)

    @classmethod
    def read(cls, path: Path) -> Handoff:
        with np.load(path, allow_pickle=False) as arrays:
            settings = json.loads(str(arrays["settings"]))
            tests = {
                name: (np.array(arrays[f"images-{i}"]), np.array(arrays[f"labels-{i}"]))
                for i, name in enumerate(settings["datasets"])
            }
        return cls(
            Path(settings["truth_root"]),
            bytes.fromhex(settings["public_key"]),
            dict(settings["clients"]),
            {int(k): tuple(v) for k, v in settings["sizes"].items()},
            tests,
            {int(k): str(v) for k, v in settings["data_dirs"].items()},
            dict(settings["tags"]),
        )
