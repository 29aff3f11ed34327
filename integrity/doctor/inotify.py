"""inotify's per-user limits against what the policy needs and what others hold.

The limits (watches, instances, queued events) are shared with every other program of
the same user: IDEs, file sync, container runtimes. A watcher over the limit leaves
directories to scheduled scans, so this says so, with the sysctl that fixes it, before
the watcher runs into it at 3 a.m.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from integrity.doctor.findings import Finding
from integrity.paths import display
from integrity.policy import Policy
from integrity.realtime.procfs import read_int, read_small, read_text, status_uid
from integrity.scan.walker import Passage, SkippedTree, WalkEntry, walk

PROC = "/proc"
INOTIFY_SYSCTL = "/proc/sys/fs/inotify"
#: Instances the watcher opens: one inotify_simple.INotify serves every rule.
WATCHER_INSTANCES = 1
#: Below this share of a limit we call the headroom comfortable.
HEADROOM = 0.8
#: How many inotify holders `doctor` lists.
TOP_HOLDERS = 5
#: The kernel's default queue length; a shorter queue overflows (and rescans) sooner.
DEFAULT_QUEUED_EVENTS = 16384

@dataclass(frozen=True)
class InotifyLimits:
    """The per-user inotify limits; None where /proc/sys could not be read."""

    max_user_watches: int | None
    max_user_instances: int | None
    max_queued_events: int | None


@dataclass(frozen=True)
class InotifyHolder:
    """A process holding inotify instances, and how many watches they carry."""

    pid: int
    comm: str
    instances: int
    watches: int
    #: True when this is a running `integrity watch` (its watches are ours already).
    is_watcher: bool = False


def inotify_limits(sysctl_dir: str = INOTIFY_SYSCTL) -> InotifyLimits:
    """Read fs.inotify.{max_user_watches,max_user_instances,max_queued_events}."""
    return InotifyLimits(
        read_int(os.path.join(sysctl_dir, "max_user_watches")),
        read_int(os.path.join(sysctl_dir, "max_user_instances")),
        read_int(os.path.join(sysctl_dir, "max_queued_events")))


@dataclass(frozen=True)
class WatchNeed:
    """Directories the watcher would put a watch on, and those it could not list."""

    directories: int
    unlisted: tuple[SkippedTree, ...] = ()


def watches_needed(policy: Policy) -> WatchNeed:
    """Count the directories whose contents the policy's walk records.

    The watcher puts one inotify watch on each: every rule root, and every directory
    the walk descends into. A directory the walk records but does not enter (a child of
    a non-recursive rule, a mount point under a one_filesystem rule) needs none: the
    watch on its parent already reports changes to it. Every directory created later
    adds one. Directories listed without being recorded (waypoints such as /home for
    /home/*/.ssh, excluded ones searched for include globs) are watched too.
    """
    directories = 0
    unlisted: list[SkippedTree] = []
    root_devs: dict[bytes, int | None] = {}
    for item in walk(policy, dirs_only=True):
        if isinstance(item, SkippedTree):
            unlisted.append(item)
            continue
        if isinstance(item, Passage):
            directories += 1
            continue
        if not isinstance(item, WalkEntry) or not stat.S_ISDIR(item.st.st_mode):
            continue
        rule = item.rule
        if item.path != rule.path:
            if not rule.recursive:
                continue
            if rule.one_filesystem:
                if rule.path not in root_devs:
                    try:
                        root_devs[rule.path] = os.lstat(rule.path).st_dev
                    except OSError:
                        root_devs[rule.path] = None
                if root_devs[rule.path] not in (None, item.st.st_dev):
                    continue
        directories += 1
    return WatchNeed(directories, tuple(unlisted))


def _process_uid(pid_dir: str) -> int | None:
    """Effective uid of a process: inotify counts instances and watches per euid."""
    try:
        return status_uid(read_small(os.path.join(pid_dir, "status"), None))
    except OSError:
        return None


def _is_watcher(pid_dir: str) -> bool:
    """True for a running `integrity watch`: the script, `python -m integrity`, any path."""
    args = read_text(os.path.join(pid_dir, "cmdline")).split("\0")
    for index, arg in enumerate(args):
        if os.path.basename(arg) == "integrity":
            return "watch" in args[index + 1:]
    return False


def inotify_holders(uid: int | None = None, proc: str = PROC) -> list[InotifyHolder]:
    """Processes holding inotify instances, most watches first.

    An inotify descriptor shows as the link target "anon_inode:inotify" in
    /proc/PID/fd (which also finds instances with no watch yet); each of its watches
    is a line "inotify wd:..." in /proc/PID/fdinfo/FD. Only processes of `uid` (by
    default ours) are counted, because the limits are per user. A descriptor shared
    by a parent and a forked child is counted in both; that errs on the safe side.
    Without root only our own user's processes are readable anyway.
    """
    want = os.geteuid() if uid is None else uid
    holders: list[InotifyHolder] = []
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return []
    for pid in pids:
        pid_dir = os.path.join(proc, pid)
        if _process_uid(pid_dir) != want:
            continue
        fd_dir = os.path.join(pid_dir, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to inspect
        instances = watches = 0
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) != "anon_inode:inotify":
                    continue
            except OSError:
                continue
            instances += 1
            info = read_text(os.path.join(pid_dir, "fdinfo", fd))
            watches += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
        if instances:
            comm = read_text(os.path.join(pid_dir, "comm")).strip() or "?"
            holders.append(InotifyHolder(int(pid), comm, instances, watches,
                                         _is_watcher(pid_dir)))
    holders.sort(key=lambda h: (-h.watches, -h.instances, h.pid))
    return holders


def suggested_limit(needed: int) -> int:
    """A round limit comfortably above `needed`: half as much again, to two digits.

    The headroom is for directories created after today and for other programs; a
    watch costs about 1 KiB of unswappable kernel memory, so generous is cheap.
    """
    target = max(int(needed * 1.5) + 1024, 8192)
    step: int = 10 ** max(len(str(target)) - 2, 0)  # int: the exponent is >= 0
    return -(-target // step) * step


def _sysctl_advice(key: str, value: int) -> str:
    name = f"fs.inotify.{key}"
    return (f"sysctl -w {name}={value}; to keep it after a reboot: "
            f"echo '{name} = {value}' > /etc/sysctl.d/60-integrity-inotify-{key}.conf")


def check_inotify(policy: Policy, limits: InotifyLimits,
                  holders: list[InotifyHolder]) -> Iterator[Finding]:
    """Watches and instances the policy needs, plus what others hold, against the limits.

    A running `integrity watch` already holds what the policy needs, so its own
    watches are not counted again as someone else's.
    """
    need = watches_needed(policy)
    others = [h for h in holders if not h.is_watcher]
    watchers = [h for h in holders if h.is_watcher]
    used_watches = sum(h.watches for h in others)
    used_instances = sum(h.instances for h in others)
    details = tuple(
        f"pid {h.pid} ({h.comm}): {h.instances} instance{'s' if h.instances != 1 else ''},"
        f" {h.watches} watch{'es' if h.watches != 1 else ''}"
        + (" [integrity watch: already counted as needed]" if h.is_watcher else "")
        for h in holders[:TOP_HOLDERS])
    if len(holders) > TOP_HOLDERS:
        details += (f"... and {len(holders) - TOP_HOLDERS} more processes",)

    total = need.directories + used_watches
    usage = (f"the policy needs {need.directories:,} watches (one per directory) and "
             f"other processes of this user hold {used_watches:,}")
    limit = limits.max_user_watches
    if limit is None:
        yield Finding("warn", f"inotify: {usage}; fs.inotify.max_user_watches is unreadable",
                      None, details)
    elif total > limit:
        yield Finding(
            "fail",
            f"inotify: {usage}, over fs.inotify.max_user_watches={limit:,}: the watcher "
            f"would leave {total - limit:,} directories to scheduled scans",
            _sysctl_advice("max_user_watches", suggested_limit(total)), details)
    elif total > limit * HEADROOM:
        yield Finding(
            "warn",
            f"inotify: {usage}, {total / limit:.0%} of fs.inotify.max_user_watches={limit:,}",
            _sysctl_advice("max_user_watches", suggested_limit(total)), details)
    else:
        yield Finding("ok", f"inotify: {usage}, within fs.inotify.max_user_watches={limit:,}",
                      None, details)

    needed_instances = 0 if watchers else WATCHER_INSTANCES
    instances = needed_instances + used_instances
    ilimit = limits.max_user_instances
    if ilimit is not None and instances > ilimit:
        yield Finding(
            "fail",
            f"inotify: {used_instances} instances already open by this user, and "
            f"fs.inotify.max_user_instances={ilimit}: the watcher could not start",
            _sysctl_advice("max_user_instances", max(ilimit * 2, 256, instances * 2)))
    elif ilimit is not None and instances > ilimit * HEADROOM:
        yield Finding(
            "warn",
            f"inotify: {instances} instances in use counting the watcher's,"
            f" {instances / ilimit:.0%} of fs.inotify.max_user_instances={ilimit}",
            _sysctl_advice("max_user_instances", max(ilimit * 2, 256, instances * 2)))

    queue = limits.max_queued_events
    if queue is not None and queue < DEFAULT_QUEUED_EVENTS:
        yield Finding(
            "warn",
            f"inotify: fs.inotify.max_queued_events={queue:,} is below the kernel default "
            f"{DEFAULT_QUEUED_EVENTS:,}: bursts overflow the queue sooner and force rescans",
            _sysctl_advice("max_queued_events", DEFAULT_QUEUED_EVENTS))

    if need.unlisted:
        first = need.unlisted[0]
        yield Finding(
            "warn",
            f"{len(need.unlisted)} director{'ies' if len(need.unlisted) != 1 else 'y'} could"
            f" not be listed (first: {display(first.path)}: {first.cause}); watches below"
            " them are not counted",
            "run doctor as the user the watcher runs as (root under systemd)"
            if os.geteuid() != 0 else None)
