"""The inotify loop on real directories: hints, coalescing, the watch map, the limits.

Every test drives a real `Watcher` (real inotify, real files under tmp_path) with
callbacks that collect what it reports, runs `watcher.run(stop)` on a thread of its
own and stops it again. Nothing is mocked: where a limit matters (queue overflow, the
watch limit) the test lowers the kernel's sysctl for a moment, as root, and always puts
it back. The watch map is checked against the kernel's own list of marks
(/proc/self/fdinfo of the inotify descriptor), which is what "no stale entries" means.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import shutil
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until as shared_wait_until
from integrity.paths import is_within
from integrity.policy import Policy, parse
from integrity.realtime.mounts import blind_reason, filesystem_type, is_blind
from integrity.realtime import watcher as watcher_module
from integrity.realtime.watcher import Hints, Unwatched, Watcher

DEADLINE = 5.0
INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify")

#: Each test stops every thread, child process and inotify instance it started.
pytestmark = pytest.mark.usefixtures("no_leaks")


# -- helpers ---------------------------------------------------------------------------

def b(path: Path | str) -> bytes:
    return os.fsencode(str(path))


class Collector:
    """The watcher's three callbacks, recording what they were given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[Hints] = []
        self.overflows = 0
        self.unwatched: list[list[Unwatched]] = []

    def on_hints(self, hints: Hints) -> None:
        with self.lock:
            self.batches.append(Hints(set(hints.paths), set(hints.subtrees)))

    def on_overflow(self) -> None:
        with self.lock:
            self.overflows += 1

    def on_unwatched(self, items: list[Unwatched]) -> None:
        with self.lock:
            self.unwatched.append(list(items))

    def paths(self) -> set[bytes]:
        with self.lock:
            return set().union(*(h.paths for h in self.batches))

    def subtrees(self) -> set[bytes]:
        with self.lock:
            return set().union(*(h.subtrees for h in self.batches))

    def everything(self) -> set[bytes]:
        return self.paths() | self.subtrees()

    def covered(self, path: bytes) -> bool:
        """The path itself was hinted, or a subtree holding it was."""
        return path in self.paths() or any(is_within(path, s) for s in self.subtrees())

    def batches_with(self, path: bytes) -> int:
        with self.lock:
            return sum(1 for h in self.batches if path in h.paths)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """conftest's, polling faster: the watcher's latency is what is measured here."""
    return shared_wait_until(predicate, what, timeout, interval=0.01)


def write(path: Path, data: bytes = b"x") -> None:
    with open(path, "wb") as handle:
        handle.write(data)


class Running:
    """A watcher whose loop runs on a thread, and its collector."""

    def __init__(self, watcher: Watcher, got: Collector, thread: threading.Thread) -> None:
        self.watcher, self.got, self.thread = watcher, got, thread

    def sentinel(self, directory: Path, name: str = "sentinel") -> None:
        """Write a file and wait for its hint: every earlier event has been handled."""
        path = directory / name
        write(path, os.urandom(8))
        wait_until(lambda: self.got.covered(b(path)), f"the hint for {path}")


@contextlib.contextmanager
def running(policy: Policy, window: float = 0.1,
            watcher: Watcher | None = None, got: Collector | None = None,
            started: bool = False) -> Iterator[Running]:
    """Start (unless `started`) and run a watcher; stop and close it afterwards."""
    got = got or Collector()
    watcher = watcher or Watcher(policy, got.on_hints, got.on_overflow, got.on_unwatched,
                                 window=window)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), name="test-inotify")
    try:
        if not started:
            watcher.start()
        thread.start()
        yield Running(watcher, got, thread)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        watcher.close()
    assert not thread.is_alive(), "the inotify loop did not stop within 5 s of stop.set()"


def kernel_watches(watcher: Watcher) -> dict[int, int]:
    """wd -> inode of every mark the kernel holds on the watcher's inotify instance."""
    marks = {}
    with open(f"/proc/self/fdinfo/{watcher.inotify.fileno()}") as handle:
        for line in handle:
            if line.startswith("inotify wd:"):
                fields = dict(f.split(":", 1) for f in line.split()[1:])
                marks[int(fields["wd"], 16)] = int(fields["ino"], 16)
    return marks


