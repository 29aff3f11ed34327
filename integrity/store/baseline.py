"""Baseline generations and their entries: written whole, swapped atomically, streamed.

A new generation is written in one transaction that takes the one it replaces out of
force and deletes it first, then writes the rows in batches and activates the new one:
any failure, an interrupt or SIGKILL included, leaves the previous baseline in force. Entries are read back as one stream in key order, which is depth-first walk
order (paths.to_key), so verify can merge them with a live walk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from integrity.errors import BaselineError, DatabaseError
from integrity.paths import from_key, to_key
from integrity.record import FileRecord
from integrity.store import schema
from integrity.store.contents import PendingTexts, Text, put_in
from integrity.store.engine import Database, cause, chunks, inserted_id
from integrity.store.ledger import forget, journal
from integrity.trust import SEAL_VERSION, TrustError
from integrity.times import utcnow

#: Rows per executemany while a baseline is written.
BATCH = 5000

#: Who installed a path (dpkg/rpm), recorded with each entry.
Owner = Callable[[bytes], "str | None"]
#: One stored entry: (key, record, package owner, digest of its kept text).
Entry = tuple[bytes, FileRecord, "str | None", "bytes | None"]
#: The stream of a baseline's entries in key order.
Entries = Iterator[Entry]
#: One stored entry as the driver returns it and as a generation is written:
#: (key, *record[1:], package, kept), what trust.EntriesRoot seals.
Row = tuple[object, ...]
#: (root, signature or None, signer's raw public key or None)
Sealed = tuple[str, "bytes | None", "bytes | None"]


@dataclass(frozen=True)
class BaselineInfo:
    """The active (or just written) baseline generation and its seal."""

    id: int
    #: When the generation became the baseline in force (sealed).
    created: dt.datetime
    entries: int
    policy_source: str
    policy_digest: str
    root: str | None
    signature: bytes | None
    generation: int
    #: The sealed part of the policy (policy/sealed.py); None before seal version 2.
    policy: str | None
    signer: bytes | None
    seal_version: int


_INFO = (schema.baseline.c.id, schema.baseline.c.activated, schema.baseline.c.entries,
         schema.baseline.c.policy_source, schema.baseline.c.policy_digest,
         schema.baseline.c.root, schema.baseline.c.signature,
         schema.baseline.c.generation, schema.baseline.c.policy,
         schema.baseline.c.signer, schema.baseline.c.seal_version)


def active_in(conn: sa.Connection) -> BaselineInfo | None:
    """The baseline in force, read on an open connection; TrustError for a row with a
    value integrity never writes (a time that is not one)."""
    try:
        row = conn.execute(sa.select(*_INFO).where(schema.baseline.c.state == "active")
                           ).first()
    except (ValueError, TypeError) as exc:
        raise TrustError(f"the baseline in force cannot be read ({exc}): it was changed "
                         "outside integrity (tampering)") from None
    return BaselineInfo(*row) if row else None


class Baselines:
    """Baseline generations of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def active(self) -> BaselineInfo | None:
        """The baseline in force, or None before the first init."""
        with self.db.reader() as conn:
            return active_in(conn)

    def require(self) -> BaselineInfo:
        """The baseline in force; BaselineError before the first init."""
        info = self.active()
        if info is None:
            raise BaselineError(f"{self.db.name()}: no baseline yet: run 'integrity init'")
        return info

    def write(self, rows: Iterable[Row], *,
              policy_source: str, policy_digest: str, sealed_policy: str,
              actor: str | None, force: bool,
              seal: Callable[[int, dt.datetime], Sealed],
              texts: PendingTexts | None = None) -> BaselineInfo:
        """Store a new generation from its rows (see Row) in key order and
        switch to it, in one write transaction.

        `texts` holds the kept texts the rows name (ops adds them as the scan
        goes); they are stored in the same transaction. `seal(generation, activated)`
        is called once every record is written, for the root, signature and signer
        the new generation is activated with; the generation number continues from
        the baseline it replaces. The switch is entered in the ledger: a chain that
        does not name the baseline in force was rewritten.

        The generation it replaces is deleted at the start of that transaction, while
        the scan goes on, and the new rows take its pages: readers see the old
        baseline until the commit, an interrupted or killed init leaves it as it
        was, and the file never holds two generations (deleting a million rows after
        the switch, then moving the new rows' pages into the holes, cost ~1.4 s).
        Other writers of the database wait for the commit (up to the busy timeout).
        """
        b = schema.baseline
        writer = _GenerationWriter(self.db, schema.entry)
        try:
            new_id, previous = writer.call(
                lambda conn: _open_generation(conn, self.db.name(), force=force,
                                              policy_source=policy_source,
                                              policy_digest=policy_digest, actor=actor))
            if previous is not None:
                writer.run(lambda conn: _delete_entries(conn, previous.id))
            if texts is not None:
                texts.sink = writer.keep
            positional = writer.positional
            columns = schema.entry.c.keys()
            batch: list[object] = []
            for stored in rows:
                row = (new_id, *stored)
                batch.append(row if positional else dict(zip(columns, row)))
                if len(batch) >= BATCH:
                    writer.put(batch)
                    batch = []
            writer.put(batch)
            if texts is not None:
                texts.flush()
            generation = previous.generation + 1 if previous else 1
            activated = utcnow().replace(microsecond=0)
            root, signature, signer = seal(generation, activated)

            def switch(conn: sa.Connection) -> None:
                if previous is not None:
                    conn.execute(b.delete().where(b.c.id == previous.id))
                    forget(conn, "baseline", [previous.id])
                conn.execute(b.update().where(b.c.id == new_id).values(
                    state="active", activated=activated, entries=writer.count,
                    root=root, signature=signature, generation=generation,
                    policy=sealed_policy, signer=signer, seal_version=SEAL_VERSION))
                journal(conn, "baseline", [new_id])
                sweep_contents(conn)

            writer.call(switch)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.db.give_back_free_pages()
        return self.require()

    def entries(self, baseline_id: int,
                ranges: Sequence[tuple[bytes, bytes]] | None = None) -> Entries:
        """Stream (key, entry) of a baseline in key order, optionally within key ranges."""
        with self.db.reader() as conn:
            yield from entries_in(conn, baseline_id, ranges)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """One read transaction: the baseline in force and its entries as one state
        (an approval or init committing meanwhile is not seen)."""
        with self.db.reader() as conn, conn.begin():
            yield Snapshot(conn, self.db.name())

    def entries_at(self, baseline_id: int, paths: Iterable[bytes]) -> dict[bytes, Entry]:
        """path -> entry of a baseline for those of `paths` it holds: one query per
        CHUNK paths (approving thousands of paths asks for their entries at once)."""
        e = schema.entry
        cols = _stored_columns()
        found: dict[bytes, Entry] = {}
        with self.db.reader() as conn:
            for chunk in chunks(sorted({to_key(path) for path in paths})):
                for row in conn.execute(sa.select(*cols).where(
                        e.c.baseline_id == baseline_id, e.c.key.in_(chunk))):
                    rec = FileRecord(from_key(row[0]), *row[1:14])
                    found[rec.path] = (row[0], rec, row[14], row[15])
        return found

    def entry(self, baseline_id: int, path: bytes) -> Entry | None:
        """One path's baseline entry, if it has one."""
        key = to_key(path)
        return next(self.entries(baseline_id, [(key, key + b"\x00")]), None)


