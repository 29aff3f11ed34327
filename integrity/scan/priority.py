"""A scan must not hurt the host: CPU nice level, I/O class and a read-rate ceiling.

`[scan]` in the policy (policy.ScanSettings) says how gently scans run. The nice
level and the I/O class are per-thread attributes on Linux (setpriority and
ioprio_set with a thread id): the CLI sets them for its whole process before the
workers are forked (they inherit them), the watcher for its scan thread only, so its
realtime re-checks are not slowed. The read rate is enforced where files are read:
each reading thread gets its share of the ceiling (`limit_reads`), and charges every
read against it (`charge`), sleeping when it is ahead.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from integrity.policy.scan import ScanSettings

T = TypeVar("T")

#: ioprio classes (linux/ioprio.h).
IOPRIO_CLASS_NONE, IOPRIO_CLASS_RT, IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 0, 1, 2, 3
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_CLASSES = {"idle": IOPRIO_CLASS_IDLE, "best-effort": IOPRIO_CLASS_BE}
#: ioprio_set / ioprio_get system call numbers (glibc has no wrapper).
_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "armv7l": (314, 315),
             "i686": (289, 290), "ppc64le": (273, 274), "s390x": (282, 283),
             "riscv64": (30, 31)}
#: Sleeping less than this is not worth a system call.
_MIN_SLEEP = 0.005
#: A paced thread wakes at least this often to ask whether its scan is still wanted
#: (one 8 MiB chunk at 2 MiB/s would otherwise sleep 4 s through a SIGTERM).
_SLEEP_SLICE = 0.25

_local = threading.local()


def _syscall(number: int, *args: int) -> int:
    import ctypes  # only here: ~5 ms of start-up that verify of /etc need not pay

    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _numbers() -> tuple[int, int]:
    machine = os.uname().machine
    numbers = _SYSCALLS.get(machine)
    if numbers is None:
        raise OSError(0, f"ioprio system calls unknown on {machine}")
    return numbers


def ioprio_get(tid: int = 0) -> tuple[int, int]:
    """(class, level) of a thread's (or with 0, the calling thread's) I/O priority."""
    value = _syscall(_numbers()[1], _IOPRIO_WHO_PROCESS, tid)
    return value >> _IOPRIO_CLASS_SHIFT, value & ((1 << _IOPRIO_CLASS_SHIFT) - 1)


def ioprio_set(io_class: int, level: int = 0, tid: int = 0) -> None:
    """Set a thread's (0: the calling thread's) I/O class and level."""
    _syscall(_numbers()[0], _IOPRIO_WHO_PROCESS, tid,
             (io_class << _IOPRIO_CLASS_SHIFT) | level)


def lower_priority(settings: ScanSettings, scheduled: bool, tid: int = 0) -> None:
    """Apply `[scan]`'s nice level and I/O class to a thread (0: the calling one; in
    the CLI's main thread before any other starts, that is the whole process and
    the workers it forks).

    Only ever lowers: a scan started under `nice -n 15` keeps 15. The I/O class
    defaults to idle for scheduled scans and stays as it is for a person's `init` or
    `verify` (an idle-class read can wait indefinitely on a busy disk). Failures are
    ignored (a kernel without the calls, a sandbox that forbids them): a scan at
    normal priority is better than no scan.
    """
    who = tid or threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, who)
        if settings.nice > current:
            os.setpriority(os.PRIO_PROCESS, who, settings.nice)
    except OSError:
        pass
    io_class = settings.io_class or ("idle" if scheduled else None)
    if io_class is None:
        return
    wanted = _CLASSES[io_class]
    # best-effort levels run 0 (first) to 7; the kernel's own default follows nice.
    level = min(7, (max(settings.nice, 0) + 20) // 5) if wanted == IOPRIO_CLASS_BE else 0
    try:
        now_class, now_level = ioprio_get(who)
        if now_class == IOPRIO_CLASS_IDLE:
            return  # nothing is lower
        if now_class == wanted == IOPRIO_CLASS_BE and now_level >= level:
            return
        ioprio_set(wanted, level, who)
    except OSError:
        pass


@contextmanager
def scan_priority(settings: ScanSettings, scheduled: bool = False) -> Iterator[None]:
    """lower_priority() for the calling thread during the block (and what it forks),
    then back as it was where we may (root may raise a priority again; anyone else's
    process is about to end anyway)."""
    who = threading.get_native_id()
    try:
        nice: int | None = os.getpriority(os.PRIO_PROCESS, who)
    except OSError:
        nice = None
    io: tuple[int, int] | None = None
    if settings.io_class or scheduled:
        try:
            io = ioprio_get(who)
        except OSError:
            pass
    lower_priority(settings, scheduled, who)
    try:
        yield
    finally:
        try:
            if io is not None and ioprio_get(who) != io:
                ioprio_set(io[0], io[1], who)
        except OSError:
            pass
        try:
            if nice is not None and os.getpriority(os.PRIO_PROCESS, who) != nice:
                os.setpriority(os.PRIO_PROCESS, who, nice)
        except OSError:
            pass


class Abandoned(Exception):
    """Whoever wanted this scan is gone: it ends. (Not an OSError, which the hasher
    takes for a file it could not read.)"""


class ReadLimit:
    """A ceiling on one thread's read rate: bytes charged as they are read; the
    thread sleeps while it is ahead of `rate` bytes per second since it started."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self.read = 0
        #: Asked before each sleep: True when whoever wants this scan is gone, which
        #: ends it (Abandoned). By default the thread's own (`abandon_when`).
        self.abandoned: Callable[[], bool] | None = getattr(_local, "abandoned", None)

    def charge(self, size: int) -> None:
        self.read += size
        while True:
            ahead = self.read / self.rate - (time.monotonic() - self.started)
            if ahead <= _MIN_SLEEP:
                return
            if self.abandoned is not None and self.abandoned():
                raise Abandoned
            time.sleep(min(ahead, _SLEEP_SLICE))


@contextmanager
def abandon_when(abandoned: Callable[[], bool]) -> Iterator[None]:
    """Paced reads of the calling thread during the block end the scan (Abandoned)
    once `abandoned()` is true: a daemon asked to stop does not sit out a throttled
    scan's sleeps."""
    before = getattr(_local, "abandoned", None)
    _local.abandoned = abandoned
    try:
        yield
    finally:
        _local.abandoned = before


def limit_reads(rate: float | None) -> None:
    """Cap the calling thread's reads at `rate` bytes/s from now on (None: no cap)."""
    _local.limit = ReadLimit(rate) if rate else None


def current_limit() -> ReadLimit | None:
    """The calling thread's read ceiling, if any."""
    limit: ReadLimit | None = getattr(_local, "limit", None)
    return limit


def charge(size: int) -> None:
    """Count `size` bytes read by this thread against its ceiling (if it has one)."""
    limit: ReadLimit | None = getattr(_local, "limit", None)
    if limit is not None:
        limit.charge(size)


def limited(items: Iterator[T], rate: float) -> Iterator[T]:
    """`items`, with the reads made while producing each capped at `rate` bytes/s
    (for a scan run in the caller's thread: the cap holds only while the scan's
    generator runs, not while the caller works between its items)."""
    limit = ReadLimit(rate)
    while True:
        before = current_limit()
        _local.limit = limit
        try:
            item = next(items, _END)
        finally:
            _local.limit = before
        if item is _END:
            return
        yield item  # type: ignore[misc]


_END = object()
