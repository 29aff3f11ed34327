"""The process behind a pid, read from /proc: exe, command line, users, and who ran it.

Read in the fanotify helper process (helper.py) at event time, because `chmod`, `cp` or
`sed -i` exit a moment after their change. One reading of /proc/PID stands for that
process for PROCESS_TTL seconds, so a process writing 10,000 files costs one reading
(and a stat of /proc/PID per event: the pid of a process reaped meanwhile may already
be another's, and a reading stands only for the process it read).

Only the standard library (and our stdlib-only modules) is imported: the helper runs
with `python -S`.
"""

from __future__ import annotations

import os
import pwd
from typing import NotRequired, TypedDict

from integrity.paths import display
from integrity.realtime.procfs import read_small, status_uid

#: How long one reading of /proc/PID stands for that process (while that process, not
#: another, has the pid: pids are reused, by a process cycling through them in well
#: under this time, or by root through ns_last_pid).
PROCESS_TTL = 2.0
#: Parents named in an actor's "ancestors", nearest first.
MAX_ANCESTORS = 8
#: Bytes of /proc/PID/cmdline read; of them, each argument keeps ARG_MAX_KEPT bytes and
#: the whole line CMDLINE_KEPT: an actor is stored with every event, and arguments can
#: carry secrets (a password on a command line) that need not outlive the process.
CMDLINE_MAX = 4096
ARG_MAX_KEPT = 256
CMDLINE_KEPT = 1024
#: What a parent keeps of its command line: the words the trusted-process check reads.
ANCESTOR_WORDS = 3
#: Marks an argument or command line that was cut: severity.CUT, which never trusts
#: such a word (the helper runs with the standard library only: no policy import).
CUT = "[...]"
UNSET_LOGINUID = 4294967295

_PF_KTHREAD = 0x00200000


class Ancestor(TypedDict):
    """A process that ran the actor (its parent, grandparent, ...)."""

    pid: int | None
    exe: str | None
    cmdline: str | None
    comm: str | None
    #: Its effective uid: only a root process counts as a package manager.
    uid: int | None


class Actor(TypedDict):
    """Who made a change, as events and alerts carry it (SPEC's `actor`).

    Every field is None when unknown; "unknown" says why (the actor is missing, or
    incomplete: an exited writer caught before its parent reaped it keeps uid, user,
    login uid, comm and ancestors). "ancestors" is there when the process was read.
    """

    pid: int | None
    exe: str | None
    cmdline: str | None
    uid: int | None
    user: str | None
    loginuid: int | None
    login_user: str | None
    comm: str | None
    ancestors: NotRequired[list[Ancestor]]
    unknown: NotRequired[str]


ACTOR_KEYS = ("pid", "exe", "cmdline", "uid", "user", "loginuid", "login_user", "comm")


def unknown(reason: str) -> Actor:
    """An actor whose every field is None, with the reason it is unknown."""
    return Actor(pid=None, exe=None, cmdline=None, uid=None, user=None, loginuid=None,
                 login_user=None, comm=None, unknown=reason)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


