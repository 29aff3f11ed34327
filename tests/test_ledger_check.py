"""Ledger.check, streamed (0bc8497), against the check it replaced: the same problems,
in the same words and order, for every kind of tampering with the event log.

`_check_before_streaming` is the check as it was before 0bc8497 (holding every
record's newest snapshot in memory), kept here as the oracle: the streamed check must
detect exactly what it detected. Tampering is done as a root attacker would, with
sqlite3 on the database file (on PostgreSQL, with SQL as the superuser, foreign keys
off); `_rechain` rewrites the chain's digests afterwards (an
attacker who can write the database can rewrite the whole chain), so that what the
record comparison reports is not hidden behind the chain's own problems.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from integrity.store import Store
from integrity.store import schema as models
from integrity.store.access import Read
from integrity.store.ledger import (_IDENTITY, _TABLES, _TOMBSTONE, _digest, _holds,
                                    _snapshot, journal)
from integrity.times import utcnow

from integrity.cli import cli


def _check_before_streaming(store: Store) -> list[str]:
    """Ledger.check's problems as computed before 0bc8497 (the oracle), unlimited."""
    problems: list[str] = []
    latest: dict[tuple[str, Any], str] = {}
    identity: dict[tuple[str, Any], tuple[object, ...]] = {}
    led = models.ledger
    with store.reader() as conn:
        prev = None
        for seq, kind, ref, content, row_prev, digest in conn.execute(
                sa.select(led.c.seq, led.c.kind, led.c.ref, led.c.content,
                          led.c.prev, led.c.digest).order_by(led.c.seq)):
            if prev is not None and row_prev != prev:
                problems.append(f"ledger row {seq}: does not follow row before "
                                "it (a ledger row was deleted or edited)")
            if not _holds(row_prev, kind, ref, content, digest):
                problems.append(f"ledger row {seq}: digest does not match its "
                                "content (edited)")
            prev = digest
            if kind not in _TABLES:
                continue
            latest[(kind, ref)] = content
            if content == _TOMBSTONE:
                identity.pop((kind, ref), None)
                continue
            try:
                fields = json.loads(content)
                ident = tuple(fields.get(name) for name in _IDENTITY[kind])
            except (ValueError, AttributeError):
                ident = ()
            first = identity.setdefault((kind, ref), ident)
            if first != ident:
                problems.append(f"{kind} {ref}: deleted, and its id reused by "
                                f"another {kind} (ledger row {seq})")
        from integrity.store.outbox import LATEST_RETRY
        retry_by = utcnow() + LATEST_RETRY + dt.timedelta(hours=1)
        for kind, table in _TABLES.items():
            query = sa.select(table).order_by(table.c.id)
            if kind == "baseline":
                query = query.where(table.c.state == "active")
            try:
                for row in conn.execute(query):
                    recorded = latest.pop((kind, row.id), None)
                    if recorded is None or recorded == _TOMBSTONE:
                        what = ("the active baseline is not in the ledger (the chain "
                                "was wiped or rewritten)" if kind == "baseline" else
                                "not in the ledger (inserted behind integrity's back)")
                        problems.append(f"{kind} {row.id}: {what}")
                    elif recorded != _snapshot(kind, row):
                        problems.append(f"{kind} {row.id}: differs from its "
                                        "last recorded state (edited)")
                    elif kind == "outbox" and row.next_attempt > retry_by:
                        problems.append(
                            f"outbox {row.id}: next attempt {row.next_attempt:%Y-%m-%d}, "
                            "later than any retry integrity schedules (edited)")
            except (ValueError, TypeError) as exc:
                problems.append(f"{kind} rows: cannot be read ({exc}): "
                                "edited outside integrity")
                for gone in [k for k in latest if k[0] == kind]:
                    del latest[gone]
        for (kind, ref), content in sorted(latest.items()):
            if content != _TOMBSTONE and kind != "baseline":
                problems.append(f"{kind} {ref}: in the ledger but gone (deleted)")
    return problems


