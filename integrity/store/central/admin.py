"""Admin-side writes to the central database: schema and roles, enrolment, approval
requests, and resolving a flagged host.

`fleet init` runs as a role that may create roles (a superuser, or CREATEROLE and
member of integrity_admin); everything it creates in schema `integrity` is owned by
`integrity_admin`, so that row-level security binds every host role and not the admin.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from integrity.errors import DatabaseError, UsageError
from integrity.store.central import schema
from integrity.store.central.schema import ADMIN_ROLE, HOST_ROLE, SCHEMA

if TYPE_CHECKING:
    from integrity.store.central import Central


@dataclass(frozen=True)
class InitReport:
    """What `fleet init` did."""

    before: str | None
    after: str
    roles_created: tuple[str, ...]


@dataclass(frozen=True)
class Resolution:
    """What resolving a host's flags did."""

    flags: list[tuple[str, str]]
    was_forked: bool
    resync_request: int | None


def _quote(conn: sa.Connection, identifier: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(identifier)


def revision(conn: sa.Connection) -> str | None:
    """The central schema's alembic revision, or None before `fleet init`."""
    exists = conn.execute(sa.text("SELECT to_regclass(:t)"),
                          {"t": f"{SCHEMA}.alembic_version"}).scalar()
    if exists is None:
        return None
    found = conn.execute(sa.text(f"SELECT version_num FROM {SCHEMA}.alembic_version")
                         ).scalar()
    return str(found) if found is not None else None


def check_schema(conn: sa.Connection, where: str) -> None:
    """Refuse a database `fleet init` has not set up, or set up by a newer integrity."""
    current = revision(conn)
    if current is None:
        raise DatabaseError(f"{where}: no fleet schema here: run 'integrity fleet init'")
    if current not in schema.REVISIONS:
        raise DatabaseError(f"{where}: fleet schema revision {current} is unknown to this "
                            "integrity (newer version?)")
    if current != schema.HEAD:
        raise DatabaseError(f"{where}: fleet schema is at revision {current}, this "
                            f"integrity needs {schema.HEAD}: run 'integrity fleet init'")


def host_id(conn: sa.Connection, host: str) -> int:
    """The id of an enrolled host, or UsageError."""
    found = conn.execute(sa.select(schema.host.c.id).where(schema.host.c.name == host)
                         ).scalar()
    if found is None:
        raise UsageError(f"{host}: no such host enrolled (see 'integrity fleet status')")
    return int(found)


class Admin:
    """What the fleet's admin changes in the central database."""

    def __init__(self, central: Central) -> None:
        self.central = central

    def init(self) -> InitReport:
        """Create or upgrade the central schema and the two group roles, in one
        transaction."""
        from importlib import resources

        from alembic import command
        from alembic.config import Config

        where = self.central.name()
        created: list[str] = []
        with self.central.errors(), self.central.engine.connect() as conn:
            before = revision(conn)
            if before is not None and before not in schema.REVISIONS:
                raise DatabaseError(f"{where}: fleet schema revision {before} is unknown "
                                    "to this integrity; not upgrading")
            for role in (ADMIN_ROLE, HOST_ROLE):
                if conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                {"r": role}).first() is None:
                    conn.execute(sa.text(f"CREATE ROLE {role} NOLOGIN"))
                    created.append(role)
            superuser = conn.execute(sa.text(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
            if not superuser and not conn.execute(sa.text(
                    f"SELECT pg_has_role(current_user, '{ADMIN_ROLE}', 'MEMBER')")).scalar():
                conn.execute(sa.text(f"GRANT {ADMIN_ROLE} TO CURRENT_USER"))
            owner = conn.execute(sa.text(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = :s"),
                {"s": SCHEMA}).scalar()
            if owner is None:
                conn.execute(sa.text(f"CREATE SCHEMA {SCHEMA} AUTHORIZATION {ADMIN_ROLE}"))
            elif owner != ADMIN_ROLE:
                raise DatabaseError(f"{where}: schema {SCHEMA} exists and belongs to "
                                    f"{owner}, not {ADMIN_ROLE}: not ours; refusing to use it")
            _grant_database(conn, where)
            conn.execute(sa.text(f"SET LOCAL ROLE {ADMIN_ROLE}"))
            config = Config()
            config.set_main_option("script_location", str(
                resources.files("integrity.store.central.migrations")))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            conn.commit()
        return InitReport(before, schema.HEAD, tuple(created))

    def enroll(self, host: str, group: str | None, password: str, *,
               rotate: bool = False) -> None:
        """Create HOST's login role (member of integrity_host) with `password`, or give
        an enrolled host that new password (`rotate`). The server only ever sees the
        SCRAM verifier, never the password (it would otherwise sit in its statement
        log)."""
        where = self.central.name()
        with self.central.errors(), self.central.engine.connect() as conn:
            check_schema(conn, where)
            exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                  {"r": host}).first() is not None
            enrolled = conn.execute(sa.select(schema.host.c.id).where(
                schema.host.c.name == host)).scalar()
            if enrolled is not None and not rotate:
                raise UsageError(f"{host}: enrolled already (--rotate gives it a new "
                                 "password)")
            if exists and enrolled is None:
                raise UsageError(f"{host}: a database role of that name exists and is not "
                                 "an enrolled host; refusing to take it over")
            if rotate and enrolled is None:
                raise UsageError(f"{host}: not enrolled; nothing to rotate")
            driver = conn.connection.driver_connection
            verifier = driver.pgconn.encrypt_password(  # type: ignore[union-attr]
                password.encode(), host.encode(), b"scram-sha-256").decode()
            role = _quote(conn, host)
            literal = "'" + verifier.replace("'", "''") + "'"
            if rotate:
                conn.exec_driver_sql(f"ALTER ROLE {role} PASSWORD {literal}")
            else:
                conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD {literal} "
                                     f"IN ROLE {HOST_ROLE}")
                new_id = conn.execute(schema.host.insert().values(
                    name=host, grp=group).returning(schema.host.c.id)).scalar_one()
                conn.execute(schema.host_state.insert().values(host_id=new_id))
            conn.commit()

    def request_approval(self, host: str, paths: list[str], approve_all: bool,
                         reason: str | None, expires: dt.timedelta) -> int:
        """Queue an approval for HOST, applied at its next push; returns the request id."""
        r = schema.request
        with self.central.errors(), self.central.engine.begin() as conn:
            check_schema(conn, self.central.name())
            target = host_id(conn, host)
            return int(conn.execute(r.insert().values(
                host_id=target, kind="approve", paths=paths, all=approve_all,
                reason=reason, expires=sa.func.now() + expires).returning(r.c.id)
            ).scalar_one())

    def resolve(self, host: str, reason: str | None, resync_expires: dt.timedelta
                ) -> Resolution:
        """Close a host's open flags after investigation. A forked chain starts a new
        epoch: the host's next record sets the base again, and it is asked to push its
        whole baseline."""
        f, st, r = schema.flag, schema.host_state, schema.request
        with self.central.errors(), self.central.engine.begin() as conn:
            check_schema(conn, self.central.name())
            target = host_id(conn, host)
            flags = [(k, d) for k, d in conn.execute(
                sa.select(f.c.kind, f.c.detail).where(
                    f.c.host_id == target, f.c.resolved.is_(None)).order_by(f.c.id))]
            conn.execute(f.update().where(f.c.host_id == target, f.c.resolved.is_(None))
                         .values(resolved=sa.func.now(), resolved_by=sa.func.session_user(),
                                 resolution=reason))
            forked = conn.execute(sa.select(st.c.forked).where(st.c.host_id == target)
                                  ).scalar() is not None
            request = None
            if forked:
                conn.execute(st.update().where(st.c.host_id == target).values(
                    forked=None, epoch=st.c.epoch + 1, head_seq=None, head_digest=None,
                    base_digest=None, chain_rows=0, push=None, generation=None,
                    ledger_seq=None))
                request = int(conn.execute(r.insert().values(
                    host_id=target, kind="resync", reason=reason or "fork resolved",
                    expires=sa.func.now() + resync_expires).returning(r.c.id)
                ).scalar_one())
        return Resolution(flags, forked, request)


def _grant_database(conn: sa.Connection, where: str) -> None:
    """Hosts and admins must connect and make the temporary tables COPY goes through."""
    database = _quote(conn, conn.execute(sa.text("SELECT current_database()")).scalar_one())
    try:
        with conn.begin_nested():
            conn.execute(sa.text(f"GRANT CONNECT, TEMPORARY ON DATABASE {database} "
                                 f"TO {HOST_ROLE}, {ADMIN_ROLE}"))
    except sa_exc.ProgrammingError:
        allowed = conn.execute(sa.text(
            f"SELECT has_database_privilege('{HOST_ROLE}', current_database(), "
            "'CONNECT, TEMPORARY')")).scalar()
        if not allowed:
            raise DatabaseError(f"{where}: {HOST_ROLE} may not connect or create temporary "
                                f"tables; as the database owner run: GRANT CONNECT, "
                                f"TEMPORARY ON DATABASE {database} TO {HOST_ROLE}, "
                                f"{ADMIN_ROLE}") from None
