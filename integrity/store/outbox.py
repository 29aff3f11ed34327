"""The outbox: alerts owed to each sink, kept in the database until delivered.

Rows are written in the transaction that records their event, so an event is never
recorded without its alerts (nor alerted without being recorded); the dispatcher
(alerts/dispatch.py) deletes a row once its sink took it and pushes `next_attempt` back
after a failure. What is left in here after a while is what `status` reports.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from integrity.store import schema as models
from integrity.store.engine import Database, chunks
from integrity.store.ledger import forget, journal
from integrity.times import utcnow

#: Seconds before retry n (1-based), then the last one for good: a sink that is down
#: for a day is tried every ten minutes, never given up on.
BACKOFF = (15, 30, 60, 120, 300, 600)
#: The furthest integrity ever schedules an attempt: a row due later than this was
#: postponed behind its back (retry bookkeeping is outside the chain) and is due now.
LATEST_RETRY = dt.timedelta(seconds=max(BACKOFF))


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
        retry), oldest first."""
        o = models.outbox
        now = now or utcnow()
        with self.db.reader() as conn:
            rows = conn.execute(
                sa.select(o.c.id, o.c.event_id, o.c.created, o.c.attempts)
                .where(o.c.sink == sink, sa.or_(o.c.next_attempt <= now,
                                                o.c.next_attempt > now + LATEST_RETRY))
                .order_by(o.c.id).limit(limit)).all()
        return [Pending(*row) for row in rows]

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

    def drop_unknown(self, sinks: Iterable[str]) -> int:
        """Discard alerts owed to sinks the policy no longer has; returns how many."""
        o = models.outbox
        names = list(sinks)
        which = o.c.sink.not_in(names) if names else sa.true()
        with self.db.writer() as conn, conn.begin():
            ids = list(conn.execute(sa.select(o.c.id).where(which)).scalars())
            for chunk in chunks(ids):
                conn.execute(o.delete().where(o.c.id.in_(chunk)))
            forget(conn, "outbox", ids)
            return len(ids)
