"""Maintenance windows: when changes under some paths are expected, and why.

A window is a record an attacker would love to forge (one that covers /usr/bin for a
year turns every implant into a low-severity "expected" change), so it lives in the
hash-chained ledger like events: opening and cancelling one are journaled, and only
windows whose row is exactly as the chain last recorded it are honoured.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import sqlalchemy as sa

from integrity.paths import is_within
from integrity.store import schema
from integrity.store.engine import Database, inserted_id
from integrity.store.ledger import journal, journaled
from integrity.times import utcnow


@dataclass(frozen=True)
class Window:
    """One maintenance window as recorded."""

    id: int
    created: dt.datetime
    start: dt.datetime
    end: dt.datetime
    reason: str
    #: Paths it covers (with everything below them); empty: every protected path.
    paths: tuple[bytes, ...]
    user: str
    sudo_user: str | None
    cancelled: dt.datetime | None
    cancelled_by: str | None

    @property
    def until(self) -> dt.datetime:
        """When it ends: its end, or its cancellation if that came first."""
        return min(self.end, self.cancelled) if self.cancelled else self.end

    def is_open(self, now: dt.datetime) -> bool:
        return self.start <= now < self.until

    def covers(self, path: bytes, when: dt.datetime) -> bool:
        """Whether a change to path made at `when` (naive UTC) was expected here."""
        return (self.start <= when < self.until
                and (not self.paths or any(is_within(path, p) for p in self.paths)))


def _paths_text(paths: tuple[bytes, ...]) -> str:
    # surrogateescape + JSON's \udcxx escapes: non-UTF-8 names round-trip exactly.
    return json.dumps([p.decode("utf-8", "surrogateescape") for p in paths])


def _window(row: sa.Row[tuple[object, ...]]) -> Window:
    m = row._mapping
    try:
        paths = tuple(str(p).encode("utf-8", "surrogateescape")
                      for p in json.loads(m["paths"]))
    except (ValueError, TypeError):
        # Not written by us (a forged row): a path no absolute path lies within, so
        # it covers nothing rather than, read as empty, everything.
        paths = (b"\x00",)
    return Window(m["id"], m["created"], m["start"], m["end"], m["reason"], paths,
                  m["user"], m["sudo_user"], m["cancelled"], m["cancelled_by"])


class Windows:
    """The maintenance_window table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def open(self, *, start: dt.datetime, end: dt.datetime, reason: str,
             paths: tuple[bytes, ...], user: str, sudo_user: str | None) -> Window:
        """Record a new window (and journal it); returns it."""
        w = schema.maintenance_window
        with self.db.writer() as conn, conn.begin():
            window_id = inserted_id(conn.execute(w.insert().values(
                created=utcnow(), start=start, end=end, reason=reason,
                paths=_paths_text(paths), user=user, sudo_user=sudo_user)))
            journal(conn, "window", [window_id])
            row = conn.execute(sa.select(w).where(w.c.id == window_id)).one()
        return _window(row)

    def cancel(self, window_id: int, by: str) -> tuple[Window, bool] | None:
        """End a window now (journaled): (the window, whether it was still open);
        None when there is no such window. One already over is left as it was."""
        w = schema.maintenance_window
        now = utcnow()
        with self.db.writer() as conn, conn.begin():
            row = conn.execute(sa.select(w).where(w.c.id == window_id)).first()
            if row is None:
                return None
            if _window(row).until <= now:
                return _window(row), False
            conn.execute(w.update().where(w.c.id == window_id)
                         .values(cancelled=now, cancelled_by=by))
            journal(conn, "window", [window_id])
            row = conn.execute(sa.select(w).where(w.c.id == window_id)).one()
        return _window(row), True

    def get(self, window_id: int) -> Window | None:
        w = schema.maintenance_window
        with self.db.reader() as conn:
            row = conn.execute(sa.select(w).where(w.c.id == window_id)).first()
        return _window(row) if row is not None else None

    def all(self) -> list[Window]:
        """Every recorded window, oldest first (journaled or not: for status)."""
        w = schema.maintenance_window
        with self.db.reader() as conn:
            return [_window(r) for r in conn.execute(sa.select(w).order_by(w.c.id))]

    def honoured(self) -> list[Window]:
        """Windows whose row matches the chain's record of it: the only ones that may
        lower a change's severity."""
        w = schema.maintenance_window
        with self.db.reader() as conn:
            rows = conn.execute(sa.select(w).order_by(w.c.id)).all()
            if not rows:
                return []
            good = journaled(conn, "window", [r.id for r in rows])
        return [_window(r) for r in rows if r.id in good]
