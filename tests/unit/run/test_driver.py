"""FederationDriver.evaluate_round: the global model is tested on the test split."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from simulator.core.models import build_model
from simulator.core.records import RoundRecord
from simulator.data.shards import Shard
from simulator.federation.training import evaluate
from simulator.run.driver import FederationDriver
from simulator.scenario import load


def idx(path: Path, count: int, header: int, shape: tuple[int, ...]) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    return np.frombuffer(raw[header : header + count * int(np.prod(shape))], np.uint8).reshape(
        count, *shape
    )


def test_the_round_record_gives_the_global_models_accuracy_on_the_test_split(
    shared_data_dir: Path,
) -> None:
    scenario = load("quickstart")  # test_examples = 2000: the first 2000 test images
    count = scenario.data.test_examples
    folder = shared_data_dir / "mnist"
    images = idx(folder / "t10k-images-idx3-ubyte.gz", count, 16, (1, 28, 28))
    labels = idx(folder / "t10k-labels-idx1-ubyte.gz", count, 8, ())
    test = Shard(
        torch.from_numpy(images.astype(np.float32)) / 255.0, torch.from_numpy(labels).long()
    )
    model = build_model(scenario.model, seed=3)
    records: list[Any] = []
    driver = FederationDriver(scenario, records.append, referee=None)  # type: ignore[arg-type]
    driver.evaluate_round(0, ArrayRecord(model.state_dict()))
    loss, accuracy = evaluate(model, scenario.model, test)
    assert records == [RoundRecord(0, accuracy, loss)]
