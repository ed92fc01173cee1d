"""The traffic path's client sampling: seeded by (seed, round), different every round."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.federation.traffic import sample_clients


def test_draws_differ_across_rounds_and_repeat_for_the_same_seed_and_round() -> None:
    draws = [sample_clients(range(10), 0.3, seed=0, server_round=r) for r in range(1, 11)]
    assert len(set(draws)) >= 5  # 120 possible triples: ten rounds drawing one would be a fault
    again = [sample_clients(range(10), 0.3, seed=0, server_round=r) for r in range(1, 11)]
    assert draws == again
    other_seed = [sample_clients(range(10), 0.3, seed=1, server_round=r) for r in range(1, 11)]
    assert other_seed != draws


@settings(max_examples=50, deadline=None)
@given(
    clients=st.integers(1, 40),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31),
    server_round=st.integers(1, 500),
)
def test_a_draw_is_a_sorted_set_of_known_clients_of_the_configured_size(
    clients: int, fraction: float, seed: int, server_round: int
) -> None:
    ids = range(100, 100 + clients)
    drawn = sample_clients(reversed(ids), fraction, seed, server_round)
    assert list(drawn) == sorted(set(drawn)) and set(drawn) <= set(ids)
    assert len(drawn) == max(1, int(clients * fraction))
