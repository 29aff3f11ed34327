"""Tamper evidence for the baseline: a Merkle root over its entries, and signatures.

The root is one BLAKE3 digest that summarises every entry (sorted by key), so an
operator can keep 64 hex characters off the host (a ticket, a vault, another server)
and `verify --expect-root` refuses a baseline that no longer hashes to it. With a
public key configured, `verify` and `watch` also refuse a baseline whose root is not
signed by the matching private key, which `init`/`approve --sign-key` use and which
need not stay on the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import blake3

from integrity.errors import IntegrityError
from integrity.record import FileRecord

_LEAF = b"integrity-entry-v1\x00"
_NODE = b"integrity-node-v1\x00"
_SIGNED = b"integrity-baseline-root-v1\x00"
#: The root of an empty baseline.
EMPTY_ROOT = blake3.blake3(b"integrity-empty-v1").hexdigest()


class TrustError(IntegrityError):
    """The baseline does not match its root, its expected root or its signature."""


def _field(value: object) -> bytes:
    if value is None:
        return b"-"
    if isinstance(value, bytes):
        return b"b" + value.hex().encode()
    if isinstance(value, int):
        return b"i" + str(value).encode()
    return b"s" + str(value).encode()


def leaf(key: bytes, rec: FileRecord) -> bytes:
    """Digest of one entry: its key and every recorded attribute."""
    return blake3.blake3(_LEAF + b"\x00".join(
        [_field(key), *(_field(v) for v in rec[1:])])).digest()


class MerkleRoot:
    """Streaming Merkle root: leaves in key order, O(log n) memory.

    Pairs are hashed as they complete (a binary counter of subtree roots); at the
    end the remaining subtrees are folded from the right. The shape depends only on
    the number of leaves, so the same entries always give the same root.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.count = 0

    def add(self, digest: bytes) -> None:
        """Append one leaf digest."""
        self.count += 1
        level, node = 0, digest
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            node = blake3.blake3(_NODE + left + node).digest()
            level += 1
        self._stack.append((level, node))

    def hexdigest(self) -> str:
        """The root (a fixed digest for an empty baseline)."""
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = blake3.blake3(_NODE + left + node).digest()
        return node.hex()


def root_of(entries: Iterable[tuple[bytes, FileRecord]]) -> str:
    """Merkle root of (key, record) pairs given in key order."""
    merkle = MerkleRoot()
    for key, rec in entries:
        merkle.add(leaf(key, rec))
    return merkle.hexdigest()


# -- signatures -------------------------------------------------------------------

def generate_keypair(private_path: str) -> tuple[str, str]:
    """Write a new Ed25519 private key (mode 0600) and its public key (.pub)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public_path = private_path + ".pub"
    for path in (private_path, public_path):
        if os.path.exists(path):
            raise IntegrityError(f"{path}: exists already; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private)
        Path(public_path).write_bytes(public)
    except OSError as exc:
        raise IntegrityError(f"{exc.filename}: cannot write key: {exc.strerror}") from None
    return private_path, public_path


def sign(root: str, private_path: str) -> bytes:
    """Ed25519 signature of a baseline root."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(private_path).read_bytes(), None)
    except OSError as exc:
        raise IntegrityError(f"{private_path}: cannot read signing key: "
                             f"{exc.strerror}") from None
    except (ValueError, TypeError):
        raise IntegrityError(f"{private_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{private_path}: not an Ed25519 private key")
    return key.sign(_SIGNED + root.encode())


def check_signature(root: str, signature: bytes | None, public_path: str) -> None:
    """Raise TrustError unless `signature` signs `root` for the key at public_path."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(public_path).read_bytes())
    except OSError as exc:
        raise IntegrityError(f"{public_path}: cannot read public key: "
                             f"{exc.strerror}") from None
    except ValueError:
        raise IntegrityError(f"{public_path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError(f"{public_path}: not an Ed25519 public key")
    if signature is None:
        raise TrustError(f"baseline root {root} is not signed, but {public_path} is "
                         "configured: sign it with 'init/approve --sign-key'")
    try:
        key.verify(signature, _SIGNED + root.encode())
    except InvalidSignature:
        raise TrustError(f"baseline root {root}: signature does not verify with "
                         f"{public_path}: the baseline was changed without the key") from None
