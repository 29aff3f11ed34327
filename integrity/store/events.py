"""The event log: what changed, when, seen by whom, and what became of it.

A change becomes an event; while it is open, later sightings of the same path update
that one row (count, last seen, latest state), so a file that keeps changing raises one
alert, not one per scan. Every state a row takes is appended to the ledger, and every
new event is owed to the alert sinks that want it, in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

import sqlalchemy as sa

from integrity.paths import display, from_key, is_within, key_range, to_key
from integrity.store import schema
from integrity.store.engine import Database, chunks, inserted_id
from integrity.store.ledger import Ledger, journal
from integrity.store.outbox import Route, enqueue
from integrity.times import iso, utcnow

OPEN, APPROVED, REVERTED, RESOLVED = "open", "approved", "reverted", "resolved"
#: Closed by `integrity restore` putting the file back; the act is an event of its own.
RESTORED, RESTORED_KIND = "restored", "restored"
#: Closed because the policy no longer covers the path (a new exclude, a removed rule).
EXCLUDED = "excluded"
#: Kinds that are not changes of an entry: the watcher could not see something, and
#: the policy file differs from the sealed one. Scans neither update nor revert them.
WARNING, POLICY = "warning", "policy"
NOTICES = (WARNING, POLICY)
UNEXPLAINED, PACKAGE_UPDATE = "unexplained", "package-update"
#: A change made inside a maintenance window (`integrity expect`) that covers it.
EXPECTED = "expected"
#: The opening of a maintenance window: announced, since it lowers what it covers.
WINDOW_KIND = "window"

#: Who made a change, as the fanotify listener tells (pid, exe, cmdline, uid, ...).
Actor = dict[str, Any]


class EventDoc(TypedDict):
    """An event as SPEC's JSON shows it, and as alert sinks receive it."""

    id: int
    time: str | None
    last_seen: str | None
    path: str
    kind: str
    changed: list[str]
    source: str
    rule: str | None
    severity: str
    status: str
    classification: str
    count: int
    actor: Actor | None
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    approval: int | None
    evidence: str | None
    #: A modification of a kept text: the unified diff, baseline -> live (redacted).
    diff: str | None
    #: The digest of the ledger row that holds the event's latest state: a place in
    #: the chain that an alert carries off the host (`--expect-head` accepts it).
    chain: str | None
    #: The maintenance window the change was expected in, and its reason (ticket).
    window: int | None
    ticket: str | None


@dataclass(frozen=True)
class Sighting:
    """One change as a scan saw it, judged and ready to record."""

    path: bytes
    kind: str
    changed: tuple[str, ...]
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    rule: str | None
    #: Severity and classification of a new event (an open one keeps its own).
    severity: str
    classification: str
    actor: Actor | None = None
    diff: str | None = None
    #: The maintenance window that expected this change (classification EXPECTED).
    window: int | None = None


@dataclass(frozen=True)
class Recorded:
    """What recording a scan did: ids of new events, counts of updated and reverted,
    and whether it owed alerts for warnings (an entry unreadable, or readable again)."""

    new: list[int]
    updated: int
    reverted: int
    warned: bool = False


@dataclass(frozen=True)
class OpenEvent:
    """An open event, as approval needs it."""

    id: int
    path: bytes
    kind: str
    changed: tuple[str, ...]
    severity: str
    #: When the change was first seen (what approvals date package runs against).
    first_seen: dt.datetime