def map_problems(watcher: Watcher) -> list[str]:
    """Where the watch map disagrees with the kernel or with the filesystem."""
    problems = []
    # dict() copies under the GIL: a consistent snapshot while the loop runs.
    wd_path, path_wd = dict(watcher.wd_path), dict(watcher.path_wd)
    kernel = kernel_watches(watcher)
    for wd, path in wd_path.items():
        if path_wd.get(path) != wd:
            problems.append(f"wd {wd} -> {path!r}, but that path maps to {path_wd.get(path)}")
        if wd not in kernel:
            problems.append(f"wd {wd} -> {path!r}: the kernel has no such watch")
            continue
        try:
            ino = os.lstat(path).st_ino
        except OSError:
            problems.append(f"wd {wd} -> {path!r}: no such directory")
            continue
        if ino != kernel[wd]:
            problems.append(f"wd {wd} -> {path!r}: the kernel watches inode {kernel[wd]}, "
                            f"the path is inode {ino}")
    for path, wd in path_wd.items():
        if wd_path.get(wd) != path:
            problems.append(f"{path!r} -> wd {wd}, but that wd maps to {wd_path.get(wd)!r}")
    anchors = dict(watcher.anchors)
    for wd, parent in anchors.items():
        # An anchor watches the parent of a rule root that is not itself watched.
        if not any((r.path.rsplit(b"/", 1)[0] or b"/") == parent
                   for r in watcher.policy.rules):
            problems.append(f"anchor wd {wd} on {parent!r} is the parent of no rule root")
    for wd in kernel:
        if wd not in wd_path and wd not in anchors:
            problems.append(f"the kernel watches wd {wd}, the map does not know it")
    return problems


