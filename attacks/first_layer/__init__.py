"""Closed-form attacks on a fully-connected first layer: the analytic dW / db attack
(:mod:`.analytic`), the span of the first layer's change (:mod:`.subspace`) and that span over
every update one client sent (:mod:`.rounds`). Importing this package registers them."""

from attacks.first_layer import analytic, rounds, subspace

__all__ = ["analytic", "rounds", "subspace"]
