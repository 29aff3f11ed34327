"""What every kind of derived file needs: the batch, vouched inputs, and the checks.

A derived file is vouched for only by making it again from inputs that are themselves
vouched for (files their package shipped, unchanged) and comparing the result with
the state the approval is about to write: the record's BLAKE3 digest, its link target,
its type, mode and owner. Nothing here trusts time, names alone, or a tool's word.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import blake3

from integrity.scan import hasher
from integrity.packages.common import LiveError, LiveFile, Verdict
from integrity.packages.derived.sandbox import Sandbox
from integrity.paths import display
from integrity.record import FileRecord
from integrity.times import iso_epoch

if TYPE_CHECKING:
    from integrity.packages import PackageManagers

#: The most a derivation reads of one input or output file into memory.
READ_LIMIT = 64 << 20
#: What dpkg runs maintainer scripts with (dpkg sets umask 022), so what their tools make.
UMASK = 0o022


def evidence(tool: str) -> str:
    """The evidence an approval records: how the file was made again."""
    return f"derived:{tool}"


@dataclass(frozen=True)
class Change:
    """One open change as approval judged it: the baseline's record, the live one (either
    None for an added or removed path) and the package managers' verdict."""

    path: bytes
    old: FileRecord | None
    new: FileRecord | None
    verdict: Verdict
    #: When the path was last seen as the baseline records it (unix time; None: when
    #: the baseline was taken): only a package run after that can have made the change.
    since: float | None = None


class Kind(Protocol):
    """One kind of derived file (Python bytecode, alternatives links, a trigger cache...)."""

    #: What the evidence names, e.g. "python-bytecode" or "ldconfig".
    name: str

    def claims(self, change: Change) -> bool:
        """Is this path (by name, or by the link it is or was) of this kind? Cheap."""
        ...

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        """A verdict for every claimed change; each file or cache is made once."""
        ...


class ReadFile(LiveFile):
    """A regular file read once into memory: its digests are of exactly these bytes, so
    what the package check vouches for is what a derivation then uses."""

    def __init__(self, path: bytes, data: bytes, st: os.stat_result) -> None:
        super().__init__(path)
        self._stat = st
        self.data = data

    def digest(self, algorithm: str) -> str:
        if algorithm not in self._digests:
            self._digests[algorithm] = hashlib.new(algorithm, self.data).hexdigest()
        return self._digests[algorithm]


def read_file(path: bytes, limit: int = READ_LIMIT) -> ReadFile:
    """All of a regular file, read without following a link and checked against its
    lstat before and its fstat after; raises LiveError naming the problem."""
    try:
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            raise LiveError(f"{display(path)} is not a regular file")
        if before.st_size > limit:
            raise LiveError(f"{display(path)} is larger than {limit >> 20} MiB")
        fd = hasher.open_at(path)
        try:
            data = hasher.read_recent(fd, before.st_size)
            if not hasher.same_file(before, os.fstat(fd)):
                raise hasher.FileChanged
        finally:
            os.close(fd)
    except hasher.FileChanged:
        raise LiveError(f"{display(path)} kept changing while it was read") from None
    except OSError as exc:
        raise LiveError(f"cannot read {display(path)}: {exc.strerror or exc}") from None
    return ReadFile(path, data, before)


