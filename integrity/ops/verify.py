"""One scan: walker -> hasher -> compare -> store, full or limited to some paths.

`init` and full `verify` walk and hash in a forked worker (worker.py) while this
process reads the baseline, compares and writes; `verify --fast` must consult the
baseline before deciding what to hash, so it runs the pipeline in-process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from integrity.scan.compare import ADDED, MODIFIED, REMOVED, Change, compare
from integrity.errors import BaselineError, ScanWarning, UsageError
from integrity.paths import display, key_range, to_key
from integrity.scan.records import READAHEAD, Progress, materialize
from integrity.policy import Policy, Rule
from integrity.record import Attr, FileRecord
from integrity.trust import MerkleRoot, leaf, sign
from integrity.scan.walker import SkippedTree, WalkEntry, walk, walk_roots
from integrity.scan.workers import Hashed, ScanWorkers, worker_count

if TYPE_CHECKING:  # the store (and SQLAlchemy) is imported only once workers run
    from integrity.store.events import EventContext
    from integrity.store.engine import BaselineInfo, Store

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    """What a scan found: changes, per-file warnings and counts."""

    scanned: int = 0
    changes: list[Change] = field(default_factory=list)
    warnings: list[ScanWarning] = field(default_factory=list)
    rules: dict[bytes, Rule] = field(default_factory=dict)
    baseline: BaselineInfo | None = None
    run_id: int | None = None
    #: Events this scan recorded (history.Recorded), once recorded.
    recorded: Any = None

    def count(self, kind: str) -> int:
        return sum(1 for c in self.changes if c.kind == kind)


# -- init ----------------------------------------------------------------------

@dataclass
class InitResult:
    """A freshly written baseline and the warnings met on the way."""

    baseline: BaselineInfo
    warnings: list[ScanWarning]


StoreOpener = Callable[[], "Store"]


def _workers(parallel: bool | int | None) -> int:
    """How many hashing workers to fork: 0 means hash in this process."""
    if parallel is None:
        return worker_count() if (os.cpu_count() or 1) > 1 else 0
    return int(parallel) if not isinstance(parallel, bool) else (worker_count() if parallel else 0)


def build_baseline(open_store: StoreOpener, policy: Policy, *, force: bool = False,
                   actor: str | None = None, progress: Progress | None = None,
                   parallel: bool | int | None = None,
                   sign_key: str | None = None) -> InitResult:
    """Walk and hash every rule's tree and make it the baseline, atomically.

    `open_store` is called after the scanning worker has started, so opening the
    database (and importing SQLAlchemy) overlaps with the first files' hashing.
    """
    warnings: list[ScanWarning] = []
    workers = ScanWorkers(policy, None, _workers(parallel)) if _workers(parallel) else None
    live: Iterator[Hashed | ScanWarning] = (
        iter(workers) if workers is not None else _in_process(policy, None))
    try:
        store = open_store()
        owner = package_owner(policy)
        merkle = MerkleRoot()

        def seal() -> tuple[str, bytes | None]:
            root = merkle.hexdigest()
            return root, sign(root, sign_key) if sign_key else None

        def records() -> Iterator[FileRecord]:
            for item in live:
                if isinstance(item, ScanWarning):
                    warnings.append(item)
                    continue
                if item.problem is not None:
                    warnings.append(item.problem)
                if item.record is not None:
                    if progress is not None:
                        _tick(progress, item.record)
                    merkle.add(leaf(to_key(item.path), item.record))
                    yield item.record

        info = store.write_baseline(records(), policy_source=policy.source,
                                    policy_digest=policy.digest, actor=actor, force=force,
                                    owner=owner, seal=seal)
    finally:
        if workers is not None:
            workers.close()
    return InitResult(info, warnings)


def package_owner(policy: Policy) -> Callable[[bytes], str | None] | None:
    """Who installed a path (dpkg/rpm), recorded with each entry; None when no
    package owns anything under the policy's rules (or there is no package manager)."""
    from integrity.packages import PackageManagers

    managers = PackageManagers()
    owners = managers.owner_map([rule.path for rule in policy.rules])
    if not owners:
        return None
    canonical = managers.canonical
    return lambda path: owners.get(canonical(path))


