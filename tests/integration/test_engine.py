"""The engine under load: Flower's message extractor replaced, and every reply kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator import api
from simulator.core.records import FailureRecord, PointRecord, UpdateRecord
from simulator.run import flower_engine
from simulator.scenario import load


def test_a_round_of_100_clients_through_the_replaced_extractor_loses_no_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered: list[int] = []
    take = flower_engine.take_undelivered

    def counted(state: object, nodes: set[int]) -> list:
        messages = take(state, nodes)  # type: ignore[arg-type]
        delivered.extend(m.metadata.dst_node_id for m in messages)
        return messages

    monkeypatch.setattr(flower_engine, "take_undelivered", counted)
    scenario = load(
        "quickstart",
        {
            "federation.clients": 100,
            "federation.fraction": 1.0,
            "federation.rounds": 2,
            "attack.name": "none",
            "data.test_examples": 500,
        },
    )
    # In this process (a tap), so the counting wrapper above is the one the engine calls.
    result = api.run(scenario, out_dir=tmp_path / "run", taps=[lambda _round: None])
    (point,) = result.table(PointRecord)
    assert point.status == "ok" and point.rounds_completed == 2
    assert result.table(FailureRecord) == []
    updates = result.table(UpdateRecord)
    for server_round in (1, 2):
        clients = sorted(u.client for u in updates if u.round == server_round)
        assert clients == list(range(100))
    # Discovery's 100 queries and 2 rounds of 100 train messages, each handed over once.
    assert len(delivered) == 300 and len(set(delivered)) == 100