class Context:
    """The batch being approved and the package facts the kinds share.

    Asking the package managers goes through one lock (they load lazily and are not
    thread-safe) and each answer is kept: a tool or source asked about by many files
    is checked once.
    """

    def __init__(self, managers: PackageManagers, changes: Iterable[Change],
                 since: float | None = None) -> None:
        self.managers = managers
        self.changes: Mapping[bytes, Change] = {c.path: c for c in changes}
        #: When the baseline was taken (unix time); None when unknown, and then no
        #: package run can be shown to have happened since.
        self.since = since
        self._logged: dict[tuple[float | None, tuple[str, ...]], dict[str, list[str]]] = {}
        self._lock = threading.RLock()
        self.sandbox: Sandbox = Sandbox(self.vouched)
        self._vouched: dict[bytes, Verdict] = {}
        self._owners: dict[bytes, list[str]] = {}
        self._interests: dict[bytes, list[str]] | None = None

    def owners(self, path: bytes) -> list[str]:
        """Installed packages that list path (any spelling), cached."""
        with self._lock:
            if path not in self._owners:
                self._owners[path] = self.managers.owners(path)
            return self._owners[path]

    def vouched(self, path: bytes) -> Verdict:
        """Does path, as it is now, match what its package shipped? (A directory: is it
        listed by a package.) Cached; the basis of trusting any input."""
        with self._lock:
            if path not in self._vouched:
                self._vouched[path] = self.managers.check_content(path)
            return self._vouched[path]

    def vouched_read(self, path: bytes, limit: int = READ_LIMIT) -> tuple[ReadFile | None,
                                                                          Verdict]:
        """Read path once and judge those very bytes against its package: the bytes
        returned are the ones vouched for (None and why not, otherwise)."""
        try:
            live = read_file(path, limit)
        except LiveError as exc:
            return None, Verdict(False, str(exc))
        with self._lock:
            verdict = self.managers.check_content(path, live)
        return (live if verdict.vouched else None), verdict

    def since_of(self, change: Change | None) -> float | None:
        """When a package run must have come after to explain `change` (None: the
        baseline's time): when its path was last seen as recorded."""
        if change is not None and change.since is not None and (
                self.since is None or change.since > self.since):
            return change.since
        return self.since

    def since_words(self, change: Change | None) -> str:
        """since_of(change) as a reason names it ("... since X", "predates X")."""
        since = self.since_of(change)
        if since is None or since == self.since:
            return "the baseline"
        return f"its last sighting as recorded ({iso_epoch(since)})"

    def logged_since(self, *actions: str, of: Change | None = None) -> dict[str, list[str]]:
        """package name -> what dpkg's log says of its `actions` ("install", "upgrade",
        "remove", "purge") since the baseline (or since `of`'s path was last seen as
        recorded), oldest first; cached. Empty when that time is not known."""
        since = self.since_of(of)
        with self._lock:
            if (since, actions) not in self._logged:
                found: dict[str, list[str]] = {}
                if since is not None:
                    for name, text in self.managers.dpkg_logged_since(since, actions):
                        found.setdefault(name, []).append(text)
                self._logged[since, actions] = found
            return self._logged[since, actions]

    def ran_since(self, packages: Iterable[str], *actions: str,
                  of: Change | None = None) -> str | None:
        """What dpkg logged last of `actions` on one of `packages` ("name" or
        "name:arch") since the baseline (or since `of`'s path was last seen as
        recorded), or None: a maintainer script of theirs can have run since only then."""
        logged = self.logged_since(*actions, of=of)
        events = [text for key in packages for text in logged.get(key.split(":", 1)[0], [])]
        return events[-1] if events else None

    def made_since(self, path: bytes, of: Change | None = None) -> bool:
        """Was path (not followed) last modified at or after the baseline's second (or
        the second `of`'s path was last seen as recorded)?"""
        since = self.since_of(of)
        if since is None:
            return False
        try:
            return os.lstat(path).st_mtime >= since
        except OSError:
            return False

    def package_files(self, key: str) -> list[bytes]:
        """The paths dpkg lists for an installed package (its info/KEY.list)."""
        try:
            with open(os.path.join(self.managers.admindir, "info", key + ".list"),
                      "rb") as handle:
                return [line for line in handle.read().split(b"\n") if line]
        except OSError:
            return []

    def trigger_interests(self) -> dict[bytes, list[str]]:
        """File and named triggers -> keys of the installed packages interested in them,
        from dpkg's info/*.triggers (what dpkg runs their postinst for)."""
        with self._lock:
            if self._interests is None:
                self._interests = _read_interests(self.managers.admindir)
            return self._interests


def _read_interests(admindir: str) -> dict[bytes, list[str]]:
    found: dict[bytes, list[str]] = {}
    info = os.path.join(admindir, "info")
    try:
        names = sorted(n for n in os.listdir(info) if n.endswith(".triggers"))
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(info, name), "rb") as handle:
                lines = handle.read().split(b"\n")
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if len(words) == 2 and words[0] in (b"interest", b"interest-await",
                                                  b"interest-noawait"):
                found.setdefault(words[1], []).append(name[:-len(".triggers")])
    return found


