"""The malicious server's attacks: each module registers its attacks with ``register_attack``.

Attacks import only :mod:`simulator.core` (the types that cross the trust boundary, the model
zoo, the registry); ``tests/unit/test_layers.py`` enforces it. Importing this package
registers every built-in attack, the active ones of :mod:`attacks.active` too.
"""

from attacks import (
    active,
    analytic,
    fedavg_multistep,
    gradient_matching,
    inversion,
    kkt,
    label_counts,
    none,
    subspace,
)

__all__ = [
    "active",
    "analytic",
    "fedavg_multistep",
    "gradient_matching",
    "inversion",
    "kkt",
    "label_counts",
    "none",
    "subspace",
]
