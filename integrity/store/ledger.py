"""The hash chain over events and approvals, its check, and pruning with a checkpoint.

Every state an event or approval row takes is appended to the ledger with the digest
of the previous ledger row. The check walks the chain and compares the newest
snapshot of each row with the row as it is now: a deleted, edited or smuggled-in
event or approval shows, as does a deleted or edited ledger row. (Without a secret,
someone who can rewrite the whole database can rewrite the chain too: keep the head
digest `status` prints off the host, as with the baseline root.) Pruning replaces the
ledger with a checkpoint that names the previous head, then the surviving rows.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import blake3
import sqlalchemy as sa

from integrity.store import schema as models
from integrity.store.engine import Database, chunks
from integrity.times import utcnow

GENESIS = "0" * 64
#: Columns outside the chain: informational, updated on every sighting.
_UNCHAINED = {"last_seen"}
#: Columns added after rows were first chained: left out of a snapshot while NULL,
#: so rows chained before the column existed still match their ledger records.
_LATER = {"window_id"}
_TABLES = {"event": models.event, "approval": models.approval,
           "window": models.maintenance_window, "access": models.access}
#: Fields a row keeps for life: a later snapshot with others means its id was reused
#: after the row was deleted.
_IDENTITY = {"event": ("key", "first_seen"), "approval": ("time",),
             "window": ("created",), "access": ("key", "first_seen")}


def _snapshot(row: Any) -> str:
    data = {k: (v.isoformat() if isinstance(v, dt.datetime) else
                v.hex() if isinstance(v, bytes) else v)
            for k, v in row._mapping.items()
            if k not in _UNCHAINED and not (k in _LATER and v is None)}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _digest(prev: str, kind: str, ref: int, content: str) -> str:
    return blake3.blake3(f"{prev}\x00{kind}\x00{ref}\x00".encode() + content.encode()
                         ).hexdigest()


def _head(conn: sa.Connection) -> str:
    row = conn.execute(sa.select(models.ledger.c.digest)
                       .order_by(models.ledger.c.seq.desc()).limit(1)).scalar()
    return str(row) if row else GENESIS


def journal(conn: sa.Connection, kind: str, ids: Iterable[int]) -> None:
    """Append the current state of these rows to the chain (inside the writer's
    transaction, which holds the write lock: the chain never forks)."""
    table = _TABLES[kind]
    wanted = sorted(set(ids))
    if not wanted:
        return
    prev = _head(conn)
    now = utcnow()
    rows = []
    for chunk in chunks(wanted):
        for row in conn.execute(sa.select(table).where(table.c.id.in_(chunk))
                                .order_by(table.c.id)):
            content = _snapshot(row)
            digest = _digest(prev, kind, row.id, content)
            rows.append({"time": now, "kind": kind, "ref": row.id, "content": content,
                         "prev": prev, "digest": digest})
            prev = digest
    if rows:
        conn.execute(models.ledger.insert(), rows)


def journaled(conn: sa.Connection, kind: str, ids: Iterable[int]) -> set[int]:
    """Those of `ids` whose row is exactly as the chain last recorded it.

    For records that grant something (a maintenance window lowers severities): a
    row inserted or edited behind integrity's back is not honoured, whatever the
    full chain check later reports.
    """
    table, led = _TABLES[kind], models.ledger
    wanted = sorted(set(ids))
    latest: dict[int, str] = {}
    current: dict[int, str] = {}
    for chunk in chunks(wanted):
        for ref, content in conn.execute(
                sa.select(led.c.ref, led.c.content).where(
                    led.c.kind == kind, led.c.ref.in_(chunk)).order_by(led.c.seq)):
            latest[ref] = content
        for row in conn.execute(sa.select(table).where(table.c.id.in_(chunk))):
            current[row.id] = _snapshot(row)
    return {ref for ref, snap in current.items() if latest.get(ref) == snap}


@dataclass
class ChainReport:
    """The chain's state: head digest, rows, and every problem found."""

    head: str = GENESIS
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Ledger:
    """The ledger table of one database: its check, head and pruning."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def head(self) -> str:
        """The digest of the newest ledger row (GENESIS for an empty chain)."""
        with self.db.reader() as conn:
            return _head(conn)

    def check(self, limit: int = 20) -> ChainReport:
        """Walk the chain and compare it with the event and approval tables."""
        report = ChainReport()
        latest: dict[tuple[str, int], str] = {}
        identity: dict[tuple[str, int], tuple[object, ...]] = {}
        led = models.ledger
        with self.db.reader() as conn:
            prev = None
            for seq, kind, ref, content, row_prev, digest in conn.execute(
                    sa.select(led.c.seq, led.c.kind, led.c.ref, led.c.content, led.c.prev,
                              led.c.digest).order_by(led.c.seq)):
                report.rows += 1
                if prev is not None and row_prev != prev:
                    report.problems.append(f"ledger row {seq}: does not follow row before it "
                                           "(a ledger row was deleted or edited)")
                if _digest(row_prev, kind, ref, content) != digest:
                    report.problems.append(f"ledger row {seq}: digest does not match its "
                                           "content (edited)")
                prev = digest
                if kind in _TABLES:
                    latest[(kind, ref)] = content
                    try:
                        fields = json.loads(content)
                        ident = tuple(fields.get(name) for name in _IDENTITY[kind])
                    except (ValueError, AttributeError):
                        ident = ()
                    first = identity.setdefault((kind, ref), ident)
                    if first != ident:
                        report.problems.append(f"{kind} {ref}: deleted, and its id reused by "
                                               f"another {kind} (ledger row {seq})")
            report.head = prev or GENESIS
            for kind, table in _TABLES.items():
                for row in conn.execute(sa.select(table).order_by(table.c.id)):
                    recorded = latest.pop((kind, row.id), None)
                    if recorded is None:
                        report.problems.append(f"{kind} {row.id}: not in the ledger "
                                               "(inserted behind integrity's back)")
                    elif recorded != _snapshot(row):
                        report.problems.append(f"{kind} {row.id}: differs from its last "
                                               "recorded state (edited)")
            for kind, ref in sorted(latest):
                report.problems.append(f"{kind} {ref}: in the ledger but gone (deleted)")
        if len(report.problems) > limit:
            more = len(report.problems) - limit
            report.problems = report.problems[:limit] + [f"... and {more} more"]
        return report

    def prune(self, older_than: dt.datetime) -> tuple[int, str]:
        """Delete closed events last seen before `older_than` (and approvals none of
        whose events remain), leaving a chained checkpoint; return (events removed,
        new head)."""
        e, a, led = models.event, models.approval, models.ledger
        w, acc = models.maintenance_window, models.access
        with self.db.writer() as conn, conn.begin():
            old_head = _head(conn)
            gone = list(conn.execute(sa.select(e.c.id).where(
                e.c.status != "open", e.c.last_seen < older_than)).scalars())
            # Changes counted by the events about to go, so that totals (metrics'
            # integrity_changes_total) never go down: kept in the checkpoint.
            pruned = _pruned_changes(conn)
            for chunk in chunks(gone):
                for kind, count in conn.execute(
                        sa.select(e.c.kind, sa.func.sum(e.c.count))
                        .where(e.c.id.in_(chunk), e.c.kind != "warning")
                        .group_by(e.c.kind)):
                    pruned[kind] = pruned.get(kind, 0) + int(count)
            for chunk in chunks(gone):
                conn.execute(e.delete().where(e.c.id.in_(chunk)))
            referenced = sa.select(e.c.approval_id).where(e.c.approval_id.is_not(None))
            conn.execute(a.delete().where(a.c.time < older_than, a.c.id.not_in(referenced)))
            expected = sa.select(e.c.window_id).where(e.c.window_id.is_not(None))
            conn.execute(w.delete().where(w.c.end < older_than, w.c.id.not_in(expected)))
            conn.execute(acc.delete().where(acc.c.last_seen < older_than))
            conn.execute(led.delete())
            content = json.dumps({"checkpoint": utcnow().isoformat(), "previous_head": old_head,
                                  "pruned_events": len(gone), "pruned_changes": pruned,
                                  "older_than": older_than.isoformat()}, sort_keys=True)
            conn.execute(led.insert().values(time=utcnow(), kind="checkpoint", ref=0,
                                             content=content, prev=old_head,
                                             digest=_digest(old_head, "checkpoint", 0, content)))
            for kind, table in _TABLES.items():
                journal(conn, kind, conn.execute(sa.select(table.c.id)).scalars())
            head = _head(conn)
        return len(gone), head

    def pruned_changes(self) -> dict[str, int]:
        """Changes (by kind) counted by events that pruning removed since the start."""
        with self.db.reader() as conn:
            return _pruned_changes(conn)


def _pruned_changes(conn: sa.Connection) -> dict[str, int]:
    """The totals the newest checkpoint carries (a checkpoint is the chain's first row)."""
    led = models.ledger
    content = conn.execute(sa.select(led.c.content).where(led.c.kind == "checkpoint")
                           .order_by(led.c.seq.desc()).limit(1)).scalar()
    if content is None:
        return {}
    try:
        totals = json.loads(content).get("pruned_changes") or {}
        return {str(k): int(v) for k, v in totals.items()}
    except (ValueError, AttributeError, TypeError):
        return {}