# -- checking the state an approval is about to write ---------------------------------

def shape_problem(change: Change, kind: str, mode: int | None = None,
                  tool: str = "the tool") -> str | None:
    """Why the live entry's type, mode, owner or extended attributes are not what `tool`
    makes (a `kind` entry with `mode`, owned by root), or None when they are."""
    new = change.new
    assert new is not None
    if new.type != kind:
        return f"is a {new.type}; {tool} makes a {kind}"
    if mode is not None and kind != "symlink" and new.mode != mode:
        return f"mode {new.mode:04o}; {tool} makes it {mode:04o}"
    if (new.uid, new.gid) != (0, 0):
        return f"owned by {new.uid}:{new.gid}; {tool} runs as root and makes it root's"
    if new.xattrs is not None and (change.old is None or change.old.xattrs != new.xattrs):
        return "extended attributes were set; no tool derives them"
    return None


def content_is(change: Change, data: bytes) -> bool:
    """Is the state to be written exactly `data`? By the record's digest when the rule
    hashes content, else by reading the file (never following a link)."""
    new = change.new
    if new is None or new.type != "file" or new.size != len(data):
        return False
    if new.content is not None:
        return blake3.blake3(data).digest() == new.content
    try:
        return read_file(change.path).data == data
    except LiveError:
        return False


def file_verdict(change: Change, data: bytes | None, tool: str, how: str,
                 mode: int = 0o644) -> Verdict:
    """The verdict on a regular file `tool` makes as `data` (None: makes none)."""
    ev = evidence(tool)
    if change.new is None:
        if data is None:
            return Verdict(True, f"{tool} makes no such file any more ({how})", ev)
        return Verdict(False, f"removed, but {tool} still makes it ({how})")
    if data is None:
        return Verdict(False, f"{tool} makes no such file ({how})")
    problem = shape_problem(change, "file", mode, tool)
    if problem:
        return Verdict(False, problem)
    if content_is(change, data):
        return Verdict(True, f"made again by {tool}: identical ({how})", ev)
    return Verdict(False, f"differs from what {tool} makes ({how})")


def link_verdict(change: Change, target: bytes | None, tool: str, how: str,
                 kind: str | None = None) -> Verdict:
    """The verdict on a symlink `tool` points at `target` (None: makes no such link);
    the evidence names `kind` (default: the tool)."""
    ev = evidence(kind or tool)
    new = change.new
    if new is None:
        if target is None:
            return Verdict(True, f"{tool} makes no such link any more ({how})", ev)
        return Verdict(False, f"removed, but {tool} still links it to {display(target)} "
                       f"({how})")
    if target is None:
        return Verdict(False, f"{tool} makes no such link ({how})")
    problem = shape_problem(change, "symlink", None, tool)
    if problem:
        return Verdict(False, problem)
    if new.link != target:
        return Verdict(False, f"points to {display(new.link or b'')}; {tool} points it to "
                       f"{display(target)} ({how})")
    return Verdict(True, f"{tool} points it to {display(target)} ({how})", ev)


def dir_verdict(change: Change, made: bool, tool: str, how: str) -> Verdict:
    """The verdict on a directory `tool` makes (or, when not `made`, does not)."""
    ev = evidence(tool)
    if change.new is None:
        if not made:
            return Verdict(True, f"{tool} makes no such directory any more ({how})", ev)
        return Verdict(False, f"removed, but {tool} still makes it ({how})")
    if not made:
        return Verdict(False, f"{tool} makes no such directory ({how})")
    problem = shape_problem(change, "dir", 0o777 & ~UMASK, tool)
    if problem:
        return Verdict(False, problem)
    return Verdict(True, f"a directory {tool} makes ({how})", ev)


def not_vouched(what: str, path: bytes, verdict: Verdict) -> Verdict:
    """An input that is not what its package shipped: nothing made from it is vouched."""
    return Verdict(False, f"{what} {display(path)} is not vouched for: {verdict.reason}")
