"""The fleet admin's changes: enrol hosts, ask them to approve, close their flags.

Arguments are checked here, before anything reaches the central database (the store
in integrity/store/central/ does the SQL): a host name is also a PostgreSQL role
name, and must never take over a role that is not a host's.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets

from integrity.errors import UsageError
from integrity.policy.fleet import NAME
from integrity.store.central import Central, Resolution

#: Role names that are never a host's: PostgreSQL's own, ours, the usual superuser.
RESERVED = {"integrity_admin", "integrity_host", "postgres", "public"}
#: How long an approval request waits for its host before it no longer applies (a
#: host that was away should not approve what its paths hold days later).
DEFAULT_EXPIRY = dt.timedelta(hours=24)
#: How long the request to send a whole baseline again waits after a resolved fork.
RESYNC_EXPIRY = dt.timedelta(days=30)


def enroll(central: Central, host: str, *, group: str | None = None,
           password_file: str | None = None, rotate: bool = False) -> str:
    """A login role for HOST (member of integrity_host) with a new random password,
    which is returned (and written to `password_file`, created 0600, when given).
    `rotate` gives an enrolled host a new password."""
    if not NAME.match(host) or host.lower() in RESERVED or host.startswith("pg_"):
        raise UsageError(f"{host!r}: a host name is letters, digits, '.', '_', '-' (at most "
                         "63), and not a reserved role name")
    if group is not None and not NAME.match(group):
        raise UsageError(f"--group: {group!r} is not a valid group name")
    password = secrets.token_urlsafe(24)
    written = _write_password(password_file, password) if password_file else None
    try:
        central.admin.enroll(host, group, password, rotate=rotate)
    except BaseException:
        if written:
            os.unlink(written)
        raise
    return password


def _write_password(path: str, password: str) -> str:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise UsageError(f"{path}: cannot create the password file: {exc.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return path


def request_approval(central: Central, host: str, paths: list[str], approve_all: bool,
                     reason: str | None, expires: dt.timedelta = DEFAULT_EXPIRY) -> int:
    """Queue an approval for HOST, applied at its next push; returns the request id."""
    if bool(paths) == approve_all:
        raise UsageError("fleet approve: name PATHs or use --all (exactly one of them)")
    for path in paths:
        if not path.startswith("/") or "\x00" in path:
            raise UsageError(f"{path!r}: a path to approve must be absolute")
    return central.admin.request_approval(host, paths, approve_all, reason, expires)


def resolve(central: Central, host: str, reason: str | None) -> Resolution:
    """Close HOST's open flags after investigation; a forked chain restarts (the host's
    next record is the new base) and the host is asked to send its whole baseline."""
    return central.admin.resolve(host, reason, RESYNC_EXPIRY)
