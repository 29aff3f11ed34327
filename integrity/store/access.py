"""Access records: who opened files under `access = true` rules, folded per hour.

One row per (file, hour, executable, uid) with a count: a backup job that opens a
private key ten thousand times an hour is one row, and the 02:00 `cat /etc/shadow` by
an unknown binary is a row of its own. Rows are chained in the ledger like events, so
deleting the record of a read is tampering. Content is never read, let alone stored.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import sqlalchemy as sa

from integrity.paths import display, from_key, to_key
from integrity.store import schema
from integrity.store.engine import Database, chunks
from integrity.store.ledger import journal
from integrity.times import iso


@dataclass(frozen=True)
class Read:
    """Opens of one file by one program and user within one hour, as the listener
    folded them."""

    path: bytes
    hour: dt.datetime
    exe: str | None
    uid: int | None
    rule: str | None
    count: int
    first_seen: dt.datetime
    last_seen: dt.datetime
    actor: dict[str, Any] | None


class AccessDoc(TypedDict):
    """An access record as `events --access --json` shows it."""

    id: int
    kind: str
    time: str | None
    last_seen: str | None
    hour: str | None
    path: str
    rule: str | None
    count: int
    actor: dict[str, Any] | None


def hour_of(when: dt.datetime) -> dt.datetime:
    """The start of the (UTC) hour a time falls in: the folding bucket."""
    return when.replace(minute=0, second=0, microsecond=0)


class Access:
    """The access table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def fold(self, reads: Sequence[Read]) -> tuple[list[int], list[int]]:
        """Add reads to their (file, hour, exe, uid) rows, creating rows as needed, in
        one journaled transaction. Returns (new row ids, updated row ids)."""
        a = schema.access
        new: list[int] = []
        updated: list[int] = []
        merged: dict[tuple[bytes, dt.datetime, str | None, int | None], Read] = {}
        for read in reads:
            fold = (to_key(read.path), hour_of(read.hour), read.exe, read.uid)
            known = merged.get(fold)
            merged[fold] = read if known is None else Read(
                read.path, read.hour, read.exe, read.uid, known.rule,
                known.count + read.count, min(known.first_seen, read.first_seen),
                max(known.last_seen, read.last_seen), known.actor)
        if not merged:
            return new, updated
        with self.db.writer() as conn, conn.begin():
            # One look-up per chunk of keys, then one executemany each for updates
            # and inserts: a flood of opens of distinct files (thousands per burst)
            # must not cost a round trip per row.
            rows: dict[tuple[bytes, dt.datetime, str | None, int | None], int] = {}
            hours = sorted({fold[1] for fold in merged})
            keys = sorted({fold[0] for fold in merged})
            for chunk in chunks(keys):
                for row_id, key, hour, exe, uid in conn.execute(
                        sa.select(a.c.id, a.c.key, a.c.hour, a.c.exe, a.c.uid).where(
                            a.c.hour.in_(hours), a.c.key.in_(chunk))):
                    rows[(key, hour, exe, uid)] = row_id
            updates = [{"b_id": rows[fold], "b_count": read.count,
                        "b_last": read.last_seen}
                       for fold, read in merged.items() if fold in rows]
            if updates:
                greatest = sa.func.max if conn.dialect.name == "sqlite" else sa.func.greatest
                conn.execute(a.update().where(a.c.id == sa.bindparam("b_id")).values(
                    count=a.c.count + sa.bindparam("b_count"),
                    last_seen=greatest(a.c.last_seen, sa.bindparam("b_last"))), updates)
                updated = [int(rows[fold]) for fold in merged if fold in rows]
            inserts = [{"key": key, "hour": hour, "exe": exe, "uid": uid, "rule": read.rule,
                        "count": read.count, "first_seen": read.first_seen,
                        "last_seen": read.last_seen,
                        "actor": json.dumps(read.actor) if read.actor else None}
                       for (key, hour, exe, uid), read in merged.items()
                       if (key, hour, exe, uid) not in rows]
            if inserts:
                # We hold the write lock: every id above the highest is one of ours.
                before = conn.execute(sa.select(sa.func.coalesce(sa.func.max(a.c.id), 0)
                                                )).scalar_one()
                conn.execute(a.insert(), inserts)
                new = list(conn.execute(sa.select(a.c.id).where(a.c.id > before)
                                        .order_by(a.c.id)).scalars())
            journal(conn, "access", [*new, *updated])
        return new, updated

    def list(self, *, since: dt.datetime | None = None,
             ids: Sequence[int] | None = None) -> list[AccessDoc]:
        """Access records, oldest hour first."""
        a = schema.access
        query = sa.select(a)
        if since is not None:
            query = query.where(a.c.last_seen >= since)
        docs: list[AccessDoc] = []
        with self.db.reader() as conn:
            for chunk in (chunks(list(ids)) if ids is not None else [None]):
                q = query if chunk is None else query.where(a.c.id.in_(chunk))
                docs += [_doc(row) for row in conn.execute(
                    q.order_by(a.c.hour, a.c.key, a.c.id)).mappings()]
        return docs


def _doc(row: sa.RowMapping) -> AccessDoc:
    return {"id": row["id"], "kind": "access", "time": iso(row["first_seen"]),
            "last_seen": iso(row["last_seen"]), "hour": iso(row["hour"]),
            "path": display(from_key(row["key"])), "rule": row["rule"],
            "count": row["count"],
            "actor": json.loads(row["actor"]) if row["actor"] else None}
