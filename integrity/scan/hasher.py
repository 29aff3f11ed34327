"""Hash one file safely: never follow a link, never open a device, never mis-hash.

Files are opened with O_NOFOLLOW|O_NONBLOCK (a FIFO swapped in after lstat cannot
block us) and O_NOATIME where allowed. After reading, fstat must agree with the lstat
that chose the file (same inode, size, mtime, ctime) and the byte count must equal the
size; otherwise the file changed under us and the digest is thrown away (AIDE's
do_md.c, borg's stat_update_check).

An unchanged stat does not prove an unchanged content, though: Linux stamps mtime and
ctime when a write() starts, not when it ends, and one write can take a long time (a
64 MB write from a cold mmap takes ~90 ms here). A read overlapping a write that began
before the lstat sees the same size and times before and after, and mixed content.
So a file whose ctime is recent (see `RECENT_NS`) is handled with more care: first
we wait for a write in progress to end, where the filesystem lets us (`settle`), then
the file is read twice, and two reads that disagree mean it changed while it was
read. An old file is read once: the care costs it one integer comparison.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import blake3

from integrity.scan.priority import charge

#: Files up to this size are read with one read() call into a fresh bytes object.
SMALL_FILE = 256 << 10
#: Larger files are read in chunks of this size into a reused per-thread buffer and
#: hashed with BLAKE3's multithreading, which pays off only on large inputs.
CHUNK = 8 << 20

#: A file whose ctime is at most this old when a scan starts, or newer, may still be
#: inside a write() that began before we looked at it (see the module docstring).
#: Generous: it must cover the longest single write() we expect plus the timestamp
#: granularity of the filesystem (the kernel's coarse clock ticks every 1-10 ms;
#: some filesystems keep whole seconds), and it costs only files changed lately.
RECENT_NS = 10 * 1_000_000_000

_BASE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_flags = _BASE_FLAGS | getattr(os, "O_NOATIME", 0)

T = TypeVar("T")


class FileChanged(Exception):
    """The file changed between lstat and the end of reading it."""


def recent_since() -> int:
    """The ctime (ns) from which a file counts as possibly mid-write: files changed
    at or after it are read twice. Taken once when a scan starts."""
    return time.time_ns() - RECENT_NS


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
    except BlockingIOError:
        return _open_leased(name, dir_fd)


def _open_leased(name: bytes | str, dir_fd: int | None) -> int:
    """Open a file someone holds a lease on (fcntl F_SETLEASE): a non-blocking open
    fails at once, while every other reader waits for the holder to let go (at most
    /proc/sys/fs/lease-break-time) and reads the bytes it let in. So do we: the entry
    is pinned with O_PATH, checked to be a regular file (never a FIFO to block on),
    and opened again through /proc/self/fd, blocking."""
    pinned = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(pinned).st_mode):
            raise BlockingIOError(errno.EWOULDBLOCK, "not a regular file", name)
        # The magic link leads to the pinned entry itself, never beyond it.
        return os.open(f"/proc/self/fd/{pinned}",
                       _flags & ~(os.O_NONBLOCK | os.O_NOFOLLOW))
    finally:
        os.close(pinned)


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
        charge(len(data))
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
        charge(n)
        total += n
        if total > size:
            raise FileChanged
        for update in updates:
            update(view[:n])
    if total != size:
        raise FileChanged


def settle(fd: int) -> None:
    """Wait for a write() in progress on fd's file to end, where the filesystem lets us.

    ext4, btrfs and tmpfs hold the inode lock through a buffered write() and take it
    to answer SEEK_DATA, so this returns only once a write that began before our
    lstat (and so moved no stamp we could see) has ended: ~5 µs when none is in
    progress. Elsewhere it returns at once and the double read is what is left.
    Moves the file offset: read with pread afterwards.
    """
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:
        pass  # ENXIO: empty or all hole; EINVAL: SEEK_DATA not supported


def read_recent(fd: int, size: int) -> bytes:
    """All of a small, recently changed file: settled, read twice, the reads agreeing.

    Raises FileChanged when they do not, or the size is not `size`.
    """
    settle(fd)
    data = os.pread(fd, size + 1, 0)
    charge(2 * len(data))
    if len(data) != size or os.pread(fd, size + 1, 0) != data:
        raise FileChanged
    return data


def blake3_fd(fd: int, expected: os.stat_result, recent: int | None = None) -> bytes:
    """BLAKE3 digest of an open regular file that must still match `expected`.

    A file whose ctime is at or after `recent` (default: `recent_since()` now) may
    be mid-write: it is settled and read twice, and both reads must agree. Raises
    FileChanged when the content or identity moved while it was read.
    """
    size = expected.st_size
    twice = expected.st_ctime_ns >= (recent_since() if recent is None else recent)
    if size <= SMALL_FILE:
        if twice:
            data = read_recent(fd, size)
        else:
            data = os.read(fd, size + 1)
            charge(len(data))
            if len(data) != size:
                raise FileChanged
        digest = blake3.blake3(data).digest()
    elif twice:
        digest = read_twice(fd, lambda: _blake3_large(fd, size))
    else:
        digest = _blake3_large(fd, size)
    if not same_file(expected, os.fstat(fd)):
        raise FileChanged
    return digest


def read_twice(fd: int, digest: Callable[[], T]) -> T:
    """`digest()` of a recently changed file, settled and taken twice from offset 0;
    raises FileChanged when the two disagree."""
    settle(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    first = digest()
    os.lseek(fd, 0, os.SEEK_SET)
    if digest() != first:
        raise FileChanged
    return first


def _blake3_large(fd: int, size: int) -> bytes:
    hasher = blake3.blake3(max_threads=_threads)
    _feed(fd, size, (hasher.update,))
    return hasher.digest()


#: listxattr's errors that mean "no extended attributes to compare": the filesystem
#: has none (a FUSE server without them), or the entry is gone or not ours to ask.
NO_XATTRS = frozenset({errno.ENOTSUP, errno.ENOENT, errno.EPERM})


def xattr_digest(target: int | bytes, follow: bool = False,
                 names: list[str] | None = None) -> bytes | None:
    """Digest of all extended attributes (SELinux labels, ACLs, capabilities), or None.

    `target` is an open fd, or a path that is followed only if `follow` (for a
    /proc/self/fd link, which leads to the entry itself and not beyond it). `names`:
    its listxattr when the caller has it already.
    """
    if names is None:
        try:
            if isinstance(target, int):
                names = os.listxattr(target)
            else:
                names = os.listxattr(target, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in NO_XATTRS:
                return None
            raise
    if not names:
        return None
    hasher = blake3.blake3()
    for name in sorted(names):
        if isinstance(target, int):
            value = os.getxattr(target, name)
        else:
            value = os.getxattr(target, name, follow_symlinks=follow)
        encoded = name.encode()
        hasher.update(len(encoded).to_bytes(4, "big") + encoded)
        hasher.update(len(value).to_bytes(4, "big") + value)
    return hasher.digest()


_PROC_FD = os.path.isdir("/proc/self/fd")
_ENTRY_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def xattr_digest_at(dir_fd: int, name: str, path: bytes) -> bytes | None:
    """Digest of the extended attributes of entry `name` of directory `dir_fd`.

    For entries we do not open (symlinks, FIFOs, devices, directories, files we do
    not hash). Their absolute `path` may be longer than PATH_MAX or pass through a
    directory swapped for a symlink since the walk, so the entry itself is opened
    with O_PATH|O_NOFOLLOW (which neither follows it nor opens a device or FIFO) and
    read through its /proc/self/fd link. Without /proc, `path`, never followed.
    """
    if not _PROC_FD or dir_fd < 0:
        return xattr_digest(path)
    fd = os.open(name, _ENTRY_FLAGS, dir_fd=dir_fd)
    try:
        return xattr_digest(b"/proc/self/fd/%d" % fd, follow=True)
    finally:
        os.close(fd)


def digest_path(path: bytes, algorithms: Iterable[str] = ("blake3",),
                retries: int = 2) -> dict[str, bytes]:
    """Digests of a regular file by absolute path, with the same safety as a scan.

    `algorithms` names "blake3" or any hashlib algorithm ("md5", "sha256"). Raises
    OSError (including ENOENT) or FileChanged when the file keeps changing.
    """
    algorithms = tuple(algorithms)
    recent = recent_since()
    for attempt in range(retries + 1):
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            raise IsADirectoryError(errno.EISDIR if stat.S_ISDIR(before.st_mode)
                                    else errno.EINVAL, "not a regular file", path)
        fd = open_at(path)
        try:
            try:
                if before.st_ctime_ns >= recent:  # possibly mid-write
                    digests = read_twice(
                        fd, lambda: _digests(fd, before.st_size, algorithms))
                else:
                    digests = _digests(fd, before.st_size, algorithms)
                if not same_file(before, os.fstat(fd)):
                    raise FileChanged
            except FileChanged:
                if attempt == retries:
                    raise
                continue
        finally:
            os.close(fd)
        return digests
    raise FileChanged  # pragma: no cover - the loop always returns or raises


def _digests(fd: int, size: int, algorithms: Iterable[str]) -> dict[str, bytes]:
    import hashlib

    hashers = {name: (blake3.blake3() if name == "blake3" else hashlib.new(name))
               for name in algorithms}
    _feed(fd, size, [h.update for h in hashers.values()])
    return {name: h.digest() for name, h in hashers.items()}
