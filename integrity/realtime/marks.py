"""fanotify marks over the protected trees, and the (path, pid) of each of their events.

Used by the helper process (helper.py), which runs with `python -S`: only the standard
library and our own stdlib-only modules are imported.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator

from integrity.paths import display, is_within
from integrity.realtime.fanotify import (
    FAN_ATTRIB, FAN_CLASS_NOTIF, FAN_CLOEXEC, FAN_CLOSE_WRITE, FAN_CREATE, FAN_DELETE,
    FAN_EVENT_ON_CHILD, FAN_MARK_ADD, FAN_MARK_FILESYSTEM, FAN_MARK_MOUNT,
    FAN_MARK_ONLYDIR, FAN_MARK_REMOVE, FAN_MODIFY, FAN_MOVED_FROM, FAN_MOVED_TO,
    FAN_NONBLOCK, FAN_ONDIR, FAN_Q_OVERFLOW, FAN_REPORT_DFID_NAME, events, handle_key,
    init, init_problem, mark)
from integrity.realtime.mounts import pseudo_devices, read_mounts
from integrity.realtime.procfs import read_int

#: What an inode mark on a protected directory asks for (FID mode only). Not
#: FAN_MODIFY unless asked: it fires on every write() call (200,000 appends of 512 bytes
#: ran 75-105% slower with it, 7-10% without), and the watcher raises realtime events
#: on IN_CLOSE_WRITE, when FAN_CLOSE_WRITE names the closer anyway.
DIR_MASK = (FAN_CLOSE_WRITE | FAN_ATTRIB | FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM
            | FAN_MOVED_TO | FAN_EVENT_ON_CHILD | FAN_ONDIR)
#: Classic mode (an fd per event) can only report writes.
CLASSIC_MASK = FAN_CLOSE_WRITE
_GROWN = FAN_CREATE | FAN_MOVED_TO
#: FID events are ~60 bytes; classic ones carry an open fd each, so read fewer at once.
FID_READ = 65536
CLASSIC_READ = 4096

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_EVENT_F_FLAGS = (os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
                  | getattr(os, "O_LARGEFILE", 0))
#: fanotify_mark() errors that mean "this filesystem cannot give file ids".
_NO_FID_ERRORS = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL,
                            errno.ENOSYS, errno.ESTALE})

NO_FID = "does not support fanotify file ids"
CLASSIC_CONSEQUENCE = ("only writes are attributed there (classic mode): attribute "
                       "changes, creations, removals and renames have no actor")


def _join(base: bytes, name: bytes) -> bytes:
    return base + name if base == b"/" else base + b"/" + name


def _mark_error(path: bytes, exc: OSError) -> str:
    """The per-subtree sentence for a mark the kernel refused."""
    if exc.errno == errno.ENOSPC:
        marks = read_int("/proc/sys/fs/fanotify/max_user_marks")
        limit = "?" if marks is None else str(marks)
        return (f"fanotify mark limit reached at '{display(path)}' "
                f"(fs.fanotify.max_user_marks={limit}): raise it with sysctl")
    return f"fanotify_mark failed for '{display(path)}': {exc.strerror}"


def normalise_roots(roots: Iterable[bytes]) -> list[bytes]:
    """Absolute roots without trailing slashes; those inside another root dropped."""
    clean = sorted({r if r == b"/" else os.path.normpath(r) for r in roots
                    if r.startswith(b"/")})
    kept: list[bytes] = []
    for root in clean:
        if not any(is_within(root, k) for k in kept):
            kept.append(root)
    return kept


class Tracker:
    """fanotify marks over the protected trees, and the (path, pid) of their events.

    FID mode (FAN_REPORT_DFID_NAME): an inode mark with FAN_EVENT_ON_CHILD on every
    directory, whose handle (name_to_handle_at) maps events back to its path; new and
    renamed directories are marked, and removed or moved-away ones forgotten, as their
    events arrive. Each root's parent is marked too (`inside` False: only the root's
    own name counts there) so a file root, or a root created later, is seen. Where FID
    mode is refused, classic mode: a filesystem mark, paths from the event's fd. Used from
    one thread: start(), then read() and paths() as the descriptors become readable.
    """

    def __init__(self, roots: Iterable[bytes], fid: bool = True,
                 modify: bool = False) -> None:
        self.roots = normalise_roots(roots)
        self.root_set = frozenset(self.roots)
        self.fid_fd = -1
        self.classic_fd = -1
        self.mode = "none"
        #: handle key -> (path, inside a root)
        self.dirs: dict[bytes, tuple[bytes, bool]] = {}
        self._keys: dict[bytes, bytes] = {}  # path -> handle key, the reverse of dirs
        #: Subtrees with no marks at all, and why (replaced, never changed in place).
        self.dark: dict[bytes, str] = {}
        #: Subtrees watched in classic mode, and what that costs.
        self.classic: dict[bytes, str] = {}
        self.root_reasons: dict[bytes, str] = {}
        self._want_fid = fid
        self._extra = FAN_MODIFY if modify else 0
        self._pseudo: set[int] = set()

    # -- set-up ---------------------------------------------------------------------

    def start(self) -> str | None:
        """Open the group(s) and mark every root; a sentence when nothing can work."""
        self._pseudo = pseudo_devices(read_mounts())
        refused = "FID mode switched off"
        if self._want_fid:
            try:
                self.fid_fd = init(FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_CLOEXEC
                                   | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return init_problem(exc)
                refused = "this kernel cannot report file ids (needs Linux 5.9)"
        for root in self.roots:
            if self.fid_fd >= 0:
                self._watch_fid(root)
            elif not self._watch_classic(root, refused) and self.classic_fd < 0:
                return self.dark[root]  # fanotify_init refused: nothing can work
        for prefix, why in [*self.dark.items(), *self.classic.items()]:
            for root in self.roots:
                if is_within(prefix, root) or is_within(root, prefix):
                    self.root_reasons.setdefault(root, why)
        if not self.dirs and not self.classic:
            return "fanotify unavailable: " + ("; ".join(
                f"{display(r)}: {w}" for r, w in self.root_reasons.items())
                or "no protected trees")
        self.mode = ("fid" if self.classic_fd < 0 else
                     "classic" if self.fid_fd < 0 else "fid+classic")
        return None

    @property
    def fds(self) -> list[int]:
        """The descriptors to poll."""
        return [fd for fd in (self.fid_fd, self.classic_fd) if fd >= 0]

    def _watch_fid(self, root: bytes) -> None:
        try:
            st: os.stat_result | None = os.lstat(root)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self._note_dark(root, f"cannot watch '{display(root)}': {exc.strerror}")
            return
        is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        if is_dir:
            self.mark_tree(root)
        if root == b"/" or self.covering_root(os.path.dirname(root)) is not None:
            return
        parent = os.path.dirname(root)
        try:
            fd = os.open(parent, _DIR_OPEN)
        except OSError as exc:
            if st is None and exc.errno in (errno.ENOENT, errno.ENOTDIR):
                self._note_dark(root, f"'{display(root)}' and its parent do not exist")
            elif not is_dir:
                self._note_dark(root, f"cannot watch '{display(root)}': its parent "
                                      f"cannot be opened ({exc.strerror})")
            return
        try:
            refused = self._mark_fd(parent, fd, False)
        finally:
            os.close(fd)
        if refused is not None and not is_dir:
            self._refused(root, refused)

    def mark_tree(self, top: bytes) -> None:
        """Mark top and every directory below it, each before it is listed.

        Marking first means a directory created after the listing is reported (and
        marked in turn) by the mark on its parent: nothing slips between the two.
        Subdirectories are opened with O_NOFOLLOW and checked against the inode the
        listing gave, so a directory swapped for a symlink cannot lead us out.
        """
        stack: list[tuple[bytes, int | None]] = [(top, None)]
        while stack:
            path, inode = stack.pop()
            try:
                fd = os.open(path, _DIR_OPEN)
            except OSError:
                continue  # gone, or no longer a directory
            try:
                st = os.fstat(fd)
                if (inode is not None and st.st_ino != inode) or st.st_dev in self._pseudo:
                    continue
                refused = self._mark_fd(path, fd, True)
                if refused is not None:
                    self._refused(path, refused)
                    continue
                with os.scandir(fd) as entries:
                    subdirs = [(os.fsencode(e.name), e.inode()) for e in entries
                               if e.is_dir(follow_symlinks=False)]
            except OSError as exc:
                self._note_dark(path, f"cannot list '{display(path)}': {exc.strerror}")
                continue
            finally:
                os.close(fd)
            stack.extend((_join(path, name), ino) for name, ino in subdirs)

    def _mark_fd(self, path: bytes, fd: int, inside: bool) -> OSError | None:
        """Mark the directory open at fd and map its handle to path; the refusal if any."""
        try:
            mark(self.fid_fd, FAN_MARK_ADD | FAN_MARK_ONLYDIR, DIR_MASK | self._extra, fd)
        except OSError as exc:
            return exc
        try:
            key = handle_key(fd)
        except OSError as exc:
            # Marked, but its events could not be mapped back to a path: take it off.
            try:
                mark(self.fid_fd, FAN_MARK_REMOVE | FAN_MARK_ONLYDIR,
                     DIR_MASK | self._extra, fd)
            except OSError:
                pass
            return exc
        known = self.dirs.get(key)
        if known is not None and known[1] and not inside:
            return None  # a root's parent that lies inside another root stays inside
        if known is not None and self._keys.get(known[0]) == key:
            del self._keys[known[0]]
        self.dirs[key] = (path, inside)
        self._keys[path] = key
        return None

    def _refused(self, path: bytes, exc: OSError) -> None:
        """A directory FID mode cannot mark: classic mode for its filesystem, or dark."""
        if exc.errno in _NO_FID_ERRORS and \
                self._watch_classic(path, f"filesystem of {display(path)} {NO_FID}"):
            return
        self._note_dark(path, _mark_error(path, exc))

    def _watch_classic(self, path: bytes, why: str) -> bool:
        """A classic-mode mark over path's filesystem; False (and a dark note) if refused.

        A filesystem mark (Linux 4.20+) rather than a mount mark: a mount mark sees only
        writes made through that very mount, and under systemd's ProtectSystem= ours is
        a read-only bind mount nobody else writes through.
        """
        if self.classic_fd < 0:
            try:
                self.classic_fd = init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK,
                                       _EVENT_F_FLAGS)
            except OSError as exc:
                self._note_dark(path, init_problem(exc))
                return False
        target = path
        while not os.path.lexists(target) and target != b"/":
            target = os.path.dirname(target)
        for kind in (FAN_MARK_FILESYSTEM, FAN_MARK_MOUNT):
            try:
                mark(self.classic_fd, FAN_MARK_ADD | kind, CLASSIC_MASK | self._extra,
                     path=target)
                break
            except OSError as exc:
                if exc.errno != errno.EINVAL or kind == FAN_MARK_MOUNT:
                    self._note_dark(path, _mark_error(target, exc))
                    return False
        self.classic = {**self.classic, path: f"{why}: {CLASSIC_CONSEQUENCE}"}
        return True

    def _note_dark(self, path: bytes, why: str) -> None:
        if path not in self.dark:
            self.dark = {**self.dark, path: why}

    def covering_root(self, path: bytes) -> bytes | None:
        """The root path lies in (roots never nest), or None."""
        return covering_root(self.root_set, path)

    # -- events ---------------------------------------------------------------------

    def read(self, fd: int) -> bytes | None:
        """One read() of queued events; None when the queue is empty."""
        try:
            data = os.read(fd, CLASSIC_READ if fd == self.classic_fd else FID_READ)
        except BlockingIOError:
            return None
        return data or None

    def paths(self, fd: int, buf: bytes) -> Iterator[tuple[bytes | None, int]]:
        """(path, pid) of each event on the trees; (None, 0) for a queue overflow."""
        if fd == self.classic_fd:
            yield from self._classic_paths(buf)
            return
        dirs, roots = self.dirs, self.root_set
        for mask, pid, _fd, key, name in events(buf):
            if mask & FAN_Q_OVERFLOW:
                yield None, 0
                continue
            entry = dirs.get(key) if key is not None else None
            if entry is None:
                continue  # a directory no longer ours (moved away, forgotten)
            base, inside = entry
            path = base if not name or name == b"." else _join(base, name)
            if not inside and path not in roots:
                continue  # a sibling of a root, seen through the root's parent
            yield path, pid
            if mask & FAN_ONDIR and path != base:
                if mask & FAN_DELETE:
                    self._forget(path)  # rmdir: it was empty, nothing below to forget
                if mask & FAN_MOVED_FROM:
                    self._forget_tree(path)
                if mask & _GROWN:
                    self.mark_tree(path)

    def _classic_paths(self, buf: bytes) -> Iterator[tuple[bytes | None, int]]:
        batch = list(events(buf))
        try:
            for mask, pid, fd, _key, _name in batch:
                if mask & FAN_Q_OVERFLOW:
                    yield None, 0
                if fd < 0:
                    continue
                try:
                    path = os.readlink(b"/proc/self/fd/%d" % fd)
                except OSError:
                    continue
                if self.covering_root(path) is not None:
                    yield path, pid
        finally:
            for _mask, _pid, fd, _key, _name in batch:
                if fd >= 0:
                    os.close(fd)

    def _forget(self, path: bytes) -> None:
        """The directory at path went away: its mark no longer names that path."""
        key = self._keys.pop(path, None)
        if key is not None and self.dirs.get(key, (None, False))[0] == path:
            del self.dirs[key]

    def _forget_tree(self, top: bytes) -> None:
        """A directory moved: forget it and everything below (its new place, if ours,
        is walked and marked again from its FAN_MOVED_TO)."""
        for path in [p for p in self._keys if is_within(p, top)]:
            self._forget(path)

    def close(self) -> None:
        """Close the groups; the kernel drops their marks with them."""
        for fd in self.fds:
            os.close(fd)
        self.fid_fd = self.classic_fd = -1


def covering_root(roots: frozenset[bytes], path: bytes) -> bytes | None:
    """The one of `roots` (which never nest) that path lies in, or None."""
    while True:
        if path in roots:
            return path
        if path == b"/" or not path:
            return None
        path = path.rpartition(b"/")[0] or b"/"
