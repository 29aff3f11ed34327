"""The database: engine setup, schema checks and migrations, baseline generations.

The only module that talks SQL. Everything SQLite-specific lives in `_engine()`
(WAL, busy timeout, BEGIN IMMEDIATE for writers); the rest is portable Core, so the
same code runs against PostgreSQL. Alembic is imported only when a schema must be
created or upgraded, to keep `verify` on a small tree quick to start.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc

from integrity.store import schema as models
from integrity.errors import BaselineError, DatabaseError
from integrity.paths import display, from_key, to_key
from integrity.record import FileRecord

#: Alembic revisions this code knows, oldest first; the last is the one it needs.
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007")
HEAD = REVISIONS[-1]
BATCH = 5000


def utcnow() -> dt.datetime:
    """Naive UTC now, the form every time column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def default_url() -> str:
    """The database of SPEC: /var/lib for root, the XDG state dir for anyone else."""
    if os.geteuid() == 0:
        return "sqlite:////var/lib/integrity/integrity.db"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return "sqlite:///" + os.path.join(os.path.abspath(state), "integrity", "integrity.db")


@dataclass(frozen=True)
class BaselineInfo:
    """The active (or just written) baseline generation."""

    id: int
    created: dt.datetime
    entries: int
    policy_source: str
    policy_digest: str
    root: str | None
    signature: bytes | None = None