def _execute(url: str, *statements: str) -> None:
    """Run SQL on the database as an attacker would: sqlite3 on the file (which
    enforces no foreign keys), or PostgreSQL's superuser with them off."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as raw:
            for statement in statements:
                raw.execute(statement)
        raw.close()
        return
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
            for statement in statements:
                conn.execute(sa.text(statement.replace(":", r"\:")))
    finally:
        engine.dispose()


def _rechain(url: str) -> None:
    """Recompute every ledger row's prev and digest over the rows as they now are."""
    engine = sa.create_engine(url)
    led = models.ledger
    try:
        with engine.begin() as conn:
            prev = None
            for seq, kind, ref, content, row_prev in conn.execute(sa.select(
                    led.c.seq, led.c.kind, led.c.ref, led.c.content, led.c.prev)
                    .order_by(led.c.seq)).all():
                prev = row_prev if prev is None else prev
                digest = _digest(prev, kind, ref, content)
                conn.execute(led.update().where(led.c.seq == seq)
                             .values(prev=prev, digest=digest))
                prev = digest
    finally:
        engine.dispose()


#: Access records beyond one batch of the streamed reads (2,000 rows).
MANY = 2500


def _history(tmp: Path, url: str) -> None:
    """A database holding every kind the chain covers, with tombstones: events (some
    approved), approvals, retired and active baselines, owed and delivered alerts,
    maintenance windows (one cancelled), and more access records than one batch."""
    tree = tmp / "tree"
    (tree / "sub").mkdir(parents=True)
    for name in ("a.conf", "b.conf", "c.conf", "sub/d.txt", "sub/e.txt"):
        (tree / name).write_text(f"{name}\n")
    policy = tmp / "policy.toml"
    policy.write_text(f'[[rule]]\npath = "{tree}"\ncheck = "static"\nseverity = "high"\n'
                      '\n[[alert]]\ntype = "email"\nname = "ops-mail"\n'
                      'host = "127.0.0.1"\nport = 9\nfrom = "integrity@example.com"\n'
                      'to = ["ops@example.com"]\n')

    def run(*args: str) -> int:
        return CliRunner().invoke(cli, ["--db", url, "--policy", str(policy), "-q", *args],
                                  catch_exceptions=False).exit_code

    assert run("init") == 0
    (tree / "a.conf").write_text("one\n")
    (tree / "new").write_text("n\n")
    (tree / "sub" / "d.txt").unlink()
    assert run("verify") == 1
    (tree / "a.conf").write_text("two\n")
    (tree / "b.conf").write_text("two\n")
    assert run("verify") == 1
    assert run("approve", str(tree / "new")) == 0
    (tree / "c.conf").write_text("three\n")
    assert run("verify") == 1
    assert run("approve", str(tree / "c.conf")) == 0
    store = Store(url)
    try:
        now = utcnow()
        for hours in (1, 2, 3):
            store.windows.open(start=now, end=now + dt.timedelta(hours=hours),
                               reason=f"window {hours}", paths=(str(tree).encode(),),
                               user="root", sudo_user=None)
        store.windows.cancel(2, "root")
        hour = now.replace(minute=0, second=0, microsecond=0)
        store.access.fold([Read(str(tree / name).encode(), hour, "/usr/bin/cat", 0, None,
                                1, now, now, None) for name in ("a.conf", "b.conf", "new")])
        store.access.fold([Read(str(tree / "a.conf").encode(), hour, "/usr/bin/cat", 0,
                                None, 2, now, now, None)])
        store.access.fold([Read(f"/srv/{n}".encode(), hour, "/usr/bin/cat", 0, None, 1,
                                now, now, None) for n in range(MANY)])
        with store.reader() as conn:
            owed = sorted(conn.execute(sa.select(models.outbox.c.id)).scalars())
        assert len(owed) >= 4, owed
        store.outbox.delivered([owed[0], owed[2]])
        assert store.ledger.check().problems == []
    finally:
        store.close()


def _sql(*statements: str) -> Callable[[str], None]:
    return lambda url: _execute(url, *statements)


def _chained(*statements: str) -> Callable[[str], None]:
    """Tamper, then rewrite the chain so that it holds."""
    def tamper(url: str) -> None:
        _execute(url, *statements)
        _rechain(url)
    return tamper


def _ledger_row(kind: str, ref: str, content: str) -> str:
    """SQL appending a ledger row (its digest for _rechain to write)."""
    return ("INSERT INTO ledger (time, kind, ref, content, prev, digest) VALUES "
            f"('2026-01-01 00:00:00', '{kind}', {ref}, '{content}', '', '')")


