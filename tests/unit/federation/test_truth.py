"""simulator.federation.truth: the sealed store outside Flower, keyed by (round, client)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simulator.core.protocol import Truth
from simulator.federation.truth import (
    TRUTH_DIR_ENV,
    TRUTH_KEY_ENV,
    TRUTH_TAGS_ENV,
    SealError,
    TruthKey,
    TruthStore,
    seal,
)


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


def test_a_client_holding_the_public_and_tag_keys_can_write_but_not_read(tmp_path: Path) -> None:
    key = TruthKey.generate()
    client = TruthStore(tmp_path, public_key=key.public, tag_key=key.tags)
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
    key, other = TruthKey.generate(), TruthKey.generate()
    TruthStore(tmp_path, public_key=other.public, tag_key=key.tags).put(
        Truth(1, 0, torch.rand(1, 1, 28, 28), torch.tensor([0]))
    )
    store = TruthStore(tmp_path, key=key)
    with pytest.raises(SealError, match="round 1, client 0"):
        store.get(1, 0)
    TruthStore(tmp_path, public_key=key.public, tag_key=key.tags).put(
        Truth(1, 2, torch.rand(1, 1, 28, 28), torch.tensor([0]))
    )
    (tmp_path / "round-1" / "client-2.sealed").rename(tmp_path / "round-1" / "client-3.sealed")
    with pytest.raises(SealError):
        store.get(1, 3)


def test_a_truth_sealed_to_the_public_key_without_the_runs_tag_does_not_open(
    tmp_path: Path,
) -> None:
    """The public key is no secret (the attack process hands it to the clients): a truth that
    anyone sealed to it, untagged or tagged with another key, is refused."""
    key = TruthKey.generate()
    forged = Truth(1, 0, torch.full((1, 1, 28, 28), 0.5), torch.tensor([0]))
    path = tmp_path / "round-1" / "client-0.sealed"
    path.parent.mkdir()
    path.write_bytes(seal(key.public, forged, tmp_path.name))
    store = TruthStore(tmp_path, key=key)
    with pytest.raises(SealError, match="does not carry this run's tag"):
        store.get(1, 0)
    TruthStore(tmp_path, public_key=key.public, tag_key=TruthKey.generate().tags).put(forged)
    with pytest.raises(SealError, match="does not carry this run's tag"):
        store.get(1, 0)
    TruthStore(tmp_path, public_key=key.public, tag_key=key.tags).put(forged)
    assert store.get(1, 0) is not None


def test_a_client_without_a_tag_key_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = TruthKey.generate()
    monkeypatch.setenv(TRUTH_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(TRUTH_KEY_ENV, key.public.hex())
    with pytest.raises(SealError, match="no tag key"):
        TruthStore.from_environment()
    monkeypatch.setenv(TRUTH_TAGS_ENV, "leaksim-tags-nobody-listens")
    with pytest.raises(SealError, match="did not answer"):
        TruthStore.from_environment()


def test_a_truth_of_another_point_replayed_does_not_open(tmp_path: Path) -> None:
    """A tagged truth copied from one point's store to another's (same round and client: an
    undefended point's batch, replayed for a defended one) is refused."""
    key = TruthKey.generate()
    first, second = (
        TruthStore(tmp_path / "point-0", key=key),
        TruthStore(tmp_path / "point-1", key=key),
    )
    first.put(Truth(1, 4, torch.rand(1, 1, 28, 28), torch.tensor([0])))
    (tmp_path / "point-1" / "round-1").mkdir(parents=True)
    (tmp_path / "point-0" / "round-1" / "client-4.sealed").rename(
        tmp_path / "point-1" / "round-1" / "client-4.sealed"
    )
    with pytest.raises(SealError, match="round 1, client 4 does not carry this run's tag"):
        second.get(1, 4)
