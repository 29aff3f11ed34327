"""Human text for alerts: one line per event, a detailed single event, a digest.

Paths are attacker-chosen (anyone who can create a file names it), so every piece of
an event that reaches text is passed through `paths.escape`: a newline or a bidi
override in a file name must not be able to forge an extra line in a digest or reorder
what a reader sees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, TYPE_CHECKING

from integrity.content.diff import shorten
from integrity.paths import escape
from integrity.policy.severity import SEVERITIES

if TYPE_CHECKING:
    from integrity.store.events import EventDoc

#: A digest lists at most this many events, most severe first, then "and N more".
MAX_LINES = 200
#: What of a diff one event's text carries; in a digest, each event's share.
DIFF_BYTES, DIGEST_DIFF_BYTES = 8192, 2048
_LONG = 100  # attribute values longer than this (digests) are shortened


def actor_text(actor: dict[str, Any] | None) -> str | None:
    """'by /usr/bin/vim (pid 123, user alice, login alice)', the reason the process is
    unknown, or None when nobody tried to find out (scans, inotify without fanotify)."""
    if not actor:
        return None
    exe = actor.get("exe")
    cmdline = actor.get("cmdline")
    if not exe and cmdline:  # exe unreadable (process gone): the command line is a hint
        exe = cmdline[0] if isinstance(cmdline, list) else str(cmdline).split()[0]
    details = []
    if actor.get("pid") is not None:
        details.append(f"pid {actor['pid']}")
    user = actor.get("user") or actor.get("uid")
    if user is not None:
        details.append(f"user {user}")
    login = actor.get("login_user") or actor.get("loginuid")
    if login is not None and login not in (-1, 4294967295):
        details.append(f"login {login}")
    if actor.get("unknown") and not exe:
        details.append(str(actor["unknown"]))
        return escape("by an unidentified process (" + ", ".join(details) + ")")
    return escape(f"by {exe or 'an unknown executable'}"
                  + (" (" + ", ".join(details) + ")" if details else ""))


def headline(event: EventDoc) -> str:
    """'modified /etc/passwd (content, mode) by ...', or a warning and its message."""
    if event.get("kind") in ("warning", "window"):
        message = (event.get("new") or {}).get(event["kind"], "")
        return escape(f"{event['kind']} {event.get('path')}: {message}")
    text = f"{event.get('kind')} {event.get('path')}"
    if event.get("changed"):
        text += f" ({', '.join(event['changed'])})"
    actor = actor_text(event.get("actor"))
    return escape(text + (f" {actor}" if actor else ""))


def line(event: EventDoc) -> str:
    """One digest line: '[high] modified /etc/passwd (content) by ... [package-update]'."""
    text = f"[{event.get('severity')}] {headline(event)}"
    if (event.get("count") or 1) > 1:
        text += f" ({event['count']} times)"
    if event.get("classification") not in (None, "unexplained"):
        text += f" [{event['classification']}]"
    if event.get("ticket"):
        text += f" [ticket {event['ticket']}]"
    return escape(text)  # severity and classification come from rows an intruder edits


def _state(value: Any) -> str:
    text = escape(value)
    return text if len(text) <= _LONG else text[:_LONG] + "..."


def details(event: EventDoc) -> str:
    """Several lines about one event: what, who, which rule, and old -> new values."""
    lines = [f"{event.get('severity')}: {headline(event)}"]
    lines.append(f"rule {event.get('rule') or '-'}, source {event.get('source')}, "
                 f"{event.get('classification')}, event {event.get('id')}, "
                 f"status {event.get('status')}")
    seen = f"first seen {event.get('time')}"
    if (event.get("count") or 1) > 1:
        seen += f", last seen {event.get('last_seen')} ({event['count']} times)"
    lines.append(seen)
    old, new = event.get("old") or {}, event.get("new") or {}
    if event.get("kind") not in ("warning", "window"):  # their headline says it all
        for name in event.get("changed") or sorted(set(old) | set(new)):
            lines.append(f"  {escape(name)}: {_state(old.get(name, '-'))} -> "
                         f"{_state(new.get(name, '-'))}")
    if event.get("evidence"):
        lines.append(f"evidence: {event['evidence']}")
    if event.get("ticket") and event.get("kind") != "window":
        lines.append(f"expected: maintenance window {event.get('window')}, "
                     f"ticket {event['ticket']}")
    lines += diff_lines(event, DIFF_BYTES)
    # Every line escaped whole: any field of a stored event may have been edited.
    return "\n".join(escape(text) for text in lines)


def diff_lines(event: EventDoc, limit: int) -> list[str]:
    """The event's diff (kept texts) as lines (the caller escapes them), cut at `limit`
    bytes with a note: what changed inside the file, at a glance."""
    diff = event.get("diff")
    if not diff:
        return []
    return ["diff:", *(f"  {line}" for line in shorten(diff, limit).splitlines())]


def highest(events: Sequence[EventDoc]) -> str:
    """The most severe severity among events."""
    return max((e.get("severity", "low") for e in events), key=_rank)


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


def counts(events: Sequence[EventDoc]) -> str:
    """'2 critical, 5 high, 30 low': most severe first."""
    tally = Counter(e.get("severity") for e in events)
    return ", ".join(f"{tally[s]} {s}" for s in reversed(SEVERITIES) if tally[s])


def digest(events: Sequence[EventDoc], limit: int = MAX_LINES) -> str:
    """Counts by severity, then one line per event (most severe first), capped."""
    ordered = sorted(events, key=lambda e: (-_rank(e.get("severity", "low")),
                                            str(e.get("time")), e.get("id") or 0))
    noun = "change" if len(events) == 1 else "changes"
    lines = [f"{len(events)} {noun}: {counts(events)}", ""]
    lines += [line(event) for event in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"and {len(ordered) - limit} more")
    for event in ordered[:limit]:
        if event.get("diff"):
            lines += ["", f"{event.get('path')}:", *diff_lines(event, DIGEST_DIFF_BYTES)]
    return "\n".join(escape(text) for text in lines)


def body(events: Sequence[EventDoc], limit: int = MAX_LINES) -> str:
    """A single event in detail, several as a digest."""
    return details(events[0]) if len(events) == 1 else digest(events, limit)


def subject(events: Sequence[EventDoc], host: str) -> str:
    """'web1: 37 changes (2 critical)' or 'web1: high: modified /etc/passwd'."""
    if len(events) == 1:
        text = escape(f"{host}: {events[0].get('severity')}: {headline(events[0])}")
        return text if len(text) <= 150 else text[:147] + "..."
    top = highest(events)
    number = sum(1 for e in events if e.get("severity") == top)
    return escape(f"{host}: {len(events)} changes ({number} {top})")
