"""The database connection: engine setup, schema checks and migrations, transactions.

Everything SQLite-specific lives in `_engine()` (WAL, busy timeout, BEGIN IMMEDIATE
for writers); the rest of the store is portable Core, so the same code runs against
PostgreSQL. Alembic is imported only when a schema must be created or upgraded, to
keep `verify` on a small tree quick to start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc

from integrity.errors import DatabaseError

log = logging.getLogger(__name__)

#: Alembic revisions this code knows, oldest first; the last is the one it needs.
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009",
             "0010", "0011", "0012", "0013")
HEAD = REVISIONS[-1]
#: Rows per statement where a list of ids or keys goes into one IN (...): under
#: SQLite's default limit of bound parameters, whatever the build.
CHUNK = 500
#: SQLite page cache (KiB) while a retired generation's free pages are given back:
#: moving pages with the default 8 MiB cache spills and takes twice as long; more
#: than this would count against peak RSS (SPEC: 150 MB at a million entries).
_BIG_CACHE_KIB = 64 << 10

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


#: Seconds a writer waits for SQLite's write lock before it fails. An `init` holds
#: the lock from its first row to the switch: about 15 s at a million files here.
BUSY_TIMEOUT = 30.0
#: Seconds an init or approve waits for the one holding the baseline lock, and a
#: CLI command's write for either (`Database(baseline_wait=)`): a cold init of a
#: million files holds SQLite's write lock for over a minute.
BASELINE_WAIT = 600.0

#: Baseline lock files this process holds (exclusive()): its own writes never wait
#: for them.
_held_locks: set[str] = set()


def _on_disk(database: str) -> bool:
    """Whether a SQLite URL's database part names a file of its own (not memory, not
    a `file:` URI): where files beside it (the baseline lock, sidecars) can live."""
    return bool(database) and database != ":memory:" and not database.startswith("file:")


def _lock_file(database: str) -> str:
    """The baseline lock beside a SQLite database file (exclusive())."""
    return database + ".lock"


def _engine(url: str, busy_timeout: float = BUSY_TIMEOUT,
            baseline_wait: float = 0.0) -> sa.Engine:
    """Create the engine; for SQLite set WAL, a busy timeout and real transactions."""
    from integrity.store.files import create_private, parse_url, redact

    parsed = parse_url(url)
    if parsed.get_backend_name() == "postgresql":
        return _postgresql_engine(parsed, baseline_wait or busy_timeout)
    if parsed.get_backend_name() != "sqlite":
        return _create(parsed)
    database = parsed.database or ""
    lock = None
    if _on_disk(database):
        create_private(database)
        lock = _lock_file(database)
    _bind_bytes_and_null_as_they_are()
    engine = _create(parsed, connect_args={"timeout": busy_timeout})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN and break atomic
        # swaps; we issue BEGIN ourselves (SQLAlchemy's documented recipe).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
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
        if immediate and baseline_wait and lock is not None:
            _begin_after_baseline(conn.connection.driver_connection, lock, baseline_wait,
                                  redact(parsed))
            return
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


#: `Connection.info` key: seconds this connection's next PostgreSQL writes wait.
_LOCK_WAIT = "integrity_lock_wait"
#: The advisory lock a PostgreSQL write transaction holds (`_postgresql_engine`); the
#: baseline lock (`Database.exclusive`) is 7243011.
WRITE_LOCK = 7243012


def _postgresql_engine(parsed: sa.URL, wait: float) -> sa.Engine:
    """Create a PostgreSQL engine whose write transactions take turns, as SQLite's do.

    Writers read the chain's head (and the highest ids) and append after it: two at
    once would fork the chain, which its check reports as tampering. SQLite's BEGIN
    IMMEDIATE lets one writer in at a time; here a transaction-level advisory lock
    does, waiting up to `wait` seconds (`Database.patience` sets another wait for
    one connection), then the write fails with one line. A pooled connection the
    server has closed meanwhile (a restart, its idle_session_timeout, a dropped
    network) is replaced when next taken, not reported as a failed write: the
    watcher keeps its engine for months.
    """
    engine = _create(parsed, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Our transactions wait between statements while files are hashed (init's
        # write, verify's read of the baseline): a server's idle-in-transaction
        # timeout, common on managed services, would end them mid-way. Lifted for our
        # own sessions only; a wait for a lock is still bounded (lock_timeout).
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        cursor = dbapi_conn.cursor()
        cursor.execute("SET idle_in_transaction_session_timeout = 0")
        cursor.close()
        dbapi_conn.autocommit = autocommit

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("write", False):
            seconds = conn.info.get(_LOCK_WAIT, wait)
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(seconds * 1000)}ms'")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    return engine


def _begin_after_baseline(driver: Any, lock: str, wait: float, name: str) -> None:
    """BEGIN IMMEDIATE once no other process holds the baseline lock, waiting up to
    `wait` s for it: an init or approve holds SQLite's write lock far longer than a
    busy timeout should be, and a timer's `verify` must not fail because of it."""
    import sqlite3
    import time

    deadline = time.monotonic() + wait
    while True:
        _poll_lock(lambda: not _held_elsewhere(lock), deadline, wait, name)
        try:
            driver.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError:
            # Taken between our look and our BEGIN: wait for it, unless it is free.
            if time.monotonic() >= deadline or not _held_elsewhere(lock):
                raise


