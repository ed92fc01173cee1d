"""The ground truth behind each update, on a channel outside Flower (simulation only).

A client writes the exact batch its update came from (a :class:`~simulator.core.protocol.Truth`)
to a run-local :class:`TruthStore`, a
folder named by the environment variable :data:`TRUTH_DIR_ENV` that the engine sets for each
sweep point; the referee reads an update's truth only after the attacks of its round have
returned, scores, and deletes the round's files. No Flower message ever carries the truth, so
the server process holds none of it while an attack runs, and under ``flwr run`` on a real
federation (where no one sets the variable) clients send exactly what the protocol sends.

Files are ``round-<r>/client-<c>.npz`` (uncompressed ``np.savez``), written to a temporary
name and renamed, so a reader sees a whole file or none.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from simulator.core.protocol import Truth

TRUTH_DIR_ENV = "LEAKSIM_TRUTH_DIR"


class TruthStore:
    """One sweep point's truths, keyed by (round, client), in a folder of its own."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def from_environment(cls) -> TruthStore | None:
        """The store the engine named for this process, or None (a real deployment)."""
        root = os.environ.get(TRUTH_DIR_ENV)
        return cls(root) if root else None

    def _path(self, server_round: int, client_id: int) -> Path:
        return self.root / f"round-{server_round}" / f"client-{client_id}.npz"

    def put(self, truth: Truth) -> None:
        """Write one update's truth atomically (a concurrent reader sees all of it or none)."""
        path = self._path(truth.round, truth.client_id)
        # Its parent folder (the run's) is never made here: a run folder that was deleted
        # during the run must not come back holding a truth store.
        self.root.mkdir(exist_ok=True)
        path.parent.mkdir(exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(
                    stream,
                    inputs=truth.inputs.detach().cpu().numpy(),
                    labels=truth.labels.detach().cpu().numpy(),
                )
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, server_round: int, client_id: int) -> Truth | None:
        """The truth of one update, or None when its client wrote none."""
        path = self._path(server_round, client_id)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as arrays:
            inputs, labels = np.array(arrays["inputs"]), np.array(arrays["labels"])
        return Truth(server_round, client_id, torch.from_numpy(inputs), torch.from_numpy(labels))

    def discard_round(self, server_round: int) -> None:
        """Delete one round's truths (the referee is done with them)."""
        shutil.rmtree(self.root / f"round-{server_round}", ignore_errors=True)

    def clear(self) -> None:
        """Delete the whole store (the point is over)."""
        shutil.rmtree(self.root, ignore_errors=True)