class Processes:
    """/proc readings per pid, kept PROCESS_TTL seconds, and uid -> user name."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[float, Actor | str]] = {}
        self._users: dict[int, str | None] = {}
        self._parents: dict[int, int] = {}
        #: The /proc/PID inode of each process read: a pid is free again once its
        #: process is reaped, and a reading stands only for the process read.
        self._identities: dict[int, int | None] = {}
        #: Readings of /proc so far (the listener's loop watches it for new writers).
        self.readings = 0

    def get(self, pid: int, now: float) -> Actor | str:
        """The actor for pid (read now unless read within PROCESS_TTL), or why not.

        The writer is read first, then its parents (most often already known): a
        package manager's maintainer script is a shell, its grandparent dpkg.
        """
        hit = self._seen.get(pid)
        if hit is not None and now - hit[0] < PROCESS_TTL \
                and _identity(pid) in (None, self._identities.get(pid)):
            return hit[1]
        info = self.read(pid)
        self.readings += 1
        if len(self._seen) >= 4096:
            self._seen = {p: v for p, v in self._seen.items() if now - v[0] < PROCESS_TTL}
            self._parents = {p: self._parents[p] for p in self._seen if p in self._parents}
            self._identities = {p: self._identities[p] for p in self._seen
                                if p in self._identities}
        self._seen[pid] = (now, info)
        if not isinstance(info, str):
            info["ancestors"] = self._lineage(self._parents.get(pid, 0), now)
        return info

    def _lineage(self, pid: int, now: float) -> list[Ancestor]:
        """pid and its ancestors, nearest first, below init: who ran the writer."""
        if pid <= 1:
            return []
        parent = self.get(pid, now)
        if isinstance(parent, str):
            return []
        words = (parent.get("cmdline") or "").split()
        if len(words) > ANCESTOR_WORDS:
            words = [*words[:ANCESTOR_WORDS], CUT]
        summary = Ancestor(pid=parent["pid"], exe=parent["exe"],
                           cmdline=" ".join(words) or None, comm=parent["comm"],
                           uid=parent["uid"])
        return [summary, *parent.get("ancestors", ())][:MAX_ANCESTORS]

    def user(self, uid: int | None) -> str | None:
        """The user name of uid, None when it has none."""
        if uid is None:
            return None
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]

    def read(self, pid: int) -> Actor | str:
        """What /proc says about pid now; a reason string when it is gone.

        exe and cmdline go first: they vanish as soon as the process exits, while its
        uid and login uid (status, loginuid) last until its parent reaps it. A process
        caught in between gives a partial actor: who, without what.
        """
        base = b"/proc/%d/" % pid
        self._identities[pid] = _identity(pid)
        try:
            try:
                exe: bytes | None = os.readlink(base + b"exe")
            except OSError:
                exe = None
            cmdline = read_small(base + b"cmdline", CMDLINE_MAX)
            stat = read_small(base + b"stat", 4096)
            head, _, tail = stat.rpartition(b")")
            fields = tail.split()
            self._parents[pid] = int(fields[1])  # field 4, ppid
            kthread = int(fields[6]) & _PF_KTHREAD  # field 9, flags
            comm = _text(head.partition(b"(")[2]) or None
            status = read_small(base + b"status", 16384)
            login = int(read_small(base + b"loginuid", 32) or UNSET_LOGINUID)
        except (OSError, ValueError, IndexError):
            return f"process {pid} exited before it could be read"
        uid = status_uid(status)
        text = capped_cmdline(cmdline, truncated=len(cmdline) >= CMDLINE_MAX)
        loginuid = None if login == UNSET_LOGINUID else login
        actor = Actor(pid=pid, exe=display(exe) if exe is not None else None,
                      cmdline=text or None, uid=uid, user=self.user(uid),
                      loginuid=loginuid, login_user=self.user(loginuid), comm=comm)
        if exe is None and not kthread:
            actor["unknown"] = (f"process {pid} exited before its exe and command line "
                                "could be read")
        return actor


def _identity(pid: int) -> int | None:
    """Which process has pid now: the inode number of its /proc/PID, which procfs
    numbers afresh for every process (one stat, a quarter of reading its stat line);
    None when no process has it (the one read exited: its late events are its own).
    A number that changes for the same process (its inode evicted) costs a reading."""
    try:
        return os.stat(b"/proc/%d" % pid).st_ino
    except OSError:
        return None


def capped_cmdline(raw: bytes, truncated: bool = False) -> str:
    """/proc/PID/cmdline as text: arguments cut to ARG_MAX_KEPT bytes, the whole to
    about CMDLINE_KEPT, each cut marked with CUT."""
    words: list[str] = []
    size = 0
    args = raw.rstrip(b"\0").split(b"\0") if raw.strip(b"\0") else []
    for arg in args:
        if size >= CMDLINE_KEPT:
            words.append(CUT)
            return " ".join(words)
        # The mark is glued on, so a cut word never passes for the path it began.
        word = _text(arg[:ARG_MAX_KEPT]) + CUT if len(arg) > ARG_MAX_KEPT else _text(arg)
        words.append(word)
        size += len(word.encode()) + 1
    if truncated:
        words.append(CUT)
    return " ".join(words)
