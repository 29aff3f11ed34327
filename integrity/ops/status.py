"""Health at a glance: baseline, open events, watcher liveness, last scan."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from integrity.errors import IntegrityError
from integrity.ops.seal import check_head, check_pins, effective_policy, verify_seal
from integrity.policy import Policy
from integrity.policy.sealed import differences, sealed_text
from integrity.policy.severity import SEVERITIES
from integrity.store import Store
from integrity.store.baseline import Snapshot
from integrity.store.runs import WatcherInfo
from integrity.times import iso, utcnow
from integrity.trust import fingerprint, signature_valid


@dataclass(frozen=True)
class StatusReport:
    """SPEC's status object and whether it is healthy."""

    data: dict[str, Any]
    healthy: bool


#: Failed attempts after which a sink counts as failing (about 4 minutes of outage
#: with outbox.BACKOFF), not merely unlucky once.
FAILING_AFTER = 4


#: How long status lists alerts dropped with a sink the policy no longer names (the
#: warning that recorded it stays in `events` for good).
DROPS_SHOWN = dt.timedelta(days=7)


def _sink_names(policy: Policy | None) -> set[str] | None:
    """The names of the policy's alert sinks, or None when they are not known."""
    if policy is None:
        return None
    from integrity.ops.metrics import policy_sinks

    try:
        return set(policy_sinks(policy))
    except IntegrityError:  # a bad [[alert]] table: `policy.error` says so
        return None


def watcher_liveness(watcher: WatcherInfo | None, now: dt.datetime) -> tuple[bool, bool]:
    """(alive, stale): stale when the heartbeat is older than three intervals."""
    if watcher is None or watcher.state == "stopped":
        return False, False
    fresh = (now - watcher.heartbeat).total_seconds() <= 3 * watcher.interval
    return fresh and watcher.state == "running", not fresh


def watcher_alive(store: Store) -> bool:
    """Whether a watcher is running on this database now (and delivering alerts)."""
    return watcher_liveness(store.runs.latest_watcher(), utcnow())[0]


def seal_state(snap: Snapshot, policy: Policy | None) -> dict[str, Any]:
    """Whether the baseline status prints is the one that was sealed: its rows
    against the root, the signature against the signer and the sealed policy's key
    (read in one snapshot, so a concurrent approval is not taken for tampering)."""
    info = snap.info
    if info is None:
        return {"valid": False, "problem": "no baseline", "signed": False}
    state: dict[str, Any] = {"valid": True, "problem": None, "version": info.seal_version,
                             "generation": info.generation,
                             "signer": fingerprint(info.signer) if info.signer else None}
    try:
        verify_seal(info, snap.entries())
        check_pins(info, effective_policy(info, policy), current=policy)
    except IntegrityError as exc:
        state.update(valid=False, problem=str(exc))
    state["signed"] = bool(state["valid"] and info.signature and info.signer
                           and signature_valid(info.root or "", info.signature,
                                               info.signer))
    return state


def collect(store: Store, policy: Policy | None, now: dt.datetime | None = None,
            expect_head: str | None = None, policy_error: str | None = None
            ) -> StatusReport:
    """Gather status; unhealthy when there is no baseline, changes are open, the
    baseline fails its seal, the policy file differs from the sealed one, the event
    log's hash chain is broken (tampering) or an alert sink keeps failing.

    A watcher whose heartbeat is older than three intervals is stale: unhealthy.
    A kept head the chain does not contain is refused (TrustError, exit 2).
    """
    check_head(store, expect_head)
    with store.baselines.snapshot() as snap:
        baseline = snap.info
        seal = seal_state(snap, policy)
    current = sealed_text(policy) if policy is not None else None
    try:
        drift = (differences(baseline.policy, current)
                 if baseline is not None and baseline.policy is not None
                 and current is not None and baseline.policy != current else [])
    except (ValueError, TypeError, AttributeError):  # the seal check says why
        drift = ["the sealed policy is not a policy (tampering)"]
    counts = store.events.open_counts()
    run = store.runs.last("verify", "scan")
    watcher = store.runs.latest_watcher()
    now = now or utcnow()
    alive, stale = watcher_liveness(watcher, now)
    backlog = store.outbox.backlog()
    sinks = _sink_names(policy)
    failing = [b for b in backlog if b.attempts >= FAILING_AFTER]
    open_total = sum(counts.values())
    chain = store.ledger.check()
    data: dict[str, Any] = {
        "baseline": None if baseline is None else {
            "id": baseline.id, "created": iso(baseline.created),
            "age_seconds": int((now - baseline.created).total_seconds()),
            "entries": baseline.entries, "root": baseline.root,
            "generation": baseline.generation, "signed": seal["signed"],
            "seal": seal, "policy": baseline.policy_source},
        "policy": {"source": policy.source if policy is not None else None,
                   "sealed": not drift, "differences": drift, "error": policy_error},
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
                    "failing": b.attempts >= FAILING_AFTER,
                    "in_policy": None if sinks is None else b.sink in sinks}
                   for b in backlog],
        "alerts_dropped": [{"sink": d.sink, "alerts": d.alerts, "severity": d.severity,
                            "since": iso(d.oldest), "time": iso(d.time),
                            "event": d.event_id}
                           for d in store.outbox.dropped_since(now - DROPS_SHOWN)],
    }
    from integrity.ops.windows import current as open_windows, window_doc

    data["windows"] = [window_doc(w) for w in open_windows(store, now)]
    healthy = (baseline is not None and open_total == 0 and not stale and chain.ok
               and not failing and seal["valid"] and not drift and not policy_error)
    return StatusReport(data, healthy)
