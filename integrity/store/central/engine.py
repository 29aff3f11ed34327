"""Connections to the central PostgreSQL database (psycopg 3 through SQLAlchemy).

Hosts connect as their own login role; the admin commands as a member of
`integrity_admin`. Connections are short-lived (NullPool): a host pushes once per
interval, and a few hundred idle connections held by a fleet would cost the server
more than reconnecting does. A password file is read at every connection, so a
rotated password needs no restart; TLS options go to libpq unchanged. psycopg itself
is imported by SQLAlchemy's dialect at the first connection, never before: a verify
on a fleet host does not load it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc
from sqlalchemy.pool import NullPool

from integrity.errors import DatabaseError, UsageError

#: Seconds to wait for the server to answer a connection (libpq connect_timeout), and
#: for any one statement: a push must never hang a thread on a dead link for long.
CONNECT_TIMEOUT = 10
STATEMENT_TIMEOUT_MS = 300_000


def parse_url(url: str, *, what: str = "--url") -> sa.URL:
    """A postgresql URL for psycopg 3, or an error naming what is wrong (never the
    password)."""
    from integrity.store.files import parse_url as parse_any

    try:
        parsed = parse_any(url)
    except DatabaseError as exc:
        raise UsageError(f"{what}: {exc}") from None
    if parsed.get_backend_name() != "postgresql":
        raise UsageError(f"{what}: the central database must be PostgreSQL "
                         f"(postgresql://...), not {parsed.get_backend_name()}")
    if parsed.get_driver_name() not in ("psycopg", "postgresql"):
        raise UsageError(f"{what}: driver {parsed.get_driver_name()!r}: only psycopg 3 "
                         "is supported (postgresql:// or postgresql+psycopg://)")
    return parsed.set(drivername="postgresql+psycopg")


def read_password(path: str) -> str:
    """The first line of a password file."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatabaseError(f"{path}: cannot read the fleet password file: {cause}") from None
    if not value:
        raise DatabaseError(f"{path}: the fleet password file is empty")
    return value


def make_engine(url: sa.URL, *, password_file: str | None = None,
                tls: Mapping[str, str] | None = None,
                application: str = "integrity") -> sa.Engine:
    """An engine for the central database; nothing connects until it is used."""
    args = {"connect_timeout": CONNECT_TIMEOUT, "application_name": application,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
            "keepalives_count": 3, **(tls or {})}
    created = sa.create_engine(url, poolclass=NullPool, connect_args=args)
    if password_file is not None:
        @event.listens_for(created, "do_connect")
        def _password(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]
                      ) -> None:
            cparams["password"] = read_password(password_file)
    return created


def cause(exc: BaseException) -> str:
    """The first line of a driver error, without psycopg's connection prefix noise."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def is_central(exc: BaseException) -> bool:
    """A driver error of the central database (psycopg, wrapped by SQLAlchemy or raised
    by a COPY on the driver's own connection), not one of the local SQLite."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    return orig is not None and type(orig).__module__.startswith("psycopg")


@contextlib.contextmanager
def central_errors(name: str) -> Iterator[None]:
    """Central driver errors as one line naming the database (DatabaseError, exit 2);
    a local database's errors pass through to the CLI's boundary unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_central(exc):
            raise
        raise DatabaseError(f"central database {name}: {cause(exc)}") from None


def copy_rows(conn: sa.Connection, table: str, columns: Sequence[str],
              rows: Iterable[Sequence[Any]]) -> int:
    """COPY rows into a table (a temporary one: COPY FROM refuses row-level security)
    through the connection's own psycopg connection, inside its transaction."""
    driver = conn.connection.driver_connection
    count = 0
    with driver.cursor() as cursor:  # type: ignore[union-attr]
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
    return count
