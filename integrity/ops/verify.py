"""Verify and record: compare the live trees with the baseline, and make events of it.

The use case behind `integrity verify`, the watcher's scheduled and catch-up scans and
its realtime re-checks: scan (integrity.scan), judge each change under its rule (when,
by whom), record it in the event log with the alerts it is owed, and keep the run's
counts. The scan itself never touches the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from integrity.errors import BaselineError, ScanWarning, UsageError, Vanished
from integrity.ops.seal import (Pins, SealCheck, SealedIndex, check_head, check_pins,
                                effective_policy, verify_seal)
from integrity.paths import key_range, to_key
from integrity.policy import Policy
from integrity.policy.sealed import differences, sealed_text
from integrity.record import FileRecord
from integrity.ops.seal_reader import SealReader
from integrity.scan import Progress, ScanResult, TreeScan, check_entries, normalize_paths
from integrity.scan.scanner import worker_processes
from integrity.scan.compare import Change, change_states
from integrity.scan.walker import SkippedTree
from integrity.times import utcnow
from integrity.trust import TrustError

if TYPE_CHECKING:  # the store (and SQLAlchemy) is imported only once workers run
    from integrity.store import BaselineInfo, Store
    from integrity.store.baseline import Entry
    from integrity.store.events import Actor, Recorded
    from integrity.store.outbox import Route

StoreOpener = Callable[[], "Store"]


@dataclass(frozen=True)
class EventContext:
    """What the watcher adds to recording: who made a change, and whom to tell.

    `actor_of` is asked for realtime changes only (a scan cannot know the writer);
    `routes` are the alert sinks that are owed each new event.
    """

    actor_of: Callable[[bytes], Actor | None] | None = None
    routes: Sequence[Route] = ()


@dataclass
class Verification:
    """A scan against a baseline, and what recording it did."""

    baseline: BaselineInfo
    result: ScanResult
    recorded: Recorded
    #: How the policy file differs from the policy sealed with the baseline (which
    #: was verified instead); empty when they are the same.
    policy_changes: list[str] = field(default_factory=list)
    #: Unified diffs of kept texts that changed, by path.
    diffs: dict[bytes, str] = field(default_factory=dict)
    #: Problems after the scan that do not change its result (metrics not written).
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.policy_changes else self.result.exit_code


#: Entries from which a whole-tree verify seals the baseline in a child (SealReader).
#: Below it, the fork and the second connection cost more than they save: /etc's
#: 1,216 entries took 0.05 s longer, the 20k tree 0.2 s shorter.
SEAL_READER_MIN = 5000


def verify(open_store: StoreOpener, policy: Policy, paths: Sequence[str | bytes] = (),
           *, fast: bool = False, progress: Progress | None = None,
           parallel: bool | int | None = None, source: str = "verify",
           context: EventContext | None = None, pins: Pins = Pins(),
           index: SealedIndex | None = None) -> Verification:
    """Compare the live trees (or just `paths`) with the baseline; record run and events.

    `source` names who asks: "verify" (a person or timer), "scan" (the watcher's
    scheduled and catch-up scans) or "realtime" (a subtree the watcher saw appear).
    The baseline's seal is checked over the rows the scan reads (or, for the watcher,
    against its `index`), with the operator's `pins`; a baseline that fails is
    recorded as tampering (critical) and refused (TrustError). The scan follows the
    policy sealed with the baseline: a policy file that differs is reported, never
    obeyed. `open_store` is called once the scan's workers run, so opening the
    database overlaps with the first files' hashing.
    """
    context = context or EventContext()
    # [scan] max_read_rate (the policy file's: it is not sealed) paces scans, never a
    # realtime re-check.
    rate = policy.scan.max_read_rate if source != "realtime" else None
    scan = _early_scan(policy, paths, fast, parallel, rate)
    try:
        store = open_store()
        with _tampering_recorded(store, source, context):
            info = store.baselines.require()
            effective = effective_policy(info, policy)
        if scan is None or effective is not policy:
            if scan is not None:
                scan.close()
            store.close()  # no connection crosses the fork; the engine reconnects
            scan = TreeScan(effective, normalize_paths(effective, paths, waypoints=True) or None,
                            fast=fast, parallel=parallel, max_read_rate=rate)
        run_id = store.runs.start(source, info.id, scan.wanted, fast)
        # A person's (or timer's) whole-tree verify of a large baseline on more than one
        # core: the CLI has no other thread using the store, so it may fork (the
        # watcher's store is shared).
        reading = (source == "verify" and index is None and not scan.wanted
                   and info.entries >= SEAL_READER_MIN and worker_processes(parallel) > 0)
        ranges = [key_range(r) for r in scan.roots]
        kept: dict[bytes, bytes] = {}
        with _tampering_recorded(store, source, context):
            check_head(store, pins.head)
            if index is not None:
                result = scan.compare(_pairs(index.entries(store, ranges), kept), progress)
            elif reading:
                # The whole baseline, read and sealed by a child on another core.
                with SealReader(store) as reader:
                    chosen, info = info, reader.info
                    _same_policy(chosen, info)
                    result = scan.compare(reader.entries(), progress, reader.kept.judged)
                    reader.finish()
                    kept = reader.kept.changed
            else:
                # One read transaction: the baseline row and the entries checked
                # against it are one state, whatever an approval commits meanwhile.
                with store.baselines.snapshot() as snap:
                    chosen, info = info, snap.require()
                    _same_policy(chosen, info)
                    if scan.wanted:
                        verify_seal(info, snap.entries())
                        result = scan.compare(_pairs(snap.entries(ranges), kept), progress)
                    else:  # every entry is read anyway: the seal is checked on the way
                        sealing = SealCheck(info)
                        result = scan.compare(sealing.stream(snap.entries()), progress,
                                              sealing.kept.judged)
                        sealing.finish()
                        kept = sealing.kept.changed
            check_pins(info, effective, pins, policy)
    finally:
        if scan is not None:
            scan.close()
    diffs = content_diffs(store, effective, result, kept)
    recorded = record(store, effective, result, source, ranges, context, diffs)
    changes = _policy_changes(store, info, policy, source, context)
    if source == "verify":
        for problem in store.ledger.check().problems:
            result.warnings.append(ScanWarning(b"(event log)", "hash chain check", problem,
                                               "tampering"))
    verification = Verification(info, result, recorded, changes, diffs)
    store.runs.finish(run_id, scanned=result.scanned, errors=len(result.warnings),
                      exit_code=verification.exit_code, **result.counts())
    return verification


def _same_policy(chosen: BaselineInfo, info: BaselineInfo) -> None:
    """Refuse a verify that read a baseline whose sealed policy is not the one it
    chose its scan by (`approve --policy` committed meanwhile)."""
    if info.policy != chosen.policy:
        raise BaselineError("the policy was approved while this verify ran; nothing "
                            "was recorded: run it again")


def _early_scan(policy: Policy, paths: Sequence[str | bytes], fast: bool,
                parallel: bool | int | None, rate: int | None) -> TreeScan | None:
    """The scan as the policy file asks for it, forked before the database opens;
    None when the file does not cover a path (the sealed policy may)."""
    try:
        wanted = normalize_paths(policy, paths, waypoints=True)
    except UsageError:
        return None
    return TreeScan(policy, wanted or None, fast=fast, parallel=parallel,
                    max_read_rate=rate)


@contextlib.contextmanager
def _tampering_recorded(store: Store, source: str, context: EventContext
                        ) -> Iterator[None]:
    """A baseline or chain that fails its seal or a pin is an event in its own right:
    recorded (critical, alerted) before the refusal goes up."""
    try:
        yield
    except TrustError as exc:
        store.events.warn(os.fsencode(store.name()), str(exc), source=source,
                          severity="critical", routes=context.routes,
                          classification="tampering")
        raise


def _policy_changes(store: Store, info: BaselineInfo, policy: Policy, source: str,
                    context: EventContext) -> list[str]:
    """Report (or settle) a policy file that differs from the sealed policy."""
    from integrity.store.events import RESOLVED

    if info.policy is None:
        return []
    current = sealed_text(policy)
    if current == info.policy:
        store.events.close_policy_changes(RESOLVED)
        return []
    changes = differences(info.policy, current) or ["policy changed"]
    store.events.policy_changed(os.fsencode(policy.source), changes, source=source,
                                routes=context.routes)
    return changes


def check_paths(store: Store, policy: Policy, paths: Sequence[bytes], index: SealedIndex,
                source: str = "realtime", context: EventContext | None = None
                ) -> Verification:
    """Targeted rehash: compare just these entries (not their subtrees) with the
    baseline, whose rows `index` vouches for, and record what really changed. The
    watcher's hints end up here."""
    context = context or EventContext()
    info = index.info
    effective = effective_policy(info, policy)
    wanted = sorted({p for p in paths if effective.rule_for(p) is not None}, key=to_key)
    ranges = [(key, key + b"\x00") for key in map(to_key, wanted)]
    result = ScanResult()
    kept: dict[bytes, bytes] = {}
    if wanted:
        with _tampering_recorded(store, source, context):
            base = list(_pairs(index.entries(store, ranges), kept))
        result = check_entries(effective, wanted, iter(base))
    diffs = content_diffs(store, effective, result, kept)
    return Verification(info, result,
                        record(store, effective, result, source, ranges, context, diffs),
                        diffs=diffs)


