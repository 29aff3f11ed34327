"""Host side: push what the central copy lacks, apply the admin's requests, report.

One push, in this order (each step commits before the spool forgets what it sent):

1. approval requests addressed to this host are read, claimed locally and applied
   through the normal approval code (their effects are pushed by the steps below);
2. event-chain records, oldest first, in batches (one transaction each);
3. the baseline: one push of it (the changed entries, or the whole baseline after
   init) with its seal (root, generation, signature, sealed policy's digest), in one
   transaction together with the chain records up to the point it was read at, so
   the central side can tell whether an approval made it;
4. the outcomes of requests;
5. a heartbeat: liveness, watcher state, the newest chain record this host holds and
   the seal of its baseline (the central side flags a seal it does not hold when
   nothing is owed: the baseline changed behind the spool).

A batch sent again after a crash or an outage is recognised centrally and dropped
(same host, same sequence number, same digest), so a push can be killed at any point.
The central database being away costs nothing but time: the spool keeps it all. Kept
texts (the content table) never leave the host: an entry carries only their digest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from integrity import __version__
from integrity.errors import IntegrityError, UsageError
from integrity.policy import Policy
from integrity.store import Store
from integrity.store.central import Central, HostSession
from integrity.times import iso, utcnow

log = logging.getLogger(__name__)

#: Chain records per transaction.
BATCH = 1000
_process_lock = threading.Lock()


@dataclass
class PushReport:
    """What one push sent."""

    host: str = ""
    ledger: int = 0
    push: int | None = None
    kind: str | None = None
    generation: int | None = None
    entries: int = 0
    accepted: bool = True
    requests: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unpushed: int = 0


@contextlib.contextmanager
def _exclusive(store: Store) -> Iterator[None]:
    """One push at a time per local database (the watcher's thread and a timer's
    `fleet push` may meet): a lock file beside the database, and a process lock."""
    with _process_lock:
        fd = os.open(store.sidecar("fleet-lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class Pusher:
    """Pushes one local database to the central one, as the policy's [fleet] says."""

    def __init__(self, store: Store, policy: Policy, *, batch: int = BATCH) -> None:
        config = policy.fleet
        if config is None:
            raise UsageError(f"{policy.source}: no [fleet] table: nothing to push to")
        if not store.url.startswith("sqlite"):
            raise UsageError(f"{store.name()}: a fleet host spools in its local SQLite "
                             "database; this one is not SQLite")
        self.store = store
        self.policy = policy
        self.config = config
        self.batch = max(1, batch)
        self.central = Central(config.url, password_file=config.password_file,
                               tls=dict(config.tls), what="fleet.url",
                               application=f"integrity push {config.host}")

    def close(self) -> None:
        self.central.close()

    def push(self) -> PushReport:
        """Push everything owed now; DatabaseError (exit 2) when the central database
        cannot take it (the spool keeps it for the next push)."""
        report = PushReport(host=self.config.host)
        spool = self.store.spool
        with _exclusive(self.store):
            report.repaired = spool.prepare()
            for line in report.repaired:
                log.warning("fleet spool: %s", line)
            with self.central.host_session(self.config.host) as session:
                session.whoami()
                self._apply_requests(session.requests(), report)
                report.ledger = self._push_ledger(session)
                self._push_baseline(session, report)
                self._report_requests(session)
                report.unpushed = self._heartbeat(session)
        return report

    # -- steps ---------------------------------------------------------------------

    def _apply_requests(self, requests: Sequence[dict[str, Any]], report: PushReport) -> None:
        for request in requests:
            if not self.store.spool.claim(int(request["id"]), request["kind"]):
                continue
            outcome = apply_request(self.store, self.policy, request)
            report.requests.append(f"request {request['id']} ({request['kind']}): {outcome}")

    def _push_ledger(self, session: HostSession) -> int:
        sent = 0
        while rows := self.store.spool.pending_ledger(self.batch):
            session.send_ledger(rows)
            self.store.spool.ack_ledger(rows[-1][0], rows[-1][-1])
            sent += len(rows)
        return sent

    def _push_baseline(self, session: HostSession, report: PushReport) -> None:
        from integrity.policy.sealed import sealed_digest

        spool = self.store.spool
        with spool.plan(ledger_limit=10**9) as plan:
            if plan is None:
                return
            if plan.kind is not None:
                base = plan.baseline
                report.accepted = session.send_baseline({
                    "push": plan.push, "kind": plan.kind, "baseline_id": base["id"],
                    "generation": base["generation"],
                    "activated": base["activated"] or base["created"],
                    "root": base["root"], "signature": base["signature"],
                    "signer": base["signer"], "seal_version": base["seal_version"],
                    "policy_digest": sealed_digest(base["policy"]) if base["policy"]
                    else None,
                    "entries": plan.entries, "changes": plan.changes,
                    "ledger_seq": plan.ledger_seq, "host_time": utcnow()},
                    plan.ledger, plan.rows())
                report.push, report.kind = plan.push, plan.kind
                report.generation, report.entries = base["generation"], plan.changes
                report.ledger += len(plan.ledger)
        # Committed centrally (or refused for good): the spool may forget it.
        assert plan is not None
        if plan.ledger:
            spool.ack_ledger(plan.ledger[-1][0], plan.ledger[-1][-1])
        spool.ack_plan(plan)

    def _report_requests(self, session: HostSession) -> None:
        for row in self.store.spool.unreported():
            session.report(
                int(row["id"]), utcnow(), row["outcome"] or "interrupted",
                row["approval_id"], row["root"],
                row["detail"] if row["outcome"] else
                "the host stopped while applying it: see its approvals and events")
            self.store.spool.reported(int(row["id"]))

    def _heartbeat(self, session: HostSession) -> int:
        owed, seal = self.store.spool.backlog_and_seal()
        session.heartbeat(utcnow(), int(self.config.interval), self.config.group,
                          __version__, watcher_state(self.store), self.store.spool.head(),
                          owed, seal)
        return owed


