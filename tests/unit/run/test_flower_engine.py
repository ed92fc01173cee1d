"""The replacement of Flower's message extractor: its guard and where it applies."""

from __future__ import annotations

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from simulator.run import flower_engine
from simulator.run.flower_engine import (
    FLOWER_EXTRACTOR,
    add_messages_to_queue,
    changed_functions,
    faster_message_delivery,
)


def test_the_installed_flower_has_the_functions_the_replacement_was_written_against() -> None:
    # Fails when Flower changes one of them: review the replacement against the new source,
    # then record the new digests in EXPECTED_SOURCES.
    assert changed_functions() == []


def test_the_replacement_is_used_inside_the_block_and_flowers_own_comes_back() -> None:
    with faster_message_delivery() as replaced:
        assert replaced
        assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert vce_api.add_messages_to_queue is FLOWER_EXTRACTOR


@pytest.mark.parametrize("name", sorted(flower_engine.EXPECTED_SOURCES))
def test_the_guard_leaves_flower_alone_when_a_function_differs(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(flower_engine.EXPECTED_SOURCES, name, "0" * 64)
    assert changed_functions() == [name]
    with faster_message_delivery() as replaced:
        assert not replaced
        assert vce_api.add_messages_to_queue is FLOWER_EXTRACTOR
