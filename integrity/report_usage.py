"""Render usage for people and programs: `events --stats` tables with bars, access
records, maintenance windows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from integrity.alerts.text import actor_text
from integrity.paths import escape as clean
from integrity.times import iso

if TYPE_CHECKING:
    from integrity.ops.stats import Stats
    from integrity.store.access import AccessDoc

BAR_WIDTH = 40
#: Text rows shown for actors, rules and directories (JSON has them all).
MAX_ROWS = 40
_EIGHTHS = " ▏▎▍▌▋▊▉"
_TITLES = {"hour": "hour of day (local time)", "weekday": "weekday (local time)",
           "actor": "actor", "rule": "rule", "dir": "directory"}


def bar(count: int, top: int, width: int = BAR_WIDTH, unicode: bool = True) -> str:
    """A horizontal bar for count out of top, in eighths of a character."""
    if top <= 0 or count <= 0:
        return ""
    if not unicode:
        return "#" * max(1, round(count * width / top))
    eighths = max(1, round(count * width * 8 / top))
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "")


def _can_draw(out: TextIO) -> bool:
    try:
        "█▏".encode(getattr(out, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def stats_json(stats: Stats) -> dict[str, Any]:
    """`events --stats --json`: every bucket, in order."""
    return {"counted": "opens" if stats.counted == "access" else "changes",
            "by": stats.by, "since": iso(stats.since), "total": stats.total,
            "buckets": [{"key": b.key, "count": b.count, **b.detail}
                        for b in stats.buckets]}


def stats_text(stats: Stats, out: TextIO) -> None:
    """A table with bars: label, bar, count."""
    what = "opens of access-recorded files" if stats.counted == "access" else "changes"
    since = f" since {iso(stats.since)}" if stats.since else ""
    out.write(f"{what} by {_TITLES.get(stats.by, stats.by)}{since}: {stats.total}\n")
    rows = stats.buckets[:MAX_ROWS] if stats.by not in ("hour", "weekday") else stats.buckets
    if not rows:
        out.write("  (none)\n")
        return
    top = max(b.count for b in rows)
    labels = [clean(b.key) for b in rows]
    width = min(max(len(label) for label in labels), 60)
    number = len(str(top))
    unicode = _can_draw(out)
    for label, bucket in zip(labels, rows):
        shown = label if len(label) <= width else label[:width - 1] + "…"
        out.write(f"  {shown:<{width}}  {bucket.count:>{number}}  "
                  f"{bar(bucket.count, top, unicode=unicode)}".rstrip() + "\n")
    hidden = len(stats.buckets) - len(rows)
    if hidden > 0:
        rest = sum(b.count for b in stats.buckets[len(rows):])
        out.write(f"  ... and {hidden} more ({rest}); --json lists them all\n")


def access_text(rows: Sequence[AccessDoc], out: TextIO) -> None:
    """One line per (file, hour, reader)."""
    if not rows:
        out.write("no access records\n")
        return
    for row in rows:
        who = actor_text(row["actor"]) or "by an unknown process"
        out.write(clean(f"{row['id']:>6} {row['hour']} {row['path']}  opened "
                        f"x{row['count']} {who} (first {row['time']}, last "
                        f"{row['last_seen']})") + "\n")


def windows_text(windows: Sequence[dict[str, Any]], out: TextIO) -> None:
    """Open windows, as status prints them (from window_json objects)."""
    for w in windows:
        where = ", ".join(w["paths"]) or "every protected path"
        out.write(clean(f"maintenance window {w['id']}: {where} until {w['end']} "
                        f"({w['reason']}, by {w['user']})") + "\n")
