"""Pieces shared by the dpkg and rpm backends: the verdict, the live file, path aliases."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from integrity.paths import display
from integrity.record import FileRecord
from integrity.scan import hasher

SIGNED_ARCHIVE = "signed-archive"
PACKAGE_DB = "package-db"

#: A function that maps a path to the spelling the package indexes use.
Canon = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Verdict:
    """The package manager's answer about one change.

    ``reason`` always says why: what matched when vouched, what is missing or differs
    when not. ``evidence`` is "signed-archive" or "package-db" when vouched, else None;
    ``package`` is "name" or "name:arch" of the owning package when there is one.
    """

    vouched: bool
    reason: str
    evidence: str | None = None
    package: str | None = None
    #: Not vouched because the package states nothing about it (no verified .deb, no
    #: statoverride), as opposed to stating something else.
    unstated: bool = False


class LiveError(Exception):
    """The live file could not be digested; the message is a verdict's reason."""


class LiveFile:
    """The live entry at a path, digested at most once per algorithm.

    md5 and sha256 are read in one pass (dpkg needs md5, a .deb check sha256); the
    read goes through `hasher.digest_path`, so links are never followed and a file
    that changes while read is reported rather than mis-hashed.

    With `state`, the record an approval is about to write, what is judged must be
    that entry: the same inode, and bytes with the recorded BLAKE3 (read in the same
    pass). The path is read again by name, and a parent directory swapped for a link
    meanwhile would otherwise have other bytes judged than those recorded.
    """

    _FIRST_PASS = ("md5", "sha256")

    def __init__(self, path: bytes, state: FileRecord | None = None) -> None:
        self.path = path
        self.state = state
        self._stat: os.stat_result | None = None
        self._digests: dict[str, str] = {}

    def lstat(self) -> os.stat_result:
        """The entry's lstat, taken once; raises LiveError when it is gone (or is not
        the entry `state` recorded)."""
        if self._stat is None:
            try:
                st = os.lstat(self.path)
            except OSError as exc:
                raise LiveError(_os_reason("cannot stat", exc)) from exc
            state = self.state
            if state is not None and (st.st_ino, st.st_dev) != (state.inode, state.dev):
                raise LiveError(_CHANGED)
            self._stat = st
        return self._stat

    def kind(self) -> str:
        """"file", "dir", "symlink" or "other"."""
        mode = self.lstat().st_mode
        if stat.S_ISREG(mode):
            return "file"
        if stat.S_ISDIR(mode):
            return "dir"
        if stat.S_ISLNK(mode):
            return "symlink"
        return "other"

    def readlink(self) -> bytes:
        """The symlink's target; raises LiveError when unreadable."""
        try:
            target = os.readlink(self.path)
        except OSError as exc:
            raise LiveError(_os_reason("cannot read link", exc)) from exc
        if self.state is not None and target != self.state.link:
            raise LiveError(_CHANGED)
        return target

    def digest(self, algorithm: str) -> str:
        """Hex digest of the file's content; raises LiveError when it cannot be read."""
        if algorithm not in self._digests:
            wanted = (self._FIRST_PASS if algorithm in self._FIRST_PASS
                      and not self._digests else (algorithm,))
            recorded = self.state.content if self.state is not None else None
            if recorded is not None and "blake3" not in self._digests:
                wanted = (*wanted, "blake3")
            try:
                digests = hasher.digest_path(self.path, dict.fromkeys(wanted))
            except hasher.FileChanged as exc:
                raise LiveError("file kept changing while it was read") from exc
            except OSError as exc:
                raise LiveError(_os_reason("cannot read", exc)) from exc
            if recorded is not None and digests["blake3"] != recorded:
                raise LiveError(_CHANGED)
            self._digests.update((name, value.hex()) for name, value in digests.items())
        return self._digests[algorithm]


#: Why a LiveFile with a `state` refuses what it finds at the path.
_CHANGED = "changed while it was being approved: not the state that was read"


def _os_reason(what: str, exc: OSError) -> str:
    return f"{what} {display(exc.filename) if isinstance(exc.filename, bytes) else 'file'}:" \
           f" {exc.strerror or exc}"


#: root -> [(alias prefix, target prefix)] found by the last canonicalizer(root).
_ALIASES: dict[bytes, list[tuple[bytes, bytes]]] = {}


def spellings(path: bytes, root: bytes = b"/") -> list[bytes]:
    """Every spelling of path through the top-level directory symlinks (path first):
    /usr/bin gives /usr/bin and /bin on a merged-/usr system."""
    found = [path]
    for alias, target in _ALIASES.get(root, []):
        if (path + b"/").startswith(target):
            found.append(alias.rstrip(b"/") + path[len(target) - 1:])
    return found


def canonicalizer(root: bytes = b"/") -> Canon:
    """A function that spells paths through the top-level directory symlinks.

    On merged-/usr systems /bin is a symlink to usr/bin, and packages list a file as
    /bin/ls while a scan of /usr/bin sees /usr/bin/ls: both are one file. Mapping both
    spellings to the target's keeps the lookups exact without a realpath per entry.
    Only paths strictly below the link are mapped: the link itself is its own entry.
    """
    aliases: list[tuple[bytes, bytes]] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        entries = []
    for entry in entries:
        try:
            if not entry.is_symlink() or not entry.is_dir():
                continue
            target = os.readlink(entry.path)
        except OSError:
            continue
        name = os.fsencode(entry.name)
        target = os.fsencode(target)
        resolved = os.path.normpath(target if target.startswith(b"/") else b"/" + target)
        if resolved != b"/" + name and resolved.startswith(b"/"):
            aliases.append((b"/" + name + b"/", resolved.rstrip(b"/") + b"/"))
    if not aliases:
        return lambda path: path
    _ALIASES[root] = list(aliases)
    prefixes = tuple(alias for alias, _ in aliases)
    mapping = dict(aliases)

    def canon(path: bytes) -> bytes:
        if path.startswith(prefixes):
            head = path[:path.index(b"/", 1) + 1]
            return mapping[head] + path[len(head):]
        return path

    return canon
