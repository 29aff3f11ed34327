"""The policy's `[metrics]` table: a node_exporter textfile and a /metrics listener.

    [metrics]
    textfile = "/var/lib/node_exporter/textfile_collector/integrity.prom"
    listen = "127.0.0.1:9419"

Both are optional. Validated at load like every other key, so a typo in the address
refuses the policy instead of leaving the dashboards blank at night.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

_KEYS = {"textfile", "listen"}
_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class MetricsSettings:
    """Where metrics go: a textfile path and/or a (host, port) to serve /metrics on."""

    textfile: str | None = None
    listen: tuple[str, int] | None = None


def parse_listen(text: str) -> tuple[str, int]:
    """"127.0.0.1:9419" or "[::1]:9419" to (host, port); ValueError says what is wrong."""
    match = _LISTEN.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. \"127.0.0.1:9419\" "
                         "or \"[::1]:9419\"")
    host = match["v6"] or match["host"]
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port must be 1-65535")
    if match["v6"]:
        import ipaddress  # 3 ms at every policy load, for a [::1] listen address only

        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    return host, port


def parse_metrics(table: Any, fail: Any) -> MetricsSettings:
    """Validate `[metrics]`; `fail(key, message)` builds the PolicyError."""
    if not isinstance(table, dict):
        raise fail("metrics", "must be a table (textfile, listen)")
    for key in table:
        if key not in _KEYS:
            raise fail(f"metrics.{key}", "unknown key")
    textfile = table.get("textfile")
    if textfile is not None:
        if not isinstance(textfile, str) or not textfile.startswith("/") \
                or "\x00" in textfile or textfile.endswith("/"):
            raise fail("metrics.textfile", "must be the absolute path of a file")
        if not textfile.endswith(".prom"):
            # node_exporter's textfile collector reads *.prom only: anything else
            # would be written faithfully and never scraped.
            raise fail("metrics.textfile", f"{textfile!r}: node_exporter reads only "
                                           "files ending in .prom")
        textfile = os.path.normpath(textfile)
    listen = table.get("listen")
    address = None
    if listen is not None:
        if not isinstance(listen, str):
            raise fail("metrics.listen", "must be a string HOST:PORT")
        try:
            address = parse_listen(listen)
        except ValueError as exc:
            raise fail("metrics.listen", str(exc)) from None
    return MetricsSettings(textfile, address)
