"""One scan: walker -> hasher -> compare -> store, full or limited to some paths.

The hot path. Per-file Python overhead, not BLAKE3, limits a baseline, so the loop
does the minimum per entry: one lstat (walker), one open/read/fstat/close for regular
files, an flistxattr where the rule checks xattrs. Files are opened a few entries
ahead of hashing and given a POSIX_FADV_WILLNEED hint, so on a cold cache the kernel
reads upcoming files while we hash the current one: overlapped I/O without threads,
whose GIL hand-offs made warm runs slower than a single thread.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import blake3

from .compare import ADDED, MODIFIED, REMOVED, Change, compare
from .errors import BaselineError, ScanWarning, UsageError
from .hasher import SMALL_FILE, FileChanged, blake3_fd, open_at, xattr_digest
from .paths import display, key_range, to_key
from .policy import Policy, Rule
from .record import Attr, FileRecord
from .store import BaselineInfo, Store
from .walker import SkippedTree, WalkEntry, walk, walk_roots

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


@dataclass
class ScanResult:
    """What a scan found: changes, per-file warnings and counts."""

    scanned: int = 0
    changes: list[Change] = field(default_factory=list)
    warnings: list[ScanWarning] = field(default_factory=list)
    rules: dict[bytes, Rule] = field(default_factory=dict)
    baseline: BaselineInfo | None = None
    run_id: int | None = None

    def count(self, kind: str) -> int:
        return sum(1 for c in self.changes if c.kind == kind)


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
        fd, link, problem = -1, None, None
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
                    link = os.readlink(entry.name, dir_fd=entry.dir_fd)  # type: ignore[assignment]
                    link = os.fsencode(link)  # type: ignore[arg-type]
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
    if problem is None and old is not None and _S_ISREG(mode):
        # --fast, unchanged stat: keep the baseline digest.
        rec = FileRecord.from_stat(entry.path, st, old.content, None,
                                   _xattrs_path(entry.path, want_xattrs))
        return rec, None, entry, old
    rec = FileRecord.from_stat(entry.path, st, None, link,
                               _xattrs_path(entry.path, want_xattrs))
    return rec, problem, entry, old


_read, _fstat, _close, _listxattr = os.read, os.fstat, os.close, os.listxattr
_S_ISREG = stat.S_ISREG
_new = tuple.__new__
_blake3 = blake3.blake3


# -- init ----------------------------------------------------------------------

@dataclass
class InitResult:
    """A freshly written baseline and the warnings met on the way."""

    baseline: BaselineInfo
    warnings: list[ScanWarning]


def build_baseline(store: Store, policy: Policy, *, force: bool = False,
                   actor: str | None = None, progress: Progress | None = None,
                   readahead: int = READAHEAD) -> InitResult:
    """Walk and hash every rule's tree and make it the baseline, atomically."""
    warnings: list[ScanWarning] = []

    def records() -> Iterator[FileRecord]:
        stream = materialize(((e, None) if isinstance(e, WalkEntry) else e
                              for e in walk(policy)),
                             lambda entry, _old: entry.rule.hashes, progress, readahead)
        for out in stream:
            if isinstance(out, ScanWarning):
                warnings.append(out)
                continue
            rec, problem = out[0], out[1]
            if problem is not None:
                warnings.append(problem)
            if rec is not None:
                yield rec

    info = store.write_baseline(records(), policy_source=policy.source,
                                policy_digest=policy.digest, actor=actor, force=force)
    return InitResult(info, warnings)


# -- verify --------------------------------------------------------------------

def normalize_paths(policy: Policy, paths: Sequence[str | bytes]) -> list[bytes]:
    """Absolute, normalized byte paths, each covered by a rule (UsageError if not)."""
    result = []
    for raw in paths:
        path = os.fsencode(raw)
        path = os.path.normpath(os.path.abspath(path))
        if policy.rule_for(path) is None:
            raise UsageError(f"{display(path)}: not covered by any rule of {policy.source}")
        result.append(path)
    return result


