"""Counting what happened, for `events --stats` and metrics: GROUP BY in the database.

Time is grouped into 15-minute UTC buckets here and turned into local hours and
weekdays by the caller: every real time zone offset is a multiple of 15 minutes, so
the local hour of each bucket is exact (daylight saving included), and 30 days are at
most 2,880 rows whatever the number of events. The SQL is portable Core (extract(),
no strftime), so PostgreSQL runs the same statements.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Literal

import sqlalchemy as sa

from integrity.paths import from_key
from integrity.store import schema
from integrity.store.engine import Database

#: What is counted: changes (event rows, warnings aside) or opens (access records).
Source = Literal["changes", "access"]
Dimension = Literal["rule", "path", "actor"]
ACTOR_FIELDS = ("exe", "user", "login_user")


def _counted(source: Source) -> tuple[sa.Table, Any, list[Any]]:
    """The table, what one row counts for, and which rows count."""
    if source == "access":
        a = schema.access
        return a, sa.func.sum(a.c.count), []
    e = schema.event
    return e, sa.func.count(), [e.c.kind != "warning"]


def _since(table: sa.Table, since: dt.datetime | None) -> list[Any]:
    return [] if since is None else [table.c.first_seen >= since]


def _json_field(conn: sa.Connection, column: Any, name: str) -> Any:
    """A text field of a JSON text column, in this database's dialect."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB
        return sa.cast(column, JSONB)[name].astext
    return sa.func.json_extract(column, f"$.{name}")


class Usage:
    """Counts over events and access records."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def buckets(self, source: Source, since: dt.datetime | None = None
                ) -> list[tuple[dt.datetime, int]]:
        """(start of a 15-minute UTC bucket, count) for every bucket with any."""
        table, count, where = _counted(source)
        col = table.c.first_seen
        minute = sa.extract("minute", col)
        parts = [sa.extract("year", col), sa.extract("month", col), sa.extract("day", col),
                 sa.extract("hour", col), minute - minute % 15]
        query = (sa.select(*parts, count).where(*where, *_since(table, since))
                 .group_by(*parts))
        with self.db.reader() as conn:
            rows = conn.execute(query).all()
        return [(dt.datetime(int(row[0]), int(row[1]), int(row[2]), int(row[3]),
                             int(row[4])), int(row[5] or 0)) for row in rows]

    def by(self, source: Source, dimension: Dimension, since: dt.datetime | None = None
           ) -> list[tuple[tuple[Any, ...], int]]:
        """(group, count) per rule, per path, or per actor (exe, user, login user);
        a path is bytes. Groups without a value (changes found by a scan have no
        actor) come back as Nones."""
        table, count, where = _counted(source)
        with self.db.reader() as conn:
            if dimension == "rule":
                parts: list[Any] = [table.c.rule]
            elif dimension == "path":
                parts = [table.c.key]
            elif source == "access":
                parts = [table.c.exe, _json_field(conn, table.c.actor, "user"),
                         _json_field(conn, table.c.actor, "login_user")]
            else:
                parts = [_json_field(conn, table.c.actor, name) for name in ACTOR_FIELDS]
            query = (sa.select(*parts, count).where(*where, *_since(table, since))
                     .group_by(*parts))
            rows = conn.execute(query).all()
        result: list[tuple[tuple[Any, ...], int]] = []
        for row in rows:
            group = tuple(row[:-1])
            if dimension == "path":
                group = (from_key(group[0]),)
            result.append((group, int(row[-1] or 0)))
        return result

    def totals(self) -> dict[str, int]:
        """Changes recorded so far by kind (each sighting of an open event counts),
        warnings aside: metrics' integrity_changes_total before pruning."""
        e = schema.event
        with self.db.reader() as conn:
            rows: Sequence[Any] = conn.execute(
                sa.select(e.c.kind, sa.func.sum(e.c.count))
                .where(e.c.kind != "warning").group_by(e.c.kind)).all()
        return {str(kind): int(total or 0) for kind, total in rows}
