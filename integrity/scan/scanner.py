"""Walk -> hash -> compare over the policy's trees, returning results (no database).

`init` and a full `verify` walk and hash in forked workers (workers.py) while the
calling process reads the baseline and compares; `verify --fast` must consult the
baseline before deciding what to hash, so it runs the records pipeline in-process.
The baseline arrives as an iterator of (key, record) in key order, from whoever holds
it: this package never opens a database.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from integrity.errors import ScanWarning, UsageError, Vanished
from integrity.paths import display, to_key
from integrity.policy import Policy, Rule
from integrity.record import FILE, LSTAT_FIELDS, Attr, FileRecord
from integrity.record import new_tuple as _new
from integrity.scan.compare import ADDED, MODIFIED, REMOVED, Change, compare
from integrity.scan.priority import limit_reads, limited
from integrity.scan.records import READAHEAD, Hashed, Progress, hash_tree, materialize
from integrity.scan.walker import SkippedTree, WalkEntry, walk, walk_roots
from integrity.scan.workers import Keyed, ScanWorkers, worker_count

log = logging.getLogger(__name__)

#: A baseline as the scan reads it: (key, record) in key order.
Baseline = Iterator[tuple[bytes, FileRecord]]
#: Told of each baseline entry once compared: (path, whether it changed).
Judged = Callable[[bytes, bool], None]
#: What a scan merges with the baseline: walk entries (--fast) or hashed ones.
LiveItem = TypeVar("LiveItem", WalkEntry, Hashed)


@dataclass
class ScanResult:
    """What a scan found: changes (with the rule that judged each), per-file
    warnings, and how many entries were examined."""

    scanned: int = 0
    changes: list[Change] = field(default_factory=list)
    warnings: list[ScanWarning] = field(default_factory=list)
    rules: dict[bytes, Rule] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for c in self.changes if c.kind == kind)

    @property
    def exit_code(self) -> int:
        """SPEC: 0 no changes, 1 changes or unreadable entries."""
        return 1 if self.changes or self.warnings else 0

    def counts(self) -> dict[str, int]:
        """Changes by kind, for a run's record."""
        return {"added": self.count(ADDED), "removed": self.count(REMOVED),
                "modified": self.count(MODIFIED)}


class Outcome(NamedTuple):
    """One path's live record (or the problem met reading it), under its rule,
    beside its baseline record."""

    new: FileRecord | None
    problem: ScanWarning | None
    rule: Rule | None
    old: FileRecord | None


def worker_processes(parallel: bool | int | None) -> int:
    """How many hashing workers to fork: 0 means hash in this process."""
    if parallel is None:
        return worker_count() if (os.cpu_count() or 1) > 1 else 0
    if isinstance(parallel, bool):
        return worker_count() if parallel else 0
    return int(parallel)


def normalize_paths(policy: Policy, paths: Sequence[str | bytes], *,
                    waypoints: bool = False) -> list[bytes]:
    """Absolute, normalized byte paths, each covered by a rule, or with `waypoints`
    also a directory above rule roots (UsageError if not). Approvals never take a
    waypoint: `approve /` must not accept everything at once."""
    result = []
    for raw in paths:
        path = os.path.normpath(os.path.abspath(os.fsencode(raw)))
        if not (policy.in_scope(path) if waypoints else policy.rule_for(path)):
            raise UsageError(f"{display(path)}: not covered by any rule of {policy.source}")
        result.append(path)
    return result


