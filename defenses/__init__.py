"""Defense plugins, one module per defense; importing this package registers them all.

Defenses import only :mod:`simulator.core`; ``tests/unit/test_layers.py`` enforces it.
"""

from defenses import (
    clipping,
    dp_sgd,
    inspection,
    local_dp,
    noise,
    pruning,
    quantization,
    secure_aggregation,
)

__all__ = [
    "clipping",
    "dp_sgd",
    "inspection",
    "local_dp",
    "noise",
    "pruning",
    "quantization",
    "secure_aggregation",
]
