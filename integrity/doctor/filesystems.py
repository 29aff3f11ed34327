"""Rules on filesystems inotify cannot see (network, cluster, FUSE, pseudo) or sees
only partly (virtiofs): the watcher puts those on scheduled scanning."""

from __future__ import annotations

from collections.abc import Iterator

from integrity.doctor.findings import Finding
from integrity.doctor.permissions import missing
from integrity.paths import display
from integrity.policy import Policy
from integrity.realtime.mounts import (Mount, blind_mounts_below, blind_reason,
                                       filesystem_type, is_blind, partial_note)


def check_filesystems(policy: Policy, mounts: list[Mount]) -> Iterator[Finding]:
    """Rules (and, where a rule crosses mounts, mounts below it) inotify cannot see."""
    problems = 0
    for rule in policy.rules:
        if missing(rule.base) is not None:
            continue
        fstype = filesystem_type(rule.base, mounts)
        spots = [(rule.base, fstype)] if is_blind(fstype) else []
        if not rule.one_filesystem and rule.recursive:
            spots += blind_mounts_below(rule.base, mounts)
        for path, kind in spots:
            problems += 1
            yield Finding(
                "warn",
                f"rule {rule.name}: {display(path)} is on {kind}, {blind_reason(kind)}",
                "the watcher scans it on the [schedule] full_scan instead; shorten that"
                " schedule if a day is too long")
        note = partial_note(fstype)
        if note is not None:
            problems += 1
            yield Finding(
                "warn",
                f"rule {rule.name}: on {fstype}, inotify sees only local changes ({note})",
                "the scheduled full scan catches the rest; keep it in [schedule] full_scan")
    if not problems:
        yield Finding("ok", "filesystems: every rule is on a filesystem inotify can watch")
