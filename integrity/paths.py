"""Lossless path handling: paths are bytes everywhere; text only for display.

The database orders entries by a key in which '/' is replaced by NUL. NUL sorts
below every byte a file name may contain, so the key order is exactly the order of a
depth-first walk that visits siblings in byte order. That lets `verify` compare the
live tree with the baseline as one streaming merge.
"""

from __future__ import annotations

import re
from typing import Any


def to_key(path: bytes) -> bytes:
    """Database key of an absolute path."""
    return path.replace(b"/", b"\x00")


def from_key(key: bytes) -> bytes:
    """Absolute path of a database key."""
    return key.replace(b"\x00", b"/")


def display(path: bytes) -> str:
    """Text form of a path for JSON and the database: undecodable bytes appear as
    \\xNN escapes, every other character as it is (JSON escapes control characters
    itself). People read `escape(path)` instead."""
    return path.decode("utf-8", "backslashreplace")


# What a terminal, a log reader or a mail client would act on instead of showing:
# C0 and C1 controls (newline, ESC, CSI 0x9b), DEL, and the invisible format
# characters that reorder or hide text (bidi overrides and isolates, zero-width
# characters, the BOM, tag characters). Lone surrogates are what surrogateescape
# made of undecodable bytes. Anyone who can create a file chooses its name, so a
# name must never be able to forge a line, move the cursor or set a window title.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte itself
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(value: Any) -> str:
    """Text of a path or value for people: control and invisible format characters
    appear as \\xNN (\\uNNNN above U+00FF), undecodable bytes as \\xNN.

    The one escaping function of every human-readable output (reports, logs, mail,
    chat, syslog). It is idempotent, so text that passes through two layers is
    escaped once. A literal backslash is left alone: a name spelling "\\x1b" and
    one holding ESC read alike here (JSON output tells them apart).
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    elif not isinstance(value, str):
        value = str(value)
    return _UNSAFE.sub(_escaped, value)


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
