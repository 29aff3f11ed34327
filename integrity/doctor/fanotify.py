"""Whether realtime events can name their writer: fanotify marks as the listener's."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from integrity.doctor.findings import Finding
from integrity.policy import Policy
from integrity.realtime import fanotify as fan
from integrity.realtime.marks import DIR_MASK
from integrity.realtime.mounts import filesystem_type


def check_fanotify(policy: Policy) -> Iterator[Finding]:
    """Whether realtime events can name their writer: one FID-mode inode mark per
    filesystem holding a rule path, as the watcher's listener places them."""
    if os.geteuid() != 0:
        return  # check_permissions said so already
    try:
        fd = fan.init(fan.FAN_CLASS_NOTIF | fan.FAN_REPORT_DFID_NAME | fan.FAN_CLOEXEC,
                      os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        yield Finding("warn", fan.init_problem(exc) + ": realtime events will not name "
                      "the process behind a change", "a kernel with CONFIG_FANOTIFY")
        return
    refused: list[str] = []
    try:
        devices: set[int] = set()
        for rule in policy.rules:
            try:
                st = os.stat(rule.base)
            except OSError:
                continue  # check_permissions reports missing paths
            if st.st_dev in devices or not stat.S_ISDIR(st.st_mode):
                continue
            devices.add(st.st_dev)
            try:
                fan.mark(fd, fan.FAN_MARK_ADD | fan.FAN_MARK_ONLYDIR, DIR_MASK,
                         path=rule.base)
            except OSError as exc:
                refused.append(f"{rule.name} ({filesystem_type(rule.base)}): "
                               f"{exc.strerror}")
    finally:
        os.close(fd)
    if refused:
        yield Finding("warn", "fanotify file ids refused on some filesystems: changes "
                      "there are named without attribute changes, or not at all",
                      details=tuple(refused))
    else:
        yield Finding("ok", "fanotify: realtime events name the process behind a change")


def check_access(policy: Policy) -> Iterator[Finding]:
    """Whether opens under `access = true` rules can be recorded (realtime/access.py
    marks each root as the watcher's helper would, then lets go)."""
    from integrity.realtime.access import probe

    found = probe(policy)
    if found is not None:
        level, message, details = found
        advice = None if level == "ok" else (
            "run `integrity watch` as root (the shipped unit does), on Linux 5.9 or newer")
        yield Finding("warn" if level != "ok" else "ok", message, advice, details)
