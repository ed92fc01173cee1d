"""The ground truth behind one client update: simulation-only, read by the scorer alone.

Clients attach it to their reply under :data:`ORACLE_KEY`; the interceptor strips it before
the update is aggregated or observed, so neither Flower's aggregation nor any attack sees it.
Nothing in ``attacks/`` may import this module (``tests/test_separation.py`` enforces it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

ORACLE_KEY = "leaksim-oracle"


@dataclass(frozen=True)
class Oracle:
    """The exact images and labels a client's update was computed from, in order."""

    round: int
    client_id: int
    inputs: torch.Tensor
    labels: torch.Tensor

    def to_record(self) -> ArrayRecord:
        return ArrayRecord(
            {
                "inputs": Array(self.inputs.detach().cpu().numpy()),
                "labels": Array(self.labels.detach().cpu().numpy()),
            }
        )

    @classmethod
    def from_record(cls, record: ArrayRecord, round_: int, client_id: int) -> Oracle:
        return cls(
            round=round_,
            client_id=client_id,
            inputs=torch.from_numpy(np.array(record["inputs"].numpy())),
            labels=torch.from_numpy(np.array(record["labels"].numpy())),
        )