def _engine(url: str) -> sa.Engine:
    """Create the engine; for SQLite set WAL, a busy timeout and real transactions."""
    from integrity.store.files import create_private, parse_url

    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return _create(parsed)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        create_private(database)
    engine = _create(parsed, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN and break atomic
        # swaps; we issue BEGIN ourselves (SQLAlchemy's documented recipe).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL is switched on once, when the schema is created (it persists in the
        # file): a database that is not ours must never be modified by opening it.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that upgrades
        # to a writer later can fail with SQLITE_BUSY no timeout can cure.
        immediate = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Store:
    """An open integrity database whose schema is at the revision this code needs."""

    def __init__(self, url: str, *, must_exist: bool = False,
                 check_schema: bool = True) -> None:
        self.url = url
        if must_exist:
            _require_existing(url)
        self.engine = _engine(url)
        if check_schema:
            self._ensure_schema()

    # -- schema -----------------------------------------------------------------

    def revision(self) -> str | None:
        """The schema revision stored in the database, or None for an empty database.

        Raises DatabaseError for a file that is not a database or not ours.
        """
        try:
            with self.engine.connect() as conn:
                tables = set(sa.inspect(conn).get_table_names())
                if not tables:
                    return None
                if "alembic_version" not in tables or "baseline" not in tables:
                    raise DatabaseError(f"{self.name()}: not an integrity database "
                                        f"(tables: {', '.join(sorted(tables))[:120]})")
                version = conn.execute(
                    sa.text("SELECT version_num FROM alembic_version")).scalar()
        except sa_exc.DatabaseError as exc:
            raise DatabaseError(f"{self.name()}: cannot read database: "
                                f"{_cause(exc)}") from None
        return str(version) if version is not None else None

    def _ensure_schema(self) -> None:
        revision = self.revision()
        if revision is None:
            self.upgrade()
        elif revision == HEAD:
            return
        elif revision in REVISIONS:
            raise DatabaseError(
                f"{self.name()}: database schema is at revision {revision}, this "
                f"integrity needs {HEAD}: run 'integrity db upgrade'")
        else:
            raise DatabaseError(
                f"{self.name()}: database schema revision {revision} is unknown to "
                f"this integrity (newer version?); refusing to use it")

    def upgrade(self) -> tuple[str | None, str]:
        """Apply alembic migrations up to HEAD; return (from, to)."""
        from alembic import command
        from alembic.config import Config

        before = self.revision()
        if before is not None and before not in REVISIONS:
            raise DatabaseError(f"{self.name()}: database schema revision {before} "
                                f"is unknown to this integrity; not upgrading")
        config = Config()
        config.set_main_option("script_location", _migrations_dir())
        try:
            if before is None and self.engine.dialect.name == "sqlite" \
                    and self.engine.url.database not in (None, "", ":memory:"):
                # Readers and the writer do not block each other in WAL mode.
                raw = self.engine.raw_connection()
                try:
                    raw.driver_connection.execute("PRAGMA journal_mode = WAL")  # type: ignore[union-attr]
                finally:
                    raw.close()
            with self.engine.connect() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
        except sa_exc.DatabaseError as exc:
            raise DatabaseError(f"{self.name()}: migration failed: {_cause(exc)}") from None
        return before, HEAD

    def name(self) -> str:
        from integrity.store.files import redact
        return redact(self.engine.url)  # a password in the query hidden as well

    def close(self) -> None:
        """Release all connections."""
        self.engine.dispose()

    def writer(self) -> Any:
        """A connection whose transaction holds the write lock from its start."""
        return self.engine.connect().execution_options(write=True)

    # -- baselines --------------------------------------------------------------

    def active_baseline(self) -> BaselineInfo | None:
        """The baseline in force, or None before the first init."""
        b = models.baseline
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(b.c.id, b.c.activated, b.c.entries, b.c.policy_source,
                          b.c.policy_digest, b.c.root, b.c.signature)
                .where(b.c.state == "active")
            ).first()
        return BaselineInfo(*row) if row else None

    def write_baseline(self, records: Iterable[FileRecord], *, policy_source: str,
                       policy_digest: str, actor: str | None, force: bool,
                       owner: Callable[[bytes], str | None] | None = None,
                       seal: Callable[[], tuple[str, bytes | None]] | None = None,
                       ) -> BaselineInfo:
        """Store a new generation from `records` (in key order) and switch to it.

        Rows are written in batches into a `building` generation; only the final
        transaction makes it active. Any failure, interrupt included, leaves the
        previous baseline in force.
        """
        b, e = models.baseline, models.entry
        with self.writer() as conn, conn.begin():
            if not force and conn.execute(
                    sa.select(b.c.id).where(b.c.state == "active")).first():
                raise BaselineError(f"{self.name()}: a baseline exists already; use "
                                    "'init --force' to replace it, or 'approve' to "
                                    "accept changes")
            self._sweep(conn)
            new_id = conn.execute(b.insert().values(
                state="building", created=utcnow(), policy_source=policy_source,
                policy_digest=policy_digest, entries=0, actor=actor)).inserted_primary_key[0]
        writer = _BatchWriter(self, e)
        try:
            positional = writer.positional
            columns = e.c.keys()
            batch: list[Any] = []
            for rec in records:
                row = (new_id, to_key(rec[0]), *rec[1:], owner(rec[0]) if owner else None)
                batch.append(row if positional else dict(zip(columns, row)))
                if len(batch) >= BATCH:
                    writer.put(batch)
                    batch = []
            writer.put(batch)
            count = writer.close()
            root, signature = seal() if seal else (None, None)
            with self.writer() as conn, conn.begin():
                conn.execute(b.update().where(b.c.state == "active")
                             .values(state="retired"))
                conn.execute(b.update().where(b.c.id == new_id).values(
                    state="active", activated=utcnow(), entries=count, root=root,
                    signature=signature))
        except BaseException:
            writer.abort()
            self._discard(new_id)
            raise
        with self.writer() as conn, conn.begin():
            self._sweep(conn)
        info = self.active_baseline()
        assert info is not None
        return info

    def _discard(self, baseline_id: int) -> None:
        """Best-effort removal of an unfinished generation (the sweep catches the rest)."""
        try:
            with self.writer() as conn, conn.begin():
                conn.execute(models.entry.delete()
                             .where(models.entry.c.baseline_id == baseline_id))
                conn.execute(models.baseline.delete()
                             .where(models.baseline.c.id == baseline_id))
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    @staticmethod
    def _sweep(conn: sa.Connection) -> None:
        """Delete generations that are not in force: leftovers of crashes and swaps."""
        b, e = models.baseline, models.entry
        stale = sa.select(b.c.id).where(b.c.state != "active")
        conn.execute(e.delete().where(e.c.baseline_id.in_(stale)))
        conn.execute(b.delete().where(b.c.state != "active"))

    def iter_entries(self, baseline_id: int,
                     ranges: Sequence[tuple[bytes, bytes]] | None = None,
                     ) -> Iterator[tuple[bytes, FileRecord]]:
        """Stream (key, entry) of a baseline in key order, optionally within key ranges."""
        e = models.entry
        cols = [e.c[name] for name in models.ENTRY_COLUMNS]
        with self.engine.connect() as conn:
            bounds: Sequence[tuple[bytes | None, bytes | None]] = ranges or [(None, None)]
            for low, high in bounds:
                query = sa.select(*cols).where(e.c.baseline_id == baseline_id)
                if low is not None and high is not None:
                    query = query.where(e.c.key >= low, e.c.key < high)
                result = conn.execution_options(stream_results=True, yield_per=BATCH) \
                    .execute(query.order_by(e.c.key))
                for row in result:
                    key = row[0]
                    yield key, FileRecord(from_key(key), *row[1:])

    def recompute_root(self, baseline_id: int) -> str:
        """The Merkle root of a baseline's entries as they are in the database now."""
        from integrity.trust import root_of
        return root_of(self.iter_entries(baseline_id))

    def entry_owner(self, baseline_id: int, path: bytes) -> str | None:
        """The package recorded as owning path in a baseline, if any."""
        e = models.entry
        with self.engine.connect() as conn:
            return conn.execute(sa.select(e.c.package).where(
                e.c.baseline_id == baseline_id, e.c.key == to_key(path))).scalar()

    # -- runs -------------------------------------------------------------------

    def start_run(self, command: str, baseline_id: int | None, paths: Sequence[bytes],
                  fast: bool = False) -> int:
        """Record that a run started; returns its id."""
        r = models.run
        with self.writer() as conn, conn.begin():
            return int(conn.execute(r.insert().values(
                command=command, started=utcnow(), baseline_id=baseline_id,
                paths="\n".join(display(p) for p in paths) or None, fast=int(fast),
                scanned=0, added=0, removed=0, modified=0, errors=0,
            )).inserted_primary_key[0])

    def finish_run(self, run_id: int, *, scanned: int, added: int, removed: int,
                   modified: int, errors: int, exit_code: int) -> None:
        """Record a run's counts and outcome."""
        r = models.run
        with self.writer() as conn, conn.begin():
            conn.execute(r.update().where(r.c.id == run_id).values(
                finished=utcnow(), scanned=scanned, added=added, removed=removed,
                modified=modified, errors=errors, exit_code=exit_code))

    def last_run(self, *commands: str) -> dict[str, Any] | None:
        """The newest finished run (of these commands, if given)."""
        r = models.run
        query = sa.select(r).where(r.c.finished.is_not(None))
        if commands:
            query = query.where(r.c.command.in_(commands))
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(r.c.id.desc()).limit(1)).mappings().first()
        return dict(row) if row else None


