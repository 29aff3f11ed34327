"""The fanotify helper process: marks the trees, reads /proc for each writer, reports.

It runs apart from the daemon (see actor.py for why): `child.helper_command()` starts
this interpreter with `python -E -s -S`, so only the standard library and our stdlib-only
modules (paths, realtime.fanotify, marks, mounts, procfs, processes) may be imported
here. It reads one JSON `Config` line on stdin, answers with one `Message` saying
whether it is ready, then sends `Message` lines (JSON) as events come, and stops at
EOF on stdin.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from typing import TypedDict

from integrity.realtime.fanotify import privilege_problem
from integrity.realtime.marks import Tracker
from integrity.realtime.processes import Actor, Processes

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


class Config(TypedDict):
    """What the listener tells the helper, as its one line on stdin."""

    roots: list[str]  # wire(path)
    fid: bool
    modify: bool
    #: pids whose events are not ours to report (the daemon's own writes).
    ignore: list[int]


class Message(TypedDict, total=False):
    """One line from the helper; paths as wire(path). JSON turns tuples into lists."""

    # The first line: started or not, and what is covered.
    ready: bool
    problem: str | None
    mode: str
    root_reasons: dict[str, str]
    # Whenever they change: subtrees not watched, and those watched in classic mode.
    dark: dict[str, str]
    classic: dict[str, str]
    # A batch: when read (time.monotonic), the actors, and (path, index into actors)
    # in the order of their last change; or a queue overflow at that time.
    t: float
    actors: list[Actor | str]
    seen: list[tuple[str, int]]
    overflow: bool
    # A line for the daemon's log: (level, text).
    log: tuple[int, str]


def wire(path: bytes) -> str:
    """A path as JSON can carry it losslessly (undecodable bytes as surrogates)."""
    return path.decode("utf-8", "surrogateescape")


def unwire(text: str) -> bytes:
    """The path wire() was given."""
    return text.encode("utf-8", "surrogateescape")


def _send(message: Message) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    while data:
        data = data[os.write(1, data):]


def main() -> None:
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
    config: Config = json.loads(line)
    tracker = Tracker([unwire(r) for r in config["roots"]], fid=config["fid"],
                      modify=config["modify"])
    try:
        problem = privilege_problem() or tracker.start()
        _send({"ready": True, "problem": problem, "mode": tracker.mode,
               "root_reasons": {wire(r): w for r, w in tracker.root_reasons.items()},
               "dark": {wire(p): w for p, w in tracker.dark.items()},
               "classic": {wire(p): w for p, w in tracker.classic.items()}})
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
        message: Message = {}
        if self.since is not None:
            message = {"t": self.since, "actors": self.actors,
                       "seen": [(wire(p), n) for p, n in self.seen.items()]}
        if self.tracker.dark is not self.dark:
            message["dark"] = {wire(p): w for p, w in self.tracker.dark.items()}
        if self.tracker.classic is not self.classic:
            message["classic"] = {wire(p): w for p, w in self.tracker.classic.items()}
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
                    _send({"log": (logging.WARNING, f"reading fanotify: {exc.strerror}"),
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
