"""Times as the product keeps them: naive UTC in the database, ISO 8601 with a Z outside.

A leaf module: the store, the use cases and the renderers all need the same
conversions, and none of them should import another for it.
"""

from __future__ import annotations

import datetime as dt
import re

from integrity.errors import UsageError

#: The form `iso` writes and `from_iso` reads.
ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utcnow() -> dt.datetime:
    """Naive UTC now, the form every time column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, from a naive UTC datetime."""
    return value.strftime(ISO_FORMAT) if value is not None else None


def from_iso(text: str) -> dt.datetime:
    """The naive UTC datetime `iso` wrote as `text`; ValueError for any other form."""
    return dt.datetime.strptime(text, ISO_FORMAT)


def iso_epoch(seconds: float) -> str:
    """ISO 8601 UTC with a Z, from seconds since the epoch (dpkg's log, file times)."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime(ISO_FORMAT)


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A naive UTC time from an ISO 8601 time or a relative form like 2h, 7d, 30m."""
    now = now or utcnow()
    match = _RELATIVE.match(text)
    if match:
        return now - dt.timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since: {text!r} is neither an ISO 8601 time nor a "
                         "relative time like 2h or 7d") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return when
