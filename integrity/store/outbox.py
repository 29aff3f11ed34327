"""The outbox: alerts owed to each sink, kept in the database until delivered.

Rows are written in the transaction that records their event, so an event is never
recorded without its alerts (nor alerted without being recorded); the dispatcher
(alerts/dispatch.py) deletes a row once its sink took it and pushes `next_attempt` back
after a failure. What is left in here after a while is what `status` reports.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa

from integrity.paths import to_key
from integrity.policy.severity import SEVERITIES
from integrity.store import schema as models
from integrity.store.engine import Database, chunks, inserted_id
from integrity.store.ledger import forget, journal, journaled
from integrity.times import from_iso, iso, utcnow

#: Seconds before retry n (1-based), then the last one for good: a sink that is down
#: for a day is tried every ten minutes, never given up on.
BACKOFF = (15, 30, 60, 120, 300, 600)
#: The furthest integrity ever schedules an attempt: a row due later than this was
#: postponed behind its back (retry bookkeeping is outside the chain) and is due now.
LATEST_RETRY = dt.timedelta(seconds=max(BACKOFF))
#: The classification of the warning that alerts were dropped with their sink.
DROPPED = "alerts-dropped"
#: Event ids a dropped-alerts warning names in its text, and keeps in its JSON.
_EVENTS_NAMED, _EVENTS_KEPT = 20, 1000


class Route(Protocol):
    """A sink as recording needs it (alerts.Route): its name, and which severities
    it takes."""

    @property
    def sink(self) -> str: ...
    def wants(self, severity: str) -> bool: ...


@dataclass(frozen=True)
class Pending:
    """One undelivered alert."""

    id: int
    event_id: int
    created: dt.datetime
    attempts: int


@dataclass(frozen=True)
class Dropped:
    """Alerts discarded with a sink the policy no longer names, and the warning
    (event) that recorded it."""

    sink: str
    alerts: int
    severity: str
    oldest: dt.datetime
    event_id: int
    time: dt.datetime


@dataclass(frozen=True)
class SinkBacklog:
    """What a sink still owes: for status."""

    sink: str
    pending: int
    oldest: dt.datetime
    attempts: int
    last_error: str | None


def enqueue(conn: sa.Connection, routes: Sequence[Route],
            events: Iterable[tuple[int, str]]) -> int:
    """Owe each (event id, severity) to every route that wants it; inside the
    recording transaction. Returns the number of rows written."""
    now = utcnow()
    rows = [{"sink": route.sink, "event_id": event_id, "created": now, "attempts": 0,
             "next_attempt": now, "last_error": None}
            for event_id, severity in events for route in routes if route.wants(severity)]
    if rows:
        o = models.outbox
        before = conn.execute(sa.select(sa.func.max(o.c.id))).scalar() or 0
        conn.execute(o.insert(), rows)
        # Owed alerts are chained: one deleted before it was sent is tampering.
        journal(conn, "outbox", conn.execute(sa.select(o.c.id).where(o.c.id > before))
                .scalars())
    return len(rows)


class Outbox:
    """The outbox table: what the dispatcher delivers, retries and reports."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def due(self, sink: str, limit: int = 500,
            now: dt.datetime | None = None) -> list[Pending]:
        """A sink's alerts whose time has come (or was put off further than any
        retry), oldest first.

        Only alerts as the chain recorded them: one whose sink was edited to this
        one (or inserted behind our back) would otherwise be sent and deleted under
        a tombstone, erasing the edit; it stays owed for the chain check to report.
        """
        o = models.outbox
        now = now or utcnow()
        found: list[Pending] = []
        after = 0
        with self.db.reader() as conn, conn.begin():
            while len(found) < limit:
                rows = conn.execute(
                    sa.select(o.c.id, o.c.event_id, o.c.created, o.c.attempts)
                    .where(o.c.sink == sink, o.c.id > after,
                           sa.or_(o.c.next_attempt <= now,
                                  o.c.next_attempt > now + LATEST_RETRY))
                    .order_by(o.c.id).limit(limit)).all()
                if not rows:
                    break
                sound = journaled(conn, "outbox", [row.id for row in rows])
                found += [Pending(*row) for row in rows if row.id in sound]
                after = rows[-1].id
        return found[:limit]

    def delivered(self, ids: Sequence[int]) -> None:
        """Forget alerts the sink took."""
        if not ids:
            return
        o = models.outbox
        with self.db.writer() as conn, conn.begin():
            for chunk in chunks(ids):
                conn.execute(o.delete().where(o.c.id.in_(chunk)))
            forget(conn, "outbox", ids)

    def failed(self, ids: Sequence[int], error: str) -> dt.datetime:
        """Count a failed attempt and schedule the next; returns when that is."""
        o = models.outbox
        now = utcnow()
        with self.db.writer() as conn, conn.begin():
            attempts = conn.execute(sa.select(sa.func.max(o.c.attempts))
                                    .where(o.c.id.in_(ids))).scalar() or 0
            retry = now + dt.timedelta(seconds=BACKOFF[min(attempts, len(BACKOFF) - 1)])
            for chunk in chunks(ids):
                conn.execute(o.update().where(o.c.id.in_(chunk)).values(
                    attempts=o.c.attempts + 1, next_attempt=retry, last_error=error[:2000]))
        return retry

    def retry_now(self, sink: str | None = None) -> int:
        """Make failed alerts due at once (a reload or a restart: the operator may have
        fixed the sink). Returns how many."""
        o = models.outbox
        query = o.update().where(o.c.attempts > 0)
        if sink is not None:
            query = query.where(o.c.sink == sink)
        with self.db.writer() as conn, conn.begin():
            return conn.execute(query.values(next_attempt=utcnow())).rowcount

    def backlog(self) -> list[SinkBacklog]:
        """Per sink: undelivered alerts, the oldest, the most attempts and the last error."""
        o = models.outbox
        with self.db.reader() as conn:
            rows = conn.execute(
                sa.select(o.c.sink, sa.func.count(), sa.func.min(o.c.created),
                          sa.func.max(o.c.attempts))
                .group_by(o.c.sink).order_by(o.c.sink)).all()
            result = []
            for sink, count, oldest, attempts in rows:
                error = conn.execute(
                    sa.select(o.c.last_error).where(o.c.sink == sink,
                                                    o.c.last_error.is_not(None))
                    .order_by(o.c.id.desc()).limit(1)).scalar()
                result.append(SinkBacklog(sink, count, oldest, attempts, error))
        return result

    def drop_unknown(self, routes: Sequence[Route], reported_as: bytes, *,
                     source: str = "realtime") -> list[Dropped]:
        """Discard alerts owed to sinks that `routes` (the policy's sinks) no longer
        name, and record for each such sink a warning that says so: how many, their
        highest severity, since when they were owed, and which events. The warning
        (path `reported_as`: the policy file) carries the highest severity among the
        dropped alerts and is owed to the remaining routes that take it.

        One transaction: the rows are never gone without the warning recorded and
        chained, nor the warning recorded with the rows still there.
        """
        o, e = models.outbox, models.event
        names = [route.sink for route in routes]
        which = o.c.sink.not_in(names) if names else sa.true()
        now = utcnow()
        with self.db.writer() as conn, conn.begin():
            rows = conn.execute(
                sa.select(o.c.id, o.c.sink, o.c.created, o.c.event_id, e.c.severity)
                .select_from(o.outerjoin(e, e.c.id == o.c.event_id))
                .where(which).order_by(o.c.id)).all()
            # Only alerts as the chain recorded them: one whose sink was edited (or
            # inserted behind our back) is tampering, which dropping it with a
            # tombstone would erase; it stays for the chain check to report.
            sound = journaled(conn, "outbox", [row.id for row in rows])
            rows = [row for row in rows if row.id in sound]
            ids = [row.id for row in rows]
            for chunk in chunks(ids):
                conn.execute(o.delete().where(o.c.id.in_(chunk)))
            forget(conn, "outbox", ids)
            by_sink: dict[str, list[Any]] = {}
            for row in rows:
                by_sink.setdefault(row.sink, []).append(row)
            dropped = [_report(conn, sink, owed, reported_as, source, routes, now)
                       for sink, owed in sorted(by_sink.items())]
            journal(conn, "event", [d.event_id for d in dropped])
        return dropped

    def dropped_since(self, since: dt.datetime) -> list[Dropped]:
        """The warnings that recorded alerts dropped with their sink since `since`,
        oldest first: what status shows so that none is lost silently."""
        e = models.event
        with self.db.reader() as conn:
            # last_seen (indexed) is first_seen: the warning is recorded resolved.
            rows = conn.execute(sa.select(e.c.id, e.c.first_seen, e.c.new).where(
                e.c.last_seen >= since, e.c.classification == DROPPED)
                .order_by(e.c.id)).all()
        result = []
        for event_id, when, new in rows:
            try:
                state = json.loads(new)
                result.append(Dropped(str(state["sink"]), int(state["alerts"]),
                                      str(state["severity"]),
                                      from_iso(state["oldest"]),
                                      event_id, when))
            except (TypeError, ValueError, KeyError):
                continue  # an edited row: the chain check reports it
        return result


