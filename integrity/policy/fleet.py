"""The host side's `[fleet]` policy table: where the central database is and who we are.

No secret is ever written in the policy (policies are often world-readable and end up
in backups and tickets): a URL that carries a password is refused, naming `fleet.url`.
The password comes from `password_file` (read at each connection, so a rotated file
needs no restart), from libpq's own PGPASSFILE / ~/.pgpass, or is not needed at all
with client certificates (`sslcert`/`sslkey`, and `sslmode = "verify-full"` with
`sslrootcert` so the server is authenticated too). The table is operational, like the
alert sinks: it is not sealed with the baseline (a host that stops pushing shows
centrally as silent).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from integrity.errors import DatabaseError, PolicyError

KEYS = {"url", "password_file", "sslmode", "sslrootcert", "sslcert", "sslkey", "host",
        "group", "interval"}
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: Host and group names: also PostgreSQL role names (the host's login role is its name).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DEFAULT_INTERVAL = 60.0

Fail = Callable[[str, str], PolicyError]


@dataclass(frozen=True)
class FleetConfig:
    """A validated [fleet] table."""

    url: str
    host: str
    group: str = "default"
    interval: float = DEFAULT_INTERVAL
    password_file: str | None = None
    #: libpq TLS options (sslmode, sslrootcert, sslcert, sslkey) as given.
    tls: tuple[tuple[str, str], ...] = ()


def parse_duration(value: Any, key: str, fail: Fail) -> float:
    """Seconds from "60s", "5m", "1h" or a number of seconds."""
    if isinstance(value, bool):
        raise fail(key, f"must be a duration like \"60s\", not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match[1]) * _UNITS[match[2]]
    else:
        raise fail(key, f"must be a duration like \"60s\" or \"5m\", not {value!r}")
    if not 1.0 <= seconds <= 86400.0:
        raise fail(key, f"must be between 1s and 24h, not {value!r}")
    return seconds


def default_host() -> str:
    """This machine's short host name."""
    return socket.gethostname().split(".")[0] or "localhost"


def parse_fleet(table: Any, fail: Fail) -> FleetConfig:
    """Validate the [fleet] table of a policy (`fail(key, message)` names the file)."""
    from integrity.store.files import login_url, url_parts

    if not isinstance(table, dict):
        raise fail("fleet", "must be a table")
    for key in table:
        if key not in KEYS:
            raise fail(f"fleet.{key}", "unknown key")
    url = table.get("url")
    if not isinstance(url, str) or not url:
        raise fail("fleet.url", "required: the central PostgreSQL database, e.g. "
                                "\"postgresql://web1@central.example/integrity\"")
    try:
        parts = url_parts(url)
    except DatabaseError as exc:
        raise fail("fleet.url", str(exc)) from None
    if parts.backend != "postgresql":
        raise fail("fleet.url", "must be a postgresql:// URL")
    if parts.driver not in ("psycopg", "postgresql"):
        raise fail("fleet.url", f"driver {parts.driver!r}: only psycopg "
                                "(postgresql:// or postgresql+psycopg://) is supported")
    if parts.has_password:
        raise fail("fleet.url", "must not carry a password (the policy is not a secret): "
                                "use fleet.password_file, PGPASSFILE or client certificates")
    host = table.get("host", parts.username or default_host())
    if not isinstance(host, str) or not NAME.match(host):
        raise fail("fleet.host", f"must be a host name of letters, digits, '.', '_', '-' "
                                 f"(at most 63), not {host!r}")
    if parts.username is not None and parts.username != host:
        raise fail("fleet.url", f"connects as {parts.username!r} but fleet.host is "
                                f"{host!r}: a host logs in with the role of its own name")
    group = table.get("group", "default")
    if not isinstance(group, str) or not NAME.match(group):
        raise fail("fleet.group", f"must be a name of letters, digits, '.', '_', '-', "
                                  f"not {group!r}")
    interval = parse_duration(table.get("interval", DEFAULT_INTERVAL), "fleet.interval", fail)
    password_file = table.get("password_file")
    if password_file is not None and (not isinstance(password_file, str)
                                      or not password_file.startswith("/")):
        raise fail("fleet.password_file", "must be an absolute path")
    tls: list[tuple[str, str]] = []
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
        value = table.get(key)
        if value is None:
            continue
        if key == "sslmode":
            if value not in SSLMODES:
                raise fail("fleet.sslmode", f"must be one of {', '.join(SSLMODES)}")
        elif not isinstance(value, str) or not value.startswith("/"):
            raise fail(f"fleet.{key}", "must be an absolute path")
        tls.append((key, value))
    return FleetConfig(login_url(url, host), host, group, interval, password_file,
                       tuple(tls))