class TreeScan:
    """One scan of the policy's trees (or of `roots` below them).

    Workers are forked when the scan is made, before the caller opens its database
    or starts a thread, so their hashing overlaps with the caller's set-up. Use as a
    context manager: the workers are reaped on exit, whatever happened.
    `max_read_rate` (bytes/s) caps the scan's reads, shared among its workers.
    """

    def __init__(self, policy: Policy, roots: Iterable[bytes] | None = None, *,
                 fast: bool = False, parallel: bool | int | None = None,
                 max_read_rate: int | None = None) -> None:
        self.policy = policy
        #: The paths asked for (empty: the whole policy).
        self.wanted = list(roots) if roots is not None else []
        self.roots = walk_roots(policy, roots)
        self.fast = fast
        self.rate = max_read_rate
        count = 0 if fast else worker_processes(parallel)
        setup = None
        if max_read_rate and count:
            def setup() -> None:
                limit_reads(max_read_rate / count)
        self._workers = ScanWorkers(policy, self.roots, count,
                                    setup=setup) if count else None

    def __enter__(self) -> TreeScan:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop and reap the workers, if any."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def live(self) -> Iterator[Keyed]:
        """Every live entry, hashed, with its key, in key order (what a baseline is
        built from)."""
        if self._workers is not None:
            return iter(self._workers)
        items = keyed(hash_in_process(self.policy, self.roots))
        return limited(items, self.rate) if self.rate else items

    def compare(self, base: Baseline, progress: Progress | None = None,
                judged: Judged | None = None) -> ScanResult:
        """Compare the live trees with `base` (the baseline entries under the roots);
        `judged` hears of each baseline entry compared, in key order (see collect)."""
        if not self.fast:
            outcomes = _full_outcomes(merge(self.live(), base, self.policy), progress)
            return collect(outcomes, self.policy, judged)
        # --fast hashes in this thread what changed: the only reads it makes.
        limit_reads(self.rate)
        try:
            as_recorded = _AsRecorded(progress, judged)
            result = collect(_fast_outcomes(self.policy, self.roots, base, progress,
                                            as_recorded), self.policy, judged)
            result.scanned += as_recorded.count
            return result
        finally:
            limit_reads(None)


def check_entries(policy: Policy, paths: Sequence[bytes], base: Baseline) -> ScanResult:
    """Targeted rehash: compare just these entries (not their subtrees) with `base`."""
    live = keyed(hash_in_process(policy, list(paths), descend=False))
    return collect(_full_outcomes(merge(live, base, policy), None), policy)


def read_state(policy: Policy, path: bytes, subtree: bool
               ) -> tuple[list[FileRecord], list[ScanWarning]]:
    """The live records of one path (with its subtree), fully hashed, and the problems
    that kept any entry from being read: what an approval writes."""
    records: list[FileRecord] = []
    problems: list[ScanWarning] = []
    for item in hash_in_process(policy, [path], descend=subtree):
        if isinstance(item, ScanWarning):
            problems.append(item)
        elif item.problem is not None:
            problems.append(item.problem)
        elif item.record is not None:
            records.append(item.record)
    return records, problems


def hash_in_process(policy: Policy, roots: list[bytes] | None, descend: bool = True
                    ) -> Iterator[Hashed | ScanWarning]:
    """The workers' stream, produced in this process (one core, or by request)."""
    return hash_tree(policy, roots, descend=descend)


def keyed(items: Iterable[LiveItem | ScanWarning]
          ) -> Iterator[tuple[bytes, LiveItem | ScanWarning]]:
    """Each item with its database key (the workers send theirs ready-made)."""
    return ((to_key(item.path), item) for item in items)


def collect(outcomes: Iterator[Outcome | ScanWarning], policy: Policy,
            judged: Judged | None = None) -> ScanResult:
    """Compare each outcome under its rule; gather changes and warnings.

    `judged(path, changed)` is called for each baseline entry compared, in key order,
    so that what is held per entry until then (kept-text digests) can go.
    """
    result = ScanResult()
    for item in outcomes:
        if isinstance(item, ScanWarning):
            result.warnings.append(item)
            continue
        new, problem, rule, old = item
        if problem is not None:
            result.warnings.append(problem)
        if new is not None or problem is not None:
            result.scanned += 1
        if rule is None and old is not None:
            rule = policy.rule_for(old.path)
        if rule is None:
            continue
        if problem is None and new == old:
            # Every field as recorded (most entries of a verify): no checked
            # attribute can differ, whatever the rule checks.
            change = None
        else:
            attrs = rule.check
            if problem is not None and new is not None and new.content is None:
                attrs &= ~Attr.CONTENT
            if problem is not None and new is None and (
                    old is None or not isinstance(problem, Vanished)):
                # Not in the baseline and gone before it could be read: the warning
                # is all there is to say. Otherwise unreadable: an error, not a
                # removal.
                continue
            change = compare(old, new, attrs)
        if change is not None:
            result.changes.append(change)
            result.rules[change.path] = rule.at(change.path)  # its severity override
        if judged is not None and old is not None:
            judged(old.path, change is not None)
    return result