def _report(conn: sa.Connection, sink: str, owed: Sequence[Any],
            path: bytes, source: str, routes: Sequence[Route],
            now: dt.datetime) -> Dropped:
    """Record (and owe to `routes`) the warning that a sink's alerts were dropped."""
    from integrity.store.events import RESOLVED, WARNING  # events imports this module

    # An alert whose event is gone (or edited) cannot say what it was about: assume
    # the worst.
    severity = max((row.severity if row.severity in SEVERITIES else SEVERITIES[-1]
                    for row in owed), key=SEVERITIES.index)
    oldest = min(row.created for row in owed)
    events = sorted({row.event_id for row in owed})
    shown = ", ".join(map(str, events[:_EVENTS_NAMED])) + (
        f" and {len(events) - _EVENTS_NAMED} more" if len(events) > _EVENTS_NAMED else "")
    count = len(owed)
    message = (f"{count} undelivered alert{'s' if count != 1 else ''} owed to sink "
               f"'{sink}' dropped: the policy no longer names that sink (highest "
               f"severity {severity}, owed since {iso(oldest)}; events {shown})")
    state = {"warning": message, "sink": sink, "alerts": count, "severity": severity,
             "oldest": iso(oldest), "events": events[:_EVENTS_KEPT]}
    e = models.event
    event_id = inserted_id(conn.execute(e.insert().values(
        key=to_key(path), kind=WARNING, changed="", source=source, rule=None,
        severity=severity, classification=DROPPED, status=RESOLVED, count=1,
        first_seen=now, last_seen=now, old=None, new=json.dumps(state), actor=None)))
    enqueue(conn, routes, [(event_id, severity)])
    return Dropped(sink, count, severity, oldest, event_id, now)