def _reused_event(url: str) -> None:
    """Delete an event behind integrity's back and journal another under its id."""
    _execute(url, "UPDATE event SET first_seen = '2026-02-02 00:00:00' "
                  "WHERE id = (SELECT min(id) + 1 FROM event)")
    store = Store(url)
    try:
        with store.writer() as conn, conn.begin():
            victim = conn.execute(sa.select(sa.func.min(models.event.c.id))).scalar_one()
            journal(conn, "event", [victim + 1])
            journal(conn, "event", [victim + 1])  # reported once per snapshot
    finally:
        store.close()


def _unreadable_below_reused(url: str) -> None:
    _reused_event(url)
    _execute(url, "UPDATE event SET first_seen = 'not a time' "
                  "WHERE id = (SELECT min(id) FROM event)")


def _reused_after_tombstone(url: str) -> None:
    """A delivered alert's id (tombstoned) reused once (fine), then again (not)."""
    first = json.dumps({"created": "2026-01-01T00:00:00", "event_id": 1, "sink": "a"})
    second = json.dumps({"created": "2026-01-02T00:00:00", "event_id": 1, "sink": "a"})
    delivered = "(SELECT min(ref) FROM ledger WHERE kind = 'outbox' AND content = " \
                f"'{_TOMBSTONE}')"
    rows = [first, first, second, _TOMBSTONE, second]
    _chained(*(_ledger_row("outbox", delivered, row) for row in rows))(url)


_INSERT_EVENT = (
    "INSERT INTO event (key, kind, changed, source, severity, classification, status, "
    "count, first_seen, last_seen) SELECT key, kind, changed, source, severity, "
    "classification, 'approved', count, first_seen, last_seen FROM event WHERE id = "
    "(SELECT min(id) FROM event)")
_INSERT_WINDOW = (
    "INSERT INTO maintenance_window (created, start, \"end\", reason, paths, \"user\") "
    "SELECT created, start, '2099-01-01 00:00:00', reason, paths, \"user\" "
    "FROM maintenance_window WHERE id = 1")

