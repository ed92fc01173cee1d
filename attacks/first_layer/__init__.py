"""Closed-form attacks on a fully-connected first layer: the analytic dW / db attack
(:mod:`.analytic`) and the span of the first layer's change (:mod:`.subspace`). Importing this
package registers them."""

from attacks.first_layer import analytic, subspace

__all__ = ["analytic", "subspace"]
