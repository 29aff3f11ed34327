"""Severity that means something: raise it off hours, lower it for package managers.

A rule's severity is what a change there means on an ordinary working day by an
unknown hand. Two facts move it: *when* the change was made (an `off_hours` window,
in local time, such as "mon-fri 19:00-07:00" or "sat,sun") and *who* made it (an
actor whose process, or one of its parents, is a trusted package manager such as
dpkg or unattended-upgrades). A package manager wins over the clock: the nightly
unattended upgrade at 03:00 is marked `package-manager`, not shouted.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SEVERITIES = ("low", "medium", "high", "critical")
#: How the actor reader marks an argument it cut (realtime/actor.py's CUT, the same).
CUT = "[...]"
UNEXPLAINED, PACKAGE_MANAGER = "unexplained", "package-manager"

#: Executables that change files on a package manager's behalf (by exe path).
DEFAULT_TRUSTED_PROCESSES = (
    "/usr/bin/dpkg", "/usr/bin/apt", "/usr/bin/apt-get", "/usr/bin/aptitude",
    "/usr/lib/apt/methods/*", "/usr/bin/unattended-upgrade",
    "/usr/bin/rpm", "/usr/bin/dnf", "/usr/bin/dnf-3", "/usr/bin/yum",
    "/usr/libexec/packagekitd", "/usr/bin/zypper",
)

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^(?:(?P<days>[a-z,\-]+))?\s*(?:(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2}))?$")


class WindowError(ValueError):
    """A window that cannot be parsed; the message says what is wrong."""


@dataclass(frozen=True)
class Window:
    """Days of the week (0 = Monday) and a time span that may cross midnight.

    A span that crosses midnight belongs to the day it starts on: "fri 19:00-07:00"
    covers Saturday 02:00.
    """

    days: frozenset[int]
    start: int  # minutes after midnight
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW.match(text.strip().lower())
        if not text.strip() or match is None:
            raise WindowError(f"{text!r}: expected '[DAYS] [HH:MM-HH:MM]', e.g. "
                              "'mon-fri 19:00-07:00' or 'sat,sun'")
        days = _parse_days(match["days"]) if match["days"] else frozenset(range(7))
        if match["start"] is None:
            return cls(days, 0, 24 * 60)
        start, end = _minutes(match["start"]), _minutes(match["end"])
        if start == end:
            raise WindowError(f"{text!r}: the window is empty")
        return cls(days, start, end)

    def contains(self, when: dt.datetime) -> bool:
        """True when a local time falls in the window."""
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


def _parse_days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise WindowError(f"{part!r}: days are mon, tue, wed, thu, fri, sat, sun "
                              "(ranges like mon-fri, lists like sat,sun)")
        low = _DAYS.index(first)
        high = _DAYS.index(last) if last else low
        span = range(low, high + 1) if low <= high else [*range(low, 7), *range(0, high + 1)]
        days.update(span)
    return frozenset(days)


def _minutes(text: str) -> int:
    hours, minutes = map(int, text.split(":"))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise WindowError(f"{text!r}: not a time of day")
    return hours * 60 + minutes


def at_least(severity: str, minimum: str) -> bool:
    """Whether `severity` reaches `minimum` (a sink's min_severity)."""
    return SEVERITIES.index(severity) >= SEVERITIES.index(minimum)


def raised(severity: str) -> str:
    """One step up, capped at critical: the default off-hours severity."""
    return SEVERITIES[min(SEVERITIES.index(severity) + 1, len(SEVERITIES) - 1)]


@dataclass(frozen=True)
class Judgement:
    """How a rule judges when and by whom: resolved at policy load, applied per event."""

    off_hours: tuple[Window, ...] = ()
    off_hours_severity: str | None = None   # None: one step above the rule's severity
    trusted_processes: tuple[str, ...] = DEFAULT_TRUSTED_PROCESSES
    trusted_severity: str = "low"

    def trusted(self, actor: Mapping[str, Any] | None, *, as_root: bool = False) -> bool:
        """True when the actor, or a process it descends from, is a trusted one (with
        `as_root`, one running as root)."""
        if not actor:
            return False
        return any(_exe_matches(program, pattern)
                   for process in [actor, *(actor.get("ancestors") or ())]
                   if not as_root or process.get("uid") == 0
                   for program in _programs(process)
                   for pattern in self.trusted_processes)

    def judge(self, severity: str, actor: Mapping[str, Any] | None,
              when: dt.datetime) -> tuple[str, str]:
        """(severity, classification) of a change under a rule of `severity`.

        A package manager changes protected files as root. Any user can run the real
        /usr/bin/dpkg (`dpkg -x x.deb DIR`) or an apt method (`/usr/lib/apt/methods/
        copy` copies where it is told), and have an interpreter run a trusted script
        after code of their own (BASH_ENV, a usercustomize.py): as another user they
        change only what that user may, and that is no package update.
        """
        if self.trusted(actor, as_root=True):
            return self.trusted_severity, PACKAGE_MANAGER
        if any(window.contains(when) for window in self.off_hours):
            return self.off_hours_severity or raised(severity), UNEXPLAINED
        return severity, UNEXPLAINED


#: Executables that run a script named on their command line: only for them does a
#: command-line word name the program (the kernel vouches for `exe`, not for argv).
_INTERPRETER = re.compile(r"(python|perl|ruby|bash|dash|sh)[0-9.]*")
#: Interpreter options after which the code does not come from a script file.
_INLINE_CODE = {"-c", "-e", "-E", "-m", "-"}


def _programs(process: Mapping[str, Any]) -> list[str]:
    """The executable, and for an interpreter the script it runs
    (unattended-upgrade is "/usr/bin/python3 /usr/bin/unattended-upgrade").

    Any process can put "/usr/bin/dpkg" in its own argv: a word counts only for an
    interpreter's `exe`, and only in the script's place (the first argument that is
    not an option; none when the code is inline, as with `python3 -c`).
    """
    exe = process.get("exe")
    if not isinstance(exe, str):
        return []
    programs = [exe]
    cmdline = process.get("cmdline")
    name = exe.removesuffix(" (deleted)").rsplit("/", 1)[-1]
    if isinstance(cmdline, str) and _INTERPRETER.fullmatch(name):
        for word in cmdline.split()[1:4]:
            if word in _INLINE_CODE and not (name.startswith("python") and word == "-E"):
                break
            if word.startswith("-"):
                continue
            # A word the actor reader cut ("/usr/lib/apt/xxx[...]") is not the path it
            # began: "/usr/lib/apt/" + 300 bytes + "/../../tmp/x" is not /usr/lib/apt/*.
            if word.startswith("/") and not word.endswith(CUT):
                programs.append(word)
            break
    return programs


def _exe_matches(exe: str, pattern: str) -> bool:
    # Package managers replace their own binaries: "/usr/bin/dpkg (deleted)".
    exe = exe.removesuffix(" (deleted)")
    if pattern.endswith("/*"):
        return exe.startswith(pattern[:-1]) and "/" not in exe[len(pattern) - 1:]
    return exe == pattern


def parse_windows(value: Any) -> tuple[Window, ...]:
    """A list of window strings; WindowError names the bad one."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WindowError("must be a list of windows such as \"mon-fri 19:00-07:00\"")
    return tuple(Window.parse(v) for v in value)


def parse_processes(value: Any) -> tuple[str, ...]:
    """A list of absolute executable paths (a trailing /* matches a directory)."""
    if not isinstance(value, list) or not all(
            isinstance(v, str) and v.startswith("/") and "\x00" not in v for v in value):
        raise WindowError("must be a list of absolute executable paths")
    return tuple(value)
