"""The policy's `[scan]` table: how gently scans run on a production host.

    [scan]
    nice = 10                  # 0-19 (default 10)
    io_class = "idle"          # or "best-effort"; default: idle for scheduled scans only
    max_read_rate = "50MiB/s"  # or "10MB/s", "unlimited" (the default)

Operational, like the schedule: not sealed with the baseline (policy/sealed.py), so a
policy sealed earlier is verified with the current file's [scan]. scan/priority.py
applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_KEYS = ("nice", "io_class", "max_read_rate")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*(?:/\s*s)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


@dataclass(frozen=True)
class ScanSettings:
    """`[scan]`: `nice` 0-19 (default 10); `io_class` "idle" or "best-effort" (None:
    idle for the watcher's scheduled scans, unchanged for init and verify);
    `max_read_rate` in bytes per second over all of a scan's readers (None: unlimited).
    """

    nice: int = 10
    io_class: str | None = None
    max_read_rate: int | None = None


def parse_rate(value: Any) -> int | None:
    """Bytes per second from "50MiB/s", "10 MB/s", "4096" or "unlimited" (None);
    ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or match[2] is None and not match[1].isdigit():
        raise ValueError(value)
    rate = int(float(match[1]) * _RATE_UNITS[(match[2] or "b").lower()])
    if rate <= 0:
        raise ValueError(value)
    return rate


def parse_scan(table: Any, fail: Any) -> ScanSettings:
    """Validate `[scan]`; `fail(key, message)` builds the PolicyError."""
    if not isinstance(table, dict):
        raise fail("scan", "must be a table (nice, io_class, max_read_rate)")
    for key in table:
        if key not in _KEYS:
            raise fail(f"scan.{key}", "unknown key")
    nice = table.get("nice", 10)
    if not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= 19:
        raise fail("scan.nice", f"must be an integer from 0 to 19, not {nice!r}")
    io_class = table.get("io_class")
    if io_class is not None and io_class not in ("idle", "best-effort"):
        raise fail("scan.io_class", f"must be \"idle\" or \"best-effort\", not {io_class!r}")
    try:
        rate = parse_rate(table.get("max_read_rate", "unlimited"))
    except ValueError:
        raise fail("scan.max_read_rate", "must be a rate like \"50MiB/s\" or \"10MB/s\", "
                   f"or \"unlimited\", not {table.get('max_read_rate')!r}") from None
    return ScanSettings(nice, io_class, rate)