#: Tampering the same SQL does on SQLite and PostgreSQL.
TAMPERING: dict[str, Callable[[str], None]] = {
    "nothing": _sql(),
    "events deleted: first, middle, last": _sql(
        "DELETE FROM event WHERE id IN ((SELECT min(id) FROM event), "
        "(SELECT max(id) FROM event), (SELECT min(id) + 2 FROM event))"),
    "event edited": _sql("UPDATE event SET status = 'approved' WHERE status = 'open'"),
    "event inserted": _sql(_INSERT_EVENT),
    "event inserted below every id": _sql(
        _INSERT_EVENT, "UPDATE event SET id = -5 WHERE id = (SELECT max(id) FROM event)"),
    "approvals edited and deleted": _sql(
        "UPDATE approval SET reason = 'nothing to see' WHERE id = (SELECT max(id) FROM "
        "approval)", "DELETE FROM approval WHERE id = (SELECT min(id) FROM approval)"),
    "owed alerts deleted and edited": _sql(
        "DELETE FROM outbox WHERE id = (SELECT max(id) FROM outbox)",
        "UPDATE outbox SET sink = 'elsewhere' WHERE id = (SELECT min(id) FROM outbox)"),
    "owed alert postponed": _sql("UPDATE outbox SET next_attempt = '9999-12-31 00:00:00'"),
    "windows": _sql("DELETE FROM maintenance_window WHERE id = 1",
                    "UPDATE maintenance_window SET \"end\" = '2099-01-01 00:00:00' "
                    "WHERE id = 3", _INSERT_WINDOW),
    "access": _sql("DELETE FROM access WHERE id = 1",
                   "UPDATE access SET count = 99 WHERE id = 2"),
    "access across batches": _sql(
        f"DELETE FROM access WHERE id IN (5, 1999, 2000, 2001, 2002, {MANY})",
        f"UPDATE access SET count = 99 WHERE id IN (4, 1998, 2003, {MANY + 2})",
        "INSERT INTO access (key, hour, exe, uid, rule, count, first_seen, last_seen) "
        "SELECT key, hour, 'sh', uid, rule, count, first_seen, last_seen FROM access "
        "WHERE id = 1000"),
    "access records across batches deleted from the ledger": _chained(
        "DELETE FROM ledger WHERE kind = 'access' AND ref IN (3, 1500, 2001, 2600)"),
    "baselines: retired deleted and edited, active edited": _sql(
        "DELETE FROM baseline WHERE state = 'retired' AND id = (SELECT min(id) FROM "
        "baseline WHERE state = 'retired')",
        "UPDATE baseline SET created = '2020-01-01 00:00:00' WHERE state = 'retired'",
        "UPDATE baseline SET created = '2020-01-01 00:00:00' WHERE state = 'active'"),
    "active baseline's records wiped": _chained(
        "DELETE FROM ledger WHERE kind = 'baseline'"),
    "ledger wiped": _sql("DELETE FROM ledger"),
    "ledger rows deleted and edited": _sql(
        "DELETE FROM ledger WHERE seq = 2",
        "UPDATE ledger SET content = replace(content, 'open', 'shut') WHERE seq = "
        "(SELECT min(seq) FROM ledger WHERE kind = 'event')"),
    "ledger row inserted": _sql(_ledger_row("event", "1", "{}")),
    "events' records deleted from the ledger": _chained(
        "DELETE FROM ledger WHERE kind = 'event' AND ref IN (2, 4)"),
    "event id reused": _reused_event,
    "alert id reused after its tombstone": _reused_after_tombstone,
    "records of kinds the chain does not cover": _chained(
        _ledger_row("bogus", "1", "{}"), _ledger_row("Event", "1", "{}"),
        _ledger_row("checkpoint", "0", "{}")),
    "records that are not snapshots": _chained(
        _ledger_row("event", "1", "not json"), _ledger_row("event", "2", "[1, 2]"),
        _ledger_row("event", "3", "null"), _ledger_row("approval", "1", "7")),
    "records of ids that never existed": _chained(
        _ledger_row("event", "-3", "{}"), _ledger_row("event", "0", "{}"),
        _ledger_row("event", "2147483647", "{}"), _ledger_row("access", "-1", "{}"),
        _ledger_row("window", "2147483646", _TOMBSTONE)),
    "everything at once": _sql(
        "DELETE FROM ledger WHERE seq = 3",
        "DELETE FROM event WHERE id = (SELECT max(id) FROM event)",
        "UPDATE approval SET reason = 'x'",
        "DELETE FROM access WHERE id = 1",
        "DELETE FROM maintenance_window WHERE id = 2",
        "UPDATE outbox SET sink = 'y'"),
}

#: What only SQLite lets through: values of another type than the column's (text or
#: blob ids in the ledger, times integrity never writes).
SQLITE_ONLY: dict[str, Callable[[str], None]] = {
    "owed alert's next attempt unreadable": _sql(
        "DELETE FROM event WHERE id = (SELECT min(id) FROM event)",
        "DELETE FROM outbox WHERE id = (SELECT max(id) FROM outbox)",
        "UPDATE outbox SET next_attempt = 'soon' WHERE id = (SELECT min(id) FROM outbox)"),
    "owed alert's next attempt a number": _sql(
        "UPDATE outbox SET next_attempt = 12345 WHERE id = (SELECT max(id) FROM outbox)"),
    "records of ids beyond the column's type": _chained(
        _ledger_row("event", "4611686018427387904", "{}"),
        _ledger_row("window", "9223372036854775807", "{}"),
        _ledger_row("window", "2.5", "{}"), _ledger_row("access", "1e30", "{}")),
    "a record whose id is text": _chained(_ledger_row("window", "'two'", "{}")),
    "records whose id is text, with the table's rows gone": _chained(
        _ledger_row("access", "'x'", "{}"), f"DELETE FROM access WHERE id > {MANY}"),
    "a record whose id is text, and a row inserted": _chained(
        _ledger_row("window", "'two'", "{}"), _INSERT_WINDOW),
    "a record whose id is a blob, and a row inserted": _chained(
        _ledger_row("access", "x'01'", "{}"),
        "INSERT INTO access (key, hour, exe, uid, rule, count, first_seen, last_seen) "
        "SELECT key, hour, 'sh', uid, rule, count, first_seen, last_seen FROM access "
        "WHERE id = 1"),
    "a record whose id is a blob": _chained(_ledger_row("approval", "x'01'", "{}")),
    "a record whose id is text that reads as a number": _chained(
        _ledger_row("window", "'2'", _TOMBSTONE), _ledger_row("window", "' 3 '", "{}")),
    "event time unreadable, with deletions and edits before and after it": _sql(
        "UPDATE event SET status = 'approved' WHERE id = (SELECT min(id) FROM event)",
        "DELETE FROM event WHERE id = (SELECT min(id) + 1 FROM event)",
        "UPDATE event SET first_seen = 'not a time' WHERE id = "
        "(SELECT min(id) + 3 FROM event)",
        "DELETE FROM event WHERE id = (SELECT max(id) FROM event)"),
    "event time unreadable below an event whose id was reused": _unreadable_below_reused,
    "access time unreadable in the second batch": _sql(
        "DELETE FROM access WHERE id IN (3, 2400)",
        "UPDATE access SET first_seen = 'not a time' WHERE id = 2300"),
    "first event's time unreadable": _sql(
        "UPDATE event SET first_seen = 'not a time' WHERE id = (SELECT min(id) FROM event)",
        "DELETE FROM event WHERE id = (SELECT max(id) FROM event)"),
    "active baseline's time unreadable": _sql(
        "UPDATE baseline SET created = 'not a time' WHERE state = 'active'"),
    "retired baseline's time unreadable": _sql(
        "UPDATE baseline SET created = 'not a time' WHERE state = 'retired'"),
}

