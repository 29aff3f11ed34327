"""What we know about one path: checkable attributes and the record of an entry."""

from __future__ import annotations

import datetime as dt
import enum
import os
import stat
from typing import Any, NamedTuple


class Attr(enum.Flag):
    """Attributes a rule can compare (AIDE's attribute groups, as flags)."""

    TYPE = enum.auto()
    CONTENT = enum.auto()
    SIZE = enum.auto()
    MODE = enum.auto()
    UID = enum.auto()
    GID = enum.auto()
    INODE = enum.auto()
    NLINK = enum.auto()
    MTIME = enum.auto()
    CTIME = enum.auto()
    LINK = enum.auto()
    XATTRS = enum.auto()
    DEV = enum.auto()
    # Not an attribute of its own: "size may only grow" (log files).
    GROWING = enum.auto()
    # Not compared either: keep the content of small text files for diffs and restore.
    DIFF = enum.auto()


NONE = Attr(0)

#: Attribute names as they appear in policies and reports, in report order.
ATTR_NAMES: dict[str, Attr] = {a.name.lower(): a for a in Attr}  # type: ignore[union-attr]

PRESETS: dict[str, Attr] = {
    "static": Attr.TYPE | Attr.CONTENT | Attr.SIZE | Attr.MODE | Attr.UID | Attr.GID
    | Attr.INODE | Attr.NLINK | Attr.LINK | Attr.XATTRS | Attr.MTIME | Attr.CTIME,
    "config": Attr.TYPE | Attr.CONTENT | Attr.SIZE | Attr.MODE | Attr.UID | Attr.GID
    | Attr.LINK | Attr.XATTRS | Attr.DIFF,
    "perms": Attr.TYPE | Attr.MODE | Attr.UID | Attr.GID | Attr.LINK | Attr.XATTRS,
    "log": Attr.TYPE | Attr.MODE | Attr.UID | Attr.GID | Attr.GROWING,
}

FILE, DIR, SYMLINK, FIFO, SOCKET, CHAR, BLOCK = (
    "file", "dir", "symlink", "fifo", "socket", "char", "block")

_TYPES = {
    stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK, stat.S_IFIFO: FIFO,
    stat.S_IFSOCK: SOCKET, stat.S_IFCHR: CHAR, stat.S_IFBLK: BLOCK,
}


def file_type(st_mode: int) -> str:
    """Entry type name of a stat mode."""
    return _TYPES.get(stat.S_IFMT(st_mode), "unknown")


def attr_names(attrs: Attr) -> list[str]:
    """Names of the attributes in a flag set, in report order."""
    return [name for name, flag in ATTR_NAMES.items() if flag in attrs]


#: Builds a NamedTuple from a tuple of its fields: `new_tuple(FileRecord, (...))`. The
#: class's own __new__ is Python code, a frame per call; this is C, for the records a
#: scan makes once per entry.
new_tuple = tuple.__new__


class FileRecord(NamedTuple):
    """One entry's state. A tuple, because the scan builds one per file on its hot path.

    `content` and `xattrs` are raw 32-byte BLAKE3 digests (None when the entry has
    no content, the rule does not hash it, or it has no extended attributes);
    `mtime` and `ctime` are nanoseconds since the epoch.
    """

    path: bytes
    type: str
    content: bytes | None
    size: int
    mode: int
    uid: int
    gid: int
    inode: int
    nlink: int
    mtime: int
    ctime: int
    link: bytes | None
    xattrs: bytes | None
    dev: int

    @classmethod
    def from_stat(cls, path: bytes, st: os.stat_result, content: bytes | None = None,
                  link: bytes | None = None, xattrs: bytes | None = None) -> FileRecord:
        """Record of a path from its lstat result and what was read of it."""
        mode = st.st_mode
        return new_tuple(cls, (path, _TYPES.get(stat.S_IFMT(mode), "unknown"), content,
                               st.st_size, stat.S_IMODE(mode), st.st_uid, st.st_gid,
                               st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns,
                               link, xattrs, st.st_dev))


#: FileRecord's fields an lstat gives, in order (size, mode, uid, gid, inode, nlink,
#: mtime, ctime): `record[LSTAT_FIELDS]` compares them with one tuple comparison.
LSTAT_FIELDS = slice(3, 11)


def iso_ns(ns: int) -> str:
    """ISO 8601 UTC with nanoseconds, from nanoseconds since the epoch."""
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{frac:09d}Z"


def json_value(name: str, raw: Any) -> Any:
    """JSON-ready form of one attribute value."""
    if raw is None:
        return None
    if name in ("content", "xattrs"):
        return raw.hex()
    if name == "mode":
        return f"{raw:04o}"
    if name in ("mtime", "ctime"):
        return iso_ns(raw)
    if name == "link":
        return raw.decode("utf-8", "backslashreplace")
    return raw
