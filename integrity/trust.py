"""Tamper evidence for the baseline: Merkle leaves and roots, seals, signatures, keys.

Pure functions over bytes. The *root* an operator keeps off the host seals, in one
BLAKE3 digest: the Merkle root of every entry column (package owner included), the
digest of the effective policy, the baseline's generation number and its creation
time (`seal`). A signature, when signing is on, signs that same root; a key is named
by its OpenSSH-style fingerprint so that it too can be pinned off the host.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import marshal
import operator
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from integrity.errors import IntegrityError
from integrity.record import FileRecord

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: Seal versions: 1 sealed the entries' attributes alone; 2 seals every column with
#: the policy, the generation and the creation time, a leaf per entry; 3 seals the
#: same, a leaf per block of LEAF_BATCH entries in a binary encoding (`encode_rows`).
SEAL_VERSION = 3
_LEAF_V1 = b"integrity-entry-v1\x00"
_LEAF = b"integrity-entry-v2\x00"
_BLOCK = b"integrity-entries-v3\x00"
_NODE = b"integrity-node-v1\x00"
_SEAL = b"integrity-seal-v2\x00"
_SIGNED = b"integrity-baseline-root-v1\x00"
#: Leaves gathered for one MerkleRoot.add_many (a power of two: whole subtrees), and
#: the entries in one leaf of seal version 3.
LEAF_BATCH = 1024
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


def row_of(key: bytes, rec: FileRecord, package: str | None, kept: bytes | None
           ) -> tuple[object, ...]:
    """An entry laid out as it is stored and sealed: (key, *record[1:], package, kept).
    (init's row loop spells it out inline: it runs once per file of a baseline.)"""
    return (key, *rec[1:], package, kept)


def leaf(key: bytes, rec: FileRecord, package: str | None, kept: bytes | None) -> bytes:
    """Digest of one entry: its key, every recorded attribute, its package owner and
    the digest of the text kept for it.

    The row is encoded by `repr` of a tuple of bytes, ints, None and ASCII strings
    (types and package names), which is unambiguous and done in C: this runs once
    per entry whenever a baseline is written or checked.
    """
    return _blake3(_LEAF + repr(row_of(key, rec, package, kept)).encode()).digest()


_blake3 = blake3.blake3
_digest = operator.methodcaller("digest")
_leaf_input = _LEAF.__add__


def row_leaves(rows: Sequence[tuple[object, ...]]) -> list[bytes]:
    """leaf() of each stored row laid out as (key, *record[1:], package, kept).

    The same digests, through one chain of C-level maps per batch: no Python frame
    per row, for the process that seals a whole baseline while a verify reads it.
    """
    return list(map(_digest, map(_blake3, map(_leaf_input, map(str.encode,
                                                                map(repr, rows))))))


def leaf_v1_row(row: Sequence[object]) -> bytes:
    """Digest of one row as seal version 1 made it: the entry's key and attributes
    (the first 14 columns of (key, *record[1:], package, kept)), tagged and joined."""
    return blake3.blake3(_LEAF_V1 + b"\x00".join(
        [_field(value) for value in row[:14]])).digest()


# -- seal version 3: a leaf per block of rows ---------------------------------------
#
# A block's rows are encoded as marshal's version 2 format writes a list of tuples of
# None, int, str and bytes: unambiguous (every value carries its type and length),
# and written in C, ~0.1 µs a row against ~1 µs for version 2's repr. marshal makes
# no promise across Python versions, so `_encode_reference` spells the format out in
# Python; the two are compared when this module is imported, and a Python whose
# marshal writes anything else gets the reference (slower, the same bytes).

def _reference_value(value: object, out: list[bytes]) -> None:
    if value is None:
        out.append(b"N")
    elif value is True or value is False:
        out.append(b"T" if value else b"F")
    elif isinstance(value, int):
        if -(1 << 31) <= value < 1 << 31:
            out.append(b"i" + struct.pack("<i", value))
        else:  # base 2**15 digits, least significant first; the count carries the sign
            magnitude, digits = abs(value), []
            while magnitude:
                digits.append(magnitude & 0x7FFF)
                magnitude >>= 15
            count = len(digits) if value > 0 else -len(digits)
            out.append(b"l" + struct.pack(f"<i{len(digits)}H", count, *digits))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out.append(b"u" + struct.pack("<I", len(data)) + data)
    elif isinstance(value, (bytes, memoryview)):
        data = bytes(value)
        out.append(b"s" + struct.pack("<I", len(data)) + data)
    elif isinstance(value, (tuple, list)):
        out.append((b"(" if isinstance(value, tuple) else b"[")
                   + struct.pack("<I", len(value)))
        for item in value:
            _reference_value(item, out)
    else:
        raise TypeError(f"a baseline row holds a {type(value).__name__}")


def _encode_reference(rows: Sequence[tuple[object, ...]]) -> bytes:
    """Seal version 3's encoding of a list of rows, in Python (see above)."""
    out: list[bytes] = []
    _reference_value(list(rows), out)
    return b"".join(out)


def _encode_marshal(rows: Sequence[tuple[object, ...]]) -> bytes:
    return marshal.dumps(rows if type(rows) is list else list(rows), 2)


_SAMPLE = [(b"/etc/\xff\x00", "file", bytes(range(32)), 0, 0o4755, -1, 1 << 31,
            (1 << 64) - 1, 1, -(10 ** 19), 1_700_000_000_123_456_789, None, b"", 2049,
            "libc-bin:amd64", "\u00e9\udcff"), (b"", "dir", None, -(1 << 31), True, False)]
#: encode_rows(rows): seal version 3's encoding of a block of rows.
encode_rows = _encode_marshal if _encode_marshal(_SAMPLE) == _encode_reference(_SAMPLE) \
    else _encode_reference


def block_leaf(rows: Sequence[tuple[object, ...]]) -> bytes:
    """Seal version 3's leaf: up to LEAF_BATCH consecutive rows laid out as stored."""
    return _blake3(_BLOCK + encode_rows(rows)).digest()


class EntriesRoot:
    """The Merkle root of a baseline's entries as seal `version` makes it, fed in key
    order either rows laid out as stored, (key, *record[1:], package, kept), a batch
    at a time, or entries one at a time; both may be mixed.

    Rows wait until LEAF_BATCH of them are in, then enter the tree as one block:
    version 3's leaf (`block_leaf`), so its blocks are cut at fixed counts whatever
    batches the rows arrive in; before it, the block's leaves, one per row.
    """

    def __init__(self, version: int = SEAL_VERSION) -> None:
        if not 1 <= version <= SEAL_VERSION:
            raise TrustError(f"the baseline has seal version {version}, which this "
                             f"integrity does not know (it knows 1 to {SEAL_VERSION}): "
                             "upgrade integrity, or the baseline was tampered with")
        self.version = version
        self.merkle = MerkleRoot()
        self._pending: list[tuple[object, ...]] = []

    def add_rows(self, rows: Sequence[tuple[object, ...]]) -> None:
        """The next rows, laid out as stored."""
        pending = self._pending
        if not pending and len(rows) == LEAF_BATCH:
            self._add_block(rows)
            return
        pending.extend(rows)
        while len(pending) >= LEAF_BATCH:
            self._add_block(pending[:LEAF_BATCH])
            del pending[:LEAF_BATCH]

    def add(self, key: bytes, rec: FileRecord, package: str | None,
            kept: bytes | None) -> None:
        """The next entry."""
        pending = self._pending
        pending.append(row_of(key, rec, package, kept))
        if len(pending) >= LEAF_BATCH:
            self._add_block(pending)
            pending.clear()

    def hexdigest(self) -> str:
        """The root of everything added so far."""
        if self._pending:
            self._add_block(self._pending)
            self._pending.clear()
        return self.merkle.hexdigest()

    def _add_block(self, rows: Sequence[tuple[object, ...]]) -> None:
        if self.version >= 3:
            self.merkle.add(block_leaf(rows))
        elif self.version == 2:
            self.merkle.add_many(row_leaves(rows))
        else:
            self.merkle.add_many([leaf_v1_row(row) for row in rows])


def seal(entries_root: str, policy_digest: str, generation: int,
         created: dt.datetime) -> str:
    """The baseline's root: entries, effective policy, generation and creation time."""
    statement = f"{entries_root}\x00{policy_digest}\x00{generation}\x00" \
                f"{created.replace(microsecond=0).isoformat()}"
    return blake3.blake3(_SEAL + statement.encode()).hexdigest()


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
        self._push(0, digest, 1)

    def add_many(self, digests: Sequence[bytes]) -> None:
        """Append leaf digests in order: the same root as add() for each, ~3x faster.

        Whenever the leaves so far are a multiple of 2^k, the next 2^k leaves form a
        complete subtree of their own: it is reduced level by level (one list
        comprehension per level) and pushed as one node.
        """
        node, i, n = _NODE, 0, len(digests)
        while i < n:
            room = self.count & -self.count or 1 << 62  # largest block now aligned
            size = min(room, 1 << ((n - i).bit_length() - 1))
            block = list(digests[i:i + size])
            level = 0
            while len(block) > 1:
                block = [_blake3(node + a + b).digest()
                         for a, b in zip(block[0::2], block[1::2])]
                level += 1
            self._push(level, block[0], size)
            i += size

    def _push(self, level: int, node: bytes, leaves: int) -> None:
        """A complete subtree's root (`leaves` = 2**level of them), merged like a
        binary counter's carry."""
        self.count += leaves
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            node = _blake3(_NODE + left + node).digest()
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


def root_of(entries: Iterable[tuple[bytes, FileRecord, str | None, bytes | None]],
            version: int = SEAL_VERSION) -> str:
    """Merkle root of (key, record, package, kept) given in key order, as seal
    `version` computes it."""
    root = EntriesRoot(version)
    for entry in entries:
        root.add(*entry)
    return root.hexdigest()


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


def fingerprint(raw_public_key: bytes) -> str:
    """A key's fingerprint as ssh-keygen prints it: SHA256 of the OpenSSH public key
    blob, base64 without padding."""
    def field(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data
    blob = field(b"ssh-ed25519") + field(raw_public_key)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def public_key_bytes(public_path: str) -> bytes:
    """The raw 32 bytes of an Ed25519 public key file (PEM)."""
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
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signer_of(private_path: str) -> bytes:
    """The raw public key of a private signing key: recorded beside its signature."""
    from cryptography.hazmat.primitives import serialization

    key = _private_key(private_path)
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _private_key(private_path: str) -> Ed25519PrivateKey:
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
    return key


def sign(root: str, private_path: str) -> bytes:
    """Ed25519 signature of a baseline root."""
    return _private_key(private_path).sign(_SIGNED + root.encode())


def signature_valid(root: str, signature: bytes, raw_public_key: bytes) -> bool:
    """Whether `signature` signs `root` for this raw Ed25519 public key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw_public_key).verify(
            signature, _SIGNED + root.encode())
    except (InvalidSignature, ValueError):
        return False
    return True


def check_signature(root: str, signature: bytes | None, public_path: str) -> None:
    """Raise TrustError unless `signature` signs `root` for the key at public_path."""
    raw = public_key_bytes(public_path)
    if signature is None:
        raise TrustError(f"baseline root {root} is not signed, but {public_path} is "
                         "configured: sign it with 'init/approve --sign-key'")
    if not signature_valid(root, signature, raw):
        raise TrustError(f"baseline root {root}: signature does not verify with "
                         f"{public_path}: the baseline was changed without the key")