def assert_map_consistent(watcher: Watcher) -> None:
    """Wait for IN_IGNORED and friends to land, then insist map and kernel agree."""
    deadline = time.monotonic() + DEADLINE
    while (problems := map_problems(watcher)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not problems, "\n".join(problems)


@contextlib.contextmanager
def sysctl(name: str, value: int) -> Iterator[int]:
    """Set /proc/sys/fs/inotify/NAME for the block; always put the old value back."""
    path = INOTIFY_SYSCTL / name
    original = path.read_text().strip()
    try:
        path.write_text(f"{value}\n")
        yield int(original)
    finally:
        path.write_text(f"{original}\n")
    assert path.read_text().strip() == original


def watches_in_use() -> int:
    """Inotify watches held by all processes (everything here runs as root)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
                    total += sum(1 for line in handle if line.startswith("inotify wd:"))
            except OSError:
                continue
    return total


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes /proc/sys and mounts")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    top = tmp_path / "watched"
    (top / "sub").mkdir(parents=True)
    write(top / "a.conf", b"alpha\n")
    write(top / "sub" / "b.conf", b"beta\n")
    return top


def policy_for(top: Path, **rule: Any) -> Policy:
    return parse({"rule": [{"path": str(top), "check": "config", **rule}]})


# -- hints -----------------------------------------------------------------------------

def test_close_write_hints_the_file_and_nothing_excluded(root: Path) -> None:
    write(root / "swap.swp")
    policy = policy_for(root, exclude=["*.swp"])
    with running(policy) as w:
        assert w.watcher.watching(b(root)) and w.watcher.watching(b(root / "sub"))
        write(root / "swap.swp", b"editor noise")
        write(root / "sub" / "b.conf", b"beta 2\n")
        wait_until(lambda: b(root / "sub" / "b.conf") in w.got.paths(),
                   "a hint for the written file")
        w.sentinel(root)
        assert b(root / "swap.swp") not in w.got.everything()
        assert all(policy.covers(p) for p in w.got.everything()), w.got.everything()
        # CLOSE_WRITE alone says nothing about the directory's shape.
        assert b(root / "sub") not in w.got.everything()


class ManualClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unread_bytes(watcher: Watcher) -> int:
    """Bytes of events the kernel holds for the watcher that it has not read yet."""
    count = array.array("i", [0])
    fcntl.ioctl(watcher.inotify.fileno(), termios.FIONREAD, count, True)
    return count[0]


def test_a_burst_of_writes_to_one_file_is_one_hint(root: Path) -> None:
    """Events within one window are one hint, however many reads they took. The clock
    stands still during the burst, so a slow machine cannot split it."""
    target, other = root / "a.conf", root / "sub" / "b.conf"
    clock = ManualClock()
    got = Collector()
    policy = policy_for(root)
    watcher = Watcher(policy, got.on_hints, got.on_overflow, got.on_unwatched,
                      window=0.5, clock=clock)
    with running(policy, watcher=watcher, got=got):
        for i in range(30):
            # Alternating with another file keeps the kernel from merging the events
            # itself: the watcher is what must coalesce them.
            write(target, b"rewrite %d\n" % i)
            write(other, b"other %d\n" % i)
        wait_until(lambda: unread_bytes(watcher) == 0, "the watcher to read every event")
        assert got.batches == [], "hints handed on before the window passed"
        clock.now += 0.5
        wait_until(lambda: got.batches, "the hints once the window has passed")
        assert got.batches == [Hints({b(target), b(other)})], got.batches


def test_attribute_changes_are_hinted(root: Path) -> None:
    with running(policy_for(root)) as w:
        os.chmod(root / "sub" / "b.conf", 0o600)
        os.chmod(root / "sub", 0o700)
        wait_until(lambda: {b(root / "sub" / "b.conf"), b(root / "sub")}
                   <= w.got.paths(), "hints for chmod of a file and of a directory")


def test_names_that_are_not_utf8_come_back_exact(root: Path) -> None:
    with running(policy_for(root)) as w:
        odd_dir = b(root) + b"/dir-\xff\xfe"
        os.mkdir(odd_dir)
        wait_until(lambda: w.watcher.watching(odd_dir), "a watch on a non-UTF-8 directory")
        w.sentinel(root)
        odd_file = odd_dir + b"/file-\xe9"
        with open(odd_file, "wb") as handle:
            handle.write(b"x")
        with open(odd_file, "wb") as handle:
            handle.write(b"y")
        wait_until(lambda: odd_file in w.got.paths(), "the hint for a non-UTF-8 file name")

def test_excluded_directories_are_not_watched(root: Path) -> None:
    (root / "cache" / "deep").mkdir(parents=True)
    (root / "spool" / "deep").mkdir(parents=True)
    policy = policy_for(root, exclude=["cache", str(root / "spool")])
    with running(policy) as w:
        watcher = w.watcher
        assert watcher.watching(b(root / "sub"))
        for excluded in ("cache", "cache/deep", "spool", "spool/deep"):
            assert not watcher.watching(b(root / excluded)), excluded
        write(root / "cache" / "f")
        write(root / "spool" / "deep" / "f")
        (root / "sub" / "cache").mkdir()  # excluded by name wherever it appears
        write(root / "sub" / "cache" / "f")
        w.sentinel(root / "sub")
        assert not watcher.watching(b(root / "sub" / "cache"))
        hinted = w.got.everything()
        for excluded in ("cache", "spool", "sub/cache"):
            assert not [p for p in hinted if is_within(p, b(root / excluded))], hinted
        assert_map_consistent(watcher)


# -- the shape of the tree -----------------------------------------------------------

def test_files_written_right_after_mkdir_are_never_missed(root: Path) -> None:
    with running(policy_for(root)) as w:
        made = []
        for i in range(200):
            d = root / f"new{i:03d}"
            os.mkdir(d)
            write(d / "f", b"%d" % i)
            made.append(d)
        for i in range(20):  # whole chains at once: mkdir -p, then a file at the bottom
            bottom = root / f"chain{i:02d}" / "x" / "y"
            os.makedirs(bottom)
            write(bottom / "f")
            made.append(bottom)
        wait_until(lambda: all(w.got.covered(b(d / "f")) for d in made),
                   "every new directory or its file to be hinted")
        subtrees = w.got.subtrees()
        missing = [d for d in made[:200] if b(d) not in subtrees]
        assert not missing, f"new directories not hinted as subtrees: {missing[:5]}"
        unwatched = [d for d in made if not w.watcher.watching(b(d))]
        assert not unwatched, f"new directories without a watch: {unwatched[:5]}"
        # The watches are real: a second write to every file is seen as itself.
        before = len(w.got.batches)
        for d in made:
            write(d / "f", b"again")
        wait_until(lambda: all(b(d / "f") in w.got.paths() for d in made),
                   "a path hint for every rewritten file")
        assert len(w.got.batches) > before
        assert_map_consistent(w.watcher)


def test_directory_rename_moves_the_watch_map(root: Path) -> None:
    (root / "old" / "inner" / "deeper").mkdir(parents=True)
    with running(policy_for(root)) as w:
        watcher = w.watcher
        assert watcher.watching(b(root / "old" / "inner" / "deeper"))
        os.rename(root / "old", root / "new")
        wait_until(lambda: b(root / "new") in w.got.subtrees(), "the renamed subtree")
        for rel in ("", "/inner", "/inner/deeper"):
            assert watcher.watching(b(root / "new") + rel.encode()), rel
            assert not watcher.watching(b(root / "old") + rel.encode()), rel
        assert b(root / "old") in w.got.subtrees()  # what was there is gone: re-check
        write(root / "new" / "inner" / "deeper" / "f")
        wait_until(lambda: b(root / "new" / "inner" / "deeper" / "f") in w.got.paths(),
                   "a hint under the new name")
        assert not [p for p in w.got.paths() if is_within(p, b(root / "old"))]
        assert_map_consistent(watcher)


def test_rename_over_an_empty_directory_keeps_the_moved_watch(root: Path) -> None:
    (root / "src" / "kid").mkdir(parents=True)
    (root / "dst").mkdir()
    with running(policy_for(root)) as w:
        os.rename(root / "src", root / "dst")  # replaces the empty dst
        wait_until(lambda: b(root / "dst") in w.got.subtrees(), "the renamed subtree")
        assert_map_consistent(w.watcher)
        assert w.watcher.watching(b(root / "dst" / "kid"))
        write(root / "dst" / "kid" / "f")
        wait_until(lambda: b(root / "dst" / "kid" / "f") in w.got.paths(),
                   "a hint inside the directory that replaced another")


def test_directories_moved_out_and_in(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "incoming" / "kid").mkdir(parents=True)
    (root / "leaving" / "kid").mkdir(parents=True)
    with running(policy_for(root)) as w:
        watcher = w.watcher
        os.rename(root / "leaving", outside / "leaving")
        os.rename(outside / "incoming", root / "incoming")
        wait_until(lambda: b(root / "incoming") in w.got.subtrees(), "the moved-in subtree")
        assert watcher.watching(b(root / "incoming" / "kid"))
        assert not watcher.watching(b(root / "leaving"))
        assert not watcher.watching(b(root / "leaving" / "kid"))
        assert b(root / "leaving") in w.got.subtrees()
        assert_map_consistent(watcher)
        # The watch that went away with the directory must not report under its old name.
        write(outside / "leaving" / "kid" / "f")
        write(root / "incoming" / "kid" / "f")
        wait_until(lambda: b(root / "incoming" / "kid" / "f") in w.got.paths(),
                   "a hint inside the moved-in directory")
        w.sentinel(root)
        assert not [p for p in w.got.paths() if b"leaving/kid" in p], w.got.paths()


def test_directory_renamed_to_an_excluded_name_is_no_longer_watched(root: Path) -> None:
    (root / "data" / "kid").mkdir(parents=True)
    (root / "cache").mkdir()
    policy = policy_for(root, exclude=["*.old", "cache"])
    with running(policy) as w:
        watcher = w.watcher
        assert watcher.watching(b(root / "data" / "kid"))
        os.rename(root / "data", root / "data.old")  # moved out of the policy's view
        os.rename(root / "cache", root / "keep")  # and one moved into it
        wait_until(lambda: watcher.watching(b(root / "keep")), "a watch on the renamed-in dir")
        w.sentinel(root)
        assert_map_consistent(watcher)
        for rel in ("data", "data/kid", "data.old", "data.old/kid"):
            assert not watcher.watching(b(root / rel)), \
                f"{rel}: excluded directories are not watched (issue 4)"


def test_a_rule_root_removed_and_recreated_is_not_silently_lost(root: Path) -> None:
    # The rule's own directory has no watched parent: when it goes away and comes back
    # (a package reinstall, a restore), the watcher must watch it again or say it cannot.
    with running(policy_for(root)) as w:
        shutil.rmtree(root)
        wait_until(lambda: not w.watcher.wd_path, "IN_IGNORED for every watch")
        root.mkdir()
        (root / "sub").mkdir()
        write(root / "sub" / "planted")
        wait_until(lambda: w.watcher.watching(b(root)) or w.got.unwatched,
                   "the re-created rule root to be watched or reported")
        assert w.watcher.watching(b(root)) or [
            u for batch in w.got.unwatched for u in batch if u.root == b(root)], \
            "the re-created rule root is neither watched nor reported as unwatched"

def test_rm_r_drops_the_watches(root: Path) -> None:
    (root / "gone" / "a" / "b").mkdir(parents=True)
    write(root / "gone" / "a" / "b" / "f")
    with running(policy_for(root)) as w:
        watcher = w.watcher
        assert watcher.watching(b(root / "gone" / "a" / "b"))
        shutil.rmtree(root / "gone")
        wait_until(lambda: b(root / "gone") in w.got.subtrees(), "the removed subtree")
        assert_map_consistent(watcher)  # IN_IGNORED handled for each of them
        stale = [p for p in dict(watcher.wd_path).values() if is_within(p, b(root / "gone"))]
        assert not stale
        assert not watcher.watching(b(root / "gone"))
        # The same name again is a new directory with a new watch.
        (root / "gone").mkdir()
        write(root / "gone" / "again")
        wait_until(lambda: watcher.watching(b(root / "gone")), "a watch on the new directory")
        w.sentinel(root)  # the batch holding the new subtree is out
        write(root / "gone" / "again", b"second")
        wait_until(lambda: b(root / "gone" / "again") in w.got.paths(),
                   "a hint in the re-created directory")
        assert_map_consistent(watcher)


# -- what it must survive ------------------------------------------------------------

@pytest.mark.inotify_limits
@needs_root
def test_queue_overflow_calls_on_overflow(root: Path) -> None:
    got = Collector()
    with sysctl("max_queued_events", 64):
        # The limit is read once, by inotify_init: this instance keeps it.
        watcher = Watcher(policy_for(root), got.on_hints, got.on_overflow, got.on_unwatched)
    try:
        watcher.start()
        for i in range(500):
            write(root / f"burst{i:03d}", b"%d" % i)
    except BaseException:
        watcher.close()
        raise
    with running(policy_for(root), watcher=watcher, got=got, started=True) as w:
        wait_until(lambda: got.overflows >= 1, "on_overflow after IN_Q_OVERFLOW")
        # It goes on watching afterwards.
        write(root / "sub" / "after")
        wait_until(lambda: b(root / "sub" / "after") in got.paths(), "a hint after overflow")
        assert w.thread.is_alive()


@pytest.mark.inotify_limits
@needs_root
def test_overflow_resyncs_the_watch_map(root: Path) -> None:
    # Directories created while events were being lost have no watch yet; after the
    # overflow the watcher must find them, or changes in them stay invisible until
    # the next restart (the rescan reports what is there, not what comes later).
    got = Collector()
    with sysctl("max_queued_events", 64):
        watcher = Watcher(policy_for(root), got.on_hints, got.on_overflow, got.on_unwatched)
    made = [root / f"during{i:03d}" for i in range(100)]
    try:
        watcher.start()
        for d in made:
            d.mkdir()
            write(d / "f")
        shutil.rmtree(root / "sub")
    except BaseException:
        watcher.close()
        raise
    with running(policy_for(root), watcher=watcher, got=got, started=True):
        wait_until(lambda: got.overflows >= 1, "on_overflow after IN_Q_OVERFLOW")
        # No wait: the watch map is resynced before on_overflow is called, so the
        # rescan it asks for already runs with every new directory watched.
        missing = [d.name for d in made if not watcher.watching(b(d))]
        assert not missing, (f"{len(missing)} of {len(made)} directories created during the "
                             f"overflow have no watch, e.g. {missing[:3]}")
        assert_map_consistent(watcher)
        write(made[-1] / "f", b"later")
        wait_until(lambda: b(made[-1] / "f") in got.paths(),
                   "a hint in a directory created during the overflow")

@pytest.mark.inotify_limits
@needs_root
def test_watch_limit_falls_back_and_says_so(root: Path) -> None:
    for i in range(9):
        (root / "sub" / f"d{i}").mkdir()
    dirs = [root, root / "sub", *(root / "sub" / f"d{i}" for i in range(9))]
    got = Collector()
    policy = policy_for(root)
    watcher = Watcher(policy, got.on_hints, got.on_overflow, got.on_unwatched)
    try:
        with sysctl("max_user_watches", watches_in_use() + 3):
            count = watcher.start()  # must not raise
            (root / "later").mkdir()
            with running(policy, watcher=watcher, got=got, started=True):
                wait_until(lambda: len(got.unwatched) >= 2,
                           "on_unwatched for a directory created at the limit")
    finally:
        watcher.close()
    assert 0 < count <= 3
    first = got.unwatched[0]
    assert first and all(isinstance(u, Unwatched) for u in first)
    roots = [u.root for u in first]
    for d in dirs:  # every directory is watched or inside a subtree put on scanning
        assert watcher.watching(b(d)) or any(is_within(b(d), r) for r in roots), d
    assert not [r for r in roots if watcher.watching(r)]
    for item in first:
        assert "fs.inotify.max_user_watches" in item.reason, item.reason
        assert "sysctl -w fs.inotify.max_user_watches=" in item.reason, item.reason
        assert f"needs {len(dirs)}" in item.reason, item.reason
    assert [u.root for u in got.unwatched[1]] == [b(root / "later")]
    assert watcher.unwatched == [*first, *got.unwatched[1]]


@pytest.mark.inotify_limits
@needs_root
def test_watch_limit_on_a_wide_tree_does_not_stall_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running out of watches must not make start-up quadratic in the size of the tree
    (one full walk per directory that found no watch): counted, not timed."""
    top = tmp_path / "wide"
    for i in range(300):
        (top / f"d{i:03d}").mkdir(parents=True)
    walks = []

    def counted_walk(*args: Any, **kwargs: Any) -> Iterator[object]:
        walks.append(args)
        return real_walk(*args, **kwargs)

    real_walk = watcher_module.walk
    monkeypatch.setattr(watcher_module, "walk", counted_walk)
    got = Collector()
    watcher = Watcher(policy_for(top), got.on_hints, got.on_overflow, got.on_unwatched)
    try:
        with sysctl("max_user_watches", watches_in_use() + 3):
            watcher.start()
    finally:
        watcher.close()
    unwatched = [u.root for batch in got.unwatched for u in batch]
    assert len(unwatched) >= 298
    # One walk to watch, one to count what the policy needs for the limit's message.
    assert len(walks) <= 2, f"{len(walks)} walks of the tree"


# -- filesystems -----------------------------------------------------------------------

@pytest.mark.parametrize("fstype", ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "fuse",
                                    "fuseblk", "9p", "ceph", "glusterfs", "proc"])
