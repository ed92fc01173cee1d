"""The malicious server's attacks, grouped by family; importing this package registers them all.

Attacks import only :mod:`simulator.core` (the types that cross the trust boundary, the model
zoo, the registry); ``tests/unit/test_layers.py`` enforces it. Inside the package the layers
run one way: :mod:`attacks.server` and :mod:`attacks.none` use the families, the families use
:mod:`attacks.base` (the plugin interface), :mod:`attacks.common` (shared helpers) and
:mod:`attacks.optim` (the batched optimisers), and those import nothing above them.
"""

from attacks import active, first_layer, inversion, kkt, labels, matching, none

__all__ = ["active", "first_layer", "inversion", "kkt", "labels", "matching", "none"]
