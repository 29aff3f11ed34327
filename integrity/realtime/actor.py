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
few events as will do (fanotify.DIR_MASK: no FAN_MODIFY unless asked).

/proc is read at event time, because `chmod`, `cp` or `sed -i` exit a moment after
their change, and it is read in a helper process of its own (`python -S`, standard
library only), not in a thread of the daemon: a thread has to win the daemon's GIL back
after every system call, and next to one busy Python thread (a scan) the thread we
first built read 0 of 30 short-lived writers in time. The helper, niced a little ahead
of the daemon (HELPER_NICE), read 35-36 of 40 `chmod` runs in full next to such a
thread and 21-25 of 40 on an idle host, where 11-13 more were caught exited but not
yet reaped: their uid, login uid, comm and parents survive until then, so the actor is
partial but says who. One reading of /proc/PID stands for that process for two
seconds, so a process writing 10,000 files costs one reading; the helper sends what it
filed in batches of JSON lines, and the listener's one daemon thread files them for
actor_for().

Marking, chosen by measuring (benchmarks/bench_fanotify.py; 2 CPUs, tmpfs, medians of
5): an inode mark on each protected directory, in FID mode (see fanotify.Tracker). A
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
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import select
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import IO, Any

from integrity.realtime.fanotify import NOT_ROOT, Tracker, covering_root, normalise_roots, read_small
from integrity.paths import display, is_within

log = logging.getLogger(__name__)

#: Paths remembered at most (the least recently written go first).
MAX_PATHS = 50_000
#: How long one reading of /proc/PID stands for that process. PIDs are handed out
#: cyclically, so one cannot be reused within this time.
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
#: Longest wait for the helper to mark the trees.
START_TIMEOUT = 120.0
#: Reads handled before looking at stdin (our stop signal) again.
READS_PER_WAKE = 64
#: Filed paths go to the listener in lines of at most FLUSH_PATHS, FLUSH_AFTER seconds
#: after the first of them was read at the latest: the daemon's thread wakes for each
#: line, and 20,000 files written on ext4 otherwise made 21,000 lines.
FLUSH_AFTER = 0.010
FLUSH_PATHS = 1024
#: A read this big (some 60 events queued) in which every writer was one we knew is a
#: burst: PAUSE before the next poll lets its events queue and merge instead of each
#: waking us. A wake-up with a new writer is never followed by a pause: the next event
#: may be a `chmod` about to exit, whose /proc must be read at once.
BURST_BYTES = 4096
PAUSE = 0.002
#: The helper runs this much ahead of the daemon (nice, relative): woken by a writer's
#: event, it then preempts that writer instead of waiting for it to exit. Of 30 `chmod`
#: runs it read 18-20 in full instead of 2-12 on an idle host, with no measurable
#: cost to writers (it still uses the same CPU time in all).
HELPER_NICE = -5
UNSET_LOGINUID = 4294967295
OVERFLOWED = "fanotify queue overflowed: the writers of that moment were lost"

_CAP_SYS_ADMIN = 21
_PF_KTHREAD = 0x00200000

ACTOR_KEYS = ("pid", "exe", "cmdline", "uid", "user", "loginuid", "login_user", "comm")
Actor = dict[str, Any]


def unknown(reason: str) -> Actor:
    """An actor whose every field is None, with the reason it is unknown."""
    actor: Actor = dict.fromkeys(ACTOR_KEYS)
    actor["unknown"] = reason
    return actor


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _wire(path: bytes) -> str:
    """A path as JSON can carry it losslessly (undecodable bytes as surrogates)."""
    return path.decode("utf-8", "surrogateescape")


