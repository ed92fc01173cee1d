"""The one snapshot schedule of the iterative attacks."""

from __future__ import annotations

from attacks.optim.tracker import snapshot_steps


def test_with_the_start_the_snapshots_span_zero_to_the_last_iteration() -> None:
    assert snapshot_steps(1000, 4, start=True) == {0, 333, 667, 1000}
    assert snapshot_steps(150, 3, start=True) == {0, 75, 150}


def test_without_the_start_they_are_one_spacing_apart_ending_at_the_last() -> None:
    assert snapshot_steps(1000, 4, start=False) == {250, 500, 750, 1000}
    assert snapshot_steps(20, 2, start=False) == {10, 20}


def test_no_snapshots_asked_none_kept() -> None:
    assert snapshot_steps(1000, 0, start=True) == set() == snapshot_steps(1000, 0, start=False)
