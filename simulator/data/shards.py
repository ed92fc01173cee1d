"""A client's shard and the global test set, read through the dataset and partition layers.

Deterministic for (data config, number of clients, seed), so the referee and tests can rebuild
exactly what a client holds without asking it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from simulator.core.config import DataConfig
from simulator.data.datasets import load_labels, load_split, to_tensor
from simulator.data.partition import partition, training_pool


@dataclass(frozen=True)
class Shard:
    """One client's training data: images in [0, 1], shape (n, C, H, W), and labels."""

    inputs: torch.Tensor
    labels: torch.Tensor


# What a run hands a process that never reads the data files itself (the attack process: see
# simulator.run.handoff): the test split, by dataset, and the shard sizes, by (data, number of
# clients, seed). Looked up before any file.
_HANDED_TESTS: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_HANDED_SIZES: dict[tuple[DataConfig, int, int], tuple[int, ...]] = {}


def hand_test_split(dataset: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Serve ``dataset``'s test split from these arrays in this process (read-only)."""
    images.flags.writeable = False
    labels.flags.writeable = False
    _HANDED_TESTS[dataset] = (images, labels)


def hand_shard_sizes(data: DataConfig, num_clients: int, seed: int, sizes: tuple[int, ...]) -> None:
    """Serve the shard sizes of (``data``, ``num_clients``, ``seed``) in this process."""
    _HANDED_SIZES[(data, num_clients, seed)] = tuple(sizes)


def test_split(data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The whole test split of ``data.dataset``: handed to this process, or read."""
    if data.dataset in _HANDED_TESTS:
        return _HANDED_TESTS[data.dataset]
    return load_split(data.dataset, "test", data.dir or None)


@functools.lru_cache(maxsize=4)
def _shard_indices(data: DataConfig, num_clients: int, seed: int) -> tuple[np.ndarray, ...]:
    all_labels = load_labels(data.dataset, "train", data.dir or None)
    pool = training_pool(all_labels, data.train_examples, data.train_balance, seed)
    labels = all_labels[pool]
    shards = partition(labels, num_clients, data.partition, seed=seed, params=data.params)
    if data.examples_per_client:
        shards = [s[: data.examples_per_client] for s in shards]
    return tuple(pool[s] for s in shards)


# The shards of the last partition this process read, by client: (data, clients, seed) -> shards.
@dataclass
class _LastPartition:
    """The shards read so far of the last partition a process asked for."""

    key: tuple[DataConfig, int, int] | None = None
    shards: dict[int, Shard] = field(default_factory=dict)


_LAST = _LastPartition()


def load_shard(data: DataConfig, num_clients: int, seed: int, client_id: int) -> Shard:
    """Client ``client_id``'s shard, deterministic for (data config, number of clients, seed).

    Memoised for the last partition asked for: one Ray actor serves many clients round after
    round, and reading and converting a shard to floats was most of a FedSGD client's work in
    a round. So a process holds at most one float copy of the training pool, and a new point's
    partition replaces the last. Callers only read the tensors (indexing copies them).
    """
    key = (data, num_clients, seed)
    if _LAST.key != key:
        _LAST.key, _LAST.shards = key, {}
    if client_id not in _LAST.shards:
        _LAST.shards[client_id] = _read_shard(data, num_clients, seed, client_id)
    return _LAST.shards[client_id]


def _read_shard(data: DataConfig, num_clients: int, seed: int, client_id: int) -> Shard:
    images, labels = load_split(data.dataset, "train", data.dir or None)
    indices = _shard_indices(data, num_clients, seed)[client_id]
    return Shard(to_tensor(images[indices]), torch.as_tensor(labels[indices], dtype=torch.int64))


def shard_size(data: DataConfig, num_clients: int, seed: int, client_id: int) -> int:
    """How many training examples client ``client_id`` holds."""
    handed = _HANDED_SIZES.get((data, num_clients, seed))
    if handed is not None:
        return handed[client_id]
    return len(_shard_indices(data, num_clients, seed)[client_id])


def load_test_set(data: DataConfig) -> Shard:
    """The global test split (capped at ``data.test_examples`` when that is set)."""
    images, labels = test_split(data)
    if data.test_examples:
        images, labels = images[: data.test_examples], labels[: data.test_examples]
    return Shard(to_tensor(images), torch.as_tensor(labels, dtype=torch.int64))


def load_training_union(data: DataConfig, num_clients: int, seed: int) -> Shard:
    """Every client's shard, concatenated in client order, read without memoising.

    The referee scores network inversion against it and drops it afterwards, so the server
    process holds no copy of the clients' data while the next attack runs.
    """
    images, labels = load_split(data.dataset, "train", data.dir or None, memoise=False)
    indices = np.concatenate(_shard_indices(data, num_clients, seed))
    return Shard(to_tensor(images[indices]), torch.as_tensor(labels[indices], dtype=torch.int64))
