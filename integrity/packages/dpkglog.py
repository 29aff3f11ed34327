"""dpkg's log: which packages were installed, removed, purged or upgraded, and when.

A removed file is explained by its package's removal or upgrade only if dpkg logged
one after the baseline was taken; a link a maintainer script made (see `derived`) only
if its package's install or upgrade was; rotated logs (log.1, log.N.gz) are read too.
"""

from __future__ import annotations

import glob
import gzip
import re
import time
from typing import NamedTuple

_LOG_LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (install|remove|purge|upgrade) (\S+) (\S+) (\S+)", re.M)
_LOG_VERB = {b"install": "installed", b"remove": "removed", b"purge": "purged",
             b"upgrade": "upgraded"}


class LogEvent(NamedTuple):
    """One install/remove/purge/upgrade line of dpkg's log."""

    when: float        # unix time (the log counts whole seconds, in local time)
    action: str        # dpkg's word for it
    name: str          # the package's name, without its architecture
    text: str          # the description a reason shows
    arch: str          # the architecture the log names ("" when it names none)
    version: str       # the version the action left installed ("<none>" for a removal)


def read_dpkg_log(log: str) -> list[LogEvent]:
    """Every install/remove/purge/upgrade in dpkg's log and its rotations, oldest first."""
    rotated = sorted(glob.glob(glob.escape(log) + ".*.gz"),
                     key=lambda p: int(p.rsplit(".", 2)[-2])
                     if p.rsplit(".", 2)[-2].isdigit() else 0)
    events: list[LogEvent] = []
    for path in reversed([log, log + ".1", *rotated]):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as handle:
                data = handle.read()
        except (OSError, EOFError):
            continue
        for match in _LOG_LINE.finditer(data):
            stamp, action, pkg, old, new = (g.decode(errors="replace")
                                            for g in match.groups())
            try:
                when = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
            except ValueError:
                continue
            verb = _LOG_VERB[match.group(2)]
            change = (f"{old} -> {new}" if action == "upgrade" else
                      new if action == "install" else old)
            name, _, arch = pkg.partition(":")
            events.append(LogEvent(when, action, name,
                                   f"dpkg {verb} {pkg} {change} at {stamp}", arch, new))
    events.sort(key=lambda event: event[0])
    return events
