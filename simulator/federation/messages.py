"""The wire format between the ServerApp and ClientApps: record keys and converters."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SCENARIO_KEY = "leaksim-scenario"
ROUND_KEY = "server-round"
CLIENT_ID_KEY = "client-id"
NUM_EXAMPLES_KEY = "num-examples"


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors to an ArrayRecord (order kept, so aggregation is reproducible)."""
    return ArrayRecord({name: Array(t.detach().cpu().numpy()) for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord back to named float tensors (copies: callers may modify them)."""
    return {name: torch.from_numpy(np.array(array.numpy())) for name, array in record.items()}
