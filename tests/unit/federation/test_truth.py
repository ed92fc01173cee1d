"""simulator.federation.truth: the store outside Flower, keyed by (round, client)."""

from __future__ import annotations

from pathlib import Path

import torch

from simulator.core.protocol import Truth
from simulator.federation.truth import TruthStore


def test_a_truth_round_trips_and_a_round_is_discarded(tmp_path: Path) -> None:
    store = TruthStore(tmp_path / "store")
    truth = Truth(3, 1, torch.rand(2, 1, 28, 28), torch.tensor([4, 7]))
    store.put(truth)
    back = store.get(3, 1)
    assert back is not None and (back.round, back.client_id) == (3, 1)
    assert torch.equal(back.inputs, truth.inputs) and torch.equal(back.labels, truth.labels)
    assert store.get(3, 2) is None and store.get(4, 1) is None
    assert [p.name for p in (tmp_path / "store" / "round-3").iterdir()] == ["client-1.npz"]
    store.discard_round(3)
    assert store.get(3, 1) is None
    store.clear()
    assert not (tmp_path / "store").exists()
