"""The inotify loop: watch every protected directory and hand changed paths on.

inotify is a hint, not the truth: it is not recursive, its queue overflows, and
renames arrive as two halves. This module keeps the watch map right (new directories
are watched before they are listed, renamed directories move their map entries,
IN_IGNORED drops them), coalesces bursts for one path into one hint, and calls back
with paths to re-check; the scan decides whether anything really changed. It never
imports the scan. On IN_Q_OVERFLOW or a watch it could not add, it says so through
its callbacks instead of going quietly blind.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from inotify_simple import INotify, flags

from integrity.errors import ScanWarning
from integrity.paths import display, is_within
from integrity.policy import Policy
from integrity.realtime.mounts import (blind_mounts_below, blind_reason, filesystem_type,
                                       read_mounts)
from integrity.realtime.procfs import read_int
from integrity.scan.walker import Passage, WalkEntry, mount_points, walk

log = logging.getLogger(__name__)

_inotify_add_watch = ctypes.CDLL(None, use_errno=True).inotify_add_watch


def add_watch(inotify_fd: int, path: bytes, mask: int) -> int:
    """inotify_add_watch(2) called directly, for every watch the watcher adds:
    inotify_simple's wrapper makes four Python calls per watch (fileno, fsencode, its
    retry helper, the method), 4.5% of the Python work of watching a directory at
    set-up. Raises OSError."""
    while True:
        wd: int = _inotify_add_watch(inotify_fd, path, mask)
        if wd != -1:
            return wd
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code), path)

WATCH_MASK = (flags.CLOSE_WRITE | flags.ATTRIB | flags.MOVED_TO | flags.MOVED_FROM
              | flags.CREATE | flags.DELETE | flags.DELETE_SELF | flags.MOVE_SELF
              | flags.DONT_FOLLOW | flags.ONLYDIR | flags.EXCL_UNLINK)
_MASK = int(WATCH_MASK)
_SHAPE = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"


class InotifyEvent(Protocol):
    """One event as inotify_simple reads it (its `Event` named tuple)."""

    @property
    def wd(self) -> int: ...
    @property
    def mask(self) -> int: ...
    @property
    def cookie(self) -> int: ...
    @property
    def name(self) -> str: ...


@dataclass
class Hints:
    """What to re-check: single entries, and whole subtrees (renamed or new dirs)."""

    paths: set[bytes] = field(default_factory=set)
    subtrees: set[bytes] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.paths or self.subtrees)


@dataclass(frozen=True)
class Unwatched:
    """A subtree inotify does not cover, and why (it goes on scheduled scanning)."""

    root: bytes
    reason: str


class Watcher:
    """inotify watches over a policy's directories, read in a loop of its own.

    `on_hints(Hints)` receives coalesced paths to re-check, `on_overflow()` is called
    after IN_Q_OVERFLOW (everything must be rescanned), `on_unwatched(list)` when
    subtrees could not be watched (watch limit, remote filesystem). Hints are handed
    on once the burst they belong to is `window` seconds old by `clock` (a monotonic
    clock in seconds; tests give one they move by hand).
    """

    def __init__(self, policy: Policy, on_hints: Callable[[Hints], None],
                 on_overflow: Callable[[], None],
                 on_unwatched: Callable[[list[Unwatched]], None],
                 window: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.on_hints = on_hints
        self.on_overflow = on_overflow
        self.on_unwatched = on_unwatched
        self.window = window
        self.clock = clock
        self.inotify = INotify()
        self.wd_path: dict[int, bytes] = {}
        self.path_wd: dict[bytes, int] = {}
        self.unwatched: list[Unwatched] = []
        self._pending = Hints()
        self._first_pending = 0.0
        self._moved_from: dict[int, bytes] = {}
        self._lock = threading.Lock()
        #: Watches on the parents of rule roots that are not themselves watched.
        self.anchors: dict[int, bytes] = {}
        self._skip: list[bytes] = []
        # A mount makes no inotify event: the mount table is polled instead (its
        # POLLPRI says it changed), and what was mounted or unmounted is re-checked.
        self._mountinfo = open("/proc/self/mountinfo", "rb")  # closed in close()
        self._mount_poll = select.poll()
        self._mount_poll.register(self._mountinfo, select.POLLPRI | select.POLLERR)
        self._mount_table = mount_points()

    # -- set-up -----------------------------------------------------------------

    def start(self) -> int:
        """Watch every directory of every rule; return the number of watches.

        Trees on filesystems inotify cannot see (NFS, CIFS, FUSE...) are not watched
        but reported through on_unwatched, so they go on scheduled scanning. A rule
        root whose parent is not watched gets an anchor watch on that parent, so
        the root being created, replaced or (for a file rule) written is seen too.
        """
        remote: list[Unwatched] = []
        mounts = read_mounts()
        for rule in self.policy.rules:
            blind = [(rule.base, filesystem_type(rule.base, mounts))]
            if not rule.one_filesystem:
                blind += blind_mounts_below(rule.base, mounts)
            for path, fstype in blind:
                reason = blind_reason(fstype)
                if reason and not any(u.root == path for u in remote):
                    remote.append(Unwatched(path, f"{fstype}: {reason}"))
        self._skip = [u.root for u in remote]
        self._watch_tree(None)
        self._anchor_roots()
        if remote:
            self._report(remote)
        return len(self.wd_path)

    def _anchor_roots(self) -> None:
        """Anchor the parent of every walk base (a rule path, or a wildcard rule's
        literal base), or the nearest ancestor that exists: a rule whose path is
        missing is watched for its creation, and the directories on the way."""
        for base in self.policy.bases:
            if base == b"/" or any(is_within(base, s) for s in self._skip):
                continue
            parent = base.rsplit(b"/", 1)[0] or b"/"
            while parent not in self.path_wd and parent not in self.anchors.values():
                try:
                    wd = add_watch(self.inotify.fileno(), parent, _MASK)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and parent != b"/":
                        parent = parent.rsplit(b"/", 1)[0] or b"/"
                        continue
                    break  # the scheduled scans cover it
                with self._lock:
                    self.anchors[wd] = parent
                break

    def _report(self, items: list[Unwatched]) -> None:
        fresh = [u for u in items if all(u.root != old.root for old in self.unwatched)]
        if fresh:
            self.unwatched += fresh
            self.on_unwatched(fresh)

    def _watch_tree(self, roots: Iterable[bytes] | None) -> list[bytes]:
        """Add watches for directories below roots (or all rules); return the new ones.

        A directory is watched when the walk yields it, before the walk lists it, so
        nothing created in it afterwards can slip past. Once the kernel's watch limit
        is reached, the rest is reported as the few subtrees (those whose parent is
        watched) that go on scheduled scanning.
        """
        added: list[bytes] = []
        exhausted: list[bytes] = []
        failed: list[Unwatched] = []
        skip = self._skip
        inotify_fd = self.inotify.fileno()
        for entry in walk(self.policy, roots, dirs_only=True):
            # Passages too: waypoints (a new user's home under /home/*/.ssh) and
            # excluded directories searched for a rule's include globs.
            if isinstance(entry, ScanWarning) or not isinstance(entry, (WalkEntry, Passage)):
                continue
            path = entry.path
            if path in self.path_wd or (skip and any(is_within(path, s) for s in skip)):
                continue
            if exhausted:
                parent = path.rsplit(b"/", 1)[0] or b"/"
                if parent in self.path_wd or self.policy.rule_at(path) is not None \
                        or self.policy.is_waypoint(path):
                    exhausted.append(path)
                continue
            try:
                wd = add_watch(inotify_fd, path, _MASK)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    exhausted.append(path)
                elif exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    failed.append(Unwatched(path, f"inotify_add_watch failed: "
                                                  f"{exc.strerror}"))
                    skip.append(path)
                continue
            with self._lock:
                self.wd_path[wd] = path
                self.path_wd[path] = wd
            added.append(path)
        if exhausted:
            reason = self._limit_reason()
            failed += [Unwatched(path, reason) for path in exhausted]
        if failed:
            self._report(failed)
        return added

    def resync(self) -> int:
        """After an overflow: forget watches of directories that are gone (their
        IN_IGNORED may have been lost) and watch those the map lacks."""
        with self._lock:
            known = list(self.path_wd.items())
        for path, wd in known:
            try:
                gone = not stat.S_ISDIR(os.lstat(path).st_mode)
            except OSError:
                gone = True
            if gone:
                try:
                    self.inotify.rm_watch(wd)
                except OSError:
                    pass
                self._forget(wd)
        added = len(self._watch_tree(None))
        self._anchor_roots()
        return added

    def _limit_reason(self) -> str:
        needed = sum(1 for e in walk(self.policy, dirs_only=True)
                     if isinstance(e, (WalkEntry, Passage)))
        limit = read_int(MAX_USER_WATCHES)
        if limit is None:
            limit = -1
        return (f"inotify watch limit reached (fs.inotify.max_user_watches={limit}, "
                f"this policy needs {needed} plus what other programs hold): raise it "
                f"with 'sysctl -w fs.inotify.max_user_watches={max(needed * 2, 65536)}'; "
                "see 'integrity doctor'")

    # -- the loop ---------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Read and handle events until `stop` is set."""
        while not stop.is_set():
            timeout = 50 if self._pending else 200
            try:
                events = self.inotify.read(timeout=timeout)
            except OSError as exc:  # pragma: no cover - the fd broke: say so, rescan
                log.error("reading inotify failed: %s; rescanning", exc.strerror)
                self.on_overflow()
                time.sleep(1)
                continue
            if events:
                self.handle(events)
            if self._mount_poll.poll(0):
                self._mounts_changed(self.clock())
            self._flush()
        self._flush(force=True)

    def _mounts_changed(self, now: float) -> None:
        """Re-check every covered path something was mounted on or unmounted from (a
        file mounted over is reported by the walk: see walker.mount_points)."""
        table = mount_points()
        old, self._mount_table = self._mount_table, table
        for parent in set(old) | set(table):
            for name in old.get(parent, frozenset()) ^ table.get(parent, frozenset()):
                path = (parent if parent != b"/" else b"") + b"/" + name
                if self.policy.covers(path):
                    log.info("the mount table changed at %s: re-checking it", display(path))
                    self._hint(path, now)

    def handle(self, events: Iterable[InotifyEvent]) -> None:
        """Turn raw events into hints and watch-map updates."""
        overflow = reanchor = False
        now = self.clock()
        for event in events:
            wd, mask, cookie, name = event.wd, event.mask, event.cookie, event.name
            if mask & flags.Q_OVERFLOW:
                overflow = True
                continue
            with self._lock:
                base = self.wd_path.get(wd)
                anchor = self.anchors.get(wd) if base is None else None
            if base is None and anchor is None:
                continue
            if mask & flags.IGNORED:
                if anchor is not None:
                    with self._lock:
                        self.anchors.pop(wd, None)
                    reanchor = True  # watch for it on the nearest ancestor left
                else:
                    self._forget(wd)
                continue
            if anchor is not None:
                # Only rule roots and the directories on the way to them matter
                # below an anchor; the anchor is not ours.
                path = anchor + b"/" + os.fsencode(name) if name else anchor
                if not name or (self.policy.rule_at(path) is None and not (
                        mask & flags.ISDIR and self.policy.is_waypoint(path))):
                    continue
                reanchor = True
            else:
                assert base is not None
                path = base + b"/" + os.fsencode(name) if name else base
                if not name:
                    if mask & flags.ATTRIB:
                        self._hint(path, now)
                    continue  # DELETE_SELF / MOVE_SELF: the parent's event tells us
                if mask & _SHAPE:
                    self._hint(base, now)  # the directory's own mtime, ctime, nlink
            if mask & flags.ISDIR:
                self._directory_event(path, mask, cookie, now)
            elif self.policy.covers(path):
                self._hint(path, now)
        if self._moved_from:
            # A directory moved out of our trees: its watches now point elsewhere.
            for old in self._moved_from.values():
                self._drop_subtree(old)
            self._moved_from.clear()
        if reanchor:
            self._anchor_roots()
        if overflow:
            log.warning("inotify queue overflowed: events were lost; rescanning")
            self.resync()
            self.on_overflow()

    def _directory_event(self, path: bytes, mask: int, cookie: int, now: float) -> None:
        if mask & flags.MOVED_FROM:
            self._moved_from[cookie] = path
            self._hint_subtree(path, now)
        elif mask & flags.MOVED_TO:
            old = self._moved_from.pop(cookie, None)
            covered = self.policy.visits(path)
            if old is not None:
                if covered:
                    self._rename_subtree(old, path)
                else:
                    self._drop_subtree(old)  # renamed to an excluded name
            if covered:
                self._watch_tree([path])
            self._hint_subtree(path, now)
        elif mask & flags.CREATE:
            if self.policy.visits(path):
                self._watch_tree([path])
                self._hint_subtree(path, now)
        elif mask & flags.DELETE:
            self._hint_subtree(path, now)
        elif mask & flags.ATTRIB and self.policy.covers(path):
            self._hint(path, now)

    def _rename_subtree(self, old: bytes, new: bytes) -> None:
        with self._lock:
            for path, wd in list(self.path_wd.items()):
                if is_within(path, old):
                    moved = new + path[len(old):]
                    del self.path_wd[path]
                    self.path_wd[moved] = wd
                    self.wd_path[wd] = moved

    def _drop_subtree(self, old: bytes) -> None:
        with self._lock:
            doomed = [(p, wd) for p, wd in self.path_wd.items() if is_within(p, old)]
        for path, wd in doomed:
            try:
                self.inotify.rm_watch(wd)
            except OSError:
                pass
            self._forget(wd)

    def _forget(self, wd: int) -> None:
        with self._lock:
            path = self.wd_path.pop(wd, None)
            if path is not None and self.path_wd.get(path) == wd:
                del self.path_wd[path]

    def _hint(self, path: bytes, now: float) -> None:
        if not self._pending:
            self._first_pending = now
        self._pending.paths.add(path)

    def _hint_subtree(self, path: bytes, now: float) -> None:
        if not self._pending:
            self._first_pending = now
        self._pending.subtrees.add(path)

    def _flush(self, force: bool = False) -> None:
        """Hand on the hints once the burst they belong to is `window` old."""
        if not self._pending:
            return
        if not force and self.clock() - self._first_pending < self.window:
            return
        hints, self._pending = self._pending, Hints()
        for root in hints.subtrees:
            hints.paths = {p for p in hints.paths if not is_within(p, root)}
        log.debug("re-checking %d paths and %d subtrees: %s", len(hints.paths),
                  len(hints.subtrees),
                  ", ".join(display(p) for p in sorted(hints.paths | hints.subtrees)[:5]))
        self.on_hints(hints)

    def watching(self, path: bytes) -> bool:
        """True when the directory at path has a watch."""
        with self._lock:
            return path in self.path_wd

    def close(self) -> None:
        """Release the inotify instance and every watch (after `run` has returned)."""
        self.inotify.close()
        self._mountinfo.close()

