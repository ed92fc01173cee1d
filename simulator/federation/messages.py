"""The wire format between the ServerApp and ClientApps: the converters of named tensors.

The record keys are :mod:`simulator.core.protocol`'s (``SCENARIO_KEY``, ``ROUND_KEY``...).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors to an ArrayRecord (order kept, so aggregation is reproducible)."""
    return ArrayRecord({name: Array(t.detach().cpu().numpy()) for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord back to named float tensors (copies: callers may modify them)."""
    return {name: torch.from_numpy(np.array(array.numpy())) for name, array in record.items()}
