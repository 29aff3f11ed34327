"""Who made a change: the process behind each change in the protected trees, via fanotify.

inotify tells the watcher what changed, never who. fanotify tells the pid, so while
`integrity watch` runs as root an `ActorListener` listens beside the inotify watcher and
remembers, per path, the last process that wrote (closed after writing), created,
removed, renamed onto or changed the attributes of it: pid, exe, command line, uid and
user, the audit login uid (which survives sudo and su) with its user, and the chain of
parents that ran it (a maintainer script's grandparent is dpkg). Best effort,
said plainly: a writer gone before /proc could be read, a queue overflow, a listener
that is not root or a kernel without fanotify each come back as "unknown" with why.

It never makes a writer wait: notification class only (FAN_CLASS_NOTIF; permission
events would let a slow reader stall every writer), a non-blocking descriptor, and as
few events as will do (marks.DIR_MASK: no FAN_MODIFY unless asked).

/proc is read at event time, because `chmod`, `cp` or `sed -i` exit a moment after
their change, and it is read in a helper process of its own (`python -S`, standard
library only), not in a thread of the daemon: a thread has to win the daemon's GIL back
after every system call, and next to one busy Python thread (a scan) the thread we
first built read 0 of 30 short-lived writers in time. The helper, niced a little ahead
of the daemon (helper.HELPER_NICE), read 35-36 of 40 `chmod` runs in full next to such a
thread and 21-25 of 40 on an idle host, where 11-13 more were caught exited but not
yet reaped: their uid, login uid, comm and parents survive until then, so the actor is
partial but says who. One reading of /proc/PID stands for that process for two
seconds, so a process writing 10,000 files costs one reading; the helper sends what it
filed in batches of JSON lines, and the listener's one daemon thread files them for
actor_for().

Marking, chosen by measuring (benchmarks/bench_fanotify.py; 2 CPUs, tmpfs, medians of
5): an inode mark on each protected directory, in FID mode (see marks.Tracker). A
filesystem-wide mark would need no walk and never race a new directory, but the kernel
then queues an event for every change anywhere on that filesystem, which we would read
only to throw away: 20,000 small files written and rewritten OUTSIDE the protected
trees ran 34-37% slower with one (some 54,000 events read and dropped per run), and
within noise (-1% to +2%) with per-directory marks. A busy writer elsewhere on / would
also fill the event queue and blind us to the writes that matter. Inside the trees the
listener costs those 20,000 files 17-22% (0.03 s; the inotify watcher alone 15%, the
two together 52-60% at the median and 34-38% in the best run, with 2 CPUs saturated),
one 1 GiB sequential write nothing measurable, and 200,000 appends 7-10%: the look at
the parent directory's marks on every write() that inotify's watch costs as well.

Limits: a file changed through a hard link outside the trees is reported under that
other path; a file written into a brand-new directory in the instant before it is marked
has no actor; a writer that never closes its file is not attributed (unless
modify=True); a process that exec()s within the two seconds is shown with its previous
exe and command line (its pid and users are right).

This module is the daemon's side, the listener; helper.py is the helper process,
processes.py its /proc reader, marks.py and fanotify.py the marks and the syscalls.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from integrity.paths import display, is_within
from integrity.realtime.fanotify import privilege_problem
from integrity.realtime import child
from integrity.realtime.helper import Config, Message, unwire, wire
from integrity.realtime.marks import covering_root, normalise_roots
from integrity.realtime.processes import Actor, unknown

log = logging.getLogger(__name__)

#: Paths remembered at most (the least recently written go first).
MAX_PATHS = 50_000
#: Longest wait for the helper to mark the trees.
START_TIMEOUT = 120.0
OVERFLOWED = "fanotify queue overflowed: the writers of that moment were lost"


class ActorListener:
    """fanotify over the protected trees: the last actor per path, for `window` seconds.

    `fid=False` forces classic mode (what a kernel before 5.9 gets), for the tests and
    the benchmark; `modify=True` also asks for FAN_MODIFY, an event per write() call,
    which attributes writers that never close their file at a measured cost (see
    marks.DIR_MASK). After start(), `available` says whether anything is
    watched and `reason` why not (or, when only some roots are covered, which and why);
    `root_reasons` maps each root that is not fully covered to its reason, and `mode`
    is "fid", "classic", "fid+classic" or "none".
    """

    def __init__(self, roots: Sequence[bytes], *, window: float = 30.0,
                 fid: bool = True, modify: bool = False) -> None:
        self.roots = normalise_roots(roots)
        self.window = window
        self.available = False
        self.reason: str | None = "fanotify listener not started"
        self.root_reasons: dict[bytes, str] = {}
        self.mode = "none"
        self.helper_pid: int | None = None
        self._fid = fid
        self._modify = modify
        self._root_set = frozenset(self.roots)
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._lock = threading.Lock()
        self._latest: OrderedDict[bytes, tuple[float, Actor | str]] = OrderedDict()
        self._overflow_at: float | None = None
        self._dark: dict[bytes, str] = {}
        self._classic: dict[bytes, str] = {}

    def start(self) -> None:
        """Start the helper, wait until it has marked the trees, start the reader thread.

        Never raises for "unavailable": `available` and `reason` say what happened.
        """
        if self._started:
            return
        self._started = True
        problem = privilege_problem()
        if problem is None:
            problem = self._start_helper()
        if problem is not None:
            self._stop_helper()
            self.available, self.reason = False, problem
            log.info("%s", problem)
            return
        self.available = True
        if self.root_reasons:
            self.reason = "fanotify partly available: " + "; ".join(
                f"{display(r)}: {w}" for r, w in self.root_reasons.items())
            log.warning("%s", self.reason)
        else:
            self.reason = None
        self._thread = threading.Thread(target=self._pump, name="fanotify", daemon=True)
        self._thread.start()

    def _start_helper(self) -> str | None:
        config: Config = {"roots": [wire(r) for r in self.roots], "fid": self._fid,
                          "modify": self._modify, "ignore": [os.getpid()]}
        command = child.helper_command("integrity.realtime.helper", "main")
        self._proc, ready = child.spawn(command, config, START_TIMEOUT, "its helper")
        self.helper_pid = self._proc.pid if self._proc is not None else None
        if isinstance(ready, str):
            return ready
        if ready["problem"]:
            return str(ready["problem"])
        self.mode = ready["mode"]
        self.root_reasons = {unwire(r): w for r, w in ready["root_reasons"].items()}
        self._dark = {unwire(p): w for p, w in ready["dark"].items()}
        self._classic = {unwire(p): w for p, w in ready["classic"].items()}
        return None

    def _pump(self) -> None:
        """The reader thread: file each line the helper sends until it closes."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            try:
                message: Message = json.loads(line)
            except ValueError:
                continue
            try:
                self._file(message)
            except Exception:  # noqa: BLE001 - a bug must not silence the listener
                log.exception("filing fanotify events failed")
        if not self._closed:
            self.available = False
            self.reason = "fanotify unavailable: its helper process stopped unexpectedly"
            log.error("%s", self.reason)

    def _file(self, message: Message) -> None:
        if "log" in message:
            level, text = message["log"]
            log.log(int(level), "%s", text)
        if "problem" in message:
            self.available, self.reason = False, str(message["problem"])
            log.error("%s", self.reason)
        if "dark" in message:
            self._dark = {unwire(p): w for p, w in message["dark"].items()}
        if "classic" in message:
            self._classic = {unwire(p): w for p, w in message["classic"].items()}
        now = message.get("t")
        if now is None:
            return
        if message.get("overflow"):
            with self._lock:
                first = self._overflow_at is None or now - self._overflow_at > self.window
                self._overflow_at = now
            if first:
                log.warning("%s", OVERFLOWED)
        actors = message.get("actors", [])
        cutoff = now - self.window
        with self._lock:
            latest = self._latest
            for path, number in message.get("seen", ()):
                key = unwire(path)
                latest[key] = (now, actors[number])
                latest.move_to_end(key)
            while len(latest) > MAX_PATHS:
                latest.popitem(last=False)
            while latest:
                oldest = next(iter(latest))
                if latest[oldest][0] >= cutoff:
                    break
                del latest[oldest]

    def actor_for(self, path: bytes) -> Actor:
        """The last actor on path within `window` seconds, or an "unknown" with why.

        Keys: ACTOR_KEYS, plus "ancestors" (pid, exe, cmdline and comm of its parents,
        nearest first, up to MAX_ANCESTORS) when the process was read. An "unknown" key
        means the actor is missing or incomplete: an exited writer caught before its
        parent reaped it keeps uid, user, login uid, comm and ancestors. Only dict
        look-ups under a lock: it never waits for I/O.
        """
        if not self.available:
            return unknown(self.reason or "fanotify unavailable")
        if covering_root(self._root_set, path) is None:
            return unknown(f"'{display(path)}' is not in a tree fanotify watches")
        for prefix, why in self._dark.items():  # replaced, never changed: no lock
            if is_within(path, prefix):
                return unknown(why)
        now = time.monotonic()
        with self._lock:
            seen = self._latest.get(path)
            overflow = self._overflow_at
        if overflow is not None and now - overflow <= self.window \
                and (seen is None or seen[0] <= overflow):
            return unknown(OVERFLOWED)
        if seen is not None and now - seen[0] <= self.window:
            actor = seen[1]
            return unknown(actor) if isinstance(actor, str) else actor.copy()
        reason = f"no fanotify event for this path within {self.window:g} s"
        for prefix, why in self._classic.items():
            if is_within(path, prefix) or is_within(prefix, path):
                reason += f" ({why})"
                break
        return unknown(reason)

    def close(self) -> None:
        """Stop the helper and the thread, close every descriptor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_helper()
        if self._started:
            self.available, self.reason = False, "fanotify listener stopped"

    def _stop_helper(self) -> None:
        """Close the helper's stdin (its stop signal), reap it, then join the thread."""
        self._closed = True
        proc, self._proc = self._proc, None
        thread, self._thread = self._thread, None
        child.stop(proc, thread, 5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ActorListener:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