def _fast_reason(st: os.stat_result, old: FileRecord) -> str | None:
    """Why --fast must rehash a file (borg's file_known_and_unchanged), or None."""
    if old.content is None:
        return "no digest in the baseline"
    if st.st_size != old.size:
        return "file size has changed"
    if st.st_mtime_ns != old.mtime:
        return "file mtime has changed"
    if st.st_ctime_ns != old.ctime:
        return "file ctime has changed"
    if st.st_ino != old.inode:
        return "file inode has changed"
    return None


def verify(store: Store, policy: Policy, paths: Sequence[str | bytes] = (), *,
           fast: bool = False, progress: Progress | None = None,
           readahead: int = READAHEAD) -> ScanResult:
    """Compare the live trees (or just `paths`) with the baseline; record the run."""
    baseline = store.active_baseline()
    if baseline is None:
        raise BaselineError(f"{store._name()}: no baseline yet: run 'integrity init'")
    wanted = normalize_paths(policy, paths)
    roots = walk_roots(policy, wanted or None)
    result = ScanResult(baseline=baseline)
    result.run_id = store.start_run("verify", baseline.id, wanted, fast)
    verbose = log.isEnabledFor(logging.DEBUG)

    def want_hash(entry: WalkEntry, old: FileRecord | None) -> bool:
        if not entry.rule.hashes:
            return False
        if not fast or old is None or old.type != "file":
            return True
        reason = _fast_reason(entry.st, old)
        if reason and verbose:
            log.debug("rehashing %s: %s", display(entry.path), reason)
        return reason is not None

    pairs = _merge(walk(policy, roots), store.iter_entries(baseline.id,
                   [key_range(r) for r in roots]), policy, result)
    for out in materialize(pairs, want_hash, progress, readahead):
        if isinstance(out, ScanWarning):
            result.warnings.append(out)
            continue
        new, problem, entry, old = out
        if problem is not None:
            result.warnings.append(problem)
        if entry is not None:
            result.scanned += 1
        rule = entry.rule if entry is not None else policy.rule_for(old.path)  # type: ignore[union-attr]
        if rule is None:
            continue
        attrs = rule.check
        if problem is not None and new is not None and new.content is None:
            attrs &= ~Attr.CONTENT
        change = compare(old, new, attrs)
        if change is not None:
            result.changes.append(change)
            result.rules[change.path] = rule
    store.finish_run(result.run_id, scanned=result.scanned, added=result.count(ADDED),
                     removed=result.count(REMOVED), modified=result.count(MODIFIED),
                     errors=len(result.warnings), exit_code=exit_code(result))
    return result


def exit_code(result: ScanResult) -> int:
    """SPEC: 0 no changes, 1 changes or unreadable entries."""
    return 1 if result.changes or result.warnings else 0


def _merge(live: Iterator[WalkEntry | ScanWarning],
           base: Iterator[tuple[bytes, FileRecord]],
           policy: Policy, result: ScanResult) -> Iterator[Item | ScanWarning]:
    """Pair live entries with baseline records by key: one streaming pass."""
    old_key: bytes | None
    old_key, old = next(base, (None, None))  # type: ignore[assignment]

    def advance() -> None:
        nonlocal old, old_key
        old_key, old = next(base, (None, None))  # type: ignore[assignment]

    for item in live:
        key = to_key(item.path)
        while old_key is not None and old_key < key:
            if policy.covers(old.path):  # type: ignore[union-attr]
                yield None, old
            advance()
        if isinstance(item, ScanWarning):
            if isinstance(item, SkippedTree):
                # Nothing below it could be seen: it is unknown, not removed.
                low, high = key + b"\x00", key + b"\x01"
                while old_key is not None and old_key < high:
                    if old_key < low and old_key != key:
                        break
                    advance()
            elif old_key == key:
                advance()  # unreadable now: an error, not a removal
            yield item
            continue
        if old_key == key:
            yield item, old
            advance()
        else:
            yield item, None
    while old is not None:
        if policy.covers(old.path):
            yield None, old
        advance()
