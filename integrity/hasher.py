"""Hash one file safely: never follow a link, never open a device, never mis-hash.

Files are opened with O_NOFOLLOW|O_NONBLOCK (a FIFO swapped in after lstat cannot
block us) and O_NOATIME where allowed. After reading, fstat must agree with the lstat
that chose the file (same inode, size, mtime, ctime) and the byte count must equal the
size; otherwise the file changed under us and the digest is thrown away (AIDE's
do_md.c, borg's stat_update_check).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterable
from typing import Any

import blake3

#: Files up to this size are read with one read() call into a fresh bytes object.
SMALL_FILE = 256 << 10
#: Larger files are read in chunks of this size into a reused per-thread buffer and
#: hashed with BLAKE3's multithreading, which pays off only on large inputs.
CHUNK = 8 << 20

_BASE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_flags = _BASE_FLAGS | getattr(os, "O_NOATIME", 0)


class FileChanged(Exception):
    """The file changed between lstat and the end of reading it."""


def open_at(name: bytes | str, dir_fd: int | None = None) -> int:
    """Open a file for reading without following links or blocking on FIFOs.

    O_NOATIME is dropped for good after the first EPERM (we do not own the file and
    are not root), so unprivileged runs pay for the fallback once.
    """
    global _flags
    try:
        return os.open(name, _flags, dir_fd=dir_fd)
    except PermissionError:
        if _flags == _BASE_FLAGS:
            raise
        fd = os.open(name, _BASE_FLAGS, dir_fd=dir_fd)
        _flags = _BASE_FLAGS
        return fd


def same_file(before: os.stat_result, after: os.stat_result) -> bool:
    """True when two stats describe one unchanged regular file."""
    return (stat.S_ISREG(after.st_mode) and after.st_ino == before.st_ino
            and after.st_dev == before.st_dev and after.st_size == before.st_size
            and after.st_mtime_ns == before.st_mtime_ns
            and after.st_ctime_ns == before.st_ctime_ns)


_local = threading.local()
_threads = blake3.blake3.AUTO


def single_threaded() -> None:
    """Hash with one thread from now on (a forked child: BLAKE3's global thread pool
    belongs to the parent, and using it after fork would deadlock)."""
    global _threads
    _threads = 1


def _buffer() -> bytearray:
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(CHUNK)
    return buf


def _feed(fd: int, size: int, updates: Iterable[Callable[[Any], object]]) -> None:
    """Read fd to its end into every update function; raise FileChanged on a size mismatch."""
    if size <= SMALL_FILE:
        data = os.read(fd, size + 1)
        if len(data) != size:
            raise FileChanged
        for update in updates:
            update(data)
        return
    buf = _buffer()
    view = memoryview(buf)
    total = 0
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        total += n
        if total > size:
            raise FileChanged
        for update in updates:
            update(view[:n])
    if total != size:
        raise FileChanged


def blake3_fd(fd: int, expected: os.stat_result) -> bytes:
    """BLAKE3 digest of an open regular file that must still match `expected`.

    Raises FileChanged when the content or identity moved while it was read.
    """
    size = expected.st_size
    if size <= SMALL_FILE:
        data = os.read(fd, size + 1)
        if len(data) != size:
            raise FileChanged
        digest = blake3.blake3(data).digest()
    else:
        hasher = blake3.blake3(max_threads=_threads)
        _feed(fd, size, (hasher.update,))
        digest = hasher.digest()
    if not same_file(expected, os.fstat(fd)):
        raise FileChanged
    return digest


def xattr_digest(target: int | bytes) -> bytes | None:
    """Digest of all extended attributes (SELinux labels, ACLs, capabilities), or None.

    `target` is an open fd, or a path that is never followed.
    """
    try:
        if isinstance(target, int):
            names = os.listxattr(target)
        else:
            names = os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT, errno.EPERM):
            return None
        raise
    if not names:
        return None
    hasher = blake3.blake3()
    for name in sorted(names):
        if isinstance(target, int):
            value = os.getxattr(target, name)
        else:
            value = os.getxattr(target, name, follow_symlinks=False)
        encoded = name.encode()
        hasher.update(len(encoded).to_bytes(4, "big") + encoded)
        hasher.update(len(value).to_bytes(4, "big") + value)
    return hasher.digest()


def digest_path(path: bytes, algorithms: Iterable[str] = ("blake3",),
                retries: int = 2) -> dict[str, bytes]:
    """Digests of a regular file by absolute path, with the same safety as a scan.

    `algorithms` names "blake3" or any hashlib algorithm ("md5", "sha256"). Raises
    OSError (including ENOENT) or FileChanged when the file keeps changing.
    """
    import hashlib

    for attempt in range(retries + 1):
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            raise IsADirectoryError(errno.EISDIR if stat.S_ISDIR(before.st_mode)
                                    else errno.EINVAL, "not a regular file", path)
        hashers = {name: (blake3.blake3() if name == "blake3" else hashlib.new(name))
                   for name in algorithms}
        fd = open_at(path)
        try:
            try:
                _feed(fd, before.st_size, [h.update for h in hashers.values()])
                if not same_file(before, os.fstat(fd)):
                    raise FileChanged
            except FileChanged:
                if attempt == retries:
                    raise
                continue
        finally:
            os.close(fd)
        return {name: h.digest() for name, h in hashers.items()}
    raise FileChanged  # pragma: no cover - the loop always returns or raises
