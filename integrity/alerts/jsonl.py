"""The jsonl sink: one JSON object per line, appended and flushed per alert.

Options of a `type = "jsonl"` table:

- `path` (required): absolute path of the file; its directory is created (0750), the
  file is created 0640.
- `max_bytes` (default 10485760, 10 MiB): before a line would take the file past this
  size it is rotated like logging.RotatingFileHandler does: path.N-1 -> path.N, ...,
  path -> path.1, and a new path is started. 0 leaves rotation to logrotate alone.
- `keep` (default 5): how many rotated files (path.1 .. path.N) are kept; the oldest
  is overwritten.

The file is opened without following a symbolic link, and refused unless it is a
regular file of ours with one link: in a directory other users can write to (a sticky
/tmp), a link or a file planted there must not receive root's alerts, nor let them
be read. Each directory on the way that sits in a world-writable directory must be
ours or root's. A file others can read has those bits removed.

External logrotate (contrib/logrotate/integrity) works as well: SIGHUP makes the
daemon call `reopen`, and even without it each append checks that the path still
names the open file, so a rotated file is never written to for long. Rotation and
the size check are done holding an flock on the open file, so two processes sharing
the file (the watcher and a `verify` from a timer) do not both rotate it.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
import fcntl
import os
import stat
import threading
from typing import TYPE_CHECKING

from integrity.alerts import DeliveryError, json_line
from integrity.alerts.options import Options

if TYPE_CHECKING:
    from integrity.store.events import EventDoc

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 5


class JsonlSink:
    """Appends events to a file, one JSON object per line, rotating by size."""

    digest = False
    interval = 0.0

    def __init__(self, path: str, min_severity: str = "low", *, name: str = "jsonl",
                 max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        self.name = name
        self.path = path
        self.min_severity = min_severity
        self.max_bytes = max_bytes
        self.keep = max(keep, 1)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def deliver(self, events: Sequence[EventDoc]) -> None:
        """Append events as lines with one write, so a line is never torn."""
        data = "".join(json_line(event) + "\n" for event in events).encode("utf-8")
        with self._lock:
            try:
                self._append(data)
            except OSError as exc:
                self._drop()
                cause = exc.strerror or str(exc)
                if exc.filename and exc.filename != self.path:  # its directory
                    cause = f"{exc.filename}: {cause}"
                raise DeliveryError(self.name, f"write {self.path}: {cause}") from None

    def reopen(self) -> None:
        """Close the file so the next alert opens the path anew (SIGHUP, logrotate)."""
        with self._lock:
            self._drop()

    def close(self) -> None:
        """Release the file."""
        self.reopen()

    # -- under self._lock ---------------------------------------------------------

    def _append(self, data: bytes) -> None:
        # Three rounds: another process may rotate between our open and our lock; a
        # third change in a row is not worth chasing, the line goes where we hold.
        for attempt in range(3):
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st = os.fstat(fd)
                last = attempt == 2
                if not last and not self._names(st):
                    self._drop()  # rotated or removed by someone else: follow the path
                    continue
                if not last and self.max_bytes and st.st_size \
                        and st.st_size + len(data) > self.max_bytes:
                    self._rotate()
                    self._drop()
                    continue
                _write_all(fd, data)
                return
            finally:
                if self._fd == fd:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int:
        if self._fd is None:
            self._fd = open_private(self.path)
        return self._fd

    def _names(self, st: os.stat_result) -> bool:
        """Whether the path still names the open file."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino)

    def _rotate(self) -> None:
        for index in range(self.keep - 1, 0, -1):
            try:
                os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
            except FileNotFoundError:
                pass
        os.replace(self.path, f"{self.path}.1")

    def _drop(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def open_private(path: str) -> int:
    """An append descriptor of path, created 0640; never through a link, never a file
    or directory another user planted where others can write."""
    directory = os.path.dirname(path)
    _check_directories(directory)  # before makedirs follows a planted link
    os.makedirs(directory, mode=0o750, exist_ok=True)
    _check_directories(directory)
    try:
        # O_NONBLOCK: a FIFO planted in place of the file must not hang us in open().
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused(path, "is a symbolic link") from None
        if exc.errno == errno.ENXIO:
            raise _refused(path, "is a FIFO") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refused(path, "is not a regular file")
        if st.st_uid != os.geteuid():
            raise _refused(path, f"is owned by uid {st.st_uid}")
        if st.st_nlink != 1:
            raise _refused(path, f"has {st.st_nlink} hard links")
        if st.st_mode & 0o007:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o007)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_directories(directory: str) -> None:
    """Refuse a directory on the way that another user controls: one that everybody
    may write without the sticky bit, or an entry of someone else's in a sticky one."""
    parent = "/"
    for part in os.path.abspath(directory).split("/")[1:]:
        here = os.path.join(parent, part)
        try:
            around, st = os.stat(parent), os.lstat(here)
        except FileNotFoundError:
            return  # makedirs creates the rest, as ours
        if around.st_mode & 0o002:
            if not around.st_mode & stat.S_ISVTX:
                raise _refused(parent, "is writable by every user (no sticky bit)")
            if st.st_uid not in (0, os.geteuid()):
                raise _refused(here, f"is owned by uid {st.st_uid} in the world-writable "
                                     f"{parent}")
        parent = here


def _refused(path: str, why: str) -> OSError:
    return OSError(errno.EPERM, f"{why}: refusing to write alerts there", path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def build(options: Options) -> JsonlSink:
    """A jsonl sink from its [[alert]] table."""
    path = options.path("path", required=True)
    assert path is not None
    return JsonlSink(path, options.min_severity, name=options.name,
                     max_bytes=options.integer("max_bytes", DEFAULT_MAX_BYTES),
                     keep=options.integer("keep", DEFAULT_KEEP, minimum=1))
