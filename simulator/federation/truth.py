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
(point, round, client) bound in as associated data, so a file moved to another name, or
another point's store, does not open.
They are written to a temporary name and renamed, so a reader sees a whole file or none. The
encryption's randomness comes from the operating system, never from a seeded generator.

Anyone who holds the public key can seal a truth of their choosing, the attack process
included (it hands the key to its clients). So each file ends with an HMAC-SHA256 tag under
the run's tag key, a secret that the clients fetch from the scoring process over a Unix socket
named by :data:`TRUTH_TAGS_ENV`; the scoring process hands it only to the processes of the
run's own Ray head (:mod:`simulator.run.tags`), never to the attack process, and opens no
truth whose tag does not verify. On a Ray cluster the user started, which the scoring process
cannot vouch for, the run names the tag key itself in :data:`TRUTH_TAG_KEY_ENV`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import shutil
import socket
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
# The run's tag-key service: an abstract Unix socket's name (its own Ray head's clients ask it).
TRUTH_TAGS_ENV = "LEAKSIM_TRUTH_TAGS"
# The tag key itself, hex: only on a Ray cluster the user started (the module doc says why).
TRUTH_TAG_KEY_ENV = "LEAKSIM_TRUTH_TAG_KEY"
SUFFIX = ".sealed"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 32  # HMAC-SHA256
TAG_KEY_TIMEOUT_S = 30.0


class SealError(RuntimeError):
    """A truth file that the run's key does not open: written by someone else, or altered."""


def _aead_key(shared: bytes, ephemeral: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral, info=b"leaksim truth").derive(shared)


def _label(store: str, server_round: int, client_id: int) -> bytes:
    return f"{store}/round-{server_round}/client-{client_id}".encode()


def seal(public_key: bytes, truth: Truth, store: str) -> bytes:
    """``truth`` encrypted to ``public_key`` (raw X25519): ephemeral key, nonce, ciphertext;
    bound to its place, the store's name (``point-<i>``), round and client."""
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
        nonce, buffer.getvalue(), _label(store, truth.round, truth.client_id)
    )
    return ephemeral_public + nonce + ciphertext


def tag(tag_key: bytes, store: str, server_round: int, client_id: int, sealed: bytes) -> bytes:
    """The HMAC-SHA256 of the ``sealed`` truth of (store, round, client) under the tag key."""
    label = _label(store, server_round, client_id)
    return hmac.new(tag_key, label + sealed, hashlib.sha256).digest()


def fetch_tag_key(service: str, timeout_s: float = TAG_KEY_TIMEOUT_S) -> bytes:
    """The run's tag key, asked of the scoring process's service ``service`` (an abstract
    Unix socket's name); SealError if it does not hand it over (to this process)."""
    received = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout_s)
            connection.connect("\0" + service)
            while chunk := connection.recv(_KEY_BYTES):
                received += chunk
    except OSError as error:
        raise SealError(f"the run's tag key service did not answer: {error}") from None
    if len(received) != _KEY_BYTES:
        raise SealError("the run's tag key service refused this process")
    return received


_TAG_KEYS: dict[str, bytes] = {}  # per service: a client process asks once


@dataclass(frozen=True)
class TruthKey:
    """A run's keys, held by the scoring process alone: the private half of the truth key
    and the tag key that authenticates its clients' truths."""

    private: X25519PrivateKey
    tags: bytes

    @classmethod
    def generate(cls) -> TruthKey:
        return cls(X25519PrivateKey.generate(), os.urandom(_KEY_BYTES))

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes_raw()

    def open(self, sealed: bytes, store: str, server_round: int, client_id: int) -> Truth:
        """The truth in ``sealed``, which must be (store, round, client)'s, tagged with this
        run's tag key; SealError otherwise (a truth of another point replayed too)."""
        sealed, found = sealed[:-_TAG_BYTES], sealed[-_TAG_BYTES:]
        expected = tag(self.tags, store, server_round, client_id, sealed)
        if not hmac.compare_digest(found, expected):
            raise SealError(
                f"the truth of round {server_round}, client {client_id} does not carry this "
                "run's tag: it was not written there by the run's clients"
            )
        ephemeral, nonce = sealed[:_KEY_BYTES], sealed[_KEY_BYTES : _KEY_BYTES + _NONCE_BYTES]
        try:
            shared = self.private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
            plain = AESGCM(_aead_key(shared, ephemeral)).decrypt(
                nonce,
                sealed[_KEY_BYTES + _NONCE_BYTES :],
                _label(store, server_round, client_id),
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

    Clients hold the public key (``public_key``) and the tag key (``tag_key``) and write; the
    scorer holds the run's keys (``key``) and reads.
    """

    def __init__(
        self,
        root: Path | str,
        public_key: bytes | None = None,
        key: TruthKey | None = None,
        tag_key: bytes | None = None,
    ) -> None:
        self.root = Path(root)
        self.key = key
        self.public_key = key.public if key is not None else public_key
        self.tag_key = key.tags if key is not None else tag_key

    @classmethod
    def from_environment(cls) -> TruthStore | None:
        """The store the run named for this client process, or None (a real deployment)."""
        root, public = os.environ.get(TRUTH_DIR_ENV), os.environ.get(TRUTH_KEY_ENV)
        if not (root and public):
            return None
        named = os.environ.get(TRUTH_TAG_KEY_ENV)
        service = os.environ.get(TRUTH_TAGS_ENV, "")
        if named:
            tag_key = bytes.fromhex(named)
        elif service:
            if service not in _TAG_KEYS:
                _TAG_KEYS[service] = fetch_tag_key(service)
            tag_key = _TAG_KEYS[service]
        else:
            raise SealError("the run named a truth store but no tag key for its truths")
        return cls(root, bytes.fromhex(public), tag_key=tag_key)

    def _path(self, server_round: int, client_id: int) -> Path:
        return self.root / f"round-{server_round}" / f"client-{client_id}{SUFFIX}"

    def put(self, truth: Truth) -> None:
        """Seal and write one update's truth atomically (a reader sees all of it or none)."""
        if self.public_key is None or self.tag_key is None:
            raise SealError("a truth store without the run's public and tag keys cannot seal")
        path = self._path(truth.round, truth.client_id)
        # Its parent folders (the run's truth folder, the run's) are never made here: a run
        # folder that was deleted during the run must not come back holding a truth store.
        self.root.mkdir(exist_ok=True, mode=0o700)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(handle, "wb") as stream:
                sealed = seal(self.public_key, truth, self.root.name)
                label = (self.root.name, truth.round, truth.client_id)
                stream.write(sealed + tag(self.tag_key, *label, sealed))
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
        return self.key.open(path.read_bytes(), self.root.name, server_round, client_id)

    def discard_round(self, server_round: int) -> None:
        """Delete one round's truths (the scorer is done with them)."""
        shutil.rmtree(self.root / f"round-{server_round}", ignore_errors=True)

    def clear(self) -> None:
        """Delete the whole store (the point is over)."""
        shutil.rmtree(self.root, ignore_errors=True)
