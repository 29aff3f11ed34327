"""Walk the protected trees: (path, lstat) in baseline key order, nothing else.

The walk is depth-first with siblings in byte order, which is the order of the
database key (see paths.py), so a scan can merge it with the baseline as a stream.
Directories are opened with O_NOFOLLOW|O_DIRECTORY and everything below them is
reached relative to that descriptor: a directory swapped for a symlink mid-walk can
never lead us outside the tree, and depth is bounded by open descriptors, not by
PATH_MAX or Python's recursion limit. No hashing and no database here.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, overload

from integrity.errors import ScanWarning
from integrity.paths import is_within, to_key
from integrity.policy import Policy, Rule
from integrity.policy.rules import Excludes
from integrity.policy.wildcards import Waypoints
from integrity.realtime.mounts import read_mounts
from integrity.record import NONE, new_tuple

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: What os.fsencode encodes names with (scandir of a descriptor yields str names).
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
#: The way down to a named path: O_PATH needs only search permission, as a path
#: lookup does, and serves as the dir_fd of every *at call we make.
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Deepest directory nesting we descend into below a walk root.
MAX_DEPTH = 4096


class WalkEntry(NamedTuple):
    """One entry to record. `dir_fd` is valid only until the walk is resumed."""

    path: bytes
    name: str
    st: os.stat_result
    dir_fd: int
    rule: Rule


class Passage(NamedTuple):
    """A directory the walk lists without recording it: a waypoint to rule roots
    below it, or an excluded directory searched for a rule's include globs. Yielded
    only by `walk(dirs_only=True)`: the watcher watches these too."""

    path: bytes
    st: os.stat_result


#: The rule of a frame that only passes through waypoints: it records nothing, so no
#: rule applies there (record_children is False and it is never yielded).
_PASSING = Rule(b"/", NONE)


@dataclass(frozen=True)
class SkippedTree(ScanWarning):
    """A directory whose contents could not be listed: nothing below it is known."""


def mount_points() -> dict[bytes, frozenset[bytes]]:
    """Where filesystems are mounted now: directory -> names of the entries in it that
    are mount points (read once per walk). A bind mount of a file from the same
    filesystem keeps its device: only the mount table tells."""
    table: dict[bytes, set[bytes]] = {}
    for mount in read_mounts():
        if mount.mount_point != b"/":
            parent, _, name = mount.mount_point.rpartition(b"/")
            table.setdefault(parent or b"/", set()).add(name)
    return {parent: frozenset(names) for parent, names in table.items()}


def mount_warning(path: bytes) -> ScanWarning:
    """A filesystem mounted on a protected file: what is read is the mount's, and a
    mount makes no inotify event. Reported at every scan while it is there."""
    return ScanWarning(path, "mount check", "a filesystem is mounted on it",
                       "checked as the mount shows it")


#: A directory's rule and what its entries are judged by, derived once per directory:
#: (rule, prefix: the path and a slash, searching, record_all, excludes or None when
#: the rule excludes nothing, includes, any includes, the depth of the entries'
#: subdirectories, above_rules). Rules and waypoints lie only below waypoints
#: (ancestors of rule roots): in any directory not above_rules no entry is either, and
#: both look-ups are skipped. A plain tuple: a NamedTuple's construction per directory
#: cost 1% of the watcher's set-up.
_Scope = tuple[Rule, bytes, bool, bool, "Excludes | None", Excludes, bool, int, bool]


@dataclass(slots=True)
class _Frame:
    path: bytes
    fd: int
    rule: Rule
    record_children: bool
    root_dev: int
    depth: int
    #: (name as bytes, name, a directory in our listing, in our share of the walk)
    pending: list[tuple[bytes, str, bool, bool]]
    index: int = 0
    #: Below an excluded directory of a rule with include globs: only names matching
    #: them are recorded, and every directory is searched.
    searching: bool = False
    #: What _descend derives from the rest for its per-entry loop, kept for when the
    #: walk comes back from a subdirectory.
    scope: _Scope | None = None
    #: Names of the directory's entries that are mount points (None: none is).
    mounts: frozenset[bytes] | None = None


def walk_roots(policy: Policy, roots: Iterable[bytes] | None = None) -> list[bytes]:
    """Start points in key order, dropping any that lies inside an earlier one.

    By default every rule's path, or for a wildcard rule its literal base (`/home` for
    `/home/*/.ssh`), from which the walk passes through the waypoints to the matches
    as they are now: wildcards are expanded at every scan.
    """
    chosen: list[bytes] = []
    for root in sorted(roots if roots is not None else policy.bases, key=to_key):
        if not any(is_within(root, earlier) for earlier in chosen):
            chosen.append(root)
    return chosen


def matches(policy: Policy, rule: Rule) -> list[bytes]:
    """The paths a wildcard rule matches now (its instances' roots), in key order;
    a literal rule's path when it exists. Found by listing the waypoint directories
    from the rule's base, never following a symlink below it."""
    if not rule.wildcard:
        try:
            os.lstat(rule.path)
        except OSError:
            return []
        return [rule.path]
    found: list[bytes] = []
    stack = [rule.base]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                children = sorted((os.fsencode(e.name), e.is_dir(follow_symlinks=False))
                                  for e in listing)
        except OSError:
            continue
        below: list[bytes] = []
        for name, is_dir in children:
            path = directory + b"/" + name if directory != b"/" else b"/" + name
            at = policy.rule_at(path)
            if at is not None and at.pattern == rule.path:
                found.append(path)
            elif is_dir and path in policy.waypoints:
                below.append(path)
        stack.extend(reversed(below))
    return sorted(found, key=to_key)


def rule_roots(policy: Policy) -> list[bytes]:
    """Every rule root as it is now: literal rule paths (present or not) and the
    current matches of wildcard rules (for what wants paths, not patterns)."""
    roots: list[bytes] = []
    for rule in policy.rules:
        roots += matches(policy, rule) if rule.wildcard else [rule.path]
    return roots


@overload
def walk(policy: Policy, roots: Iterable[bytes] | None = None, *,
         descend: bool = True, share: tuple[int, int] | None = None,
         dirs_only: Literal[False] = False) -> Iterator[WalkEntry | ScanWarning]: ...


@overload
def walk(policy: Policy, roots: Iterable[bytes] | None = None, *,
         descend: bool = True, share: tuple[int, int] | None = None,
         dirs_only: Literal[True]) -> Iterator[WalkEntry | Passage | ScanWarning]: ...


def walk(policy: Policy, roots: Iterable[bytes] | None = None, *,
         descend: bool = True, share: tuple[int, int] | None = None,
         dirs_only: bool = False) -> Iterator[WalkEntry | Passage | ScanWarning]:
    """Yield every recorded entry under the policy's rules (or below `roots`).

    Also yields ScanWarning for entries that could not be examined, and SkippedTree
    for directories that could not be listed. `descend=False` yields just the roots.
    `share=(part, parts)` yields only worker `part`'s share (see _descend); the
    shares of all parts together are exactly the whole walk. `dirs_only` yields only
    directories, every one the walk lists (a Passage for those it does not record),
    and never lstats anything else (the watcher's set-up).
    """
    waypoints = policy.waypoints
    starts = walk_roots(policy, roots) if descend else sorted(
        roots if roots is not None else policy.bases, key=to_key)
    table = mount_points()
    for root in starts:
        yield from _walk_root(policy, root, waypoints, descend, share or (0, 1),
                              table, dirs_only)


def open_parent(path: bytes, top: bytes) -> tuple[int, str]:
    """An O_PATH fd of path's directory, and path's last name, for a path at or
    below `top` (a rule's root).

    `top` is opened by its absolute path, as the walk opens it; each directory below
    it relative to the one above with O_NOFOLLOW|O_DIRECTORY, so a directory swapped
    for a symlink fails the open (ENOTDIR: not in the tree) instead of leading
    outside it, and no path given to the kernel is longer than one name (PATH_MAX
    does not apply). For `top` itself, its parent is opened by path. The caller
    closes the fd. Raises OSError.
    """
    if path == b"/":
        return os.open(b"/", _PATH_FLAGS), "/"
    parent, _, name = path.rpartition(b"/")
    if path == top or not is_within(path, top):
        # Above the rule's root the operator's own symlinks are followed, as the
        # kernel follows them in every absolute path.
        return os.open(parent or b"/", _PATH_FLAGS & ~os.O_NOFOLLOW), os.fsdecode(name)
    fd = os.open(top, _PATH_FLAGS)
    try:
        for part in parent[len(top):].split(b"/"):
            if part:
                child = os.open(part, _PATH_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, os.fsdecode(name)


#: A component of the way down is missing, a file, or a symlink: the path is not
#: (or no longer) in the tree, exactly as a full walk would not find it.
NOT_IN_TREE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def lstat_in_tree(path: bytes, top: bytes) -> os.stat_result:
    """lstat of a path reached from `top` without following links (see open_parent)."""
    fd, name = open_parent(path, top)
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def _walk_root(policy: Policy, root: bytes, waypoints: Waypoints, descend: bool,
               share: tuple[int, int], table: dict[bytes, frozenset[bytes]],
               dirs_only: bool = False) -> Iterator[WalkEntry | Passage | ScanWarning]:
    part = share[0]
    found = policy.rule_for(root)
    if found is None and root not in waypoints:
        return
    # A root below no rule is a waypoint (`/home` for `/home/*/.ssh`): listed, so the
    # rule roots below it are met, never recorded itself.
    rule = found if found is not None else _PASSING
    top = rule.path if found is not None else root
    # Reached from the rule's root one directory at a time: a root named below it
    # (approve, targeted verify, the watcher's hints) may be deeper than PATH_MAX,
    # and a parent swapped for a symlink must not lead the walk out of the tree.
    try:
        parent_fd, name = open_parent(root, top)
    except OSError as exc:
        if exc.errno not in NOT_IN_TREE and not part:
            yield ScanWarning(root, "open directory", exc.strerror or str(exc))
        return
    try:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            if not part:
                yield ScanWarning(root, "lstat", exc.strerror or str(exc))
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        recorded = found is not None and policy.covers(root)
        if recorded and not part and (is_dir or not dirs_only):
            yield WalkEntry(root, name, st, parent_fd, rule)
            if not is_dir and os.path.basename(root) in table.get(
                    os.path.dirname(root), ()):
                yield mount_warning(root)
        if not is_dir or not descend:
            return
        # Inside an excluded directory of a rule with include globs: searched.
        searching = (found is not None and rule.searches and root != rule.path
                     and policy.excluded(root, rule))
        record_children = recorded and not searching and (root == rule.path
                                                          or rule.recursive)
        if not record_children and not searching and root not in waypoints:
            return
        if dirs_only and not recorded and not part:
            yield Passage(root, st)
        try:
            root_dev = st.st_dev if root == top else os.lstat(rule.path).st_dev
        except OSError:
            root_dev = st.st_dev
        frame = _open_frame(root, parent_fd, rule, record_children, root_dev, 0,
                            searching, dirs_only, share=share, table=table)
    finally:
        os.close(parent_fd)
    if isinstance(frame, ScanWarning):
        if not part:
            yield frame
        return
    yield from _descend(policy, frame, waypoints, share, table, dirs_only)


def _open_frame(path: bytes, parent_fd: int, rule: Rule, record_children: bool,
                root_dev: int, depth: int, searching: bool = False,
                dirs_only: bool = False, name: str | None = None,
                share: tuple[int, int] = (0, 1),
                table: dict[bytes, frozenset[bytes]] | None = None
                ) -> _Frame | ScanWarning:
    """Open and list a directory (`name`: its name in parent_fd, when the caller has
    it from the listing); a failure becomes a SkippedTree warning. With a `share`
    of the walk, other workers' non-directories are left out (see _descend)."""
    part, parts = share
    if name is None:
        name = os.fsdecode(path.rsplit(b"/", 1)[1]) if path != b"/" else "/"
    fd = -1
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        with os.scandir(fd) as listing:
            # d_type says which entries are directories (an lstat only where the
            # filesystem does not fill it in); everything else is lstat-ed later.
            # Names are encoded as os.fsencode would, without its call per name; a
            # directories-only walk (the watcher's) keeps only directories.
            # `|`, not `or`: both walrus targets are set for every entry.
            names = [(e.name.encode(_FS_ENCODING, _FS_ERRORS), e.name, is_dir, mine)
                     for e in listing
                     if (is_dir := e.is_dir(follow_symlinks=False))
                     | ((mine := parts == 1 or hash(e.name) % parts == part)
                        and not dirs_only)]
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        consequence = "subtree skipped"
        return SkippedTree(path, "open directory" if fd < 0 else "list directory",
                           exc.strerror or str(exc), consequence)
    names.sort()
    return _Frame(path, fd, rule, record_children, root_dev, depth, names,
                  searching=searching, mounts=table.get(path) if table else None)


def _descend(policy: Policy, top: _Frame, waypoints: Waypoints,
             share: tuple[int, int], table: dict[bytes, frozenset[bytes]],
             dirs_only: bool = False) -> Iterator[WalkEntry | Passage | ScanWarning]:
    stack = [top]
    rule_at = policy.rule_at
    lstat, is_directory = os.stat, stat.S_ISDIR
    try:
        while stack:
            frame = stack[-1]
            pending, fd, i, mounts = frame.pending, frame.fd, frame.index, frame.mounts
            count = len(pending)
            if i >= count:
                os.close(fd)
                stack.pop()
                continue
            # The directory's state, in locals while its entries are walked (the
            # per-entry loop is the walk's hot path).
            scope = frame.scope
            if scope is None:
                rule = frame.rule
                scope = frame.scope = (
                    rule, frame.path + b"/" if frame.path != b"/" else b"/",
                    frame.searching, frame.record_children,
                    rule.excludes if rule.excludes.patterns else None, rule.includes,
                    bool(rule.includes.patterns), frame.depth + 1,
                    frame.path in waypoints)
            (frame_rule, prefix, frame_searching, record_all, excludes, includes,
             any_includes, depth, above_rules) = scope
            below: _Frame | None = None
            while i < count:
                raw, name, listed_dir, mine = pending[i]
                i += 1
                # Share the walk between workers by a name hash alone (the same in
                # every forked worker): each worker lists the directories itself, so
                # a type read from its own listing could differ from another's for
                # an entry that changes type meanwhile, and a share by type could
                # miss it. All workers descend every directory; only its owner
                # reports an entry, its warnings and its skipped subtree. Others'
                # non-directories are not even listed (_open_frame), which says
                # whose each entry is.
                path = prefix + raw
                child_rule = rule_at(path) if above_rules else None
                excluded = False
                if child_rule is not None:
                    rule, recorded = child_rule, True
                else:
                    rule = frame_rule
                    if frame_searching:
                        excluded = True
                        recorded = includes.match(path, raw)
                    elif record_all:
                        excluded = excludes is not None and excludes.match(path, raw)
                        # An include glob wins over an exclude.
                        recorded = not excluded or (any_includes
                                                    and includes.match(path, raw))
                    else:
                        recorded = False
                search = excluded and rule.searches
                if not recorded and not (search and listed_dir) and not (
                        above_rules and path in waypoints):
                    continue
                try:
                    st = lstat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished between listing and lstat: simply not there
                except OSError as exc:
                    if recorded and mine:
                        yield ScanWarning(path, "lstat", exc.strerror or str(exc))
                    continue
                if recorded and mine:
                    yield new_tuple(WalkEntry, (path, name, st, fd, rule))
                    # After its entry: what the mount shows is still compared.
                    if mounts is not None and raw in mounts \
                            and not is_directory(st.st_mode):
                        yield mount_warning(path)
                if not is_directory(st.st_mode):
                    continue
                searching = False
                if child_rule is not None:
                    record_children, root_dev = True, st.st_dev
                else:
                    root_dev = frame.root_dev
                    same_fs = not (rule.one_filesystem and st.st_dev != root_dev)
                    record_children = (recorded and not excluded and rule.recursive
                                       and same_fs)
                    searching = search and same_fs
                if not record_children and not searching and not (
                        above_rules and path in waypoints):
                    continue
                if depth > MAX_DEPTH:
                    if mine:
                        yield SkippedTree(path, "descend",
                                          f"deeper than {MAX_DEPTH} levels",
                                          "subtree skipped")
                    continue
                if dirs_only and not recorded and mine:
                    yield Passage(path, st)
                child = _open_frame(path, fd, rule, record_children, root_dev, depth,
                                    searching, dirs_only, name, share, table)
                if isinstance(child, ScanWarning):
                    if (recorded or record_children) and mine:
                        yield child
                    continue
                below = child
                break
            frame.index = i
            if below is not None:
                stack.append(below)  # its parent's walk resumes at `index` after it
            else:
                os.close(fd)
                stack.pop()
    finally:
        for frame in stack:
            os.close(frame.fd)
