"""The global test set is the dataset's own test split, read here from the IDX file by hand;
clients' shards are read once per partition and process."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from simulator.data import shards
from simulator.data.shards import load_shard, load_test_set
from simulator.scenario import load


def first_test_image(shared_data_dir: Path) -> torch.Tensor:
    """Image 0 of t10k-images (IDX: a 16-byte header, then 28x28 bytes per image), in [0, 1]."""
    raw = gzip.decompress((shared_data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert int.from_bytes(raw[4:8], "big") == 10_000
    pixels = np.frombuffer(raw[16 : 16 + 784], dtype=np.uint8).reshape(1, 28, 28)
    return torch.from_numpy(pixels.astype(np.float32)) / 255.0


def test_the_test_set_is_mnists_test_split(shared_data_dir: Path) -> None:
    whole = load_test_set(load("quickstart", {"data.test_examples": 0}).data)
    assert whole.inputs.shape == (10_000, 1, 28, 28) and whole.labels.shape == (10_000,)
    assert torch.equal(whole.inputs[0], first_test_image(shared_data_dir))
    assert int(whole.labels[0]) == 7  # MNIST's first test digit


def test_test_examples_caps_the_split_from_its_start(shared_data_dir: Path) -> None:
    capped = load_test_set(load("quickstart", {"data.test_examples": 2000}).data)
    assert capped.inputs.shape[0] == 2000
    assert torch.equal(capped.inputs[0], first_test_image(shared_data_dir))


def test_a_shard_is_read_once_per_partition_and_the_next_partition_replaces_it(
    shared_data_dir: Path,
) -> None:
    data = load("quickstart", {"data.examples_per_client": 20}).data
    first = load_shard(data, 10, 0, 3)
    assert load_shard(data, 10, 0, 3) is first  # the same tensors: no re-read, no conversion
    again = shards._read_shard(data, 10, 0, 3)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.labels, again.labels)
    other = load_shard(data, 10, 1, 3)  # another seed: another partition
    assert shards._LAST.key == (data, 10, 1) and list(shards._LAST.shards) == [3]
    assert not torch.equal(other.labels, first.labels)
