"""Walk the protected trees: (path, lstat) in baseline key order, nothing else.

The walk is depth-first with siblings in byte order, which is the order of the
database key (see paths.py), so a scan can merge it with the baseline as a stream.
Directories are opened with O_NOFOLLOW|O_DIRECTORY and everything below them is
reached relative to that descriptor: a directory swapped for a symlink mid-walk can
never lead us outside the tree, and depth is bounded by open descriptors, not by
PATH_MAX or Python's recursion limit. No hashing and no database here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .errors import ScanWarning
from .paths import is_within, to_key
from .policy import Policy, Rule

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

#: Deepest directory nesting we descend into below a walk root.
MAX_DEPTH = 4096


class WalkEntry(NamedTuple):
    """One entry to record. `dir_fd` is valid only until the walk is resumed."""

    path: bytes
    name: str
    st: os.stat_result
    dir_fd: int
    rule: Rule


@dataclass(frozen=True)
class SkippedTree(ScanWarning):
    """A directory whose contents could not be listed: nothing below it is known."""


@dataclass
class _Frame:
    path: bytes
    fd: int
    rule: Rule
    record_children: bool
    root_dev: int
    depth: int
    pending: list[tuple[bytes, str, int]]
    index: int = 0


def _waypoints(policy: Policy) -> frozenset[bytes]:
    """Every directory strictly above some rule root: walks must pass through them."""
    points: set[bytes] = set()
    for rule in policy.rules:
        probe = rule.path
        while probe != b"/":
            probe = probe.rsplit(b"/", 1)[0] or b"/"
            points.add(probe)
    return frozenset(points)


def walk_roots(policy: Policy, roots: Iterable[bytes] | None = None) -> list[bytes]:
    """Start points in key order, dropping any that lies inside an earlier one."""
    chosen: list[bytes] = []
    for root in sorted(roots if roots is not None else (r.path for r in policy.rules),
                       key=to_key):
        if not any(is_within(root, earlier) for earlier in chosen):
            chosen.append(root)
    return chosen


def walk(policy: Policy, roots: Iterable[bytes] | None = None, *,
         descend: bool = True, share: tuple[int, int] | None = None,
         dirs_only: bool = False) -> Iterator[WalkEntry | ScanWarning]:
    """Yield every recorded entry under the policy's rules (or below `roots`).

    Also yields ScanWarning for entries that could not be examined, and SkippedTree
    for directories that could not be listed. `descend=False` yields just the roots.
    `share=(part, parts)` yields only worker `part`'s share (see _descend); the
    shares of all parts together are exactly the whole walk. `dirs_only` yields only
    directories and never lstats anything else (the watcher's set-up).
    """
    waypoints = _waypoints(policy)
    starts = walk_roots(policy, roots) if descend else sorted(
        roots if roots is not None else (r.path for r in policy.rules), key=to_key)
    for root in starts:
        yield from _walk_root(policy, root, waypoints, descend, share, dirs_only)


def _walk_root(policy: Policy, root: bytes, waypoints: frozenset[bytes], descend: bool,
               share: tuple[int, int] | None, dirs_only: bool = False,
               ) -> Iterator[WalkEntry | ScanWarning]:
    part = share[0] if share else 0
    rule = policy.rule_for(root)
    if rule is None:
        return
    parent = root.rsplit(b"/", 1)[0] or b"/"
    name = os.fsdecode(root.rsplit(b"/", 1)[1]) if root != b"/" else "/"
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    except OSError as exc:
        if not part:
            yield ScanWarning(root, "lstat", exc.strerror or str(exc))
        return
    recorded = policy.covers(root)
    if recorded and not part and (stat.S_ISDIR(st.st_mode) or not dirs_only):
        try:
            parent_fd = os.open(parent, _DIR_FLAGS)
        except OSError:
            parent_fd = -1
        try:
            yield WalkEntry(root, name, st, parent_fd, rule)
        finally:
            if parent_fd >= 0:
                os.close(parent_fd)
    if not stat.S_ISDIR(st.st_mode) or not descend:
        return
    record_children = recorded and (root == rule.path or rule.recursive)
    if not record_children and root not in waypoints:
        return
    try:
        root_dev = st.st_dev if root == rule.path else os.lstat(rule.path).st_dev
    except OSError:
        root_dev = st.st_dev
    frame = _open_frame(root, None, rule, record_children, root_dev, 0)
    if isinstance(frame, ScanWarning):
        if not part:
            yield frame
        return
    yield from _descend(policy, frame, waypoints, share, dirs_only)


def _open_frame(path: bytes, parent_fd: int | None, rule: Rule, record_children: bool,
                root_dev: int, depth: int) -> _Frame | ScanWarning:
    """Open and list a directory; a failure becomes a SkippedTree warning."""
    name: bytes | str = path if parent_fd is None else os.fsdecode(path.rsplit(b"/", 1)[1])
    fd = -1
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        with os.scandir(fd) as listing:
            names = [(os.fsencode(e.name), e.name, _kind(e)) for e in listing]
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        consequence = "subtree skipped"
        return SkippedTree(path, "open directory" if fd < 0 else "list directory",
                           exc.strerror or str(exc), consequence)
    names.sort()
    return _Frame(path, fd, rule, record_children, root_dev, depth, names)


_DIR, _FILE, _OTHER = 0, 1, 2


def _kind(entry: os.DirEntry[str]) -> int:
    """Directory, regular file or other, from d_type (lstat only where it is unknown)."""
    if entry.is_dir(follow_symlinks=False):
        return _DIR
    return _FILE if entry.is_file(follow_symlinks=False) else _OTHER


def _descend(policy: Policy, top: _Frame, waypoints: frozenset[bytes],
             share: tuple[int, int] | None = None, dirs_only: bool = False,
             ) -> Iterator[WalkEntry | ScanWarning]:
    stack = [top]
    part, parts = share or (0, 1)
    rule_at = policy.rule_at
    try:
        while stack:
            frame = stack[-1]
            if frame.index >= len(frame.pending):
                os.close(frame.fd)
                stack.pop()
                continue
            raw, name, kind = frame.pending[frame.index]
            frame.index += 1
            if dirs_only and kind != _DIR:
                continue
            if parts > 1:
                # Share the walk between workers without an lstat of the others'
                # files: regular files by a name hash (the same in every forked
                # worker), everything else to worker 0; all descend directories.
                if kind == _FILE:
                    if hash(raw) % parts != part:
                        continue
                elif kind == _OTHER and part:
                    continue
            path = frame.path + b"/" + raw if frame.path != b"/" else b"/" + raw
            child_rule = rule_at(path)
            if child_rule is not None:
                rule, recorded = child_rule, True
            else:
                rule = frame.rule
                recorded = frame.record_children and not rule.excludes.match(path, raw)
            if not recorded and path not in waypoints:
                continue
            try:
                st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # vanished between listing and lstat: simply not there
            except OSError as exc:
                if recorded:
                    yield ScanWarning(path, "lstat", exc.strerror or str(exc))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if recorded and (not part or not is_dir):
                yield WalkEntry(path, name, st, frame.fd, rule)
            if not is_dir:
                continue
            if child_rule is not None:
                record_children, root_dev = True, st.st_dev
            else:
                root_dev = frame.root_dev
                record_children = (recorded and rule.recursive
                                   and not (rule.one_filesystem and st.st_dev != root_dev))
            if not record_children and path not in waypoints:
                continue
            if frame.depth + 1 > MAX_DEPTH:
                if not part:
                    yield SkippedTree(path, "descend", f"deeper than {MAX_DEPTH} levels",
                                      "subtree skipped")
                continue
            child = _open_frame(path, frame.fd, rule, record_children, root_dev,
                                frame.depth + 1)
            if isinstance(child, ScanWarning):
                if (recorded or record_children) and not part:
                    yield child
                continue
            stack.append(child)
    finally:
        for frame in stack:
            os.close(frame.fd)
