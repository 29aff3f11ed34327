"""Runs and heartbeats: what ran when with what outcome, and whether a watcher lives.

`status` builds on both: the last scan's counts, and a watcher whose heartbeat is
older than three of its intervals is stale.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from integrity.paths import display
from integrity.store import schema
from integrity.store.engine import Database, inserted_id
from integrity.times import utcnow


@dataclass(frozen=True)
class RunInfo:
    """One finished init, verify or scan."""

    id: int
    command: str
    started: dt.datetime
    finished: dt.datetime | None
    paths: str | None
    fast: bool
    scanned: int
    added: int
    removed: int
    modified: int
    errors: int
    exit_code: int | None


@dataclass(frozen=True)
class WatcherInfo:
    """The newest watcher's row: who it is and its last heartbeat."""

    id: int
    host: str
    pid: int
    started: dt.datetime
    heartbeat: dt.datetime
    interval: int
    state: str
    watches: int
    unwatched: str | None


class Runs:
    """The run and watcher tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def start(self, command: str, baseline_id: int | None, paths: Sequence[bytes],
              fast: bool = False) -> int:
        """Record that a run started; returns its id."""
        r = schema.run
        with self.db.writer() as conn, conn.begin():
            return inserted_id(conn.execute(r.insert().values(
                command=command, started=utcnow(), baseline_id=baseline_id,
                paths="\n".join(display(p) for p in paths) or None, fast=int(fast),
                scanned=0, added=0, removed=0, modified=0, errors=0,
            )))

    def finish(self, run_id: int, *, scanned: int, added: int, removed: int,
               modified: int, errors: int, exit_code: int) -> None:
        """Record a run's counts and outcome."""
        r = schema.run
        with self.db.writer() as conn, conn.begin():
            conn.execute(r.update().where(r.c.id == run_id).values(
                finished=utcnow(), scanned=scanned, added=added, removed=removed,
                modified=modified, errors=errors, exit_code=exit_code))

    def last(self, *commands: str) -> RunInfo | None:
        """The newest finished run (of these commands, if given)."""
        r = schema.run
        query = sa.select(r.c.id, r.c.command, r.c.started, r.c.finished, r.c.paths, r.c.fast,
                          r.c.scanned, r.c.added, r.c.removed, r.c.modified, r.c.errors,
                          r.c.exit_code).where(r.c.finished.is_not(None))
        if commands:
            query = query.where(r.c.command.in_(commands))
        with self.db.reader() as conn:
            row = conn.execute(query.order_by(r.c.id.desc()).limit(1)).first()
        if row is None:
            return None
        values = list(row)
        values[5] = bool(values[5])
        return RunInfo(*values)

    def heartbeat(self, watcher_id: int | None, *, interval: int, state: str,
                  watches: int, unwatched: str | None,
                  patience: float | None = None) -> int:
        """Record that this watcher is alive (creating its row on the first beat),
        waiting at most `patience` seconds for the write lock when given."""
        w = schema.watcher
        now = utcnow()
        with self.db.writer() as conn, \
                (self.db.patience(conn, patience) if patience else contextlib.nullcontext()), \
                conn.begin():
            if watcher_id is None:
                return inserted_id(conn.execute(w.insert().values(
                    host=socket.gethostname(), pid=os.getpid(), started=now,
                    heartbeat=now, interval=interval, state=state, watches=watches,
                    unwatched=unwatched,
                )))
            conn.execute(w.update().where(w.c.id == watcher_id).values(
                heartbeat=now, state=state, watches=watches, unwatched=unwatched))
            return watcher_id

    def latest_watcher(self) -> WatcherInfo | None:
        """The most recently started watcher."""
        w = schema.watcher
        with self.db.reader() as conn:
            row = conn.execute(sa.select(
                w.c.id, w.c.host, w.c.pid, w.c.started, w.c.heartbeat, w.c.interval,
                w.c.state, w.c.watches, w.c.unwatched,
            ).order_by(w.c.started.desc(), w.c.id.desc()).limit(1)).first()
        return WatcherInfo(*row) if row else None

    def last_success(self, *commands: str) -> RunInfo | None:
        """The newest run of these commands that ran to the end (exit 0 or 1: changes
        found is a successful scan; 2 is one that could not run)."""
        r = schema.run
        with self.db.reader() as conn:
            row = conn.execute(sa.select(
                r.c.id, r.c.command, r.c.started, r.c.finished, r.c.paths, r.c.fast,
                r.c.scanned, r.c.added, r.c.removed, r.c.modified, r.c.errors,
                r.c.exit_code).where(
                r.c.finished.is_not(None), r.c.exit_code.in_((0, 1)),
                r.c.command.in_(commands)).order_by(r.c.id.desc()).limit(1)).first()
        if row is None:
            return None
        values = list(row)
        values[5] = bool(values[5])
        return RunInfo(*values)

    def overflowed(self, watcher_id: int | None) -> None:
        """Count an inotify queue overflow against this watcher's row."""
        if watcher_id is None:
            return
        w = schema.watcher
        with self.db.writer() as conn, conn.begin():
            conn.execute(w.update().where(w.c.id == watcher_id)
                         .values(overflows=w.c.overflows + 1))

    def overflows(self) -> int:
        """inotify queue overflows over every watcher that ever ran here."""
        w = schema.watcher
        with self.db.reader() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(
                sa.func.sum(w.c.overflows), 0))).scalar_one())
