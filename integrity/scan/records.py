"""Turn walk entries into records: open, hash, read links and xattrs, in order.

The hot path of every scan. Per-file Python overhead, not BLAKE3, limits a baseline,
so the loop does the minimum per entry: one open/read/fstat/close for regular files
(the walker did the lstat) and an flistxattr where the rule checks xattrs; only a
file changed in the last seconds is read twice (see hasher.py). On a cold
cache, files are opened a few entries ahead of hashing with POSIX_FADV_WILLNEED so
the kernel reads upcoming files while we hash the current one: overlapped I/O
without threads, whose GIL hand-offs made warm runs slower than one thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import blake3

from integrity.errors import ScanWarning, Vanished
from integrity.scan.hasher import (NO_XATTRS, SMALL_FILE, FileChanged, blake3_fd, open_at,
                     read_recent, recent_since, xattr_digest, xattr_digest_at)
from integrity.record import FileRecord
from integrity.record import new_tuple as _new
from integrity.policy import Policy, Rule
from integrity.scan.priority import ReadLimit, current_limit
from integrity.scan.walker import NOT_IN_TREE, WalkEntry, open_parent, walk

log = logging.getLogger(__name__)

#: How many files are opened (and read-ahead hinted) before the one being hashed.
READAHEAD = 16
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
_RETRIES = 2
#: While read-ahead is off, every this many files one hash is timed; one that takes
#: longer than _COLD_SECONDS waited for the disk, or was preempted: read-ahead starts
#: after _COLD_SAMPLES such samples in a row (one preemption on a busy host turned it
#: on for the rest of a warm scan, at ~1 µs a file).
_SAMPLE_EVERY = 32
_COLD_SECONDS = 0.0005
_COLD_SAMPLES = 2
_SAMPLE_SIZE = 64 << 10


@dataclass
class Progress:
    """Counters a progress display polls; `tick` is called every `every` entries."""

    tick: Callable[[Progress], None] | None = None
    every: int = 1024
    files: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, size: int) -> None:
        """Count one entry of `size` bytes; tick every `every` entries."""
        self.files += 1
        self.bytes += size
        if self.tick is not None and self.files % self.every == 0:
            self.tick(self)


def _rehash_by_path(entry: WalkEntry, want_xattrs: bool, recent: int
                    ) -> tuple[FileRecord | None, ScanWarning | None]:
    """Second and later attempts for a file that changed while it was read.

    The walk's directory fd may be closed (or its number reused) by now, so the
    file's directory is opened again from the rule's root without following links
    (walker.open_parent): a directory swapped for a symlink meanwhile cannot lead
    the re-read out of the tree, and a path beyond PATH_MAX is no obstacle. Whatever
    has become of the file is a warning about it, never an exception.
    """
    path = entry.path
    try:
        dir_fd, name = open_parent(path, entry.rule.path)
    except OSError as exc:
        return None, _lost(path, "open directory", exc)
    try:
        st: os.stat_result | None = None
        xattrs: bytes | None = None
        for _ in range(_RETRIES):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    link = (os.fsencode(os.readlink(name, dir_fd=dir_fd))
                            if stat.S_ISLNK(st.st_mode) else None)
                    return FileRecord.from_stat(path, st, None, link, _xattrs_at(
                        dir_fd, name, path, want_xattrs)), None
                fd = open_at(name, dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    st = None  # a symlink now, since the stat: look again
                    continue
                return None, _lost(path, "open", exc)
            try:
                digest = blake3_fd(fd, st, recent)
                xattrs = xattr_digest(fd) if want_xattrs else None
                return FileRecord.from_stat(path, st, digest, None, xattrs), None
            except FileChanged:
                xattrs = _xattrs_fd(fd, want_xattrs)
                continue
            except OSError as exc:
                return None, ScanWarning(path, "read", exc.strerror or str(exc))
            finally:
                os.close(fd)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None, ScanWarning(path, "open", "kept changing type")
        return (FileRecord.from_stat(path, st, None, None, xattrs),
                ScanWarning(path, "hash", "file kept changing while being read",
                            "content not recorded"))
    finally:
        os.close(dir_fd)


def _lost(path: bytes, operation: str, exc: OSError) -> ScanWarning:
    """The warning for a path that could not be reached again."""
    if exc.errno in NOT_IN_TREE:
        # Gone, or a directory on the way is no longer one (swapped for a symlink):
        # either way the path is no longer in the tree.
        return Vanished(path, operation, exc.strerror or str(exc))
    return ScanWarning(path, operation, exc.strerror or str(exc))


def _xattrs_at(dir_fd: int, name: str, path: bytes, wanted: bool) -> bytes | None:
    if not wanted:
        return None
    try:
        return xattr_digest_at(dir_fd, name, path)
    except OSError:
        return None


def _xattrs_fd(fd: int, wanted: bool) -> bytes | None:
    if not wanted:
        return None
    try:
        return xattr_digest(fd)
    except OSError:
        return None


#: A live walk entry and the baseline record of the same path (either may be None).
Pair = tuple[WalkEntry | None, FileRecord | None]


class Materialized(NamedTuple):
    """What became of a Pair: the live record (None when the entry could not be read
    or is gone), the problem met on the way, and the pair it came from."""

    record: FileRecord | None
    problem: ScanWarning | None
    entry: WalkEntry | None
    old: FileRecord | None


class Hashed(NamedTuple):
    """A live entry as a full scan saw it: its record or the problem that stopped it."""

    path: bytes
    record: FileRecord | None
    problem: ScanWarning | None
    rule: Rule


def hash_tree(policy: Policy, roots: list[bytes] | None, *, descend: bool = True,
              share: tuple[int, int] | None = None) -> Iterator[Hashed | ScanWarning]:
    """Walk and hash everything the rules hash, in walk order (see walker.walk for
    `descend` and `share`): the stream a baseline is built from."""
    for out in hash_walk(policy, roots, descend=descend, share=share):
        if isinstance(out, ScanWarning):
            yield out
        else:
            entry = out.entry
            assert entry is not None
            yield Hashed(entry.path, out.record, out.problem, entry.rule)


def hash_walk(policy: Policy, roots: list[bytes] | None, *, descend: bool = True,
              share: tuple[int, int] | None = None) -> Iterator[Materialized | ScanWarning]:
    """hash_tree's stream as materialize gives it (every entry set), for a worker
    that forwards it without building a Hashed per file."""
    entries = walk(policy, roots, descend=descend, share=share)
    return materialize(entries, None, None, READAHEAD, bare=True)


class _Opened(NamedTuple):
    """An entry waiting in the read-ahead window: its file is open (fd) or not (-1)."""

    entry: WalkEntry | None
    old: FileRecord | None
    fd: int
    link: bytes | None
    xattrs: bytes | None
    problem: ScanWarning | None


def materialize(items: Iterable[Pair | WalkEntry | ScanWarning],
                want_hash: Callable[[WalkEntry, FileRecord | None], bool] | None,
                progress: Progress | None = None, readahead: int = READAHEAD,
                bare: bool = False) -> Iterator[Materialized | ScanWarning]:
    """Turn walk entries into FileRecords, hashing where `want_hash` says so (None:
    every file whose rule hashes).

    Each input is (live entry or None, baseline record or None), passed through
    alongside the result, or with `bare` a walk entry alone (no baseline record);
    warnings pass through unchanged. Order is preserved.
    """
    # Warnings wait in the window too, so they leave in the order they came.
    window: deque[_Opened | ScanWarning] = deque()
    recent = recent_since()
    # [scan] max_read_rate of this thread (read_recent charges its own reads).
    limit = current_limit()
    # Read-ahead costs ~5 µs a file on a warm cache and halves a cold run, so it
    # starts off and is switched on when a sampled file takes disk-like time.
    depth = 0 if _WILLNEED is not None else -1
    held = 0  # entries the window holds back: the read-ahead depth
    sample = slow = 0
    tick = progress.tick if progress else None
    every = progress.every if progress else 0
    n = 0
    for item in items:
        if isinstance(item, ScanWarning):
            if window:
                # Keep order: hold warnings until the entries before them are out.
                window.append(item)
            else:
                yield item
            continue
        entry: WalkEntry | None
        old: FileRecord | None
        if bare:
            entry, old = item, None  # type: ignore[assignment]
        else:
            entry, old = item  # type: ignore[misc]
        fd: int = -1
        link: bytes | None = None
        xattrs: bytes | None = None
        problem: ScanWarning | None = None
        if entry is not None:
            mode = entry.st.st_mode
            if _S_ISREG(mode) and (entry.rule.hashes if want_hash is None
                                   else want_hash(entry, old)):
                try:
                    fd = open_at(entry.name, entry.dir_fd)
                except FileNotFoundError:
                    problem = Vanished(entry.path, "open", "No such file or directory")
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
            if fd < 0 and entry.rule.wants_xattrs and (
                    not isinstance(problem, Vanished)):
                # Now, while entry.dir_fd is still the walk's: _finish may run after
                # the walk has moved on (read-ahead) and closed it.
                st = entry.st
                if old is not None and st.st_ctime_ns == old.ctime \
                        and st.st_ino == old.inode:
                    # Any xattr change moves ctime, which user space cannot set back.
                    xattrs = old.xattrs
                else:
                    xattrs = _xattrs_at(entry.dir_fd, entry.name, entry.path, True)
        if held:
            window.append(_new(_Opened, (entry, old, fd, link, xattrs, problem)))
            while len(window) > held:
                yield _finish_held(window.popleft(), recent, limit)
        elif depth == 0 and fd >= 0 and (
                entry.st.st_size <= _SAMPLE_SIZE  # type: ignore[union-attr]
                and (sample := sample + 1) % _SAMPLE_EVERY == 0):
            started = time.perf_counter()
            out = _finish(entry, old, fd, link, xattrs, problem, recent, limit)
            slow = slow + 1 if time.perf_counter() - started > _COLD_SECONDS else 0
            if slow >= _COLD_SAMPLES:
                depth = held = readahead
                log.debug("cold cache: reading ahead %d files", depth)
            yield out
        else:  # nothing held back: the window is empty
            yield _finish(entry, old, fd, link, xattrs, problem, recent, limit)
        if tick is not None:
            n += 1
            if entry is not None:
                progress.files += 1  # type: ignore[union-attr]
                progress.bytes += entry.st.st_size  # type: ignore[union-attr]
            if n % every == 0:
                tick(progress)  # type: ignore[arg-type]
    while window:
        yield _finish_held(window.popleft(), recent, limit)


def _finish_held(item: _Opened | ScanWarning, recent: int, limit: ReadLimit | None
                 ) -> Materialized | ScanWarning:
    """_finish of what waited in the read-ahead window (warnings pass through)."""
    if isinstance(item, ScanWarning):
        return item
    return _finish(*item, recent, limit)


def _finish(entry: WalkEntry | None, old: FileRecord | None, fd: int, link: bytes | None,
            xattrs: bytes | None, problem: ScanWarning | None, recent: int,
            limit: ReadLimit | None = None) -> Materialized:
    """Hash an opened file (or record a non-file) and build its FileRecord.

    A file whose ctime is at or after `recent` may be mid-write and is read twice
    (see hasher's docstring). The small-file case is spelled out inline: it runs
    once per file of a scan. Its arguments are an _Opened's fields, passed one by
    one: the window is empty on a warm scan, and no tuple is built for it.
    """
    if entry is None:
        return _new(Materialized, (None, None, None, old))
    want_xattrs = entry.rule.wants_xattrs
    st = entry.st
    mode = st.st_mode
    if fd >= 0:
        try:
            size = st.st_size
            if size <= SMALL_FILE:
                if st.st_ctime_ns < recent:
                    data = _read(fd, size + 1)
                    if limit is not None:  # [scan] max_read_rate
                        limit.charge(len(data))
                else:  # recently changed, may be mid-write: settled and read twice
                    data = read_recent(fd, size)
                after = _fstat(fd)
                if (len(data) != size or after.st_ino != st.st_ino
                        or after.st_size != size or after.st_mtime_ns != st.st_mtime_ns
                        or after.st_ctime_ns != st.st_ctime_ns
                        or after.st_dev != st.st_dev or not _S_ISREG(after.st_mode)):
                    raise FileChanged
                digest = _blake3(data).digest()
            else:
                digest = blake3_fd(fd, st, recent)
            xattrs = None
            if want_xattrs:
                # Listed once, here: most files have none, and xattr_digest is not
                # called for them.
                try:
                    names = _listxattr(fd)
                except OSError as exc:
                    if exc.errno not in NO_XATTRS:
                        raise
                    names = None
                if names:
                    xattrs = xattr_digest(fd, names=names)
        except FileChanged:
            _close(fd)
            rec, problem = _rehash_by_path(entry, want_xattrs, recent)
            return _new(Materialized, (rec, problem, entry, old))
        except OSError as exc:
            _close(fd)
            return _new(Materialized, (
                FileRecord.from_stat(entry.path, st, None, None, None),
                ScanWarning(entry.path, "read", exc.strerror or str(exc),
                            "content not checked"), entry, old))
        _close(fd)
        return _new(Materialized, (_new(FileRecord, (
            entry.path, "file", digest, size, mode & 0o7777, st.st_uid, st.st_gid,
            st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns, None, xattrs,
            st.st_dev)), None, entry, old))
    if isinstance(problem, Vanished):
        return _new(Materialized, (None, problem, entry, old))
    if problem is None and old is not None and _S_ISREG(mode):
        # --fast, unchanged stat: keep the baseline digest. FileRecord.from_stat
        # spelled out, as for a hashed file above: its call per file of a --fast
        # verify cost 1.8k instructions, 4% of the main process's work per entry.
        return _new(Materialized, (_new(FileRecord, (
            entry.path, "file", old.content, st.st_size, mode & 0o7777, st.st_uid,
            st.st_gid, st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns, None,
            xattrs, st.st_dev)), None, entry, old))
    return _new(Materialized, (
        FileRecord.from_stat(entry.path, st, None, link, xattrs), problem, entry, old))


_read, _fstat, _close, _listxattr = os.read, os.fstat, os.close, os.listxattr
_S_ISREG = stat.S_ISREG
_blake3 = blake3.blake3