class Events:
    """The event table of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, sightings: Sequence[Sighting], source: str,
               scope: Sequence[tuple[bytes, bytes]], *, unknown: Iterable[bytes] = (),
               skipped: Iterable[bytes] = (), routes: Sequence[Route] = (),
               covered: Callable[[bytes], bool] | None = None,
               unreadable: Sequence[Unreadable] = ()) -> Recorded:
        """Record a scan's changes; return what was new, updated and reverted.

        Open events inside `scope` (key ranges the scan examined) whose path no
        longer differs from the baseline are closed as reverted, except paths in
        `unknown` and below `skipped` directories (not examinable this time); those
        the policy no longer covers (`covered` False) are closed as excluded. New
        events are owed to `routes` in the same transaction.

        Each `unreadable` entry (one the scan could not check) opens a warning,
        alerted once; an open one in `scope` that was read this time is resolved,
        and its resolution alerted.
        """
        e = schema.event
        now = utcnow()
        seen = {to_key(s.path): s for s in sightings}
        unknown_keys = {to_key(p) for p in unknown}
        skipped_ranges = [key_range(p) for p in skipped]
        updated = 0
        with self.db.writer() as conn, conn.begin():
            open_rows = _open_in(conn, scope)
            inserts = []
            touched: list[int] = []
            escalated: list[tuple[int, str]] = []
            for key, sighting in seen.items():
                new_state = json.dumps(sighting.new)
                fields: dict[str, Any] = {
                    "kind": sighting.kind, "changed": ",".join(sighting.changed),
                    "source": source, "rule": sighting.rule, "last_seen": now,
                    "old": json.dumps(sighting.old), "new": new_state,
                    "diff": sighting.diff,
                }
                actor = json.dumps(sighting.actor) if sighting.actor else None
                existing = open_rows.get(key)
                if existing is None:
                    inserts.append({**fields, "key": key, "severity": sighting.severity,
                                    "classification": sighting.classification,
                                    "status": OPEN, "count": 1, "first_seen": now,
                                    "actor": actor, "window_id": sighting.window})
                elif existing[1] != new_state or existing[2] != sighting.kind:
                    if actor:  # the latest writer is the one to ask
                        fields["actor"] = actor
                    if existing[3] == EXPECTED and sighting.window is None:
                        # Changed again outside any window: an expected event must
                        # not hide what came after it. Judged afresh, and alerted.
                        fields.update(severity=sighting.severity, window_id=None,
                                      classification=sighting.classification)
                        escalated.append((existing[0], sighting.severity))
                    conn.execute(e.update().where(e.c.id == existing[0]).values(
                        **fields, count=e.c.count + 1))
                    touched.append(existing[0])
                    updated += 1
                else:
                    conn.execute(e.update().where(e.c.id == existing[0])
                                 .values(last_seen=now))
            new_ids: list[int] = []
            if inserts:
                conn.execute(e.insert(), inserts)
                # We hold the write lock: every open event first seen at `now` is ours.
                new_rows = conn.execute(sa.select(e.c.id, e.c.severity).where(
                    e.c.status == OPEN, e.c.first_seen == now).order_by(e.c.id)).all()
                new_ids = [row[0] for row in new_rows]
                enqueue(conn, routes, [(row[0], row[1]) for row in new_rows])
            enqueue(conn, routes, escalated)
            gone = [row[0] for key, row in open_rows.items()
                    if key not in seen and key not in unknown_keys
                    and not any(low <= key < high for low, high in skipped_ranges)]
            closing = set(gone)
            excluded = [row[0] for key, row in open_rows.items() if row[0] in closing
                        and covered is not None and not covered(from_key(key))]
            for status, ids in ((EXCLUDED, excluded),
                                (REVERTED, sorted(closing.difference(excluded)))):
                for chunk in chunks(ids):
                    conn.execute(e.update().where(e.c.id.in_(chunk))
                                 .values(status=status, last_seen=now))
            noticed, warned = _unreadable_in(conn, scope, unreadable, source, now, routes)
            journal(conn, "event", [*new_ids, *touched, *gone, *noticed])
        return Recorded(new_ids, updated, len(gone), warned)

    def warn(self, path: bytes, message: str, *, source: str = "realtime",
             severity: str = "high", resolved: bool = False,
             routes: Sequence[Route] = (), classification: str = "watcher") -> int:
        """Record that something could not be seen or trusted (an open warning until
        it is resolved); a repeat of an open warning for the same path updates it and
        is not alerted again, its resolution is."""
        return self._notice(path, WARNING, "", {"warning": message}, source=source,
                            severity=severity, resolved=resolved, routes=routes,
                            classification=classification)

    def policy_changed(self, path: bytes, differences: Sequence[str], *, source: str,
                       routes: Sequence[Route] = ()) -> int:
        """Record that the policy file differs from the one sealed with the baseline
        (critical; open until `approve --policy`, resolved if the file is put back)."""
        return self._notice(path, POLICY, "policy", {"differences": list(differences)},
                            source=source, severity="critical", resolved=False,
                            routes=routes, classification=UNEXPLAINED)

    def _notice(self, path: bytes, kind: str, changed: str, state: dict[str, Any], *,
                source: str, severity: str, resolved: bool, routes: Sequence[Route],
                classification: str) -> int:
        e = schema.event
        now = utcnow()
        key = to_key(path)
        with self.db.writer() as conn, conn.begin():
            existing = conn.execute(sa.select(e.c.id).where(
                e.c.status == OPEN, e.c.kind == kind, e.c.key == key)).scalar()
            status = RESOLVED if resolved else OPEN
            new_state = json.dumps(state)
            if existing is not None:
                event_id = int(existing)
                conn.execute(e.update().where(e.c.id == event_id).values(
                    count=e.c.count + 1, last_seen=now, status=status, new=new_state))
                if resolved:
                    enqueue(conn, routes, [(event_id, severity)])
            else:
                event_id = inserted_id(conn.execute(e.insert().values(
                    key=key, kind=kind, changed=changed, source=source, rule=None,
                    severity=severity, classification=classification, status=status,
                    count=1, first_seen=now, last_seen=now, old=None, new=new_state,
                    actor=None)))
                enqueue(conn, routes, [(event_id, severity)])
            journal(conn, "event", [event_id])
            return event_id

    def restored(self, path: bytes, actor: Actor, *, routes: Sequence[Route] = ()) -> int:
        """Record that `integrity restore` put a file back (with who did it), and close
        its open events as restored, in one transaction."""
        e = schema.event
        now = utcnow()
        key = to_key(path)
        with self.db.writer() as conn, conn.begin():
            closed = list(conn.execute(sa.select(e.c.id).where(
                e.c.status == OPEN, e.c.key == key, e.c.kind.not_in(NOTICES))).scalars())
            for chunk in chunks(closed):
                conn.execute(e.update().where(e.c.id.in_(chunk))
                             .values(status=RESTORED, last_seen=now))
            event_id = inserted_id(conn.execute(e.insert().values(
                key=key, kind=RESTORED_KIND, changed="", source="restore", rule=None,
                severity="low", classification="restore", status=RESOLVED, count=1,
                first_seen=now, last_seen=now, old=None,
                new=json.dumps({"restored": True, "closed": closed}),
                actor=json.dumps(actor))))
            enqueue(conn, routes, [(event_id, "low")])
            journal(conn, "event", [*closed, event_id])
            return event_id

    def window_opened(self, path: bytes, window_id: int, text: str, severity: str,
                      actor: Actor, *, routes: Sequence[Route] = ()) -> int:
        """Record that a maintenance window was opened (`text` says which, by whom,
        until when), owed to the sinks that take `severity`: the highest it lowers."""
        e = schema.event
        now = utcnow()
        with self.db.writer() as conn, conn.begin():
            event_id = inserted_id(conn.execute(e.insert().values(
                key=to_key(path), kind=WINDOW_KIND, changed="", source="expect",
                rule=None, severity=severity, classification=WINDOW_KIND,
                status=RESOLVED, count=1, first_seen=now, last_seen=now, old=None,
                new=json.dumps({"window": text}), actor=json.dumps(actor),
                window_id=window_id)))
            enqueue(conn, routes, [(event_id, severity)])
            journal(conn, "event", [event_id])
            return event_id

    def close_policy_changes(self, status: str, approval_id: int | None = None) -> int:
        """Close open policy events: approved with the policy, or resolved because
        the file matches the sealed policy again."""
        e = schema.event
        with self.db.writer() as conn, conn.begin():
            ids = list(conn.execute(sa.select(e.c.id).where(
                e.c.status == OPEN, e.c.kind == POLICY)).scalars())
            for chunk in chunks(ids):
                conn.execute(e.update().where(e.c.id.in_(chunk)).values(
                    status=status, last_seen=utcnow(), approval_id=approval_id))
            journal(conn, "event", ids)
            return len(ids)

    def resolve_warnings(self, keep: Iterable[bytes] = ()) -> int:
        """Close open warnings, except those for paths in `keep`; return how many."""
        e = schema.event
        kept = [to_key(p) for p in keep]
        which = [e.c.status == OPEN, e.c.kind == WARNING]
        if kept:
            which.append(e.c.key.not_in(kept))
        with self.db.writer() as conn, conn.begin():
            ids = list(conn.execute(sa.select(e.c.id).where(*which)).scalars())
            if ids:
                for chunk in chunks(ids):
                    conn.execute(e.update().where(e.c.id.in_(chunk))
                                 .values(status=RESOLVED, last_seen=utcnow()))
                journal(conn, "event", ids)
            return len(ids)

    def open(self, scope: Sequence[tuple[bytes, bytes]] | None = None) -> list[OpenEvent]:
        """Open changes (in key order; not warnings), optionally within key ranges."""
        e = schema.event
        query = sa.select(e.c.id, e.c.key, e.c.kind, e.c.changed, e.c.severity,
                          e.c.first_seen).where(e.c.status == OPEN,
                                                e.c.kind.not_in(NOTICES))
        if scope is not None:
            query = query.where(sa.or_(*[sa.and_(e.c.key >= low, e.c.key < high)
                                         for low, high in scope]) if scope else sa.false())
        with self.db.reader() as conn:
            rows = conn.execute(query.order_by(e.c.key)).all()
        return [OpenEvent(i, from_key(k), kind, tuple(c.split(",")) if c else (), sev, seen)
                for i, k, kind, c, sev, seen in rows]

    def seen_as_recorded(self, events: Sequence[OpenEvent], baseline_id: int,
                         since: dt.datetime) -> dict[int, dt.datetime]:
        """event id -> when its path was last known to be as the baseline records it:
        the start of the last scan that covered the path and finished before the
        change was first seen, or the last approval of a change there, or `since` (the
        baseline's creation), whichever is latest. Whatever made the change ran after
        that, so a package run before it explains nothing of the change.

        A scan's start, not its end: it may have read the path before a package run
        that ended while it went on."""
        e, r, a = schema.event, schema.run, schema.approval
        if not events:
            return {}
        latest = max(event.first_seen for event in events)
        approved: dict[bytes, dt.datetime] = {}
        with self.db.reader() as conn:
            scans = conn.execute(sa.select(r.c.started, r.c.finished, r.c.paths).where(
                r.c.baseline_id == baseline_id, r.c.finished.is_not(None),
                r.c.finished <= latest, r.c.started >= since,
                r.c.exit_code.in_((0, 1))).order_by(r.c.finished.desc())).all()
            for keys in chunks(sorted({to_key(event.path) for event in events})):
                for key, when in conn.execute(sa.select(e.c.key, sa.func.max(a.c.time))
                                              .join(a, a.c.id == e.c.approval_id)
                                              .where(e.c.key.in_(keys))
                                              .group_by(e.c.key)):
                    approved[from_key(key)] = when
        bounds = {}
        for event in events:
            # runs.paths holds displayed paths: compare in that form.
            shown = display(event.path).encode()
            bound = max(since, approved.get(event.path, since))
            for started, finished, paths in scans:  # the last to finish first
                if finished <= bound:
                    break  # started before it finished: no later start is left
                if finished <= event.first_seen and started > bound and (
                        paths is None or any(is_within(shown, root.encode())
                                             for root in paths.split("\n"))):
                    bound = started
            bounds[event.id] = bound
        return bounds

    def open_policy_changes(self) -> list[OpenEvent]:
        """Open events saying the policy file differs from the sealed one."""
        e = schema.event
        with self.db.reader() as conn:
            rows = conn.execute(sa.select(e.c.id, e.c.key, e.c.kind, e.c.changed,
                                          e.c.severity, e.c.first_seen).where(
                e.c.status == OPEN, e.c.kind == POLICY).order_by(e.c.id)).all()
        return [OpenEvent(i, from_key(k), kind, (c,) if c else (), sev, seen)
                for i, k, kind, c, sev, seen in rows]

    def open_counts(self) -> dict[str, int]:
        """Open events by severity."""
        e = schema.event
        with self.db.reader() as conn:
            rows = conn.execute(sa.select(e.c.severity, sa.func.count()).where(
                e.c.status == OPEN).group_by(e.c.severity)).all()
        return {severity: count for severity, count in rows}

    def list(self, *, open_only: bool = False, since: dt.datetime | None = None,
             ids: Sequence[int] | None = None) -> list[EventDoc]:
        """Event history as SPEC's JSON objects, oldest first."""
        e, w = schema.event, schema.maintenance_window
        query = sa.select(e, w.c.reason.label("ticket")).select_from(
            e.outerjoin(w, e.c.window_id == w.c.id))
        if open_only:
            query = query.where(e.c.status == OPEN)
        if since is not None:
            query = query.where(e.c.last_seen >= since)
        docs: list[EventDoc] = []
        with self.db.reader() as conn:
            for chunk in (chunks(list(ids)) if ids is not None else [None]):
                q = query if chunk is None else query.where(e.c.id.in_(chunk))
                docs += [_doc(row) for row in conn.execute(
                    q.order_by(e.c.first_seen, e.c.id)).mappings()]
        if ids is not None:
            docs.sort(key=lambda d: (d["time"] or "", d["id"]))
        places = Ledger(self.db).digest_of("event", [d["id"] for d in docs])
        for doc in docs:
            doc["chain"] = places.get(doc["id"])
        return docs


def _doc(row: sa.RowMapping) -> EventDoc:
    return {
        "id": row["id"], "time": iso(row["first_seen"]),
        "last_seen": iso(row["last_seen"]), "path": display(from_key(row["key"])),
        "kind": row["kind"],
        "changed": row["changed"].split(",") if row["changed"] else [],
        "source": row["source"], "rule": row["rule"], "severity": row["severity"],
        "status": row["status"], "classification": row["classification"],
        "count": row["count"], "actor": json.loads(row["actor"]) if row["actor"] else None,
        "old": json.loads(row["old"]) if row["old"] else None,
        "new": json.loads(row["new"]) if row["new"] else None,
        "approval": row["approval_id"], "evidence": row["evidence"],
        "diff": row["diff"], "chain": None,
        "window": row["window_id"], "ticket": row["ticket"],
    }


#: The classification of a warning that a scan could not check an entry.
UNREADABLE = "unreadable"


class Unreadable(NamedTuple):
    """An entry a scan could not check, why, and the severity of its rule."""

    path: bytes
    message: str
    severity: str


def _unreadable_in(conn: sa.Connection, scope: Sequence[tuple[bytes, bytes]],
                   unreadable: Sequence[Unreadable], source: str, now: dt.datetime,
                   routes: Sequence[Route]) -> tuple[list[int], bool]:
    """Open (and alert) a warning per entry a scan could not check, unless one is open;
    resolve (and alert) the open ones in `scope` it checked this time. The ids touched,
    and whether any alert is owed.

    An entry that cannot be read cannot be compared: its change would be unseen, so
    that is alerted as loudly as a change, whatever made the read fail."""
    e = schema.event
    warned: dict[bytes, tuple[int, str]] = {}
    for low, high in scope:
        warned.update((bytes(key), (event_id, severity))
                      for key, event_id, severity in conn.execute(
            sa.select(e.c.key, e.c.id, e.c.severity).where(
                e.c.status == OPEN, e.c.kind == WARNING,
                e.c.classification == UNREADABLE, e.c.key >= low, e.c.key < high)))
    touched: list[int] = []
    alerted = False
    now_unreadable = {to_key(u.path): u for u in unreadable}
    for key, item in now_unreadable.items():
        state = json.dumps({"warning": item.message})
        existing = warned.get(key)
        if existing is not None:
            conn.execute(e.update().where(e.c.id == existing[0]).values(
                count=e.c.count + 1, last_seen=now, new=state))
            touched.append(existing[0])
            continue
        event_id = inserted_id(conn.execute(e.insert().values(
            key=key, kind=WARNING, changed="", source=source, rule=None,
            severity=item.severity, classification=UNREADABLE, status=OPEN, count=1,
            first_seen=now, last_seen=now, old=None, new=state, actor=None)))
        enqueue(conn, routes, [(event_id, item.severity)])
        touched.append(event_id)
        alerted = True
    readable = [found for key, found in warned.items() if key not in now_unreadable]
    for event_id, _ in readable:
        conn.execute(e.update().where(e.c.id == event_id).values(
            status=RESOLVED, last_seen=now))
    enqueue(conn, routes, readable)
    return touched + [event_id for event_id, _ in readable], alerted or bool(readable)


def _open_in(conn: sa.Connection, scope: Sequence[tuple[bytes, bytes]]
             ) -> dict[bytes, tuple[int, str | None, str, str]]:
    """Open events in key ranges: key -> (id, new state, kind, classification)."""
    e = schema.event
    found: dict[bytes, tuple[int, str | None, str, str]] = {}
    for low, high in scope:
        rows = conn.execute(sa.select(e.c.key, e.c.id, e.c.new, e.c.kind,
                                      e.c.classification).where(
            e.c.status == OPEN, e.c.kind.not_in(NOTICES), e.c.key >= low, e.c.key < high))
        for key, event_id, new_state, kind, classification in rows:
            found[key] = (event_id, new_state, kind, classification)
    return found
