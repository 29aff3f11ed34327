"""Reading /proc and /proc/sys: whole files, numbers, and a process's effective uid.

One place for how these files are read, because they are not ordinary files: stat
says their size is 0 (or 4096), so they are read until EOF; a process may exit between
two reads, so every reader lets OSError through or says "unknown" (None, "").

Only the standard library is imported: the fanotify helper process (helper.py) runs
with `python -S` and reads /proc through this module.
"""

from __future__ import annotations

import os

#: Anything os.open() takes as a path.
ProcPath = str | bytes

#: Longest file read_small() returns unless told otherwise.
SMALL_LIMIT = 1 << 22


def read_small(path: ProcPath, limit: int | None = SMALL_LIMIT) -> bytes:
    """A whole /proc or /sys file, up to `limit` bytes (None: all of it).

    Raises OSError (the process is gone, the file unreadable).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        size = 0
        while limit is None or size < limit:
            want = 65536 if limit is None else min(65536, limit - size)
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: ProcPath) -> str:
    """A whole file as text (undecodable bytes escaped); "" when it cannot be read."""
    try:
        return read_small(path, None).decode("utf-8", "backslashreplace")
    except OSError:
        return ""


def read_int(path: ProcPath) -> int | None:
    """The number a file starts with (a sysctl such as max_user_watches), or None."""
    try:
        return int(read_small(path, 4096).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def status_uid(status: bytes) -> int | None:
    """The effective uid in a /proc/PID/status text, None when it has no Uid: line.

    The line reads "Uid: real effective saved fs"; the effective one is what inotify
    counts limits against and what a process acts as.
    """
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            try:
                return int(line.split()[2])
            except (ValueError, IndexError):
                return None
    return None
