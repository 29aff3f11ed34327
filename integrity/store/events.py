"""The event log and approvals: what changed, when, who accepted it, and on what evidence.

A change becomes an event; while it is open, later sightings of the same path update
that one row (count, last seen, latest state), so a file that keeps changing raises one
alert, not one per scan. An approval writes the current state of its paths into the
active baseline and closes their events, in one transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from integrity.store import schema as models
from integrity.scan.compare import Change, change_states
from integrity.errors import UsageError
from integrity.paths import display, from_key, key_range, to_key
from integrity.policy import Rule
from integrity.record import FileRecord
from integrity.store.engine import Store, utcnow
from integrity.store.ledger import journal
from integrity.store.outbox import Route, enqueue
from integrity.trust import root_of, sign

OPEN, APPROVED, REVERTED, RESOLVED = "open", "approved", "reverted", "resolved"
#: Closed because the policy no longer covers the path (a new exclude, a removed rule).
EXCLUDED = "excluded"
WARNING = "warning"
UNEXPLAINED, PACKAGE_UPDATE = "unexplained", "package-update"

_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A naive UTC time from an ISO 8601 time or a relative form like 2h, 7d, 30m."""
    now = now or utcnow()
    match = _RELATIVE.match(text)
    if match:
        return now - dt.timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since: {text!r} is neither an ISO 8601 time nor a "
                         "relative time like 2h or 7d") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return when


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, from a naive UTC datetime."""
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


@dataclass(frozen=True)
class Recorded:
    """What recording a scan did: ids of new events, counts of updated and reverted."""

    new: list[int]
    updated: int
    reverted: int


@dataclass(frozen=True)
class OpenEvent:
    """An open event, as approval needs it."""

    id: int
    path: bytes
    kind: str
    changed: tuple[str, ...]
    severity: str


Actor = dict[str, Any]


@dataclass(frozen=True)
class EventContext:
    """What the watcher adds to recording: who made a change, and whom to tell.

    `actor_of` is asked for realtime changes only (a scan cannot know the writer);
    `routes` are the alert sinks that are owed each new event.
    """

    actor_of: Callable[[bytes], Actor | None] | None = None
    routes: Sequence[Route] = ()


def _when(change: Change, now: dt.datetime) -> dt.datetime:
    """Local time of a change for off-hours rules: the new state's ctime (which a
    writer cannot set) when there is one, else the time we saw it."""
    if change.new is not None:
        return dt.datetime.fromtimestamp(change.new.ctime / 1e9)
    return now.replace(tzinfo=dt.timezone.utc).astimezone().replace(tzinfo=None)


class EventLog:
    """Events and approvals in the store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, changes: Sequence[Change], rules: Mapping[bytes, Rule], source: str,
               scope: Sequence[tuple[bytes, bytes]], unknown: Iterable[bytes] = (),
               skipped: Iterable[bytes] = (), context: EventContext | None = None,
               covered: Callable[[bytes], bool] | None = None) -> Recorded:
        """Record a scan's changes; return what was new, updated and reverted.

        Open events inside `scope` (key ranges the scan examined) whose path no
        longer differs from the baseline are closed as reverted, except paths in
        `unknown` and below `skipped` directories (not examinable this time); those
        the policy no longer covers (`covered` False) are closed as excluded. Each
        new event's severity and classification come from its rule's judgement of
        when and by whom (severity.py); its alerts go to the outbox in the same
        transaction.
        """
        context = context or EventContext()
        actor_of = context.actor_of if source == "realtime" else None
        e = models.event
        now = utcnow()
        changed_keys = {to_key(c.path): c for c in changes}
        unknown_keys = {to_key(p) for p in unknown}
        skipped_ranges = [key_range(p) for p in skipped]
        updated = 0
        with self.store.writer() as conn, conn.begin():
            open_rows = self._open_in(conn, scope)
            inserts = []
            touched: list[int] = []
            for key, change in changed_keys.items():
                old_state, new_state = change_states(change)
                rule = rules.get(change.path)
                fields = {
                    "kind": change.kind, "changed": ",".join(change.changed),
                    "source": source, "rule": rule.name if rule else None,
                    "last_seen": now, "old": json.dumps(old_state),
                    "new": json.dumps(new_state),
                }
                actor = actor_of(change.path) if actor_of is not None else None
                existing = open_rows.get(key)
                if existing is None:
                    severity, classification = (
                        rule.judgement.judge(rule.severity, actor, _when(change, now))
                        if rule else ("medium", UNEXPLAINED))
                    inserts.append({**fields, "key": key, "severity": severity,
                                    "classification": classification,
                                    "status": OPEN, "count": 1, "first_seen": now,
                                    "actor": json.dumps(actor) if actor else None})
                elif existing[1] != fields["new"] or existing[2] != change.kind:
                    if actor:  # the latest writer is the one to ask
                        fields["actor"] = json.dumps(actor)
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
                enqueue(conn, context.routes, new_rows)
            gone = [row[0] for key, row in open_rows.items()
                    if key not in changed_keys and key not in unknown_keys
                    and not any(low <= key < high for low, high in skipped_ranges)]
            closing = set(gone)
            excluded = [row[0] for key, row in open_rows.items() if row[0] in closing
                        and covered is not None and not covered(from_key(key))]
            for status, ids in ((EXCLUDED, excluded),
                                (REVERTED, sorted(closing.difference(excluded)))):
                for chunk in _chunks(ids):
                    conn.execute(e.update().where(e.c.id.in_(chunk))
                                 .values(status=status, last_seen=now))
            reverted = len(gone)
            journal(conn, "event", [*new_ids, *touched, *gone])
        return Recorded(new_ids, updated, reverted)

    @staticmethod
    def _open_in(conn: sa.Connection, scope: Sequence[tuple[bytes, bytes]]
                 ) -> dict[bytes, tuple[int, str | None, str]]:
        e = models.event
        found: dict[bytes, tuple[int, str | None, str]] = {}
        for low, high in scope:
            rows = conn.execute(sa.select(e.c.key, e.c.id, e.c.new, e.c.kind).where(
                e.c.status == OPEN, e.c.kind != WARNING, e.c.key >= low, e.c.key < high))
            for key, event_id, new_state, kind in rows:
                found[key] = (event_id, new_state, kind)
        return found

    def warn(self, path: bytes, message: str, *, source: str = "realtime",
             severity: str = "high", resolved: bool = False,
             routes: Sequence[Route] = ()) -> int:
        """Record that the watcher could not see something (an open warning until it
        is resolved); a repeat of an open warning for the same path updates it and
        is not alerted again, its resolution is."""
        e = models.event
        now = utcnow()
        key = to_key(path)
        with self.store.writer() as conn, conn.begin():
            existing = conn.execute(sa.select(e.c.id).where(
                e.c.status == OPEN, e.c.kind == WARNING, e.c.key == key)).scalar()
            status = RESOLVED if resolved else OPEN
            if existing is not None:
                conn.execute(e.update().where(e.c.id == existing).values(
                    count=e.c.count + 1, last_seen=now, status=status,
                    new=json.dumps({"warning": message})))
                event_id = int(existing)
                if resolved:
                    enqueue(conn, routes, [(event_id, severity)])
            else:
                event_id = int(conn.execute(e.insert().values(
                    key=key, kind=WARNING, changed="", source=source, rule=None,
                    severity=severity, classification="watcher", status=status, count=1,
                    first_seen=now, last_seen=now, old=None,
                    new=json.dumps({"warning": message}), actor=None)).inserted_primary_key[0])
                enqueue(conn, routes, [(event_id, severity)])
            journal(conn, "event", [event_id])
            return event_id

    def resolve_warnings(self, keep: Iterable[bytes] = ()) -> int:
        """Close open warnings, except those for paths in `keep`; return how many."""
        e = models.event
        kept = [to_key(p) for p in keep]
        which = [e.c.status == OPEN, e.c.kind == WARNING]
        if kept:
            which.append(e.c.key.not_in(kept))
        with self.store.writer() as conn, conn.begin():
            ids = list(conn.execute(sa.select(e.c.id).where(*which)).scalars())
            if ids:
                conn.execute(e.update().where(e.c.id.in_(ids))
                             .values(status=RESOLVED, last_seen=utcnow()))
                journal(conn, "event", ids)
            return len(ids)

    def open_events(self, scope: Sequence[tuple[bytes, bytes]] | None = None
                    ) -> list[OpenEvent]:
        """Open changes (in key order; not warnings), optionally within key ranges."""
        e = models.event
        query = sa.select(e.c.id, e.c.key, e.c.kind, e.c.changed, e.c.severity).where(
            e.c.status == OPEN, e.c.kind != WARNING)
        if scope is not None:
            query = query.where(sa.or_(*[sa.and_(e.c.key >= low, e.c.key < high)
                                         for low, high in scope]) if scope else sa.false())
        with self.store.engine.connect() as conn:
            rows = conn.execute(query.order_by(e.c.key)).all()
        return [OpenEvent(i, from_key(k), kind, tuple(c.split(",")) if c else (), sev)
                for i, k, kind, c, sev in rows]

    def open_counts(self) -> dict[str, int]:
        """Open events by severity."""
        e = models.event
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(e.c.severity, sa.func.count()).where(
                e.c.status == OPEN).group_by(e.c.severity)).all()
        return {severity: count for severity, count in rows}

    def events(self, *, open_only: bool = False, since: dt.datetime | None = None,
               ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Event history as SPEC's JSON objects, oldest first."""
        e = models.event
        query = sa.select(e)
        if ids is not None:
            query = query.where(e.c.id.in_(list(ids)))
        if open_only:
            query = query.where(e.c.status == OPEN)
        if since is not None:
            query = query.where(e.c.last_seen >= since)
        with self.store.engine.connect() as conn:
            rows = conn.execute(query.order_by(e.c.first_seen, e.c.id)).mappings().all()
        return [{
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
        } for row in rows]

    def approve(self, baseline_id: int, *, upserts: Sequence[FileRecord],
                deletes: Sequence[bytes], events: Mapping[int, str | None],
                user: str, sudo_user: str | None, reason: str | None, mode: str,
                classification: str = UNEXPLAINED,
                owner: Callable[[bytes], str | None] | None = None,
                sign_key: str | None = None) -> int:
        """Write paths' current state into the baseline and close their events.

        `events` maps event id to the evidence it rested on (None for a person's
        word). One transaction: the baseline never holds half an approval.
        """
        b, en, e, a = models.baseline, models.entry, models.event, models.approval
        with self.store.writer() as conn, conn.begin():
            keys = [to_key(rec.path) for rec in upserts] + [to_key(p) for p in deletes]
            for chunk in _chunks(keys):
                conn.execute(en.delete().where(en.c.baseline_id == baseline_id,
                                               en.c.key.in_(chunk)))
            if upserts:
                conn.execute(en.insert(), [
                    {"baseline_id": baseline_id, "key": to_key(rec.path),
                     **{name: getattr(rec, name) for name in models.ENTRY_COLUMNS[1:]},
                     "package": owner(rec.path) if owner else None}
                    for rec in upserts])
            count = conn.execute(sa.select(sa.func.count()).select_from(en).where(
                en.c.baseline_id == baseline_id)).scalar_one()
            # The new root, from the rows as this transaction leaves them.
            cols = [en.c[name] for name in models.ENTRY_COLUMNS]
            rows = conn.execute(sa.select(*cols).where(en.c.baseline_id == baseline_id)
                                .order_by(en.c.key))
            root = root_of((row[0], FileRecord(from_key(row[0]), *row[1:])) for row in rows)
            conn.execute(b.update().where(b.c.id == baseline_id).values(
                entries=count, root=root, signature=sign(root, sign_key) if sign_key else None))
            approval_id = conn.execute(a.insert().values(
                time=utcnow(), user=user, sudo_user=sudo_user, reason=reason, mode=mode,
                baseline_id=baseline_id, entries=len(upserts) + len(deletes),
                events=len(events))).inserted_primary_key[0]
            for event_id, evidence in events.items():
                values: dict[str, Any] = {"status": APPROVED, "approval_id": approval_id,
                                          "evidence": evidence}
                if evidence is not None:
                    values["classification"] = classification
                conn.execute(e.update().where(e.c.id == event_id, e.c.status == OPEN)
                             .values(**values))
            journal(conn, "approval", [int(approval_id)])
            journal(conn, "event", list(events))
        return int(approval_id)

    def last_approval(self) -> dict[str, Any] | None:
        """The newest approval."""
        a = models.approval
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(a).order_by(a.c.id.desc()).limit(1)
                               ).mappings().first()
        return dict(row) if row else None


def _chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