def _pairs(entries: Iterable[Entry], kept: dict[bytes, bytes]
           ) -> Iterator[tuple[bytes, FileRecord]]:
    """(key, record) for the scan, noting the kept text digests on the way (diffs)."""
    for key, rec, _package, text in entries:
        if text is not None:
            kept[key] = text
        yield key, rec


def content_diffs(store: Store, policy: Policy, result: ScanResult,
                  kept: Mapping[bytes, bytes]) -> dict[bytes, str]:
    """Diffs of the modified files whose text the baseline kept (`kept`: entry key ->
    text digest)."""
    if not any(c.kind == "modified" for c in result.changes):
        return {}
    from integrity.ops.content import ContentKeeper

    return ContentKeeper(store, policy).diffs(result.changes, result.rules, kept)


def record(store: Store, policy: Policy, result: ScanResult, source: str,
           scope: Sequence[tuple[bytes, bytes]], context: EventContext | None = None,
           diffs: Mapping[bytes, str] | None = None) -> Recorded:
    """Judge each change under its rule (when, and for realtime changes by whom) and
    record it with its diff; open events in `scope` that no longer differ are closed. A
    change a maintenance window expected is recorded as such (ops/windows.py)."""
    from integrity.ops.windows import Expectations
    from integrity.store.events import EXPECTED, Sighting, UNEXPLAINED, Unreadable

    context = context or EventContext()
    actor_of = context.actor_of if source == "realtime" else None
    now = utcnow()
    diffs = diffs or {}
    expectations = Expectations.load(store, now) if result.changes else None
    sightings = []
    for change in result.changes:
        rule = result.rules.get(change.path)
        actor = actor_of(change.path) if actor_of is not None else None
        severity, classification = (
            rule.judgement.judge(rule.severity, actor, _when(change, now))
            if rule else ("medium", UNEXPLAINED))
        window = expectations.window_for(
            change.path, change.new.ctime if change.new is not None else None) \
            if expectations is not None and rule is not None else None
        if window is not None:
            severity, classification = "low", EXPECTED
        old, new = change_states(change)
        sightings.append(Sighting(change.path, change.kind, change.changed, old, new,
                                  rule.name if rule else None, severity, classification,
                                  actor, diffs.get(change.path),
                                  window.id if window is not None else None))
    unreadable = []
    for warning in result.warnings:
        rule = policy.rule_for(warning.path)
        # A directory that could not be listed hides all below it: alerted as well.
        if rule is not None and not isinstance(warning, Vanished):
            unreadable.append(Unreadable(warning.path, warning.error, rule.severity))
    return store.events.record(
        sightings, source, scope,
        unknown=[w.path for w in result.warnings if not isinstance(w, SkippedTree)],
        skipped=[w.path for w in result.warnings if isinstance(w, SkippedTree)],
        routes=context.routes, covered=policy.covers, unreadable=unreadable)