class _BatchWriter:
    """Writes baseline batches on a thread of its own while the scan goes on.

    sqlite3 releases the GIL while SQLite works on a batch, so the B-tree inserts of
    one batch overlap with hashing the next. Rows go to the DBAPI's executemany as
    tuples: Core's per-row parameter processing cost ~9 µs a row, and our column
    types need no conversion. The statement is still compiled by the dialect.
    """

    def __init__(self, store: Store, table: sa.Table) -> None:
        import queue
        import threading

        dialect = store.engine.dialect
        self.sql = str(table.insert().compile(dialect=dialect,
                                              column_keys=list(table.c.keys())))
        self.positional = bool(dialect.positional)
        self.store = store
        self.count = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue[list[Any] | None] = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._run, name="baseline-writer",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is not None or not batch:
                continue
            try:
                with self.store.writer() as conn, conn.begin():
                    conn.exec_driver_sql(self.sql, batch)
                self.count += len(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self.error = exc

    def put(self, batch: list[Any]) -> None:
        """Queue a batch (blocks while two are pending); re-raise a writer failure."""
        self._raise()
        self.queue.put(batch)

    def close(self) -> int:
        """Wait for every batch; return the row count or raise the writer's error."""
        self.queue.put(None)
        self.thread.join()
        self._raise()
        return self.count

    def abort(self) -> None:
        """Stop after the batch in progress (the caller discards the generation)."""
        self.error = self.error or RuntimeError("aborted")
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            error = self.error
            if isinstance(error, sa_exc.DBAPIError):
                raise DatabaseError(f"{self.store.name()}: cannot write baseline: "
                                    f"{_cause(error)}") from None
            raise error


def heartbeat(store: Store, watcher_id: int | None, *, interval: int, state: str,
              watches: int, unwatched: str | None) -> int:
    """Record that this watcher is alive (creating its row on the first beat)."""
    import socket

    w = models.watcher
    now = utcnow()
    with store.writer() as conn, conn.begin():
        if watcher_id is None:
            return int(conn.execute(w.insert().values(
                host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                interval=interval, state=state, watches=watches, unwatched=unwatched,
            )).inserted_primary_key[0])
        conn.execute(w.update().where(w.c.id == watcher_id).values(
            heartbeat=now, state=state, watches=watches, unwatched=unwatched))
        return watcher_id


def latest_watcher(store: Store) -> dict[str, Any] | None:
    """The most recently started watcher's row."""
    w = models.watcher
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(w).order_by(w.c.started.desc(), w.c.id.desc())
                           .limit(1)).mappings().first()
    return dict(row) if row else None


def _create(parsed: sa.URL, **kwargs: Any) -> sa.Engine:
    """create_engine, with an unknown or missing driver as one DatabaseError line."""
    from integrity.store.files import redact

    try:
        return sa.create_engine(parsed, **kwargs)
    except sa_exc.NoSuchModuleError:
        raise DatabaseError(f"{redact(parsed)}: unknown database driver "
                            f"{parsed.drivername!r}") from None
    except ImportError as exc:
        raise DatabaseError(f"{redact(parsed)}: the driver for {parsed.drivername!r} is "
                            f"not installed ({exc.name or exc})") from None
    except (sa_exc.ArgumentError, ValueError, TypeError) as exc:
        raise DatabaseError(f"{redact(parsed)}: bad database URL: {exc}") from None


def _require_existing(url: str) -> None:
    """Refuse to create an empty database as a side effect of reading one."""
    from integrity.store.files import parse_url

    parsed = parse_url(url)
    database = parsed.database or ""
    if (parsed.get_backend_name() == "sqlite" and database
            and database != ":memory:" and not database.startswith("file:")
            and not os.path.exists(database)):
        raise DatabaseError(f"{database}: no database yet: run 'integrity init'")


def _migrations_dir() -> str:
    from importlib import resources
    return str(resources.files("integrity.store.migrations"))


def as_database_error(exc: BaseException) -> DatabaseError | None:
    """A driver error that escaped the store (disk full, I/O error) as one clear line."""
    if isinstance(exc, sa_exc.DBAPIError):
        return DatabaseError(f"database error: {_cause(exc)}")
    return None


def _cause(exc: sa_exc.DBAPIError) -> str:
    return str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
