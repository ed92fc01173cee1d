"""The small federation both strategy tests drive with mock replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simulator.core.config import Scenario
from simulator.scenario import load


def small_scenario(protocol: str = "fedsgd", defenses: Sequence[dict[str, Any]] = ()) -> Scenario:
    """Four clients, all sampled, batches of 2, a 784-4-10 MLP."""
    return load(
        "quickstart",
        {
            "federation.protocol": protocol,
            "federation.clients": 4,
            "federation.fraction": 1.0,
            "federation.batch_size": 2,
            "federation.lr": 0.5,
            "federation.timeout_s": 30.0,
            "model.widths": [4],
            "defenses": list(defenses),
        },
    )
