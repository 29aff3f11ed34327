"""Put a file back exactly: content, mode and owner, atomically.

The new file is written beside the old one under a temporary name (created
exclusively, never through a link), given the baseline's owner and mode, synced, and
renamed over the path; the directory is synced after. A crash leaves either the old
file or the restored one, never half of it. The directory is reached from the rule's
root without following links, as the scan reaches it.
"""

from __future__ import annotations

import os
import secrets

from integrity.errors import IntegrityError
from integrity.paths import display
from integrity.record import FileRecord
from integrity.scan.hasher import xattr_digest
from integrity.scan.walker import open_parent

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class RestoreError(IntegrityError):
    """A file could not be put back (nothing was changed)."""


def restore_file(path: bytes, top: bytes, text: bytes, rec: FileRecord) -> None:
    """Write `text` to `path` with `rec`'s owner and mode (and its extended attributes,
    copied from the live file when they are still the baseline's)."""
    try:
        dir_fd, name = open_parent(path, top)
    except OSError as exc:
        raise RestoreError(f"{display(path)}: cannot reach its directory: "
                           f"{exc.strerror}") from None
    temp = f".{name}.integrity-restore-{secrets.token_hex(6)}"
    try:
        attributes = _live_xattrs(name, dir_fd, rec)
        try:
            fd = os.open(temp, _CREATE, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise RestoreError(f"{display(path)}: cannot create a file beside it: "
                               f"{exc.strerror}") from None
        try:
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view):]
            os.fchown(fd, rec.uid, rec.gid)
            os.fchmod(fd, rec.mode)  # after fchown, which clears setuid/setgid
            for key, value in attributes.items():
                os.setxattr(fd, key, value)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(temp, dir_fd=dir_fd)
            raise RestoreError(f"{display(path)}: cannot write it back: "
                               f"{exc.strerror}") from None
        os.close(fd)
        try:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            os.unlink(temp, dir_fd=dir_fd)
            raise RestoreError(f"{display(path)}: cannot put it in place: "
                               f"{exc.strerror}") from None
        sync = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)  # not O_PATH
        try:
            os.fsync(sync)
        finally:
            os.close(sync)
    finally:
        os.close(dir_fd)


def _live_xattrs(name: str, dir_fd: int, rec: FileRecord) -> dict[str, bytes]:
    """The extended attributes to give the restored file: none when the baseline had
    none; the live file's when they still hash to the baseline's digest. Values are
    not kept, so other ones cannot be put back: refused."""
    if rec.xattrs is None:
        return {}
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        fd = -1
    try:
        if fd >= 0 and xattr_digest(fd) == rec.xattrs:
            return {key: os.getxattr(fd, key) for key in os.listxattr(fd)}
    finally:
        if fd >= 0:
            os.close(fd)
    raise RestoreError(f"{name}: its extended attributes are not the baseline's and "
                       "their values are not kept: put them back by hand (nothing was "
                       "changed)")
