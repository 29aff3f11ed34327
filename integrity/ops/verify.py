"""Verify and record: compare the live trees with the baseline, and make events of it.

The use case behind `integrity verify`, the watcher's scheduled and catch-up scans and
its realtime re-checks: scan (integrity.scan), judge each change under its rule (when,
by whom), record it in the event log with the alerts it is owed, and keep the run's
counts. The scan itself never touches the database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from integrity.errors import ScanWarning
from integrity.paths import key_range, to_key
from integrity.policy import Policy
from integrity.scan import Progress, ScanResult, TreeScan, check_entries, normalize_paths
from integrity.scan.compare import Change, change_states
from integrity.scan.walker import SkippedTree
from integrity.times import utcnow

if TYPE_CHECKING:  # the store (and SQLAlchemy) is imported only once workers run
    from integrity.store import BaselineInfo, Store
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
    #: Problems after the scan that do not change its result (metrics not written).
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.result.exit_code


def verify(open_store: StoreOpener, policy: Policy, paths: Sequence[str | bytes] = (),
           *, fast: bool = False, progress: Progress | None = None,
           parallel: bool | int | None = None, source: str = "verify",
           context: EventContext | None = None) -> Verification:
    """Compare the live trees (or just `paths`) with the baseline; record run and events.

    `source` names who asks: "verify" (a person or timer), "scan" (the watcher's
    scheduled and catch-up scans) or "realtime" (a subtree the watcher saw appear).
    `open_store` is called once the scan's workers run, so opening the database
    overlaps with the first files' hashing.
    """
    wanted = normalize_paths(policy, paths)
    with TreeScan(policy, wanted or None, fast=fast, parallel=parallel) as scan:
        store = open_store()
        baseline = store.baselines.require()
        run_id = store.runs.start(source, baseline.id, wanted, fast)
        ranges = [key_range(r) for r in scan.roots]
        result = scan.compare(store.baselines.entries(baseline.id, ranges), progress)
    recorded = record(store, policy, result, source, ranges, context)
    if source == "verify":
        for problem in store.ledger.check().problems:
            result.warnings.append(ScanWarning(b"(event log)", "hash chain check", problem,
                                               "tampering"))
    store.runs.finish(run_id, scanned=result.scanned, errors=len(result.warnings),
                      exit_code=result.exit_code, **result.counts())
    return Verification(baseline, result, recorded)


def check_paths(store: Store, policy: Policy, paths: Sequence[bytes],
                source: str = "realtime", context: EventContext | None = None
                ) -> Verification:
    """Targeted rehash: compare just these entries (not their subtrees) with the
    baseline and record what really changed. The watcher's hints end up here."""
    baseline = store.baselines.require()
    wanted = sorted({p for p in paths if policy.rule_for(p) is not None}, key=to_key)
    ranges = [(key, key + b"\x00") for key in map(to_key, wanted)]
    result = ScanResult()
    if wanted:
        result = check_entries(policy, wanted, store.baselines.entries(baseline.id, ranges))
    return Verification(baseline, result,
                        record(store, policy, result, source, ranges, context))


def record(store: Store, policy: Policy, result: ScanResult, source: str,
           scope: Sequence[tuple[bytes, bytes]], context: EventContext | None = None
           ) -> Recorded:
    """Judge each change under its rule (when, and for realtime changes by whom) and
    record it; open events in `scope` that no longer differ are closed. A change a
    maintenance window expected is recorded as such (ops/windows.py)."""
    from integrity.ops.windows import Expectations
    from integrity.store.events import EXPECTED, Sighting, UNEXPLAINED

    context = context or EventContext()
    actor_of = context.actor_of if source == "realtime" else None
    now = utcnow()
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
                                  actor, window.id if window is not None else None))
    return store.events.record(
        sightings, source, scope,
        unknown=[w.path for w in result.warnings if not isinstance(w, SkippedTree)],
        skipped=[w.path for w in result.warnings if isinstance(w, SkippedTree)],
        routes=context.routes, covered=policy.covers)


def _when(change: Change, now: dt.datetime) -> dt.datetime:
    """Local time of a change for off-hours rules: the new state's ctime (which a
    writer cannot set) when there is one, else the time we saw it."""
    if change.new is not None:
        return dt.datetime.fromtimestamp(change.new.ctime / 1e9)
    return now.replace(tzinfo=dt.timezone.utc).astimezone().replace(tzinfo=None)


def verify_and_alert(open_store: StoreOpener, policy: Policy,
                     paths: Sequence[str | bytes] = (), *, fast: bool = False,
                     progress: Progress | None = None,
                     expect_root: str | None = None) -> Verification:
    """`integrity verify`: check the seal where the operator pinned it (or signing is
    on), verify and record, and deliver the alerts owed unless a watcher does."""
    from integrity.alerts import build_sinks, routes_of
    from integrity.alerts.dispatch import deliver_after_scan
    from integrity.ops.seal import check_baseline

    sinks = build_sinks(policy)
    if expect_root or policy.public_key:
        check_baseline(open_store(), policy, expect_root)
    verification = verify(open_store, policy, paths, fast=fast, progress=progress,
                          context=EventContext(routes=routes_of(sinks)))
    deliver_after_scan(open_store(), sinks)
    if policy.metrics.textfile:
        from integrity.ops.metrics import textfile_problem

        problem = textfile_problem(open_store(), policy, sinks=[s.name for s in sinks])
        if problem:
            verification.notes.append(problem)
    return verification