def _tick(progress: Progress, rec: FileRecord) -> None:
    progress.files += 1
    progress.bytes += rec.size
    if progress.tick is not None and progress.files % progress.every == 0:
        progress.tick(progress)


def _in_process(policy: Policy, roots: list[bytes] | None, descend: bool = True
                ) -> Iterator[Hashed | ScanWarning]:
    """The worker's stream, produced in this process (one core, or by request)."""
    items = ((e, None) if isinstance(e, WalkEntry) else e
             for e in walk(policy, roots, descend=descend))
    for out in materialize(items, lambda entry, _old: entry.rule.hashes, None, READAHEAD):
        if isinstance(out, ScanWarning):
            yield out
        else:
            rec, problem, entry, _ = out
            assert entry is not None
            yield Hashed(entry.path, rec, problem, entry.rule)


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


def verify(open_store: StoreOpener, policy: Policy, paths: Sequence[str | bytes] = (),
           *, fast: bool = False, progress: Progress | None = None,
           parallel: bool | int | None = None, source: str = "verify",
           context: EventContext | None = None) -> ScanResult:
    """Compare the live trees (or just `paths`) with the baseline; record run and events.

    `source` names who asks: "verify" (a person or timer) or "scan" (the watcher's
    scheduled and catch-up scans).
    """
    wanted = normalize_paths(policy, paths)
    roots = walk_roots(policy, wanted or None)
    count = 0 if fast else _workers(parallel)
    worker = ScanWorkers(policy, roots, count) if count else None
    try:
        store = open_store()
        baseline = _baseline(store)
        result = ScanResult(baseline=baseline)
        result.run_id = store.start_run(source, baseline.id, wanted, fast)
        ranges = [key_range(r) for r in roots]
        base = store.iter_entries(baseline.id, ranges)
        if fast:
            outcomes = _fast_outcomes(policy, roots, base, progress)
        else:
            live = iter(worker) if worker is not None else _in_process(policy, roots)
            outcomes = _full_outcomes(_merge(live, base, policy), progress)
        _collect(result, outcomes, policy)
    finally:
        if worker is not None:
            worker.close()
    _record_events(store, result, source, ranges, context, policy)
    if source == "verify":
        from integrity.store.ledger import check
        for problem in check(store).problems:
            result.warnings.append(ScanWarning(b"(event log)", "hash chain check", problem,
                                               "tampering"))
    store.finish_run(result.run_id, scanned=result.scanned, added=result.count(ADDED),
                     removed=result.count(REMOVED), modified=result.count(MODIFIED),
                     errors=len(result.warnings), exit_code=exit_code(result))
    return result


def check_paths(store: Store, policy: Policy, paths: Iterable[bytes],
                source: str = "realtime", context: EventContext | None = None
                ) -> ScanResult:
    """Targeted rehash: compare just these entries (not their subtrees) with the
    baseline and record what really changed. The watcher's hints end up here."""
    wanted = sorted({p for p in paths if policy.rule_for(p) is not None}, key=to_key)
    result = ScanResult(baseline=_baseline(store))
    if not wanted:
        return result
    ranges = [(key, key + b"\x00") for key in map(to_key, wanted)]
    base = store.iter_entries(result.baseline.id, ranges)  # type: ignore[union-attr]
    live = _in_process(policy, wanted, descend=False)
    _collect(result, _full_outcomes(_merge(live, base, policy), None), policy)
    _record_events(store, result, source, ranges, context, policy)
    return result


def _baseline(store: Store) -> BaselineInfo:
    baseline = store.active_baseline()
    if baseline is None:
        raise BaselineError(f"{store.name()}: no baseline yet: run 'integrity init'")
    return baseline


