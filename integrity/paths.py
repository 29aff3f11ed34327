"""Lossless path handling: paths are bytes everywhere; text only for display.

The database orders entries by a key in which '/' is replaced by NUL. NUL sorts
below every byte a file name may contain, so the key order is exactly the order of a
depth-first walk that visits siblings in byte order. That lets `verify` compare the
live tree with the baseline as one streaming merge.
"""

from __future__ import annotations


def to_key(path: bytes) -> bytes:
    """Database key of an absolute path."""
    return path.replace(b"/", b"\x00")


def from_key(key: bytes) -> bytes:
    """Absolute path of a database key."""
    return key.replace(b"\x00", b"/")


def display(path: bytes) -> str:
    """Text form of a path: undecodable bytes appear as \\xNN escapes."""
    return path.decode("utf-8", "backslashreplace")


def is_within(path: bytes, root: bytes) -> bool:
    """True when path is root itself or lies below it."""
    if root == b"/":
        return path.startswith(b"/")
    return path == root or path.startswith(root + b"/")


def key_range(root: bytes) -> tuple[bytes, bytes]:
    """Half-open key range [low, high) holding root and everything below it."""
    low = to_key(root.rstrip(b"/") or b"/")
    if low == b"\x00":
        return b"\x00", b"\x01"
    return low, low + b"\x01"
