"""Database URLs and files as an attacker would look at them.

A database URL is checked whole before any driver sees it, so a typo is one line
naming the URL (never a ValueError from deep in a driver), and a URL is never shown
with its password. The SQLite file holds every path we protect, every event and who
made it: it is created 0600 in a 0700 directory, never left to the umask.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from integrity.errors import DatabaseError

#: Query parameters that libpq and the MySQL drivers read as a password.
_SECRET_PARAMS = ("password", "passwd", "sslpassword")
_USERINFO = re.compile(r"(://[^/@:]*:)[^/@]*@")
_QUERY_SECRET = re.compile(r"((?:^|[?&])(?:%s)=)[^&]*" % "|".join(_SECRET_PARAMS), re.I)


def redact(url: str | sa.URL) -> str:
    """A URL fit to print: its password (in the authority or the query) as ***."""
    if isinstance(url, sa.URL):
        url = url.render_as_string(hide_password=True)
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub(r"\1***@", url))


def parse_url(url: str) -> sa.URL:
    """A SQLAlchemy URL, or DatabaseError naming the (redacted) URL and what is wrong."""
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError:
        raise DatabaseError(f"{redact(url)}: not a database URL") from None
    except (ValueError, TypeError) as exc:
        # make_url turns "h:notaport" into int("notaport"): say which part is bad.
        cause = "the port is not a number" if "int()" in str(exc) else str(exc)
        raise DatabaseError(f"{redact(url)}: bad database URL: {cause}") from None
    return parsed


def carries_password(url: str) -> bool:
    """True when a URL holds a password (user:PASSWORD@ or ?password=)."""
    parsed = parse_url(url)
    return bool(parsed.password) or any(key.lower() in _SECRET_PARAMS
                                        for key in parsed.query)


@dataclass(frozen=True)
class UrlParts:
    """What a policy's [fleet] table checks of the central database's URL."""

    backend: str
    driver: str
    username: str | None
    has_password: bool


def url_parts(url: str) -> UrlParts:
    """The parts of a database URL (DatabaseError when it is not one)."""
    parsed = parse_url(url)
    # From the text: URL.get_driver_name() would load the dialect for its default
    # driver (a third of a second for PostgreSQL's) in every command of a fleet host.
    backend, _, driver = parsed.drivername.partition("+")
    return UrlParts(backend, driver or backend, parsed.username, carries_password(url))


def login_url(url: str, username: str) -> str:
    """The URL a fleet host connects with: psycopg 3, as the role of its own name."""
    return parse_url(url).set(drivername="postgresql+psycopg", username=username
                              ).render_as_string(hide_password=False)


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (None for another database, memory or a file: URI)."""
    parsed = parse_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:"):
        return None
    return database


def create_private(database: str) -> None:
    """Create the database's directory (0700) and an empty file (0600) unless present.

    SQLite would create the file 0644 (less the umask), and gives its -wal and -shm
    files the database file's mode: creating the file first makes all three private.
    An existing file is left as it is (doctor reports one others can read).
    """
    parent = os.path.dirname(os.path.abspath(database))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"{parent}: cannot create database directory: "
                            f"{exc.strerror}") from None
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise DatabaseError(f"{database}: cannot create database: {exc.strerror}") from None
    os.close(fd)


def exposure(url: str) -> list[str]:
    """What lets other users read (or swap) the database: one sentence per problem."""
    problems: list[str] = []
    if carries_password(url):
        problems.append(f"the database URL {redact(url)} carries a password, which "
                        "shows in process lists and in files that hold it; use a "
                        "~/.pgpass (PGPASSFILE) file of mode 0600 instead")
    database = sqlite_path(url)
    if database is None:
        return problems
    for name in (database, database + "-wal", database + "-shm"):
        try:
            st = os.stat(name)
        except OSError:
            continue
        if st.st_mode & 0o077:
            problems.append(f"{name} is mode {stat.S_IMODE(st.st_mode):04o}: other users "
                            "can read the paths, events and actors it holds")
    parent = os.path.dirname(os.path.abspath(database))
    try:
        st = os.stat(parent)
    except OSError:
        return problems
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        problems.append(f"{parent} is writable by every user: anyone can replace the "
                        "database")
    return problems