def _unwire(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# -- /proc --------------------------------------------------------------------------------

class Processes:
    """/proc readings per pid, kept PROCESS_TTL seconds, and uid -> user name."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[float, Actor | str]] = {}
        self._users: dict[int, str | None] = {}
        self._parents: dict[int, int] = {}
        #: Readings of /proc so far (the listener's loop watches it for new writers).
        self.readings = 0

    def get(self, pid: int, now: float) -> Actor | str:
        """The actor for pid (read now unless read within PROCESS_TTL), or why not.

        The writer is read first, then its parents (most often already known): a
        package manager's maintainer script is a shell, its grandparent dpkg.
        """
        hit = self._seen.get(pid)
        if hit is not None and now - hit[0] < PROCESS_TTL:
            return hit[1]
        info = self.read(pid)
        self.readings += 1
        if len(self._seen) >= 4096:
            self._seen = {p: v for p, v in self._seen.items() if now - v[0] < PROCESS_TTL}
            self._parents = {p: self._parents[p] for p in self._seen if p in self._parents}
        self._seen[pid] = (now, info)
        if isinstance(info, dict):
            info["ancestors"] = self._lineage(self._parents.get(pid, 0), now)
        return info

    def _lineage(self, pid: int, now: float) -> list[Actor]:
        """pid and its ancestors, nearest first, below init: who ran the writer."""
        if pid <= 1:
            return []
        parent = self.get(pid, now)
        if isinstance(parent, str):
            return []
        summary = {key: parent[key] for key in ("pid", "exe", "comm")}
        words = (parent.get("cmdline") or "").split()
        if len(words) > ANCESTOR_WORDS:
            words = [*words[:ANCESTOR_WORDS], CUT]
        summary["cmdline"] = " ".join(words) or None
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
        uid: int | None = None
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                uid = int(line.split()[2])  # real, effective, saved, fs: effective
                break
        text = capped_cmdline(cmdline, truncated=len(cmdline) >= CMDLINE_MAX)
        loginuid = None if login == UNSET_LOGINUID else login
        actor: Actor = {"pid": pid, "exe": display(exe) if exe is not None else None,
                        "cmdline": text or None, "uid": uid, "user": self.user(uid),
                        "loginuid": loginuid, "login_user": self.user(loginuid),
                        "comm": comm}
        if exe is None and not kthread:
            actor["unknown"] = (f"process {pid} exited before its exe and command line "
                                "could be read")
        return actor


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


def privilege_problem() -> str | None:
    """Why this process cannot learn writers' pids, or None (it has CAP_SYS_ADMIN).

    Since Linux 5.13 an unprivileged fanotify_init() succeeds, but the kernel then
    reports pid 0 for every other process's events: useless here, so we check first.
    """
    try:
        status = read_small(b"/proc/self/status", 16384)
    except OSError:
        return None if os.geteuid() == 0 else NOT_ROOT
    for line in status.splitlines():
        if line.startswith(b"CapEff:"):
            return None if int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1 else NOT_ROOT
    return None if os.geteuid() == 0 else NOT_ROOT


# -- the helper process -------------------------------------------------------------------

def _send(message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    while data:
        data = data[os.write(1, data):]


def helper_main() -> None:
    """The helper: one JSON config line on stdin, JSON lines out; stops at stdin EOF."""
    # The daemon decides when we stop (EOF on stdin, also when it dies): systemd's stop
    # signals the whole cgroup at once, and we must not vanish before the daemon asks.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        import fcntl
        fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for bursts while filed
    except (ImportError, AttributeError, OSError):
        pass
    try:
        os.nice(HELPER_NICE)
    except OSError:
        pass  # without CAP_SYS_NICE: same priority as the daemon
    line = sys.stdin.buffer.readline()
    if not line:
        return  # the listener is gone already
    config = json.loads(line)
    tracker = Tracker([_unwire(r) for r in config["roots"]], fid=config["fid"],
                      modify=config["modify"])
    try:
        problem = privilege_problem() or tracker.start()
        _send({"ready": True, "problem": problem, "mode": tracker.mode,
               "root_reasons": {_wire(r): w for r, w in tracker.root_reasons.items()},
               "dark": {_wire(p): w for p, w in tracker.dark.items()},
               "classic": {_wire(p): w for p, w in tracker.classic.items()}})
        if problem is None:
            _listen(tracker, {os.getpid(), *config["ignore"]})
    except BrokenPipeError:
        pass  # the daemon died (SIGKILL): nobody is left to tell, so just stop
    finally:
        tracker.close()


class _Outbox:
    """What the helper has filed and not yet sent: one JSON line per flush.

    A path written 500 times before a flush is sent once; an actor shared by many paths
    is sent once per line.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.clear()

    def clear(self) -> None:
        self.since: float | None = None  # when the oldest unsent path was read
        self.seen: dict[bytes, int] = {}
        self.actors: list[Actor | str] = []
        self.index: dict[int, int] = {}
        self.dark, self.classic = self.tracker.dark, self.tracker.classic

    def add(self, path: bytes, info: Actor | str, now: float) -> None:
        if self.since is None:
            self.since = now
        number = self.index.setdefault(id(info), len(self.actors))
        if number == len(self.actors):
            self.actors.append(info)
        self.seen.pop(path, None)  # keep the order of the last changes
        self.seen[path] = number

    def due(self, now: float) -> float | None:
        """Seconds until the next flush is due (0: now), None when nothing waits."""
        if self.tracker.dark is not self.dark or self.tracker.classic is not self.classic:
            return 0.0
        if self.since is None:
            return None
        if len(self.seen) >= FLUSH_PATHS:
            return 0.0
        return max(0.0, self.since + FLUSH_AFTER - now)

    def flush(self) -> None:
        message: dict[str, Any] = {}
        if self.since is not None:
            message = {"t": self.since, "actors": self.actors,
                       "seen": [(_wire(p), n) for p, n in self.seen.items()]}
        if self.tracker.dark is not self.dark:
            message["dark"] = {_wire(p): w for p, w in self.tracker.dark.items()}
        if self.tracker.classic is not self.classic:
            message["classic"] = {_wire(p): w for p, w in self.tracker.classic.items()}
        if message:
            _send(message)
        self.clear()


def _listen(tracker: Tracker, ignore: set[int]) -> None:
    """Read events as they come, /proc at once for each new writer, send in batches."""
    poller = select.poll()
    for fd in tracker.fds:
        poller.register(fd, select.POLLIN)
    poller.register(0, select.POLLIN)
    processes = Processes()
    outbox = _Outbox(tracker)
    while True:
        due = outbox.due(time.monotonic())
        ready = poller.poll(None if due is None else due * 1000)
        if not ready or outbox.due(time.monotonic()) == 0.0:
            outbox.flush()
        burst = False
        readings = processes.readings
        for fd, _ in ready:
            if fd == 0:
                outbox.flush()
                return  # EOF (or anything): the listener closed us
            for _ in range(READS_PER_WAKE):
                try:
                    buf = tracker.read(fd)
                except OSError as exc:  # EMFILE in classic mode: those events are lost
                    outbox.flush()
                    _send({"log": [logging.WARNING, f"reading fanotify: {exc.strerror}"],
                           "t": time.monotonic(), "overflow": True})
                    break
                if buf is None:
                    break
                burst = burst or len(buf) >= BURST_BYTES
                now = time.monotonic()
                try:
                    for path, pid in tracker.paths(fd, buf):
                        if path is None:
                            outbox.flush()  # what came before the overflow, then it
                            _send({"t": now, "overflow": True})
                        elif pid not in ignore:
                            outbox.add(path, processes.get(pid, now), now)
                except ValueError as exc:  # an event format we do not know
                    outbox.flush()
                    _send({"problem": f"fanotify unavailable: {exc}"})
                    return
        if burst and processes.readings == readings:
            time.sleep(PAUSE)


def _helper_command() -> list[str]:
    """This interpreter, without site or environment, importing this very package."""
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {parent!r}); "
            "from integrity.realtime.actor import helper_main; helper_main()")
    return [sys.executable or "python3", "-E", "-s", "-S", "-c", code]


