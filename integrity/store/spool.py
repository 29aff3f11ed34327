"""The local side of a fleet host: the SQLite database is the spool.

Everything the central copy still lacks is recorded here by SQLite triggers, in the
transaction that makes it, so nothing a crash, an outage or a slow network does can
lose it:

- `fleet_ledger`: a copy of every ledger (hash chain) row. `prune` rewrites the
  ledger; this copy keeps the order the central side verifies, numbered by an
  AUTOINCREMENT sequence that is never reused: (host, seq) is the push's idempotency
  key.
- `fleet_entry`: the keys written into the active baseline (approvals delete and
  insert entry rows), an empty key when the baseline row itself was re-sealed (a new
  root, generation or sealed policy), and a NULL key when a new baseline came into
  force: the next push sends just those entries (a delta), or the whole baseline.
- `fleet_request`: approval requests from the admin, claimed before they are applied
  so a request is applied at most once, and their outcome until reported.

Rows are deleted once the central database has committed them. The triggers are made
when a host first pushes (`prepare`), so hosts outside a fleet pay nothing, and are
checked before every push: a trigger an intruder dropped is repaired, and what it
missed is recovered from the ledger and the baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from integrity.store import schema as models
from integrity.store.engine import CHUNK, Database
from integrity.times import utcnow

GENESIS = "0" * 64
#: The marker key of a re-sealed baseline row (no entry key is empty: "/" is b"\x00").
RESEALED = b""

_ACTIVE = "(SELECT id FROM baseline WHERE state = 'active')"
#: name -> DDL. The entry triggers fire for the active baseline only: init retires the
#: old generation before deleting its rows and writes a `building` one (its
#: activation is one marker), approvals the active one.
TRIGGERS = {
    "fleet_ledger_spool":
        "CREATE TRIGGER IF NOT EXISTS fleet_ledger_spool AFTER INSERT ON ledger BEGIN "
        "INSERT INTO fleet_ledger (time, kind, ref, content, prev, digest) VALUES "
        "(NEW.time, NEW.kind, NEW.ref, NEW.content, NEW.prev, NEW.digest); END",
    "fleet_baseline_spool":
        "CREATE TRIGGER IF NOT EXISTS fleet_baseline_spool AFTER UPDATE OF state ON "
        "baseline WHEN NEW.state = 'active' AND OLD.state IS NOT 'active' BEGIN "
        "INSERT INTO fleet_entry (baseline_id, key) VALUES (NEW.id, NULL); END",
    # An approval that changes no entry (`approve --policy` over the same paths) still
    # re-seals the baseline: a new root and generation to push.
    "fleet_baseline_reseal":
        "CREATE TRIGGER IF NOT EXISTS fleet_baseline_reseal AFTER UPDATE OF root, "
        "generation, policy, signature, signer ON baseline WHEN NEW.state = 'active' "
        "AND OLD.state = 'active' BEGIN "
        "INSERT INTO fleet_entry (baseline_id, key) VALUES (NEW.id, X''); END",
    "fleet_entry_insert":
        f"CREATE TRIGGER IF NOT EXISTS fleet_entry_insert AFTER INSERT ON entry "
        f"WHEN NEW.baseline_id = {_ACTIVE} BEGIN "
        f"INSERT INTO fleet_entry (baseline_id, key) VALUES (NEW.baseline_id, NEW.key); END",
    "fleet_entry_delete":
        f"CREATE TRIGGER IF NOT EXISTS fleet_entry_delete AFTER DELETE ON entry "
        f"WHEN OLD.baseline_id = {_ACTIVE} BEGIN "
        f"INSERT INTO fleet_entry (baseline_id, key) VALUES (OLD.baseline_id, OLD.key); END",
    # Nothing of ours updates an entry row in place: whoever does it is shown centrally.
    "fleet_entry_update":
        f"CREATE TRIGGER IF NOT EXISTS fleet_entry_update AFTER UPDATE ON entry "
        f"WHEN NEW.baseline_id = {_ACTIVE} OR OLD.baseline_id = {_ACTIVE} BEGIN "
        f"INSERT INTO fleet_entry (baseline_id, key) VALUES (NEW.baseline_id, NEW.key); "
        f"INSERT INTO fleet_entry (baseline_id, key) VALUES (OLD.baseline_id, OLD.key); END",
}
#: Entry columns pushed after the key (the kept text's digest, never the text).
ENTRY_FIELDS = ("type", "content", "size", "mode", "uid", "gid", "inode", "nlink", "mtime",
                "ctime", "link", "xattrs", "dev", "package", "kept")
#: A chain record as pushed: (seq, time, kind, ref, content, prev, digest).
Record = tuple[int, Any, str, int, str, str, str]


@dataclass
class Plan:
    """A consistent view of what to push of the baseline (one SQLite read transaction)."""

    conn: sa.Connection
    #: The newest spool number it covers: the push's idempotency key centrally.
    push: int
    #: "full", "delta", or None when the spooled changes are for a retired baseline.
    kind: str | None
    baseline: dict[str, Any] = field(default_factory=dict)
    keys: list[bytes] = field(default_factory=list)
    entries: int = 0
    ledger: list[Record] = field(default_factory=list)
    ledger_seq: int = 0

    @property
    def changes(self) -> int:
        return self.entries if self.kind == "full" else len(self.keys)

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """(key, removed, type, content, ..., kept) for every entry to push."""
        e = models.entry
        cols = [e.c.key, *(e.c[name] for name in ENTRY_FIELDS)]
        base = sa.select(*cols).where(e.c.baseline_id == self.baseline["id"])
        if self.kind == "full":
            # The whole baseline: straight from the driver's cursor, in this snapshot
            # (Core's per-row processing would double the time of a 100k-entry push).
            compiled = base.order_by(e.c.key).compile(self.conn)
            cursor = self.conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(str(compiled), [compiled.params[name]
                                               for name in compiled.positiontup or ()])
                while batch := cursor.fetchmany(5000):
                    for row in batch:
                        yield (row[0], False, *row[1:])
            finally:
                cursor.close()
            return
        for start in range(0, len(self.keys), CHUNK):
            chunk = self.keys[start:start + CHUNK]
            found = {row[0]: row for row in self.conn.execute(base.where(e.c.key.in_(chunk)))}
            for key in chunk:
                hit = found.get(key)
                yield (key, False, *hit[1:]) if hit is not None else \
                    (key, True, *([None] * len(ENTRY_FIELDS)))


class Spool:
    """The fleet_* tables of one local database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def prepare(self) -> list[str]:
        """Start spooling (the first time: the chain so far is queued, and the whole
        baseline), or repair the triggers; returns what was repaired, for the log."""
        state_t, b = models.fleet_state, models.baseline
        repaired: list[str] = []
        with self.db.writer() as conn, conn.begin():
            state = conn.execute(sa.select(state_t)).mappings().first()
            present = set(conn.execute(sa.text(
                "SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars())
            missing = [name for name in TRIGGERS if name not in present]
            if state is None:
                conn.execute(state_t.insert().values(id=1, enabled=utcnow()))
                _copy_ledger(conn, after=None)
                _mark_full(conn)
            elif missing:
                repaired.append("spool triggers missing (" + ", ".join(missing) + "): "
                                "recreated; the baseline is sent whole")
                if "fleet_ledger_spool" in missing:
                    copied = _copy_ledger(conn, after=_newest_spooled(conn, state))
                    repaired.append(f"{copied} chain records recovered from the event log")
                _mark_full(conn)
            else:
                active = conn.execute(sa.select(b.c.id, b.c.root, b.c.generation)
                                      .where(b.c.state == "active")).first()
                pending = conn.execute(sa.select(sa.func.count())
                                       .select_from(models.fleet_entry)).scalar()
                if active is not None and not pending and (
                        (state["baseline_id"], state["root"], state["generation"])
                        != tuple(active)):
                    # The baseline moved without a trace in the spool: send it whole.
                    repaired.append("baseline changed without a spooled change: sent whole")
                    _mark_full(conn)
            for name in missing:
                conn.exec_driver_sql(TRIGGERS[name])
        return repaired

    def mark_full(self) -> None:
        """Have the next push send the whole baseline (the central side asked: resync)."""
        with self.db.writer() as conn, conn.begin():
            _mark_full(conn)

    # -- the event chain ---------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(the newest chain record's spool number, its digest): what the host reports."""
        with self.db.reader() as conn, conn.begin():
            return _head(conn)

    def pending_ledger(self, limit: int) -> list[Record]:
        """The oldest chain records not yet pushed, in order."""
        with self.db.reader() as conn:
            return _pending(conn, limit)

    def ack_ledger(self, seq: int, digest: str) -> None:
        """The central database holds every chain record up to `seq`."""
        led = models.fleet_ledger
        with self.db.writer() as conn, conn.begin():
            conn.execute(led.delete().where(led.c.seq <= seq))
            conn.execute(models.fleet_state.update().values(last_digest=digest))

    def unpushed_records(self) -> int:
        """Records the central database still lacks: chain records and baseline changes
        spooled, or, before the first push, every chain record and the baseline."""
        with self.db.reader() as conn:
            return _unpushed(conn)

    def backlog_and_seal(self) -> tuple[int, tuple[str | None, int | None]]:
        """unpushed_records() and the (root, generation) of the baseline in force, read
        together: with nothing owed, the seal is the one the central copy must hold."""
        b = models.baseline
        with self.db.reader() as conn, conn.begin():
            seal = conn.execute(sa.select(b.c.root, b.c.generation)
                                .where(b.c.state == "active")).first()
            return _unpushed(conn), (seal[0], seal[1]) if seal else (None, None)

    # -- the baseline ------------------------------------------------------------

    @contextlib.contextmanager
    def plan(self, ledger_limit: int) -> Iterator[Plan | None]:
        """The baseline changes to push now, read in one transaction with the root they
        lead to and the chain records up to that point; None when there are none."""
        b, e, fe = models.baseline, models.entry, models.fleet_entry
        with self.db.reader() as conn, conn.begin():
            marks = conn.execute(sa.select(fe.c.seq, fe.c.baseline_id, fe.c.key)
                                 .order_by(fe.c.seq)).all()
            if not marks:
                yield None
                return
            state = conn.execute(sa.select(models.fleet_state)).mappings().first()
            active = conn.execute(sa.select(b).where(b.c.state == "active")).mappings().first()
            plan = Plan(conn, push=int(marks[-1][0]), kind=None)
            if active is not None:
                mine = [m for m in marks if m[1] == active["id"]]
                full = (state is None or state["baseline_id"] != active["id"]
                        or any(m[2] is None for m in mine))
                plan.kind = "full" if full else ("delta" if mine else None)
                if not full:
                    plan.keys = sorted({m[2] for m in mine
                                        if m[2] is not None and m[2] != RESEALED})
                plan.baseline = dict(active)
                plan.entries = int(conn.execute(sa.select(sa.func.count()).select_from(e)
                                                .where(e.c.baseline_id == active["id"])
                                                ).scalar() or 0)
                plan.ledger_seq = _head(conn)[0]
                plan.ledger = _pending(conn, ledger_limit, upto=plan.ledger_seq)
            yield plan

    def ack_plan(self, plan: Plan) -> None:
        """The central database holds this baseline push (or refused it for good)."""
        fe = models.fleet_entry
        with self.db.writer() as conn, conn.begin():
            conn.execute(fe.delete().where(fe.c.seq <= plan.push))
            if plan.kind is not None:
                base = plan.baseline
                conn.execute(models.fleet_state.update().values(
                    push=plan.push, baseline_id=base["id"], root=base["root"],
                    generation=base["generation"]))

    # -- requests from the admin -------------------------------------------------

    def claim(self, request_id: int, kind: str) -> bool:
        """Take a request to apply it: True once per request, ever (a crash midway
        leaves it claimed and without outcome: reported as interrupted, never applied
        twice)."""
        r = models.fleet_request
        with self.db.writer() as conn, conn.begin():
            if conn.execute(sa.select(r.c.id).where(r.c.id == request_id)).first():
                return False
            conn.execute(r.insert().values(id=request_id, received=utcnow(), kind=kind))
            return True

    def finish(self, request_id: int, outcome: str, *, approval_id: int | None = None,
               root: str | None = None, detail: str | None = None) -> None:
        """Record what applying a request did."""
        r = models.fleet_request
        with self.db.writer() as conn, conn.begin():
            conn.execute(r.update().where(r.c.id == request_id).values(
                outcome=outcome, approval_id=approval_id, root=root, detail=detail))

    def unreported(self) -> list[dict[str, Any]]:
        """Requests whose outcome the central side has not heard (interrupted too)."""
        r = models.fleet_request
        with self.db.reader() as conn:
            rows = conn.execute(sa.select(r).where(r.c.reported.is_(None))
                                .order_by(r.c.id)).mappings().all()
        return [dict(row) for row in rows]

    def reported(self, request_id: int) -> None:
        """The central database has the outcome of a request."""
        r = models.fleet_request
        with self.db.writer() as conn, conn.begin():
            conn.execute(r.update().where(r.c.id == request_id).values(reported=utcnow()))


def _unpushed(conn: sa.Connection) -> int:
    def count(table: sa.Table) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
                   or 0)
    if conn.execute(sa.select(models.fleet_state.c.id)).first() is None:
        active = conn.execute(sa.select(models.baseline.c.id).where(
            models.baseline.c.state == "active")).first()
        return count(models.ledger) + (active is not None)
    return count(models.fleet_ledger) + count(models.fleet_entry)


def _head(conn: sa.Connection) -> tuple[int, str]:
    seq = conn.execute(sa.text(
        "SELECT seq FROM sqlite_sequence WHERE name = 'fleet_ledger'")).scalar()
    digest = conn.execute(sa.select(models.ledger.c.digest)
                          .order_by(models.ledger.c.seq.desc()).limit(1)).scalar()
    return int(seq or 0), str(digest or GENESIS)


def _pending(conn: sa.Connection, limit: int, upto: int | None = None) -> list[Record]:
    led = models.fleet_ledger
    query = sa.select(led).order_by(led.c.seq).limit(limit)
    if upto is not None:
        query = query.where(led.c.seq <= upto)
    return [(int(r[0]), r[1], str(r[2]), int(r[3]), str(r[4]), str(r[5]), str(r[6]))
            for r in conn.execute(query)]


def _newest_spooled(conn: sa.Connection, state: Any) -> str | None:
    led = models.fleet_ledger
    newest = conn.execute(sa.select(led.c.digest).order_by(led.c.seq.desc()).limit(1)
                          ).scalar()
    return str(newest) if newest else state["last_digest"]


def _copy_ledger(conn: sa.Connection, after: str | None) -> int:
    """Queue ledger records (those after the one with digest `after`, if it is there)."""
    led = models.ledger
    start = None
    if after is not None:
        start = conn.execute(sa.select(led.c.seq).where(led.c.digest == after)).scalar()
    query = sa.select(led.c.time, led.c.kind, led.c.ref, led.c.content, led.c.prev,
                      led.c.digest).order_by(led.c.seq)
    if start is not None:
        query = query.where(led.c.seq > start)
    result = conn.execute(models.fleet_ledger.insert().from_select(
        ["time", "kind", "ref", "content", "prev", "digest"], query))
    return int(result.rowcount or 0)


def _mark_full(conn: sa.Connection) -> None:
    b = models.baseline
    active = conn.execute(sa.select(b.c.id).where(b.c.state == "active")).scalar()
    if active is not None:
        conn.execute(models.fleet_entry.insert().values(baseline_id=active, key=None))