def _full_outcomes(pairs: Iterator[tuple[Hashed | None, FileRecord | None] | ScanWarning],
                   progress: Progress | None) -> Iterator[Outcome | ScanWarning]:
    """Merged pairs of a full verify: every live file was hashed by the worker."""
    for item in pairs:
        if isinstance(item, ScanWarning):
            yield item
            continue
        live, old = item
        if live is None:
            yield _new(Outcome, (None, None, None, old))
            continue
        if progress is not None and live.record is not None:
            progress.add(live.record.size)
        yield _new(Outcome, (live.record, live.problem, live.rule, old))


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


class _AsRecorded:
    """Counts the files --fast finds as recorded, which it passes over (see
    _drop_as_recorded), and tells `progress` and `judged` of each as collect would."""

    def __init__(self, progress: Progress | None, judged: Judged | None) -> None:
        self.count = 0
        self.progress = progress
        self.judged = judged


def _drop_as_recorded(pairs: Iterator[tuple[WalkEntry | None, FileRecord | None]
                                      | ScanWarning], seen: _AsRecorded
                      ) -> Iterator[tuple[WalkEntry | None, FileRecord | None] | ScanWarning]:
    """--fast's pairs, less the regular files whose every field is as recorded.

    Such a file is not hashed (borg's rule: size, mtime, ctime and inode as
    recorded), its xattr digest is the baseline's (ctime and inode as recorded), and
    its other fields are compared here: the record materialize would build for it
    equals the baseline's, so no rule can find a change in it. Most entries of a
    --fast verify are such files; building, passing on and comparing a record for
    each cost 2.9 µs of the main process's 9 µs per entry at a million files.
    """
    is_file, regular, lstat_fields = stat.S_ISREG, FILE, LSTAT_FIELDS
    progress, judged = seen.progress, seen.judged
    count = 0
    try:
        for item in pairs:
            if type(item) is tuple:
                entry, old = item
                if entry is not None and old is not None:
                    st = entry.st
                    mode = st.st_mode
                    if (is_file(mode) and old.type == regular and old.content is not None
                            and old[lstat_fields] == (  # type: ignore[comparison-overlap]
                                st.st_size, mode & 0o7777, st.st_uid, st.st_gid, st.st_ino,
                                st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)
                            and st.st_dev == old.dev and (rule := entry.rule).hashes
                            and (rule.wants_xattrs or old.xattrs is None)):
                        count += 1
                        if progress is not None:
                            progress.add(st.st_size)
                        if judged is not None:
                            judged(old.path, False)
                        continue
            yield item
    finally:
        seen.count += count


def _fast_outcomes(policy: Policy, roots: list[bytes], base: Baseline,
                   progress: Progress | None, as_recorded: _AsRecorded
                   ) -> Iterator[Outcome | ScanWarning]:
    """--fast: merge first, then hash only files whose stat moved (borg's rule)."""
    verbose = log.isEnabledFor(logging.DEBUG)

    def want_hash(entry: WalkEntry, old: FileRecord | None) -> bool:
        if not entry.rule.hashes:
            return False
        if old is None or old.type != "file":
            return True
        st = entry.st
        if (st.st_size == old.size and st.st_mtime_ns == old.mtime
                and st.st_ctime_ns == old.ctime and st.st_ino == old.inode
                and old.content is not None):
            return False  # _fast_reason's None, without its call for every file
        reason = _fast_reason(st, old)
        if reason and verbose:
            log.debug("rehashing %s: %s", display(entry.path), reason)
        return reason is not None

    pairs = _drop_as_recorded(merge(keyed(walk(policy, roots)), base, policy), as_recorded)
    for out in materialize(pairs, want_hash, progress, READAHEAD):
        if isinstance(out, ScanWarning):
            yield out
            continue
        entry = out.entry
        yield _new(Outcome, (out.record, out.problem,
                             entry.rule if entry is not None else None, out.old))


def merge(live: Iterator[tuple[bytes, LiveItem | ScanWarning]], base: Baseline,
          policy: Policy
          ) -> Iterator[tuple[LiveItem | None, FileRecord | None] | ScanWarning]:
    """Pair live entries (with their keys) with baseline records by key: one
    streaming pass.

    Baseline entries the policy no longer covers are dropped, not called removed;
    entries below a directory that could not be listed are unknown, not removed.
    """
    old_key: bytes | None = None
    old: FileRecord | None = None

    def advance() -> None:
        nonlocal old, old_key
        old_key, old = next(base, (None, None))

    advance()
    for key, item in live:
        while old is not None and old_key is not None and old_key < key:
            if policy.covers(old.path):
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