def _held_elsewhere(lock: str) -> bool:
    """Whether another process holds the baseline lock file `lock` now."""
    import fcntl

    if lock in _held_locks:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file yet (no init ever ran), or not ours to read
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False  # closing fd lets it go at once
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _poll_lock(take: Callable[[], bool], deadline: float, wait: float, name: str) -> None:
    """Call `take` until it succeeds, every 50 ms up to `deadline` (time.monotonic),
    saying once on stderr that we wait; then fail with one line."""
    import time

    told = False
    while not take():
        if time.monotonic() >= deadline:
            raise DatabaseError(f"{name}: another init or approve holds the baseline "
                                f"lock (waited {wait:.0f} s)")
        if not told:
            log.warning("%s: another init or approve is writing the baseline; waiting "
                        "for it (up to %.0f s)", name, wait)
            told = True
        time.sleep(0.05)


def _bind_bytes_and_null_as_they_are() -> None:
    """Register identity adapters for bytes and None parameters in the sqlite3 module.

    CPython's sqlite3 binds only int, float, str and bytearray without the adaptation
    protocol; every bytes or None parameter goes through it, and before 3.12 its
    failed `__adapt__` lookup on a type formats an AttributeError message that is
    thrown away: ~2k instructions a parameter, six per entry row, 0.8 µs a row held
    under the GIL while `init` writes. A registered adapter is found first; these
    return the value itself (`bytes(b)` is `b`; `{}.get(None)` is None), so what
    is stored is unchanged.
    """
    import sqlite3

    nothing: dict[None, None] = {}
    sqlite3.register_adapter(bytes, bytes)
    sqlite3.register_adapter(type(None), nothing.get)


