"""The ground truth behind one client update: simulation-only, read by the scorer alone.

Clients attach it to their reply as bytes (an ``np.savez`` payload): in a ConfigRecord under
:data:`ORACLE_KEY` on the Message API path, in the FitRes metrics under the same key on the
SecAgg+ path (:mod:`simulator.secagg_app`). Bytes, not an ArrayRecord, so the reply carries
exactly one ArrayRecord (the update), as Flower's client mods (LocalDpMod) require. The server
side strips it before the update is aggregated or observed, so neither Flower's aggregation nor
any attack sees it. Nothing in ``attacks/`` may import this module (``tests/test_separation.py``
enforces it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord

ORACLE_KEY = "leaksim-oracle"
PAYLOAD_KEY = "payload"


@dataclass(frozen=True)
class Oracle:
    """The exact images and labels a client's update was computed from, in order."""

    round: int
    client_id: int
    inputs: torch.Tensor
    labels: torch.Tensor

    def to_bytes(self) -> bytes:
        """The batch as an ``np.savez`` payload (round and client travel with the reply)."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            inputs=self.inputs.detach().cpu().numpy(),
            labels=self.labels.detach().cpu().numpy(),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes, round_: int, client_id: int) -> Oracle:
        with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
            inputs, labels = np.array(arrays["inputs"]), np.array(arrays["labels"])
        return cls(round_, client_id, torch.from_numpy(inputs), torch.from_numpy(labels))

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({PAYLOAD_KEY: self.to_bytes()})

    @classmethod
    def from_record(cls, record: ConfigRecord, round_: int, client_id: int) -> Oracle:
        return cls.from_bytes(bytes(record[PAYLOAD_KEY]), round_, client_id)  # type: ignore[arg-type]
