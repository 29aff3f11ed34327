"""Turn walk entries into records: open, hash, read links and xattrs, in order.

The hot path of every scan. Per-file Python overhead, not BLAKE3, limits a baseline,
so the loop does the minimum per entry: one open/read/fstat/close for regular files
(the walker did the lstat) and an flistxattr where the rule checks xattrs. On a cold
cache, files are opened a few entries ahead of hashing with POSIX_FADV_WILLNEED so
the kernel reads upcoming files while we hash the current one: overlapped I/O
without threads, whose GIL hand-offs made warm runs slower than one thread.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import blake3

from .errors import ScanWarning
from .hasher import SMALL_FILE, FileChanged, blake3_fd, open_at, xattr_digest
from .record import FileRecord
from .walker import WalkEntry

log = logging.getLogger(__name__)

#: How many files are opened (and read-ahead hinted) before the one being hashed.
READAHEAD = 16
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
_RETRIES = 2
#: While read-ahead is off, every this many files one hash is timed; one that takes
#: longer than _COLD_SECONDS waited for the disk.
_SAMPLE_EVERY = 32
_COLD_SECONDS = 0.0005
_SAMPLE_SIZE = 64 << 10


@dataclass
class Progress:
    """Counters a progress display polls; `tick` is called every `every` entries."""

    tick: Callable[[Progress], None] | None = None
    every: int = 1024
    files: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)


def _rehash_by_path(entry: WalkEntry, want_xattrs: bool
                    ) -> tuple[FileRecord | None, ScanWarning | None]:
    """Second and later attempts for a file that changed while it was read."""
    for _ in range(_RETRIES):
        try:
            st = os.lstat(entry.path)
            if not stat.S_ISREG(st.st_mode):
                return FileRecord.from_stat(entry.path, st, None, _readlink(entry.path, st),
                                            _xattrs_path(entry.path, want_xattrs)), None
            fd = open_at(entry.path)
        except FileNotFoundError:
            return None, ScanWarning(entry.path, "open", "No such file or directory",
                                     "vanished during scan")
        except OSError as exc:
            return None, ScanWarning(entry.path, "open", exc.strerror or str(exc))
        try:
            digest = blake3_fd(fd, st)
            xattrs = xattr_digest(fd) if want_xattrs else None
            return FileRecord.from_stat(entry.path, st, digest, None, xattrs), None
        except FileChanged:
            continue
        except OSError as exc:
            return None, ScanWarning(entry.path, "read", exc.strerror or str(exc))
        finally:
            os.close(fd)
    st = os.lstat(entry.path)
    return (FileRecord.from_stat(entry.path, st, None, None, None),
            ScanWarning(entry.path, "hash", "file kept changing while being read",
                        "content not recorded"))


def _readlink(path: bytes, st: os.stat_result) -> bytes | None:
    return os.readlink(path) if stat.S_ISLNK(st.st_mode) else None


def _xattrs_path(path: bytes, wanted: bool) -> bytes | None:
    if not wanted:
        return None
    try:
        return xattr_digest(path)
    except OSError:
        return None


Item = tuple[WalkEntry | None, FileRecord | None]
Out = tuple[FileRecord | None, ScanWarning | None, WalkEntry | None, FileRecord | None]


def materialize(items: Iterable[Item | ScanWarning],
                want_hash: Callable[[WalkEntry, FileRecord | None], bool],
                progress: Progress | None = None, readahead: int = READAHEAD,
                ) -> Iterator[Out | ScanWarning]:
    """Turn walk entries into FileRecords, hashing where `want_hash` says so.

    Each input is (live entry or None, baseline record or None), passed through
    alongside the result; warnings pass through unchanged. Order is preserved.
    """
    window: deque[tuple[WalkEntry | None, FileRecord | None, int, bytes | None,
                        ScanWarning | None]] = deque()
    # Read-ahead costs ~5 µs a file on a warm cache and halves a cold run, so it
    # starts off and is switched on when a sampled file takes disk-like time.
    depth = 0 if _WILLNEED is not None else -1
    sample = 0
    tick = progress.tick if progress else None
    every = progress.every if progress else 0
    n = 0
    for item in items:
        if isinstance(item, ScanWarning):
            if window:
                # Keep order: hold warnings until the entries before them are out.
                window.append((None, None, -2, None, item))
            else:
                yield item
            continue
        entry, old = item
        fd: int = -1
        link: bytes | None = None
        problem: ScanWarning | None = None
        if entry is not None:
            mode = entry.st.st_mode
            if stat.S_ISREG(mode):
                if want_hash(entry, old):
                    try:
                        fd = open_at(entry.name, entry.dir_fd)
                    except FileNotFoundError:
                        problem = ScanWarning(entry.path, "open", "No such file or directory",
                                              "vanished during scan")
                    except OSError as exc:
                        problem = ScanWarning(entry.path, "open", exc.strerror or str(exc),
                                              "content not checked")
                    else:
                        if depth > 0 and entry.st.st_size > 0:
                            os.posix_fadvise(fd, 0, 0, _WILLNEED)  # type: ignore[arg-type]
            elif stat.S_ISLNK(mode):
                try:
                    link = os.fsencode(os.readlink(entry.name, dir_fd=entry.dir_fd))
                except OSError as exc:
                    problem = ScanWarning(entry.path, "readlink", exc.strerror or str(exc),
                                          "target not checked")
        window.append((entry, old, fd, link, problem))
        if depth == 0 and fd >= 0 and entry.st.st_size <= _SAMPLE_SIZE:  # type: ignore[union-attr]
            sample += 1
            if sample % _SAMPLE_EVERY == 0:
                started = time.perf_counter()
                out = _finish(*window.popleft())
                if time.perf_counter() - started > _COLD_SECONDS:
                    depth = readahead
                    log.debug("cold cache: reading ahead %d files", depth)
                yield out
        while len(window) > max(depth, 0):
            yield _finish(*window.popleft())
        if tick is not None:
            n += 1
            if entry is not None:
                progress.files += 1  # type: ignore[union-attr]
                progress.bytes += entry.st.st_size  # type: ignore[union-attr]
            if n % every == 0:
                tick(progress)  # type: ignore[arg-type]
    while window:
        yield _finish(*window.popleft())


def _finish(entry: WalkEntry | None, old: FileRecord | None, fd: int, link: bytes | None,
            problem: ScanWarning | None) -> Out | ScanWarning:
    """Hash an opened file (or record a non-file) and build its FileRecord.

    The small-file case is spelled out inline: it runs once per file of a scan.
    """
    if fd == -2:
        assert problem is not None
        return problem
    if entry is None:
        return None, None, None, old
    want_xattrs = entry.rule.wants_xattrs
    st = entry.st
    mode = st.st_mode
    if fd >= 0:
        try:
            size = st.st_size
            if size <= SMALL_FILE:
                data = _read(fd, size + 1)
                after = _fstat(fd)
                if (len(data) != size or after.st_ino != st.st_ino
                        or after.st_size != size or after.st_mtime_ns != st.st_mtime_ns
                        or after.st_ctime_ns != st.st_ctime_ns
                        or after.st_dev != st.st_dev or not _S_ISREG(after.st_mode)):
                    raise FileChanged
                digest = _blake3(data).digest()
            else:
                digest = blake3_fd(fd, st)
            xattrs = (xattr_digest(fd) if want_xattrs and _listxattr(fd) else None)
        except FileChanged:
            _close(fd)
            rec, problem = _rehash_by_path(entry, want_xattrs)
            return rec, problem, entry, old
        except OSError as exc:
            _close(fd)
            return (FileRecord.from_stat(entry.path, st, None, None, None),
                    ScanWarning(entry.path, "read", exc.strerror or str(exc),
                                "content not checked"), entry, old)
        _close(fd)
        return _new(FileRecord, (
            entry.path, "file", digest, size, mode & 0o7777, st.st_uid, st.st_gid,
            st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns, None, xattrs,
            st.st_dev)), None, entry, old
    if problem is not None and problem.consequence == "vanished during scan":
        return None, problem, entry, old
    if old is not None and st.st_ctime_ns == old.ctime and st.st_ino == old.inode:
        # Any xattr change moves ctime, which user space cannot set back.
        xattrs = old.xattrs
    else:
        xattrs = _xattrs_path(entry.path, want_xattrs)
    if problem is None and old is not None and _S_ISREG(mode):
        # --fast, unchanged stat: keep the baseline digest.
        return FileRecord.from_stat(entry.path, st, old.content, None, xattrs), None, entry, old
    return FileRecord.from_stat(entry.path, st, None, link, xattrs), problem, entry, old


_read, _fstat, _close, _listxattr = os.read, os.fstat, os.close, os.listxattr
_S_ISREG = stat.S_ISREG
_new = tuple.__new__
_blake3 = blake3.blake3