class Database:
    """An open integrity database whose schema is at the revision this code needs."""

    def __init__(self, url: str, *, must_exist: bool = False,
                 check_schema: bool = True, busy_timeout: float = BUSY_TIMEOUT,
                 baseline_wait: float = 0.0) -> None:
        """`baseline_wait`: seconds a write transaction first waits for another
        process's init or approve (SQLite); 0 leaves it to the busy timeout."""
        self.url = url
        if must_exist:
            _require_existing(url)
        self.busy_timeout = busy_timeout
        self.engine = _engine(url, busy_timeout, baseline_wait)
        if check_schema:
            self._ensure_schema()

    def name(self) -> str:
        """The URL without its password (in the query too), for messages."""
        from integrity.store.files import redact
        return redact(self.engine.url)

    def close(self) -> None:
        """Release all connections."""
        self.engine.dispose()

    def sidecar(self, name: str) -> str:
        """A file of ours kept beside the database, not in it (a copy of the database
        alone does not carry it): `<database>.<name>` for SQLite.

        Another database's sidecars live in the host's state directory (created
        0700 on first use, as for the default SQLite database)."""
        database = self.engine.url.database or ""
        if self._is_sqlite() and _on_disk(database):
            return f"{database}.{name}"
        state = os.path.dirname(default_url().split(":///", 1)[1])
        try:
            os.makedirs(state, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"{state}: cannot create the state directory: "
                                f"{exc.strerror}") from None
        return os.path.join(state, name)

    def reader(self) -> sa.Connection:
        """A connection for reading (its own consistent snapshot per transaction).

        SQLite's read transactions are snapshots; PostgreSQL's default (READ
        COMMITTED) takes a new one per statement, so there a reader asks for
        REPEATABLE READ. Writers keep READ COMMITTED: their first statement waits
        for the write lock, and what they read after it must include the writes of
        the writer before them (`_postgresql_engine`)."""
        conn = self.engine.connect()
        if self.engine.dialect.name == "postgresql":
            return conn.execution_options(isolation_level="REPEATABLE READ")
        return conn

    def writer(self) -> sa.Connection:
        """A connection whose transaction holds the write lock from its start."""
        return self.engine.connect().execution_options(write=True)

    @contextlib.contextmanager
    def unchecked_writer(self) -> Iterator[sa.Connection]:
        """A write transaction without foreign-key enforcement (SQLite), for deleting
        whole generations, entries before their baseline row: SQLite's bookkeeping
        made deleting a million entries 4x slower (1.9 s against 0.5); and for a new
        generation's rows, which all name the baseline row written before them."""
        with self.writer() as conn:
            driver = conn.connection.driver_connection if self._is_sqlite() else None
            if driver is not None:  # only outside a transaction
                driver.execute("PRAGMA foreign_keys = OFF")
            try:
                with conn.begin():
                    yield conn
            finally:
                if driver is not None:
                    try:
                        driver.execute("PRAGMA foreign_keys = ON")
                    except Exception:
                        conn.invalidate()  # never back to the pool unchecked
                        raise

    @contextlib.contextmanager
    def patience(self, conn: sa.Connection, seconds: float) -> Iterator[None]:
        """Wait at most `seconds` for the write lock on this connection, outside a
        transaction (a heartbeat that cannot be written now is skipped, not waited
        for)."""
        if self.engine.dialect.name == "postgresql":
            conn.info[_LOCK_WAIT] = seconds
            try:
                yield
            finally:
                conn.info.pop(_LOCK_WAIT, None)
            return
        driver = conn.connection.driver_connection if self._is_sqlite() else None
        if driver is None:
            yield
            return
        with self._busy_wait(driver, seconds):
            yield

    @contextlib.contextmanager
    def _busy_wait(self, driver: Any, seconds: float) -> Iterator[None]:
        """SQLite's busy timeout of this driver connection, then ours again."""
        driver.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        try:
            yield
        finally:
            driver.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    def give_back_free_pages(self) -> None:
        """Shrink the file by the pages a retired generation left free (SQLite with
        auto_vacuum=INCREMENTAL: every database this code creates or upgrades).
        Without it the file keeps two generations' worth of pages after every init
        (SPEC's size target is per entry of the baseline in force)."""
        import sqlite3

        if not self._is_sqlite():
            return
        raw = self.engine.raw_connection()
        try:
            self._vacuum_pages(raw.driver_connection)
        except sqlite3.Error as exc:
            # The new baseline is in force already: the space waits for the next init.
            log.warning("%s: free pages not given back: %s", self.name(), exc)
        finally:
            raw.close()

    def _vacuum_pages(self, driver: Any) -> None:
        """incremental_vacuum with a larger cache, then the WAL truncated."""
        if driver.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return
        driver.execute(f"PRAGMA cache_size = -{_BIG_CACHE_KIB}")
        try:
            # executescript steps the pragma to its end (execute() frees one page).
            driver.executescript("PRAGMA incremental_vacuum;")
        finally:
            driver.execute("PRAGMA cache_size = -2000")
            driver.execute("PRAGMA shrink_memory")
        # The WAL back to zero bytes, waiting a moment at most for readers (a
        # watcher's read transaction must not stall init for the busy timeout).
        with self._busy_wait(driver, 1.0):
            driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def _file(self) -> str | None:
        """The SQLite database's file, or None (another database, or in memory)."""
        database = self.engine.url.database or ""
        return database if self._is_sqlite() and _on_disk(database) else None

    @contextlib.contextmanager
    def exclusive(self, timeout: float = BASELINE_WAIT) -> Iterator[None]:
        """Hold the baseline lock: inits and approvals of one database take turns.

        A baseline is written in many transactions (batches, then the switch), so
        the database's own write lock cannot keep two writers apart. SQLite: an flock
        on `<database>.lock` beside the file; other databases: an advisory lock.
        Waits up to `timeout` seconds for the holder, then fails with one line.
        """
        if self._is_sqlite():
            database = self._file()
            if database is None:
                yield
                return
            with _file_lock(_lock_file(database), timeout, self.name()):
                yield
            return
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn:
                conn.exec_driver_sql(f"SET lock_timeout = '{int(timeout * 1000)}ms'")
                try:
                    conn.exec_driver_sql("SELECT pg_advisory_lock(7243011)")
                except sa_exc.DBAPIError:
                    raise DatabaseError(f"{self.name()}: another init or approve holds "
                                        f"the baseline lock (waited {timeout:.0f} s)") from None
                try:
                    yield
                finally:
                    conn.exec_driver_sql("SELECT pg_advisory_unlock(7243011)")
            return
        raise DatabaseError(f"{self.name()}: no baseline lock for the "
                            f"{self.engine.dialect.name} dialect")

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
            if before is None and self._file() is not None:
                # Before the first table: free pages that can be given back
                # (give_back_free_pages), and WAL, where readers and the writer do not
                # block each other. (SQLite's 4 KiB pages stay: with 16 KiB ones a
                # million entries insert ~20% faster, but every WAL frame is 4x larger,
                # and on a full disk a failed init then left no room to record a verify.)
                raw = self.engine.raw_connection()
                try:
                    driver: Any = raw.driver_connection
                    driver.execute("PRAGMA auto_vacuum = INCREMENTAL")
                    driver.execute("PRAGMA journal_mode = WAL")
                finally:
                    raw.close()
            # On PostgreSQL a migration is a write like any other: under the write
            # lock, so processes meeting an empty database (or one upgrade) take
            # turns and the later ones find the schema at head. SQLite's deferred
            # BEGIN makes them take turns already.
            with (self.writer() if self.engine.dialect.name == "postgresql"
                  else self.engine.connect()) as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
        except sa_exc.DatabaseError as exc:
            raise DatabaseError(f"{self.name()}: migration failed: {cause(exc)}") from None
        if before is not None and before != HEAD:
            self._repage()
        return before, HEAD

    def _repage(self) -> None:
        """Switch an older SQLite database to auto_vacuum=INCREMENTAL (one VACUUM, at
        upgrade time only), so that init can give a retired generation's pages back."""
        import sqlite3

        path = self._file()
        if path is None:
            return
        self.engine.dispose()  # no pooled connection of ours in the way
        raw = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            if raw.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                raw.execute("PRAGMA auto_vacuum = INCREMENTAL")
                raw.execute("VACUUM")
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.name()}: VACUUM after the upgrade failed: "
                                f"{exc}") from None
        finally:
            raw.close()


@contextlib.contextmanager
def _file_lock(path: str, timeout: float, name: str) -> Iterator[None]:
    """An exclusive flock on `path` (created 0600), waited for up to `timeout` s."""
    import fcntl
    import time

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DatabaseError(f"{path}: cannot open the baseline lock: {exc.strerror}") from None

    def take() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    try:
        _poll_lock(take, time.monotonic() + timeout, timeout, name)
        _held_locks.add(path)
        try:
            yield
        finally:
            _held_locks.discard(path)
    finally:
        os.close(fd)


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
    if (parsed.get_backend_name() == "sqlite" and _on_disk(database)
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