def _when(change: Change, now: dt.datetime) -> dt.datetime:
    """Local time of a change for off-hours rules: the new state's ctime (which a
    writer cannot set) when there is one, else the time we saw it."""
    if change.new is not None:
        return dt.datetime.fromtimestamp(change.new.ctime / 1e9)
    return now.replace(tzinfo=dt.timezone.utc).astimezone().replace(tzinfo=None)


def verify_and_alert(open_store: StoreOpener, policy: Policy,
                     paths: Sequence[str | bytes] = (), *, fast: bool = False,
                     progress: Progress | None = None, pins: Pins = Pins()
                     ) -> Verification:
    """`integrity verify`: verify and record against the sealed baseline and the
    operator's pins, and deliver the alerts owed (tampering included) unless a
    watcher does."""
    from integrity.alerts import build_sinks, routes_of
    from integrity.alerts.dispatch import deliver_after_scan

    sinks = build_sinks(policy)
    try:
        verification = verify(open_store, policy, paths, fast=fast, progress=progress,
                              context=EventContext(routes=routes_of(sinks)), pins=pins)
    finally:
        deliver_after_scan(open_store(), sinks)
    if policy.metrics.textfile:
        from integrity.ops.metrics import textfile_problem

        problem = textfile_problem(open_store(), policy, sinks=[s.name for s in sinks])
        if problem:
            verification.notes.append(problem)
    return verification
