"""The ground truth behind each update, sealed, on a channel outside Flower (simulation only).

A client writes the exact batch its update came from (a :class:`~simulator.core.protocol.Truth`)
to the point's :class:`TruthStore`, encrypted to the run's public key: the folder is named by
:data:`TRUTH_DIR_ENV` and the key by :data:`TRUTH_KEY_ENV`, variables that the run hands only
to its own clients (Ray's runtime environment of the point's connection). The private half of
the key (:class:`TruthKey`) stays in the process that scores (the ``leaksim`` process that
supervises the run's worker), so the process that runs the attacks (Flower's ServerApp, the
malicious server, every plugin) can find the files but read nothing from them. No Flower
message ever carries the truth, and under ``flwr run`` on a real federation (where no one sets
the variables) clients send exactly what the protocol sends.

Files are ``round-<r>/client-<c>.sealed``: an ephemeral X25519 public key, a nonce and the
AES-GCM ciphertext of the uncompressed ``np.savez`` of inputs and labels, the file's own
(round, client) bound in as associated data, so a file moved to another name does not open.
They are written to a temporary name and renamed, so a reader sees a whole file or none. The
encryption's randomness comes from the operating system, never from a seeded generator.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from simulator.core.protocol import Truth

TRUTH_DIR_ENV = "LEAKSIM_TRUTH_DIR"
TRUTH_KEY_ENV = "LEAKSIM_TRUTH_KEY"  # the run's public key, hex: clients encrypt to it
SUFFIX = ".sealed"
_KEY_BYTES = 32
_NONCE_BYTES = 12


class SealError(RuntimeError):
    """A truth file that the run's key does not open: written by someone else, or altered."""


def _aead_key(shared: bytes, ephemeral: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral, info=b"leaksim truth").derive(shared)


def _label(server_round: int, client_id: int) -> bytes:
    return f"round-{server_round}/client-{client_id}".encode()


def seal(public_key: bytes, truth: Truth) -> bytes:
    """``truth`` encrypted to ``public_key`` (raw X25519): ephemeral key, nonce, ciphertext."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        inputs=truth.inputs.detach().cpu().numpy(),
        labels=truth.labels.detach().cpu().numpy(),
    )
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = AESGCM(_aead_key(shared, ephemeral_public)).encrypt(
        nonce, buffer.getvalue(), _label(truth.round, truth.client_id)
    )
    return ephemeral_public + nonce + ciphertext


@dataclass(frozen=True)
class TruthKey:
    """The private half of a run's truth key: held by the scoring process alone."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> TruthKey:
        return cls(X25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes_raw()

    def open(self, sealed: bytes, server_round: int, client_id: int) -> Truth:
        """The truth in ``sealed``, which must be (round, client)'s; SealError otherwise."""
        ephemeral, nonce = sealed[:_KEY_BYTES], sealed[_KEY_BYTES : _KEY_BYTES + _NONCE_BYTES]
        try:
            shared = self.private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
            plain = AESGCM(_aead_key(shared, ephemeral)).decrypt(
                nonce, sealed[_KEY_BYTES + _NONCE_BYTES :], _label(server_round, client_id)
            )
        except (InvalidTag, ValueError) as error:
            raise SealError(
                f"the truth of round {server_round}, client {client_id} is not sealed to "
                "this run's key"
            ) from error
        with np.load(io.BytesIO(plain), allow_pickle=False) as arrays:
            inputs, labels = np.array(arrays["inputs"]), np.array(arrays["labels"])
        return Truth(server_round, client_id, torch.from_numpy(inputs), torch.from_numpy(labels))


class TruthStore:
    """One sweep point's sealed truths, keyed by (round, client), in a folder of its own.

    Clients hold only the public key (``public_key``) and write; the scorer holds the private
    one (``key``) and reads.
    """

    def __init__(
        self, root: Path | str, public_key: bytes | None = None, key: TruthKey | None = None
    ) -> None:
        self.root = Path(root)
        self.key = key
        self.public_key = key.public if key is not None else public_key

    @classmethod
    def from_environment(cls) -> TruthStore | None:
        """The store the run named for this client process, or None (a real deployment)."""
        root, public = os.environ.get(TRUTH_DIR_ENV), os.environ.get(TRUTH_KEY_ENV)
        return cls(root, bytes.fromhex(public)) if root and public else None

    def _path(self, server_round: int, client_id: int) -> Path:
        return self.root / f"round-{server_round}" / f"client-{client_id}{SUFFIX}"

    def put(self, truth: Truth) -> None:
        """Seal and write one update's truth atomically (a reader sees all of it or none)."""
        if self.public_key is None:
            raise SealError("a truth store without the run's public key cannot seal")
        path = self._path(truth.round, truth.client_id)
        # Its parent folders (the run's truth folder, the run's) are never made here: a run
        # folder that was deleted during the run must not come back holding a truth store.
        self.root.mkdir(exist_ok=True, mode=0o700)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(seal(self.public_key, truth))
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, server_round: int, client_id: int) -> Truth | None:
        """The truth of one update, or None when its client wrote none (the scorer only)."""
        if self.key is None:
            raise SealError("only the scoring process holds the key that opens the truth")
        path = self._path(server_round, client_id)
        if not path.is_file():
            return None
        return self.key.open(path.read_bytes(), server_round, client_id)

    def discard_round(self, server_round: int) -> None:
        """Delete one round's truths (the scorer is done with them)."""
        shutil.rmtree(self.root / f"round-{server_round}", ignore_errors=True)

    def clear(self) -> None:
        """Delete the whole store (the point is over)."""
        shutil.rmtree(self.root, ignore_errors=True)
