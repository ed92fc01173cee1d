"""Seeded randomness: every random draw in a run derives from (seed, round, client, ...).

Keys, not global state, so that the same scenario and seed give bit-identical runs whatever the
order in which Ray schedules clients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator whose state depends only on ``keys`` (seed, round, client...)."""
    state = np.random.SeedSequence([abs(k) for k in keys]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@contextlib.contextmanager
def seeded_numpy(*keys: int) -> Iterator[None]:
    """Seed numpy's global generator from ``keys`` inside the block, then restore its state."""
    state = np.random.get_state()
    seed = np.random.SeedSequence([abs(k) for k in keys]).generate_state(1)[0]
    np.random.seed(int(seed))
    try:
        yield
    finally:
        np.random.set_state(state)
