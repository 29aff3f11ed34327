"""The fleet's central PostgreSQL database: the only code that speaks its SQL.

`Central` opens one central database (psycopg 3, no pool) and hands out a view per
side: `admin` (schema and roles, enrolment, requests, resolving flags), `reads`
(status, events, drift), `alerts` (the monitor's) and `host_session()` for a host's
push. The schema is `integrity`, created by its own alembic migrations (migrations/),
owned by the role integrity_admin, with row-level security binding every host role.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from integrity.store.central.admin import Admin, InitReport, Resolution
from integrity.store.central.alerts import Alerts, Owed
from integrity.store.central.engine import central_errors, make_engine, parse_url
from integrity.store.central.ingest import HostSession
from integrity.store.central.reads import VARIANT, DriftReader, Reads

__all__ = ["Central", "DriftReader", "HostSession", "InitReport", "Owed", "Resolution",
           "VARIANT"]


class Central:
    """An open central database (nothing connects until it is used)."""

    def __init__(self, url: str, *, password_file: str | None = None,
                 tls: Mapping[str, str] | None = None, application: str = "integrity",
                 what: str = "--url") -> None:
        self.engine = make_engine(parse_url(url, what=what), password_file=password_file,
                                  tls=tls, application=application)
        self.admin = Admin(self)
        self.reads = Reads(self)
        self.alerts = Alerts(self)

    def name(self) -> str:
        """The database as people may see it (never a password)."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def errors(self) -> contextlib.AbstractContextManager[None]:
        """Driver errors as one line naming this database (DatabaseError, exit 2)."""
        return central_errors(self.name())

    @contextlib.contextmanager
    def host_session(self, host: str) -> Iterator[HostSession]:
        """A connection for one push, as the host's login role."""
        with self.errors(), self.engine.connect() as conn:
            yield HostSession(conn, self.name(), host)
