"""Health at a glance: baseline, open events, watcher liveness, last scan."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from integrity.policy.severity import SEVERITIES
from integrity.store import Store
from integrity.store.runs import WatcherInfo
from integrity.times import iso, utcnow


@dataclass(frozen=True)
class StatusReport:
    """SPEC's status object and whether it is healthy."""

    data: dict[str, Any]
    healthy: bool


#: Failed attempts after which a sink counts as failing (about 4 minutes of outage
#: with outbox.BACKOFF), not merely unlucky once.
FAILING_AFTER = 4


def watcher_liveness(watcher: WatcherInfo | None, now: dt.datetime) -> tuple[bool, bool]:
    """(alive, stale): stale when the heartbeat is older than three intervals."""
    if watcher is None or watcher.state == "stopped":
        return False, False
    fresh = (now - watcher.heartbeat).total_seconds() <= 3 * watcher.interval
    return fresh and watcher.state == "running", not fresh


def watcher_alive(store: Store) -> bool:
    """Whether a watcher is running on this database now (and delivering alerts)."""
    return watcher_liveness(store.runs.latest_watcher(), utcnow())[0]


def collect(store: Store, now: dt.datetime | None = None) -> StatusReport:
    """Gather status; unhealthy when there is no baseline, changes are open, the
    event log's hash chain is broken (tampering) or an alert sink keeps failing.

    A watcher whose heartbeat is older than three intervals is stale: unhealthy.
    """
    baseline = store.baselines.active()
    counts = store.events.open_counts()
    run = store.runs.last("verify", "scan")
    watcher = store.runs.latest_watcher()
    now = now or utcnow()
    alive, stale = watcher_liveness(watcher, now)
    backlog = store.outbox.backlog()
    failing = [b for b in backlog if b.attempts >= FAILING_AFTER]
    open_total = sum(counts.values())
    chain = store.ledger.check()
    data: dict[str, Any] = {
        "baseline": None if baseline is None else {
            "id": baseline.id, "created": iso(baseline.created),
            "age_seconds": int((now - baseline.created).total_seconds()),
            "entries": baseline.entries, "root": baseline.root,
            "signed": baseline.signature is not None,
            "policy": baseline.policy_source},
        "events": {"open": open_total, **{s: counts.get(s, 0) for s in SEVERITIES}},
        "watcher": {
            "pid": watcher.pid if watcher else None,
            "host": watcher.host if watcher else None,
            "heartbeat": iso(watcher.heartbeat) if watcher else None,
            "alive": alive, "stale": stale,
            "state": watcher.state if watcher else None,
            "watches": watcher.watches if watcher else None,
            "unwatched": watcher.unwatched.splitlines()
            if watcher and watcher.unwatched else []},
        "chain": {"ok": chain.ok, "head": chain.head, "rows": chain.rows,
                  "problems": chain.problems},
        "last_scan": None if run is None else {
            "time": iso(run.finished), "source": run.command,
            "fast": run.fast, "scanned": run.scanned, "added": run.added,
            "removed": run.removed, "modified": run.modified,
            "errors": run.errors},
        "alerts": [{"sink": b.sink, "undelivered": b.pending, "since": iso(b.oldest),
                    "attempts": b.attempts, "last_error": b.last_error,
                    "failing": b.attempts >= FAILING_AFTER} for b in backlog],
    }
    from integrity.ops.windows import current, window_doc

    data["windows"] = [window_doc(w) for w in current(store, now)]
    healthy = (baseline is not None and open_total == 0 and not stale and chain.ok
               and not failing)
    return StatusReport(data, healthy)