# -- the listener -------------------------------------------------------------------------

class ActorListener:
    """fanotify over the protected trees: the last actor per path, for `window` seconds.

    `fid=False` forces classic mode (what a kernel before 5.9 gets), for the tests and
    the benchmark; `modify=True` also asks for FAN_MODIFY, an event per write() call,
    which attributes writers that never close their file at a measured cost (see
    fanotify.DIR_MASK). After start(), `available` says whether anything is
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
        try:
            proc = subprocess.Popen(_helper_command(), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            return f"fanotify unavailable: cannot start its helper: {exc.strerror}"
        self._proc, self.helper_pid = proc, proc.pid
        assert proc.stdin is not None and proc.stdout is not None
        config = {"roots": [_wire(r) for r in self.roots], "fid": self._fid,
                  "modify": self._modify, "ignore": [os.getpid()]}
        try:
            proc.stdin.write(json.dumps(config).encode() + b"\n")
            proc.stdin.flush()
            ready = _first_line(proc.stdout, START_TIMEOUT)
        except (OSError, ValueError) as exc:
            return f"fanotify unavailable: its helper failed to start: {exc}"
        if ready is None:
            return (f"fanotify unavailable: its helper did not start within "
                    f"{START_TIMEOUT:g} s")
        if not ready.get("ready"):
            return "fanotify unavailable: its helper exited while starting"
        if ready["problem"]:
            return str(ready["problem"])
        self.mode = ready["mode"]
        self.root_reasons = {_unwire(r): w for r, w in ready["root_reasons"].items()}
        self._dark = {_unwire(p): w for p, w in ready["dark"].items()}
        self._classic = {_unwire(p): w for p, w in ready["classic"].items()}
        return None

    def _pump(self) -> None:
        """The reader thread: file each line the helper sends until it closes."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
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

    def _file(self, message: dict[str, Any]) -> None:
        if "log" in message:
            level, text = message["log"]
            log.log(int(level), "%s", text)
        if "problem" in message:
            self.available, self.reason = False, str(message["problem"])
            log.error("%s", self.reason)
        if "dark" in message:
            self._dark = {_unwire(p): w for p, w in message["dark"].items()}
        if "classic" in message:
            self._classic = {_unwire(p): w for p, w in message["classic"].items()}
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
                key = _unwire(path)
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
            return unknown(actor) if isinstance(actor, str) else dict(actor)
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
        if proc is not None:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ActorListener:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _first_line(stream: IO[bytes], timeout: float) -> dict[str, Any] | None:
    """The helper's first message, {} if it exited first, None after timeout seconds."""
    poller = select.poll()
    poller.register(stream.fileno(), select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return None
    line = stream.readline()
    return json.loads(line) if line else {}
