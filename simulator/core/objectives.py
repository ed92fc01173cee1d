"""What an attack minimised, named once for the attack's result, its trace and its record.

Kept apart from :mod:`simulator.core.protocol` (which needs torch) so that the records can
name an objective without it.
"""

from __future__ import annotations

from typing import Literal, get_args

# The distance of the images' gradients to the observed update; the KKT stationarity loss of
# trained weights; a generator's (network inversion's) total loss; the energy of the update
# outside the candidates' span; "none" for closed forms, which minimise nothing.
Objective = Literal[
    "gradient-distance", "kkt-stationarity", "generator-loss", "span-residual", "none"
]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


def objective_key(objective: str) -> str:
    """The key of an objective's value in trace rows and records: its name with underscores
    (``kkt-stationarity``: ``kkt_stationarity``)."""
    return objective.replace("-", "_")