def watcher_state(store: Store) -> dict[str, Any]:
    """The local watcher as `status` sees it: for the central side's status."""
    from integrity.ops.status import watcher_liveness

    watcher = store.runs.latest_watcher()
    if watcher is None:
        return {"state": None, "alive": False}
    alive, stale = watcher_liveness(watcher, utcnow())
    return {"state": watcher.state, "alive": alive, "stale": stale, "pid": watcher.pid,
            "heartbeat": iso(watcher.heartbeat), "watches": watcher.watches}


def apply_request(store: Store, policy: Policy, request: dict[str, Any]) -> str:
    """Apply one claimed request through the normal local code path; record and return
    the outcome."""
    from integrity.ops.approve import Approver
    from integrity.paths import display

    request_id = int(request["id"])
    if request["kind"] == "resync":
        store.spool.mark_full()
        store.spool.finish(request_id, "done", detail="the whole baseline is sent again")
        return "done"
    reason = f"fleet request {request_id} from {request['requested_by']}"
    if request.get("reason"):
        reason += f": {request['reason']}"
    try:
        approver = Approver(store, policy, reason=reason)
        outcome = approver.all() if request["all"] else approver.paths(list(request["paths"]))
    except IntegrityError as exc:
        store.spool.finish(request_id, "failed", detail=str(exc))
        return f"failed: {exc}"
    detail = json.dumps({
        "approved": [display(a.path) for a in outcome.approved],
        "written": len(outcome.written),
        "left_open": [{"path": display(o.path), "reason": o.reason}
                      for o in outcome.left_open]})
    applied = outcome.approval_id is not None
    store.spool.finish(request_id, "applied" if applied else "nothing",
                       approval_id=outcome.approval_id, root=outcome.root, detail=detail)
    return "applied" if applied else "nothing to approve"


def push_once(store: Store, policy: Policy, *, batch: int = BATCH) -> PushReport:
    """`integrity fleet push`: one push, now."""
    pusher = Pusher(store, policy, batch=batch)
    try:
        return pusher.push()
    finally:
        pusher.close()


def unpushed_records(store: Store) -> int:
    """Records of this host the central database does not hold yet (chain records and
    baseline changes; before the first push, every chain record and the baseline): the
    backlog `integrity_fleet_unpushed_records` reports."""
    return store.spool.unpushed_records()
