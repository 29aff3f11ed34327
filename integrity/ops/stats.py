"""A host's rhythm: how many changes (or reads of secrets) per hour of day, weekday,
actor, rule or directory, so the 02:00 change by an unknown process stands out from
the 06:00 package updates and two admins' office hours.

The database does the counting (store/usage.py groups by 15-minute UTC buckets, rule,
path or actor); this module turns buckets into local hours and weekdays, paths into
their directories, and actors into labels.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from integrity.errors import UsageError
from integrity.paths import display

if TYPE_CHECKING:
    from integrity.store import Store

By = Literal["hour", "weekday", "actor", "rule", "dir"]
BY = ("hour", "weekday", "actor", "rule", "dir")
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
NO_ACTOR = {"changes": "(no actor: found by a scan, or fanotify could not tell)",
            "access": "(unknown process)"}


@dataclass
class Bucket:
    """One row of the table: its label, its count, and for actors who it is."""

    key: str
    count: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stats:
    """Counts per bucket, in display order."""

    by: str
    counted: str  # "changes" or "access"
    since: dt.datetime | None
    buckets: list[Bucket]

    @property
    def total(self) -> int:
        return sum(b.count for b in self.buckets)


def _local(utc: dt.datetime) -> dt.datetime:
    return utc.replace(tzinfo=dt.timezone.utc).astimezone()


def actor_label(exe: Any, user: Any, login: Any, source: str) -> str:
    """'/usr/bin/vim as alice (login bob)', or the no-actor label."""
    if exe is None and user is None:
        return NO_ACTOR[source]
    text = str(exe) if exe is not None else "(unknown executable)"
    if user is not None:
        text += f" as {user}"
    if login is not None and login != user:
        text += f" (login {login})"
    return text


def collect(store: Store, by: str, since: dt.datetime | None,
            source: Literal["changes", "access"] = "changes") -> Stats:
    """Counts of changes (or opens of `access = true` files) per `by` since `since`."""
    if by not in BY:
        raise UsageError(f"--by: {by!r} is not one of {', '.join(BY)}")
    buckets: list[Bucket]
    if by in ("hour", "weekday"):
        tally: Counter[int] = Counter()
        for start, count in store.usage.buckets(source, since):
            local = _local(start)
            tally[local.hour if by == "hour" else local.weekday()] += count
        if by == "hour":
            buckets = [Bucket(f"{h:02d}", tally[h]) for h in range(24)]
        else:
            buckets = [Bucket(name, tally[i]) for i, name in enumerate(WEEKDAYS)]
    elif by == "rule":
        buckets = [Bucket(str(rule) if rule is not None else "(no rule)", count)
                   for (rule,), count in store.usage.by(source, "rule", since)]
    elif by == "dir":
        dirs: Counter[bytes] = Counter()
        for (path,), count in store.usage.by(source, "path", since):
            dirs[os.path.dirname(path) or b"/"] += count
        buckets = [Bucket(display(d), n) for d, n in dirs.items()]
    else:
        buckets = [Bucket(actor_label(exe, user, login, source), count,
                          {"exe": exe, "user": user, "login_user": login})
                   for (exe, user, login), count in store.usage.by(source, "actor", since)]
    if by not in ("hour", "weekday"):
        buckets.sort(key=lambda b: (-b.count, b.key))
    return Stats(by, source, since, buckets)
