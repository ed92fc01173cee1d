"""The scorer: the one place where reconstructions meet the oracle (the clients' truth)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simulator.oracle import Oracle


def score_round(reconstructions: Sequence[Any], oracles: Sequence[Oracle]) -> list[dict[str, Any]]:
    """One ``attack`` record per reconstruction, scored against its client's true batch."""
    if not reconstructions:
        return []
    raise NotImplementedError("scoring lands with the gradient-matching attacks")