def _collect(result: ScanResult, outcomes: Iterator[Outcome | ScanWarning],
             policy: Policy) -> None:
    """Compare each outcome under its rule; gather changes and warnings."""
    for item in outcomes:
        if isinstance(item, ScanWarning):
            result.warnings.append(item)
            continue
        new, problem, rule, old = item
        if problem is not None:
            result.warnings.append(problem)
        if new is not None or problem is not None:
            result.scanned += 1
        rule = rule or policy.rule_for(old.path)  # type: ignore[union-attr]
        if rule is None:
            continue
        attrs = rule.check
        if problem is not None and new is not None and new.content is None:
            attrs &= ~Attr.CONTENT
        if problem is not None and new is None and (
                old is None or problem.consequence != "vanished during scan"):
            # Not in the baseline and gone before it could be read: the warning is
            # all there is to say. Otherwise unreadable: an error, not a removal.
            continue
        change = compare(old, new, attrs)
        if change is not None:
            result.changes.append(change)
            result.rules[change.path] = rule


def _record_events(store: Store, result: ScanResult, source: str,
                   ranges: Sequence[tuple[bytes, bytes]],
                   context: EventContext | None = None,
                   policy: Policy | None = None) -> None:
    from integrity.store.events import EventLog

    result.recorded = EventLog(store).record(
        result.changes, result.rules, source, ranges,
        unknown=[w.path for w in result.warnings if not isinstance(w, SkippedTree)],
        skipped=[w.path for w in result.warnings if isinstance(w, SkippedTree)],
        context=context, covered=policy.covers if policy is not None else None)


Outcome = tuple[FileRecord | None, ScanWarning | None, Rule | None, FileRecord | None]


def _full_outcomes(pairs: Iterator[tuple[Hashed | None, FileRecord | None] | ScanWarning],
                   progress: Progress | None) -> Iterator[Outcome | ScanWarning]:
    """Merged pairs of a full verify: every live file was hashed by the worker."""
    for item in pairs:
        if isinstance(item, ScanWarning):
            yield item
            continue
        live, old = item
        if live is None:
            yield None, None, None, old
            continue
        if progress is not None and live.record is not None:
            _tick(progress, live.record)
        yield live.record, live.problem, live.rule, old


def _fast_outcomes(policy: Policy, roots: list[bytes],
                   base: Iterator[tuple[bytes, FileRecord]],
                   progress: Progress | None) -> Iterator[Outcome | ScanWarning]:
    """--fast: merge first, then hash only files whose stat moved (borg's rule)."""
    verbose = log.isEnabledFor(logging.DEBUG)

    def want_hash(entry: WalkEntry, old: FileRecord | None) -> bool:
        if not entry.rule.hashes:
            return False
        if old is None or old.type != "file":
            return True
        reason = _fast_reason(entry.st, old)
        if reason and verbose:
            log.debug("rehashing %s: %s", display(entry.path), reason)
        return reason is not None

    pairs = _merge(walk(policy, roots), base, policy)
    for out in materialize(pairs, want_hash, progress, READAHEAD):  # type: ignore[arg-type]
        if isinstance(out, ScanWarning):
            yield out
            continue
        new, problem, entry, old = out
        yield new, problem, entry.rule if entry is not None else None, old


def exit_code(result: ScanResult) -> int:
    """SPEC: 0 no changes, 1 changes or unreadable entries."""
    return 1 if result.changes or result.warnings else 0


LiveItem = TypeVar("LiveItem", WalkEntry, Hashed)


def _merge(live: Iterator[LiveItem | ScanWarning],
           base: Iterator[tuple[bytes, FileRecord]],
           policy: Policy) -> Iterator[tuple[LiveItem | None, FileRecord | None] | ScanWarning]:
    """Pair live entries with baseline records by key: one streaming pass.

    Baseline entries the policy no longer covers are dropped, not called removed;
    entries below a directory that could not be listed are unknown, not removed.
    """
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
