"""Who opens the secrets: fanotify open events on `access = true` trees, in a helper.

This is the helper process behind access.AccessListener (started with `python -S`, so
only the standard library and our stdlib-only realtime modules are imported). It
marks the access trees, reads /proc for each process the moment its open arrives (a
`cat /etc/shadow` is gone a millisecond later), folds opens of one file by one
process, and sends what it filed as JSON lines about once a second.

Marks, FID mode (FAN_REPORT_DFID_NAME: each event names the directory and entry):
- a directory root: an inode mark with FAN_OPEN | FAN_EVENT_ON_CHILD on it and, for a
  recursive rule, on every directory below, each marked before it is listed; new and
  renamed-in directories are marked as their FAN_CREATE / FAN_MOVED_TO arrive;
- a file root (`/etc/shadow`): FAN_OPEN on the file's own inode, and its parent marked
  for creations and renames only, so a file replaced by rename (what `passwd` and
  `vipw` do) is marked again. The parent's other files cost readers nothing: the
  kernel checks the parent's mask and queues no event for an open.
So only opens under the access trees are ever queued; opens elsewhere on the same
filesystem are not seen at all (a filesystem mark would queue every open on it).

Notification class only (FAN_CLASS_NOTIF): the reader is never made to wait, which
is why this records and never blocks (FAN_OPEN_PERM would). Opens of directories
(`ls`) are not recorded. The kernel merges an open with an identical one still queued
(same process, same file), so counts are opens delivered: a tight loop may count less.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Iterator
from typing import Any

from integrity.paths import is_within
from integrity.realtime.fanotify import privilege_problem
from integrity.realtime.processes import Processes
from integrity.realtime.fanotify import (FAN_CLASS_NOTIF, FAN_CLOEXEC, FAN_CREATE,
                                         FAN_DELETE, FAN_EVENT_ON_CHILD, FAN_MARK_ADD,
                                         FAN_MARK_ONLYDIR, FAN_MOVED_FROM, FAN_MOVED_TO,
                                         FAN_NONBLOCK, FAN_ONDIR, FAN_Q_OVERFLOW,
                                         FAN_REPORT_DFID_NAME, events, handle_key, init,
                                         init_problem, mark)

#: include/uapi/linux/fanotify.h: a file (or directory) was opened.
FAN_OPEN = 0x00000020
TREE_MASK = (FAN_OPEN | FAN_CREATE | FAN_MOVED_TO | FAN_MOVED_FROM | FAN_DELETE
             | FAN_EVENT_ON_CHILD | FAN_ONDIR)
#: A root's parent: only what makes or replaces the root, never its siblings' opens.
PARENT_MASK = FAN_CREATE | FAN_MOVED_TO | FAN_EVENT_ON_CHILD | FAN_ONDIR
FILE_MASK = FAN_OPEN
_GROWN = FAN_CREATE | FAN_MOVED_TO
_GONE = FAN_DELETE | FAN_MOVED_FROM
#: Seconds between batches sent to the daemon (and ticks while idle, so that it can
#: write counts it holds back even when nothing more is read).
FLUSH_SECONDS = 1.0
TICK_SECONDS = 30.0
READ_SIZE = 65536
#: A read this big (some 60 events queued) in which every reader was one we knew is a
#: burst (a tight loop of opens): pausing PAUSE before the next poll lets its opens
#: queue, where the kernel merges each with an identical one still queued, instead of
#: each waking us. A read with a new reader is never followed by a pause: the next
#: event may be a `cat` about to exit, whose /proc must be read at once. (The actor
#: listener does the same, for the same reason.)
BURST_BYTES = 4096
PAUSE = 0.002
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

TREE, PARENT = "tree", "parent"


def _join(base: bytes, name: bytes) -> bytes:
    return base + name if base == b"/" else base + b"/" + name


def wire(path: bytes) -> str:
    """A path as JSON carries it losslessly (undecodable bytes as surrogates)."""
    return path.decode("utf-8", "surrogateescape")


def unwire(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class OpenMarks:
    """FAN_OPEN marks over the access roots, and the path of each open they report.

    `roots` maps each root to whether its rule is recursive. Used from one thread.
    """

    def __init__(self, roots: dict[bytes, bool]) -> None:
        # A root inside a recursive root is covered by it already.
        self.roots = {r: rec for r, rec in roots.items()
                      if not any(other != r and deep and is_within(r, other)
                                 for other, deep in roots.items())}
        self.fd = -1
        #: handle key -> (directory path, TREE or PARENT)
        self.dirs: dict[bytes, tuple[bytes, str]] = {}
        #: (parent path, name) of each root, for its parent's events.
        self.children = {(os.path.dirname(r), os.path.basename(r)): r
                         for r in self.roots if r != b"/"}
        #: Roots that could not be marked, and why (doctor and the log say so).
        self.dark: dict[bytes, str] = {}

    def start(self) -> str | None:
        """Open the group and mark every root; the reason when nothing can work."""
        try:
            self.fd = init(FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_CLOEXEC
                           | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return ("fanotify unavailable: this kernel cannot report file ids "
                        "(needs Linux 5.9)")
            return init_problem(exc)
        for root in self.roots:
            self._mark_parent(root)
            self._mark_root(root)
        if len(self.dark) == len(self.roots) and self.roots:
            return "fanotify unavailable: " + "; ".join(
                f"{os.fsdecode(r)}: {w}" for r, w in self.dark.items())
        return None

    def _mark_parent(self, root: bytes) -> None:
        if root == b"/":
            return
        parent = os.path.dirname(root)
        try:
            fd = os.open(parent, _DIR_OPEN)
        except OSError as exc:
            self.dark[root] = f"its parent cannot be opened ({exc.strerror})"
            return
        try:
            self._mark_dir(parent, fd, PARENT_MASK, PARENT)
        except OSError as exc:
            self.dark[root] = f"its parent cannot be marked ({exc.strerror})"
        finally:
            os.close(fd)

    def _mark_root(self, root: bytes) -> None:
        """Mark a root as it is now: a directory tree, a file, or nothing yet."""
        try:
            st = os.lstat(root)
        except OSError:
            return  # not there (yet): its parent's mark sees it arrive
        if stat.S_ISDIR(st.st_mode):
            self.mark_tree(root, self.roots[root])
        elif stat.S_ISREG(st.st_mode):
            try:
                mark(self.fd, FAN_MARK_ADD, FILE_MASK, path=root)
            except OSError as exc:
                self.dark[root] = f"fanotify_mark failed: {exc.strerror}"
                return
        self.dark.pop(root, None)

    def _mark_dir(self, path: bytes, fd: int, mask: int, role: str) -> None:
        mark(self.fd, FAN_MARK_ADD | FAN_MARK_ONLYDIR, mask, fd)
        key = handle_key(fd)
        known = self.dirs.get(key)
        if known is None or role == TREE:
            self.dirs[key] = (path, role)

    def mark_tree(self, top: bytes, recursive: bool = True) -> None:
        """Mark top (and, recursive, every directory below), each before it is listed."""
        stack: list[tuple[bytes, int | None]] = [(top, None)]
        while stack:
            path, inode = stack.pop()
            try:
                fd = os.open(path, _DIR_OPEN)
            except OSError:
                continue
            try:
                if inode is not None and os.fstat(fd).st_ino != inode:
                    continue  # swapped for another directory (or a link) meanwhile
                self._mark_dir(path, fd, TREE_MASK, TREE)
                if not recursive:
                    continue
                with os.scandir(fd) as entries:
                    subdirs = [(os.fsencode(e.name), e.inode()) for e in entries
                               if e.is_dir(follow_symlinks=False)]
            except OSError as exc:
                if path == top:
                    self.dark[top] = f"cannot mark '{os.fsdecode(path)}': {exc.strerror}"
                continue
            finally:
                os.close(fd)
            stack.extend((_join(path, name), ino) for name, ino in subdirs)

    def _recursive(self, path: bytes) -> bool:
        for root, recursive in self.roots.items():
            if is_within(path, root):
                return recursive
        return False

    def opens(self, buf: bytes) -> Iterator[tuple[bytes | None, int]]:
        """(path, pid) of each open of a file under the roots; (None, 0) for an
        overflow. Creations and renames update the marks on the way."""
        for mask, pid, _fd, key, name in events(buf):
            if mask & FAN_Q_OVERFLOW:
                yield None, 0
                continue
            entry = self.dirs.get(key) if key is not None else None
            if entry is None or name is None:
                continue
            base, role = entry
            path = base if name == b"." else _join(base, name)
            if role == PARENT:
                root = self.children.get((base, name))
                if root is None:
                    continue
                if mask & FAN_OPEN and not mask & FAN_ONDIR:
                    yield path, pid  # the file root's own mark, named via its parent
                elif mask & _GROWN:
                    self._mark_root(root)
                continue
            if mask & FAN_OPEN:
                if not mask & FAN_ONDIR and path != base:
                    yield path, pid
                continue
            if mask & FAN_ONDIR and path != base:
                if mask & _GONE:
                    self._forget(path)
                if mask & _GROWN and self._recursive(path):
                    self.mark_tree(path)

    def _forget(self, top: bytes) -> None:
        for key in [k for k, (p, role) in self.dirs.items()
                    if role == TREE and is_within(p, top)]:
            del self.dirs[key]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the helper process ----------------------------------------------------------------

def _send(message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    while data:
        data = data[os.write(1, data):]


class _Batch:
    """Opens filed since the last flush: per (path, process reading) a count."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        #: Opens were lost (queue overflow) after those in `reads`.
        self.overflowed = False
        self.reads: dict[tuple[bytes, int], list[Any]] = {}
        self.actors: list[Any] = []
        self.index: dict[int, int] = {}

    def add(self, path: bytes, info: Any, now: float) -> None:
        number = self.index.setdefault(id(info), len(self.actors))
        if number == len(self.actors):
            self.actors.append(info if isinstance(info, dict) else {"unknown": info})
        entry = self.reads.get((path, number))
        if entry is None:
            self.reads[(path, number)] = [1, now, now]
        else:
            entry[0] += 1
            entry[2] = now

    def flush(self) -> None:
        if self.reads or self.overflowed:
            message: dict[str, Any] = {
                "t": time.time(), "actors": self.actors,
                "reads": [[wire(p), n, c, first, last]
                          for (p, n), (c, first, last) in self.reads.items()]}
            if self.overflowed:
                message["overflow"] = True  # in the same message: told before filing
            _send(message)
        self.clear()


