"""The composition root: importing this module registers every built-in plugin.

The registries of :mod:`simulator.core.registry` hold what the process has imported. This is
the one place that imports every package registering into them: the model zoo, the datasets
and partitioners, the defenses and the attacks (each package's ``__init__`` imports all of its
modules). The processes that validate scenarios import it before they read one: the command
line, the Python API, a run's worker process and the ServerApp (so ``flwr run``'s
``serverapp`` entry point goes through it). The ClientApp does not: an honest client
registers only what it runs (models, datasets, partitioners, defenses), so no attack module
is ever imported into a client (``tests/unit/federation/test_client_app.py`` checks).
"""

from __future__ import annotations

import attacks
import defenses
from simulator.core import models
from simulator.data import datasets, partition

__all__ = ["attacks", "datasets", "defenses", "models", "partition"]