def test_remote_and_pseudo_filesystems_are_blind(fstype: str) -> None:
    assert is_blind(fstype) and blind_reason(fstype)


@pytest.mark.parametrize("fstype", ["ext4", "tmpfs", "xfs", "btrfs", "overlay", ""])
def test_local_filesystems_are_watchable(fstype: str) -> None:
    assert not is_blind(fstype) and blind_reason(fstype) is None


@contextlib.contextmanager
def mounted(fstype: str, where: Path) -> Iterator[Path]:
    """mount -t FSTYPE on `where` for the block; always unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", fstype, "integrity-test", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@needs_root
@pytest.mark.parametrize("name", ["mnt", "with space"])
def test_filesystem_type_of_a_tmpfs_mount(tmp_path: Path, name: str) -> None:
    mount = tmp_path / name
    (mount / "inside").mkdir(parents=True)
    below = filesystem_type(b(mount / "inside"))
    assert below and below != "tmpfs"
    with mounted("tmpfs", mount):
        (mount / "deeper").mkdir()
        assert filesystem_type(b(mount)) == "tmpfs"
        assert filesystem_type(b(mount / "deeper")) == "tmpfs"
        assert filesystem_type(b(tmp_path)) == below  # the mount's parent is not in it
        assert not is_blind(filesystem_type(b(mount)))
    assert filesystem_type(b(mount / "inside")) == below


@needs_root
def test_a_rule_on_a_blind_filesystem_is_reported_not_watched(tmp_path: Path) -> None:
    with mounted("bpf", tmp_path / "pseudo") as pseudo:
        assert filesystem_type(b(pseudo)) == "bpf"
        got = Collector()
        watcher = Watcher(policy_for(pseudo), got.on_hints, got.on_overflow,
                          got.on_unwatched)
        try:
            assert watcher.start() == 0
        finally:
            watcher.close()
    assert not watcher.watching(b(pseudo))
    [[item]] = got.unwatched
    assert item.root == b(pseudo) and "bpf" in item.reason and "pseudo" in item.reason


@needs_root
def test_a_blind_mount_inside_a_rule_that_crosses_filesystems(root: Path) -> None:
    with mounted("bpf", root / "sub" / "pseudo") as pseudo:
        policy = policy_for(root, one_filesystem=False)
        with running(policy) as w:
            assert w.watcher.watching(b(root)) and w.watcher.watching(b(root / "sub"))
            assert not w.watcher.watching(b(pseudo))
            assert [[u.root for u in batch] for batch in w.got.unwatched] == [[b(pseudo)]]
            write(root / "sub" / "b.conf", b"still watched\n")
            wait_until(lambda: b(root / "sub" / "b.conf") in w.got.paths(),
                       "a hint next to the blind mount")