def helper_main() -> None:
    """The helper: one JSON config line on stdin, JSON lines out; stops at stdin EOF."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the daemon says when (EOF on stdin)
    try:
        os.nice(-5)  # ahead of the daemon, like the actor helper: readers exit fast
    except OSError:
        pass
    line = sys.stdin.buffer.readline()
    if not line:
        return
    config = json.loads(line)
    marks = OpenMarks({unwire(p): bool(r) for p, r in config["roots"]})
    try:
        problem = privilege_problem() or marks.start()
        _send({"ready": True, "problem": problem,
               "dark": {wire(p): w for p, w in marks.dark.items()}})
        if problem is None:
            _listen(marks, {os.getpid(), *config["ignore"]})
    except BrokenPipeError:
        pass  # the daemon is gone
    finally:
        marks.close()


def _listen(marks: OpenMarks, ignore: set[int]) -> None:
    poller = select.poll()
    poller.register(marks.fd, select.POLLIN)
    poller.register(0, select.POLLIN)
    processes = Processes()
    batch = _Batch()
    flush_at: float | None = None
    tick_at = time.monotonic() + TICK_SECONDS
    while True:
        now = time.monotonic()
        due = min(tick_at, flush_at) if flush_at is not None else tick_at
        ready = poller.poll(max(0.0, due - now) * 1000)
        now = time.monotonic()
        if flush_at is not None and now >= flush_at:
            batch.flush()
            flush_at = None
        if now >= tick_at:
            _send({"t": time.time()})
            tick_at = now + TICK_SECONDS
        burst = False
        readings = processes.readings
        for fd, _ in ready:
            if fd == 0:
                batch.flush()
                return
            while True:
                try:
                    buf = os.read(marks.fd, READ_SIZE)
                except BlockingIOError:
                    break
                burst = burst or len(buf) >= BURST_BYTES
                wall = time.time()
                for path, pid in marks.opens(buf):
                    if path is None:
                        batch.overflowed = True
                        flush_at = time.monotonic()
                    elif pid not in ignore:
                        batch.add(path, processes.get(pid, time.monotonic()), wall)
                        if flush_at is None:
                            flush_at = time.monotonic() + FLUSH_SECONDS
        if burst and processes.readings == readings:
            time.sleep(PAUSE)
