"""The hash chain over every record a decision or an alert rests on, its check, and
pruning with a checkpoint.

Every state an event, approval, owed alert (outbox row) or active baseline takes is
appended to the ledger with the digest of the previous ledger row; a row integrity
deletes itself (a delivered alert, a swept baseline) gets a tombstone. The check walks
the chain and compares the newest snapshot of each row with the row as it is now: a
deleted, edited or smuggled-in record shows, as does a deleted or edited ledger row,
and an active baseline the chain does not name (a wiped ledger). Someone who can
rewrite the whole database can rewrite the chain too: keep the head digest `status`
prints off the host (`--expect-head`), as with the baseline root. Pruning replaces the
ledger with a checkpoint that names the previous head, then the surviving rows; the
rows it removes are archived with the digest of their content, so a head kept before a
prune is still an ancestor, and only one the archived rows hash to.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import sqlalchemy as sa

from integrity.store import schema as models
from integrity.store.engine import CHUNK, Database, chunks
from integrity.times import utcnow

GENESIS = "0" * 64
_TABLES = {"event": models.event, "approval": models.approval,
           "outbox": models.outbox, "baseline": models.baseline,
           "window": models.maintenance_window, "access": models.access}
#: Columns outside the chain: informational or retry bookkeeping.
_UNCHAINED = {"event": {"last_seen"}, "approval": set(),
              "outbox": {"attempts", "next_attempt", "last_error"},
              # `state` moves building -> active -> retired; only active rows are checked.
              "baseline": {"state", "activated"},
              "window": set(), "access": {"last_seen"}}
#: Columns added after rows were first chained: left out of a snapshot while NULL,
#: so rows chained before the column existed still match their ledger records.
_LATER = {"window_id", "diff"}
#: Fields a row keeps for life: a later snapshot with others means its id was reused
#: after the row was deleted.
_IDENTITY = {"event": ("key", "first_seen"), "approval": ("time",),
             "outbox": ("created", "event_id", "sink"), "baseline": ("created",),
             "window": ("created",), "access": ("key", "first_seen")}
_TOMBSTONE = '{"deleted":true}'


def _snapshot(kind: str, row: Any) -> str:
    return _snapshot_of(kind, row._fields, row)


def _snapshot_of(kind: str, names: Sequence[str], values: Sequence[Any]) -> str:
    """A row's chained state: its columns by name (`names`, in `values`' order)."""
    skip = _UNCHAINED[kind]
    data = {k: (v.isoformat() if isinstance(v, dt.datetime) else
                v.hex() if isinstance(v, bytes) else v)
            for k, v in zip(names, values)
            if k not in skip and not (k in _LATER and v is None)}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


_V2 = b"integrity-ledger-v2\x00"


def _content_digest(content: str) -> bytes:
    return blake3.blake3(content.encode()).digest()


def _digest_of(prev: str, kind: str, ref: int, content_digest: bytes) -> str:
    """A chain row's digest (since 0013): over its content's digest, so that a pruned
    row keeps what proves its place in 32 bytes instead of its content."""
    return blake3.blake3(_V2 + f"{prev}\x00{kind}\x00{ref}\x00".encode()
                         + content_digest).hexdigest()


def _digest(prev: str, kind: str, ref: int, content: str) -> str:
    return _digest_of(prev, kind, ref, _content_digest(content))


def _holds(prev: str, kind: str, ref: int, content: str, digest: str) -> bool:
    """Whether a row hashes to its digest, as chained now or before 0013 (over the
    content itself)."""
    return (_digest(prev, kind, ref, content) == digest
            or blake3.blake3(f"{prev}\x00{kind}\x00{ref}\x00".encode() + content.encode()
                             ).hexdigest() == digest)


def _head(conn: sa.Connection) -> str:
    row = conn.execute(sa.select(models.ledger.c.digest)
                       .order_by(models.ledger.c.seq.desc()).limit(1)).scalar()
    return str(row) if row else GENESIS


def _append(conn: sa.Connection, entries: list[tuple[str, int, str]],
            prev: str | None = None) -> None:
    """Chain entries after the head (or after `prev`: a checkpoint names the head of
    the ledger it replaces)."""
    prev = prev if prev is not None else _head(conn)
    now = utcnow()
    rows = []
    for kind, ref, content in entries:
        digest = _digest(prev, kind, ref, content)
        rows.append({"time": now, "kind": kind, "ref": ref, "content": content,
                     "prev": prev, "digest": digest})
        prev = digest
    if rows:
        conn.execute(models.ledger.insert(), rows)


def journal(conn: sa.Connection, kind: str, ids: Iterable[int]) -> None:
    """Append the current state of these rows to the chain (inside the writer's
    transaction, which holds the write lock: the chain never forks)."""
    table = _TABLES[kind]
    wanted = sorted(set(ids))
    entries: list[tuple[str, int, str]] = []
    for chunk in chunks(wanted):
        for row in conn.execute(sa.select(table).where(table.c.id.in_(chunk))
                                .order_by(table.c.id)):
            entries.append((kind, row.id, _snapshot(kind, row)))
    _append(conn, entries)


def forget(conn: sa.Connection, kind: str, ids: Iterable[int]) -> None:
    """Record that integrity itself removed these rows (a delivered alert, a swept
    baseline), so their absence is not taken for tampering."""
    _append(conn, [(kind, ref, _TOMBSTONE) for ref in sorted(set(ids))])


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
            current[row.id] = _snapshot(kind, row)
    return {ref for ref, snap in current.items() if latest.get(ref) == snap}


#: Read in batches, not all at once (PostgreSQL: a server-side cursor).
_STREAMED = {"stream_results": True, "yield_per": 2000}


@dataclass
class _Findings:
    """Problems in the order the check has always reported them (status shows the
    first `limit`): the chain's and reused ids' by ledger row, then each kind's rows
    by id, then records gone, by kind name and id."""

    chain: list[tuple[int, int, str]] = field(default_factory=list)  # (seq, rank, text)
    rows: list[str] = field(default_factory=list)
    gone: dict[str, list[str]] = field(default_factory=dict)

    def ordered(self) -> list[str]:
        chain = sorted(self.chain, key=lambda found: found[:2])
        return ([text for _, _, text in chain] + self.rows
                + [text for kind in sorted(self.gone) for text in self.gone[kind]])


def _newest_snapshots(kind: str, snapshots: Iterable[Any], found: _Findings
                      ) -> Iterator[tuple[Any, str]]:
    """(id, newest snapshot, or the tombstone) of each record of a kind, in id order,
    from its ledger rows in (id, seq) order; a record whose identity changed without
    a tombstone between (deleted behind integrity's back, its id reused) is reported."""
    names = _IDENTITY[kind]
    current: Any = None
    first: object = None
    content = _TOMBSTONE
    for ref, seq, content_now in snapshots:
        if ref != current:
            if current is not None:
                yield current, content
            current, first = ref, None
        content = content_now
        if content == _TOMBSTONE:
            first = None
            continue
        try:
            fields = json.loads(content)
            ident: object = tuple(fields.get(name) for name in names)
        except (ValueError, AttributeError):
            ident = ()
        if first is None:
            first = ident
        elif ident != first:
            found.chain.append((seq, 2, f"{kind} {ref}: deleted, and its id reused by "
                                        f"another {kind} (ledger row {seq})"))
    if current is not None:
        yield current, content


def _below(ref: object, before: int) -> bool:
    """Whether a record's id comes before table id `before` in the merge. An id
    integrity never writes (text, a blob: SQLite orders them after every number)
    matches no row: it comes after them all, and shows as gone."""
    return isinstance(ref, (int, float)) and ref < before


def _check_records(conn: sa.Connection, kind: str, found: _Findings) -> None:
    """Compare a kind's rows with their newest snapshots in the chain: a row the chain
    does not hold, one that differs from it, and a record the chain holds whose row is
    gone are each tampering."""
    from integrity.store.outbox import LATEST_RETRY  # outbox chains through here

    table, led = _TABLES[kind], models.ledger
    # An hour of slack: a clock stepped back is not tampering (due() sends such a row
    # at once anyway).
    retry_by = utcnow() + LATEST_RETRY + dt.timedelta(hours=1)
    records = _newest_snapshots(kind, conn.execute(
        sa.select(led.c.ref, led.c.seq, led.c.content).where(led.c.kind == kind)
        .order_by(led.c.ref, led.c.seq), execution_options=_STREAMED), found)
    record = next(records, None)
    query = sa.select(table).order_by(table.c.id)
    if kind == "baseline":
        query = query.where(table.c.state == "active")
    gone_here = found.gone.setdefault(kind, [])

    def gone(before: int | None) -> tuple[Any, str] | None:
        """Skip the records below id `before` (None: all), reporting those the chain
        holds (not tombstoned) as deleted; the next record, if any."""
        nonlocal record
        while record is not None and (before is None or _below(record[0], before)):
            if record[1] != _TOMBSTONE and kind != "baseline":
                gone_here.append(f"{kind} {record[0]}: in the ledger but gone (deleted)")
            record = next(records, None)
        return record

    try:
        result = conn.execute(query, execution_options=_STREAMED)
        names = list(result.keys())
        at_id = names.index("id")
        at_next = names.index("next_attempt") if kind == "outbox" else -1
        for row in result:
            ref = row[at_id]
            held = gone(ref)
            if held is None or held[0] != ref or held[1] == _TOMBSTONE:
                what = ("the active baseline is not in the ledger (the chain was wiped or "
                        "rewritten)" if kind == "baseline" else
                        "not in the ledger (inserted behind integrity's back)")
                found.rows.append(f"{kind} {ref}: {what}")
            elif held[1] != _snapshot_of(kind, names, row):
                found.rows.append(f"{kind} {ref}: differs from its last recorded state "
                                  "(edited)")
            elif kind == "outbox" and row[at_next] > retry_by:
                found.rows.append(f"outbox {ref}: next attempt {row[at_next]:%Y-%m-%d}, "
                                  "later than any retry integrity schedules (edited)")
            if held is not None and held[0] == ref:
                record = next(records, None)
    except (ValueError, TypeError) as exc:  # a value integrity never writes
        found.rows.append(f"{kind} rows: cannot be read ({exc}): edited outside integrity")
        # Which rows are gone is unknown past the unreadable one: none is reported.
        # Ids reused show all the same (the chain alone proves them).
        gone_here.clear()
        for _ in records:
            pass
        return
    gone(None)


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

    def contains(self, digest: str) -> bool:
        """Whether `digest` is the head or an ancestor of it (pruned rows included):
        a row the chain from the head back to it hashes to, link by link."""
        digest = digest.strip().lower()
        if digest == GENESIS:
            return True
        with self.db.reader() as conn:
            return any(found == digest for found in _ancestors(conn))

    def digest_of(self, kind: str, refs: Iterable[int]) -> dict[int, str]:
        """The digest of each row's newest ledger entry: its place in the chain."""
        led = models.ledger
        found: dict[int, str] = {}
        with self.db.reader() as conn:
            for chunk in chunks(sorted(set(refs))):
                newest = (sa.select(sa.func.max(led.c.seq))
                          .where(led.c.kind == kind, led.c.ref.in_(chunk))
                          .group_by(led.c.ref))
                for ref, digest in conn.execute(
                        sa.select(led.c.ref, led.c.digest).where(led.c.seq.in_(newest))):
                    found[ref] = digest
        return found

    def check(self, limit: int = 20) -> ChainReport:
        """Walk the chain and compare it with the tables it covers.

        Every verify runs this over the whole history, so memory stays flat however
        long it is: the chain is walked in order keeping only the previous digest, and
        each table is merged, in id order, with its records' snapshots read by (kind,
        id) through the ledger's index, instead of holding every record's newest
        snapshot.
        """
        report = ChainReport()
        found = _Findings()
        led = models.ledger
        with self.db.reader() as conn:
            prev = None
            for seq, kind, ref, content, row_prev, digest in conn.execute(
                    sa.select(led.c.seq, led.c.kind, led.c.ref, led.c.content,
                              led.c.prev, led.c.digest).order_by(led.c.seq),
                    execution_options=_STREAMED):
                report.rows += 1
                if prev is not None and row_prev != prev:
                    found.chain.append((seq, 0, f"ledger row {seq}: does not follow row "
                                        "before it (a ledger row was deleted or edited)"))
                if not _holds(row_prev, kind, ref, content, digest):
                    found.chain.append((seq, 1, f"ledger row {seq}: digest does not match "
                                        "its content (edited)"))
                prev = digest
            report.head = prev or GENESIS
            for kind in _TABLES:
                _check_records(conn, kind, found)
        report.problems = found.ordered()
        if len(report.problems) > limit:
            more = len(report.problems) - limit
            report.problems = report.problems[:limit] + [f"... and {more} more"]
        return report

    def prune(self, older_than: dt.datetime) -> tuple[int, str]:
        """Delete closed events last seen before `older_than` whose alerts were all
        delivered (and approvals none of whose events remain), leaving a chained
        checkpoint; return (events removed, new head). The digests of the ledger rows
        it replaces are archived."""
        e, a, led = models.event, models.approval, models.ledger
        w, acc = models.maintenance_window, models.access
        with self.db.writer() as conn, conn.begin():
            old_head = _head(conn)
            # An event still owed to a sink stays: without it the dispatcher has
            # nothing to send, and its alert would go as if delivered.
            owed = sa.select(models.outbox.c.event_id)
            gone = list(conn.execute(sa.select(e.c.id).where(
                e.c.status != "open", e.c.last_seen < older_than,
                e.c.id.not_in(owed))).scalars())
            # Changes counted by the events about to go, so that totals (metrics'
            # integrity_changes_total) never go down: kept in the checkpoint.
            pruned = _pruned_changes(conn)
            for chunk in chunks(gone):
                for kind, count in conn.execute(
                        sa.select(e.c.kind, sa.func.sum(e.c.count))
                        .where(e.c.id.in_(chunk),
                               e.c.kind.in_(("added", "removed", "modified")))
                        .group_by(e.c.kind)):
                    pruned[kind] = pruned.get(kind, 0) + int(count)
            for chunk in chunks(gone):
                conn.execute(e.delete().where(e.c.id.in_(chunk)))
            referenced = sa.select(e.c.approval_id).where(e.c.approval_id.is_not(None))
            conn.execute(a.delete().where(a.c.time < older_than,
                                          a.c.id.not_in(referenced)))
            expected = sa.select(e.c.window_id).where(e.c.window_id.is_not(None))
            conn.execute(w.delete().where(w.c.end < older_than, w.c.id.not_in(expected)))
            conn.execute(acc.delete().where(acc.c.last_seen < older_than))
            _archive(conn)
            conn.execute(led.delete())
            content = json.dumps({"checkpoint": utcnow().isoformat(),
                                  "previous_head": old_head, "pruned_events": len(gone),
                                  "pruned_changes": pruned,
                                  "older_than": older_than.isoformat()}, sort_keys=True)
            _append(conn, [("checkpoint", 0, content)], prev=old_head)
            for kind, table in _TABLES.items():
                query = sa.select(table.c.id)
                if kind == "baseline":
                    query = query.where(table.c.state == "active")
                journal(conn, kind, conn.execute(query).scalars())
            head = _head(conn)
        return len(gone), head

    def pruned_changes(self) -> dict[str, int]:
        """Changes (by kind) counted by events that pruning removed since the start."""
        with self.db.reader() as conn:
            return _pruned_changes(conn)


def _ancestors(conn: sa.Connection) -> Iterator[str]:
    """The digests the chain proves, newest first: each ledger row, then each archived
    row (pruned), that hashes to the digest its successor names; the walk ends at the
    first that does not."""
    led, arc = models.ledger, models.ledger_archive
    expected = None
    for kind, ref, content, prev, digest in conn.execute(
            sa.select(led.c.kind, led.c.ref, led.c.content, led.c.prev, led.c.digest)
            .order_by(led.c.seq.desc())):
        if expected not in (None, digest) or not _holds(prev, kind, ref, content, digest):
            return
        yield digest
        expected = prev
    if expected is None:
        return  # no chain: nothing archived is an ancestor of it
    for kind, ref, prev, content_digest, content, digest in conn.execute(
            sa.select(arc.c.kind, arc.c.ref, arc.c.prev, arc.c.content_digest,
                      arc.c.content, arc.c.digest)
            .where(arc.c.seq.is_not(None)).order_by(arc.c.seq.desc())):
        proved = (_digest_of(prev, kind, ref, content_digest) == digest
                  if content_digest is not None else
                  content is not None and _holds(prev, kind, ref, content, digest))
        if digest != expected or not proved:
            return
        yield digest
        expected = prev


def _archive(conn: sa.Connection) -> None:
    """Append the ledger's rows to the archive, in chain order, each with what proves
    its digest: its content's digest, or (chained before 0013) its content."""
    led, arc = models.ledger, models.ledger_archive
    last = int(conn.execute(sa.select(sa.func.max(arc.c.seq))).scalar() or 0)
    after = -1
    while rows := conn.execute(
            sa.select(led.c.seq, led.c.kind, led.c.ref, led.c.content, led.c.prev,
                      led.c.digest).where(led.c.seq > after).order_by(led.c.seq)
            .limit(CHUNK)).all():
        archived = []
        for seq, kind, ref, content, prev, digest in rows:
            after, last = seq, last + 1
            proof = _content_digest(content)
            current = _digest_of(prev, kind, ref, proof) == digest
            archived.append({"seq": last, "digest": digest, "kind": kind, "ref": ref,
                             "prev": prev, "content_digest": proof if current else None,
                             "content": None if current else content})
        # A digest archived without proof (0008) gives way to the row that proves it.
        conn.execute(arc.delete().where(arc.c.digest.in_([r["digest"] for r in archived])))
        conn.execute(arc.insert(), archived)


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
