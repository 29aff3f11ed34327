"""The database connection: engine setup, schema checks and migrations, transactions.

Everything SQLite-specific lives in `_engine()` (WAL, busy timeout, BEGIN IMMEDIATE
for writers); the rest of the store is portable Core, so the same code runs against
PostgreSQL. Alembic is imported only when a schema must be created or upgraded, to
keep `verify` on a small tree quick to start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc

from integrity.errors import DatabaseError

#: Alembic revisions this code knows, oldest first; the last is the one it needs.
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008")
HEAD = REVISIONS[-1]
#: Rows per statement where a list of ids or keys goes into one IN (...): under
#: SQLite's default limit of bound parameters, whatever the build.
CHUNK = 500

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Slices of at most `size` items, for statements with one parameter per item."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def inserted_id(result: sa.CursorResult[Any]) -> int:
    """The primary key of the row an INSERT ... VALUES just wrote."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def default_url() -> str:
    """The database of SPEC: /var/lib for root, the XDG state dir for anyone else."""
    if os.geteuid() == 0:
        return "sqlite:////var/lib/integrity/integrity.db"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return "sqlite:///" + os.path.join(os.path.abspath(state), "integrity", "integrity.db")


def _engine(url: str) -> sa.Engine:
    """Create the engine; for SQLite set WAL, a busy timeout and real transactions."""
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError:
        raise DatabaseError(f"{url}: not a database URL") from None
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        parent = os.path.dirname(os.path.abspath(database))
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"{parent}: cannot create database directory: "
                                f"{exc.strerror}") from None
    engine = sa.create_engine(parsed, connect_args={"timeout": 30})

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


class Database:
    """An open integrity database whose schema is at the revision this code needs."""

    def __init__(self, url: str, *, must_exist: bool = False,
                 check_schema: bool = True) -> None:
        self.url = url
        if must_exist:
            _require_existing(url)
        self.engine = _engine(url)
        if check_schema:
            self._ensure_schema()

    def name(self) -> str:
        """The URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Release all connections."""
        self.engine.dispose()

    def reader(self) -> sa.Connection:
        """A connection for reading (its own consistent snapshot per transaction)."""
        return self.engine.connect()

    def writer(self) -> sa.Connection:
        """A connection whose transaction holds the write lock from its start."""
        return self.engine.connect().execution_options(write=True)

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
                                f"{cause(exc)}") from None
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
        config.set_main_option("script_location", migrations_dir())
        try:
            if before is None and self.engine.dialect.name == "sqlite" \
                    and self.engine.url.database not in (None, "", ":memory:"):
                # Readers and the writer do not block each other in WAL mode.
                raw = self.engine.raw_connection()
                try:
                    raw.driver_connection.execute(  # type: ignore[union-attr]
                        "PRAGMA journal_mode = WAL")
                finally:
                    raw.close()
            with self.engine.connect() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
        except sa_exc.DatabaseError as exc:
            raise DatabaseError(f"{self.name()}: migration failed: {cause(exc)}") from None
        return before, HEAD


def _require_existing(url: str) -> None:
    """Refuse to create an empty database as a side effect of reading one."""
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError:
        raise DatabaseError(f"{url}: not a database URL") from None
    database = parsed.database or ""
    if (parsed.get_backend_name() == "sqlite" and database
            and database != ":memory:" and not database.startswith("file:")
            and not os.path.exists(database)):
        raise DatabaseError(f"{database}: no database yet: run 'integrity init'")


def migrations_dir() -> str:
    """Where the alembic scripts of the local schema are installed."""
    from importlib import resources
    return str(resources.files("integrity.store.migrations"))


def as_database_error(exc: BaseException) -> DatabaseError | None:
    """A driver error that escaped the store (disk full, I/O error) as one clear line."""
    if isinstance(exc, sa_exc.DBAPIError):
        return DatabaseError(f"database error: {cause(exc)}")
    return None


def cause(exc: sa_exc.DBAPIError) -> str:
    """The driver's own first line for a database error."""
    return str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)


def is_driver_error(exc: BaseException) -> bool:
    """Whether an exception came from the database driver (for the error boundary)."""
    return isinstance(exc, sa_exc.DBAPIError)
