"""simulator.federation.truth: the sealed store outside Flower, keyed by (round, client)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simulator.core.protocol import Truth
from simulator.federation.truth import SealError, TruthKey, TruthStore


def test_a_truth_round_trips_and_a_round_is_discarded(tmp_path: Path) -> None:
    store = TruthStore(tmp_path / "store", key=TruthKey.generate())
    truth = Truth(3, 1, torch.rand(2, 1, 28, 28), torch.tensor([4, 7]))
    store.put(truth)
    back = store.get(3, 1)
    assert back is not None and (back.round, back.client_id) == (3, 1)
    assert torch.equal(back.inputs, truth.inputs) and torch.equal(back.labels, truth.labels)
    assert store.get(3, 2) is None and store.get(4, 1) is None
    assert [p.name for p in (tmp_path / "store" / "round-3").iterdir()] == ["client-1.sealed"]
    store.discard_round(3)
    assert store.get(3, 1) is None
    store.clear()
    assert not (tmp_path / "store").exists()


def test_a_client_holding_the_public_key_alone_can_write_but_not_read(tmp_path: Path) -> None:
    key = TruthKey.generate()
    client = TruthStore(tmp_path, public_key=key.public)
    truth = Truth(1, 0, torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3]))
    client.put(truth)
    sealed = (tmp_path / "round-1" / "client-0.sealed").read_bytes()
    assert truth.inputs[0].numpy().tobytes()[:64] not in sealed
    with pytest.raises(SealError, match="only the scoring process"):
        client.get(1, 0)
    opened = TruthStore(tmp_path, key=key).get(1, 0)
    assert opened is not None and torch.equal(opened.inputs, truth.inputs)


def test_a_truth_sealed_to_another_key_or_moved_to_another_client_does_not_open(
    tmp_path: Path,
) -> None:
    key = TruthKey.generate()
    TruthStore(tmp_path, public_key=TruthKey.generate().public).put(
        Truth(1, 0, torch.rand(1, 1, 28, 28), torch.tensor([0]))
    )
    store = TruthStore(tmp_path, key=key)
    with pytest.raises(SealError, match="round 1, client 0"):
        store.get(1, 0)
    TruthStore(tmp_path, public_key=key.public).put(
        Truth(1, 2, torch.rand(1, 1, 28, 28), torch.tensor([0]))
    )
    (tmp_path / "round-1" / "client-2.sealed").rename(tmp_path / "round-1" / "client-3.sealed")
    with pytest.raises(SealError):
        store.get(1, 3)
