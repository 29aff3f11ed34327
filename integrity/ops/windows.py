"""Maintenance windows: `integrity expect`, and how recording honours them.

A planned change should neither page anyone nor slip into the baseline unseen. Inside
a window, a change under its paths is recorded as `expected`: low severity, the
ticket attached, the actor kept, and open until someone approves it. What decides
"inside" is the change's ctime (which a writer cannot set; a removal has none, so the
time it was seen): a change made before the window opened, and found by a scan during
it, stays unexplained, and so does one made after it closed. Windows are chained in
the ledger; one inserted or edited behind integrity's back is never honoured.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from integrity.errors import UsageError
from integrity.paths import display
from integrity.policy import Policy
from integrity.times import utcnow

if TYPE_CHECKING:
    from integrity.store import Store
    from integrity.store.windows import Window

#: The longest window: a forgotten one must not stay a blind spot for long. A week
#: covers a migration weekend; longer work opens a new window, with a new ticket.
MAX_WINDOW = dt.timedelta(days=7)
MAX_REASON = 500
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: A change whose ctime lies this far in the future of our clock is not believed to
#: fall in a window (clocks of a host and its NFS server drift a little).
CLOCK_SLACK = dt.timedelta(seconds=60)


def parse_duration(text: str) -> dt.timedelta:
    """'30m', '2h', '1d' to a timedelta (UsageError naming --for otherwise)."""
    match = _DURATION.match(text)
    if not match or int(match[1]) == 0:
        raise UsageError(f"--for: {text!r} is not a duration like 30m, 2h or 1d")
    duration = dt.timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    if duration > MAX_WINDOW:
        raise UsageError(f"--for: {text} is longer than the longest window (7d): "
                         "open a new window when this one ends")
    return duration


def check_reason(reason: str) -> str:
    """The ticket or reason, refused when empty, too long or holding control
    characters (it is shown in every text about the events it covers)."""
    text = reason.strip()
    if not text:
        raise UsageError("--reason: say why (a ticket), it is attached to every change "
                         "the window covers")
    if len(text) > MAX_REASON:
        raise UsageError(f"--reason: longer than {MAX_REASON} characters")
    if any(ord(ch) < 0x20 or 0x7f <= ord(ch) < 0xa0 for ch in text):
        raise UsageError("--reason: control characters are not allowed")
    return text


def open_window(store: Store, policy: Policy, paths: Sequence[str | bytes],
                duration: str, reason: str, *, user: str, sudo_user: str | None,
                now: dt.datetime | None = None) -> Window:
    """Open a window from now for `duration` over `paths` (each under a rule of the
    policy; none: every protected path)."""
    from integrity.scan import normalize_paths

    from integrity.alerts import build_sinks, routes_of
    from integrity.alerts.dispatch import deliver_after_scan
    from integrity.ops.who import own_actor

    span = parse_duration(duration)
    text = check_reason(reason)
    wanted = tuple(normalize_paths(policy, paths))
    start = now or utcnow()
    sinks = build_sinks(policy)
    window = store.windows.open(start=start, end=start + span, reason=text, paths=wanted,
                                user=user, sudo_user=sudo_user)
    # Changes under it are recorded low: a sink that takes only more would never hear
    # of them, nor of the window, which whoever may run `expect` (root) could open to
    # make what it changes next pass unalerted. The opening is alerted at the highest
    # severity it lowers.
    actor = own_actor("integrity expect", user, sudo_user)
    try:
        # Named by the policy file, as a policy change is: not an entry's event.
        store.events.window_opened(os.fsencode(policy.source), window.id,
                                   describe(window), silenced(policy, wanted), actor,
                                   routes=routes_of(sinks))
    finally:
        deliver_after_scan(store, sinks)
    return window


def silenced(policy: Policy, paths: Sequence[bytes]) -> str:
    """The highest severity a change under `paths` (none: everywhere) could get, which
    a window over them lowers to low: the rules' own, their overrides', off hours'."""
    from integrity.paths import is_within
    from integrity.policy.severity import SEVERITIES, raised

    found = ["low"]
    for rule in policy.rules:
        if paths and not any(is_within(rule.path, p) or is_within(p, rule.path)
                             for p in paths):
            continue
        found += [rule.severity, *(o.severity for o in rule.overrides)]
        if rule.judgement.off_hours:
            found.append(rule.judgement.off_hours_severity or raised(rule.severity))
    return max(found, key=SEVERITIES.index)


def cancel_window(store: Store, window_id: int, by: str) -> tuple[Window, bool]:
    """End a window now: (the window, False if it was over already); UsageError for
    an unknown id."""
    found = store.windows.cancel(window_id, by)
    if found is None:
        raise UsageError(f"expect --cancel: there is no maintenance window {window_id}")
    return found


def current(store: Store, now: dt.datetime | None = None) -> list[Window]:
    """Windows open now (journaled or not: status shows what is recorded; the chain
    check says which were forged)."""
    now = now or utcnow()
    return [w for w in store.windows.all() if w.is_open(now)]


class Expectations:
    """The honoured windows, asked once per recording: which one expected a change."""

    def __init__(self, windows: Sequence[Window], now: dt.datetime) -> None:
        self.windows = list(windows)
        self.now = now

    @classmethod
    def load(cls, store: Store, now: dt.datetime) -> Expectations:
        return cls(store.windows.honoured(), now)

    def window_for(self, path: bytes, ctime_ns: int | None) -> Window | None:
        """The newest window that covers a change to path with this ctime (None for
        a removal: judged at the time it is seen)."""
        if not self.windows:
            return None
        when = self.now if ctime_ns is None else dt.datetime.fromtimestamp(
            ctime_ns / 1e9, dt.timezone.utc).replace(tzinfo=None)
        if when > self.now + CLOCK_SLACK:
            return None
        for window in reversed(self.windows):
            if window.covers(path, when):
                return window
        return None


def describe(window: Window) -> str:
    """'window 3: /etc/nginx until 2026-12-01T10:30:00Z (CHG-1234, by alice)'."""
    from integrity.times import iso

    where = ", ".join(display(p) for p in window.paths) or "every protected path"
    by = window.user + (f" (sudo by {window.sudo_user})" if window.sudo_user
                        and window.sudo_user != window.user else "")
    state = ""
    if window.cancelled is not None and window.cancelled < window.end:
        state = f", cancelled at {iso(window.cancelled)}"
    return (f"window {window.id}: {where} from {iso(window.start)} until "
            f"{iso(window.until)} ({window.reason}, by {by}{state})")


def window_doc(window: Window) -> dict[str, Any]:
    """A maintenance window as JSON (status, expect --json)."""
    from integrity.times import iso

    return {"id": window.id, "start": iso(window.start), "end": iso(window.until),
            "reason": window.reason, "paths": [display(p) for p in window.paths],
            "user": window.user, "sudo_user": window.sudo_user,
            "cancelled": iso(window.cancelled)}