#: Not tampering with anything the check covers: the chain holds, only records of kinds
#: it does not cover were added, and retired baselines are not checked.
UNSEEN = {"nothing", "records of kinds the chain does not cover",
          "retired baseline's time unreadable"}

#: Where the check before streaming died (sorting text ids among numbers): what the
#: streamed check reports instead.
DIED_BEFORE = {"records whose id is text, with the table's rows gone": [
    f"access {n}: in the ledger but gone (deleted)" for n in range(MANY + 1, MANY + 4)
] + ["access x: in the ledger but gone (deleted)"]}


def _compare(url: str, name: str) -> None:
    store = Store(url)
    try:
        if name in DIED_BEFORE:
            with pytest.raises(TypeError):
                _check_before_streaming(store)
            expected = DIED_BEFORE[name]
        else:
            expected = _check_before_streaming(store)
        report = store.ledger.check(limit=10**6)
    finally:
        store.close()
    assert (name in UNSEEN) == (expected == [])
    assert report.problems == expected


@pytest.fixture(scope="module")
def sqlite_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("history")
    db = tmp / "state" / "integrity.db"
    _history(tmp, f"sqlite:///{db}")
    return db


@pytest.mark.parametrize("name", [*TAMPERING, *SQLITE_ONLY])
def test_the_streamed_check_reports_what_the_check_before_it_did(
        sqlite_history: Path, tmp_path: Path, name: str) -> None:
    db = tmp_path / "copy.db"
    shutil.copyfile(sqlite_history, db)
    url = f"sqlite:///{db}"
    {**TAMPERING, **SQLITE_ONLY}[name](url)
    _compare(url, name)


@pytest.fixture(scope="module")
def pg_history(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """A history on PostgreSQL, as a template each test's database is copied from."""
    pg_cluster.psql("CREATE DATABASE ledger_history")
    _history(tmp_path_factory.mktemp("pg-history"), pg_cluster.url("ledger_history"))
    yield "ledger_history"
    pg_cluster.psql("DROP DATABASE IF EXISTS ledger_history WITH (FORCE)")


_COPIES = iter(range(1, 10**6))


@pytest.mark.parametrize("name", list(TAMPERING))
def test_the_streamed_check_reports_what_the_check_before_it_did_on_postgresql(
        pg_cluster: Any, pg_history: str, name: str) -> None:
    copy = f"ledger_copy_{next(_COPIES)}"
    pg_cluster.psql(f"CREATE DATABASE {copy} TEMPLATE {pg_history}")
    try:
        url = pg_cluster.url(copy)
        TAMPERING[name](url)
        _compare(url, name)
    finally:
        pg_cluster.psql(f"DROP DATABASE IF EXISTS {copy} WITH (FORCE)")