class Snapshot:
    """The baseline in force and its entries, read in one transaction."""

    def __init__(self, conn: sa.Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.info = active_in(conn)

    def require(self) -> BaselineInfo:
        """The baseline of this snapshot; BaselineError before the first init."""
        if self.info is None:
            raise BaselineError(f"{self.name}: no baseline yet: run 'integrity init'")
        return self.info

    def entries(self, ranges: Sequence[tuple[bytes, bytes]] | None = None) -> Entries:
        """The baseline's entries in key order, optionally within key ranges."""
        return entries_in(self.conn, self.require().id, ranges)

    def row_batches(self, size: int) -> Iterator[list[Row]]:
        """Every entry of the baseline as the driver returns it, `size` rows at a time
        in key order: (key, *record[1:], package, kept) tuples, read through the DB-API
        cursor of this transaction (the seal reader pickles them whole; SQLAlchemy's
        row objects cost more than the rows)."""
        e = schema.entry
        compiled = sa.select(*_stored_columns()).where(
            e.c.baseline_id == self.require().id).order_by(e.c.key).compile(
            dialect=self.conn.dialect)
        params = compiled.construct_params()
        args: Sequence[object] | Mapping[str, object] = params
        if compiled.positional:
            args = tuple(params[name] for name in compiled.positiontup or ())
        cursor = self.conn.connection.cursor()
        try:
            cursor.execute(str(compiled), args)
            while rows := cursor.fetchmany(size):
                # Tuples, whatever the driver's row type: the seal encodes tuples.
                yield (cast("list[Row]", rows) if type(rows) is list and type(rows[0]) is tuple
                       else [tuple(row) for row in rows])
        finally:
            cursor.close()


def entries_in(conn: sa.Connection, baseline_id: int,
               ranges: Sequence[tuple[bytes, bytes]] | None = None) -> Entries:
    """(key, record) of a baseline in key order, on an open connection."""
    e = schema.entry
    cols = _stored_columns()
    bounds: Sequence[tuple[bytes | None, bytes | None]] = ranges or [(None, None)]
    for low, high in bounds:
        query = sa.select(*cols).where(e.c.baseline_id == baseline_id)
        if low is not None and high is not None:
            query = query.where(e.c.key >= low, e.c.key < high)
        # Options of this statement: Connection.execution_options() would change the
        # connection for good, and a DELETE after it in the same transaction would go
        # through PostgreSQL's server-side cursor (DECLARE ... CURSOR FOR DELETE).
        result = conn.execute(query.order_by(e.c.key),
                              execution_options={"stream_results": True, "yield_per": BATCH})
        for row in result:
            key = row[0]
            yield key, FileRecord(from_key(key), *row[1:14]), row[14], row[15]


def _stored_columns() -> list[sa.Column[Any]]:
    """An entry's columns as it is read back: key, the record's fields in FileRecord
    order, package, kept (the layout of Entry and of Row)."""
    e = schema.entry
    return [e.c[name] for name in schema.ENTRY_COLUMNS] + [e.c.package, e.c.kept]


def sweep_contents(conn: sa.Connection) -> None:
    """Delete kept texts no entry names any more."""
    c, e = schema.content, schema.entry
    conn.execute(c.delete().where(c.c.digest.not_in(
        sa.select(e.c.kept).where(e.c.kept.is_not(None)))))


def _open_generation(conn: sa.Connection, name: str, *, force: bool, policy_source: str,
                     policy_digest: str, actor: str | None
                     ) -> tuple[int, BaselineInfo | None]:
    """The new generation's row, inside the writer's transaction; and the baseline
    in force it replaces (None on the first init)."""
    b = schema.baseline
    previous = active_in(conn)
    if previous is not None and not force:
        raise BaselineError(f"{name}: a baseline exists already; use 'init --force' to "
                            "replace it, or 'approve' to accept changes")
    _sweep(conn)
    if previous is not None:
        # Not in force from here on, inside this transaction: deleting its entries
        # is not a change of the baseline in force (a fleet host's spool triggers
        # would record a million deletions for nothing).
        conn.execute(b.update().where(b.c.id == previous.id).values(state="retired"))
    new_id = inserted_id(conn.execute(b.insert().values(
        state="building", created=utcnow(), policy_source=policy_source,
        policy_digest=policy_digest, entries=0, actor=actor)))
    return new_id, previous


def _delete_entries(conn: sa.Connection, baseline_id: int) -> None:
    e = schema.entry
    conn.execute(e.delete().where(e.c.baseline_id == baseline_id))


def _sweep(conn: sa.Connection) -> None:
    """Delete generations that are not in force: remains of an init killed by an
    older version of integrity, which committed its rows batch by batch."""
    b, e = schema.baseline, schema.entry
    stale = sa.select(b.c.id).where(b.c.state != "active")
    conn.execute(e.delete().where(e.c.baseline_id.in_(stale)))
    conn.execute(b.delete().where(b.c.state != "active"))


#: A unit of work for the writer's transaction.
_Job = Callable[[sa.Connection], object]


class _GenerationWriter:
    """One write transaction on a thread of its own, fed while the scan goes on.

    sqlite3 releases the GIL while SQLite works on a batch, so the B-tree inserts of
    one batch overlap with hashing the next. Rows go to the DBAPI's executemany as
    tuples: Core's per-row parameter processing cost ~9 µs a row, and our column
    types need no conversion. The statement is still compiled by the dialect.
    Every statement of the generation runs on this thread's connection (an SQLite
    connection belongs to the thread that opened it), without foreign-key checks:
    every row names the generation written just before them, and SQLite's check
    would cost ~1 µs a row for nothing.
    """

    def __init__(self, db: Database, table: sa.Table) -> None:
        dialect = db.engine.dialect
        self.sql = str(table.insert().compile(dialect=dialect,
                                              column_keys=list(table.c.keys())))
        self.positional = bool(dialect.positional)
        self.db = db
        self.count = 0
        self.error: BaseException | None = None
        self.aborted = False
        self.served = False
        self.jobs: queue.Queue[tuple[_Job, queue.Queue[object] | None] | None] = \
            queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._run, name="baseline-writer",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.db.unchecked_writer() as conn:
                self._serve(conn)
                if self.error is not None or self.aborted:
                    raise _RolledBack
        except _RolledBack:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the producer
            self.error = self.error or exc
            if not self.served:  # no transaction (BEGIN failed): answer until told to stop
                self._serve(None)

    def _serve(self, conn: sa.Connection | None) -> None:
        while (job := self.jobs.get()) is not None:
            work, reply = job
            value: object = None
            if conn is not None and self.error is None and not self.aborted:
                try:
                    value = work(conn)
                except BaseException as exc:  # noqa: BLE001 - handed to the producer
                    self.error = exc
            if reply is not None:
                reply.put(value)
        self.served = True

    def run(self, work: _Job) -> None:
        """Queue work for the transaction (blocks while two jobs are pending)."""
        self._raise()
        self.jobs.put((work, None))

    def call(self, work: _Job) -> Any:
        """Run work in the transaction and return its result."""
        reply: queue.Queue[object] = queue.Queue(maxsize=1)
        self._raise()
        self.jobs.put((work, reply))
        value = reply.get()
        self._raise()
        return value

    def put(self, batch: list[object]) -> None:
        """Queue a batch of rows."""
        def insert(conn: sa.Connection) -> None:
            conn.exec_driver_sql(self.sql, batch)  # type: ignore[arg-type, unused-ignore]
            self.count += len(batch)
        if batch:
            self.run(insert)

    def keep(self, texts: list[Text]) -> None:
        """Queue kept texts the rows name."""
        self.run(lambda conn: put_in(conn, texts))

    def commit(self) -> None:
        """Commit once every job is done; raise the writer's error, if any."""
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def abort(self) -> None:
        """Roll back after the job in progress (the old baseline stays whole)."""
        self.aborted = True
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            error = self.error
            if isinstance(error, sa_exc.DBAPIError):
                raise DatabaseError(f"{self.db.name()}: cannot write baseline: "
                                    f"{cause(error)}") from None
            raise error


class _RolledBack(Exception):
    """Leaves the writer's transaction without committing it."""
