"""Whether doctor (and so the watcher run the same way) can read what the policy names."""

from __future__ import annotations

import os
from collections.abc import Iterator

from integrity.doctor.findings import Finding
from integrity.policy import Policy
from integrity.scan.walker import matches


def missing(path: bytes) -> OSError | None:
    """Why path cannot be examined (FileNotFoundError when absent), or None."""
    try:
        os.lstat(path)
    except OSError as exc:
        return exc
    return None


def check_permissions(policy: Policy) -> Iterator[Finding]:
    """Whether we run as root, and rule paths that do not exist.

    A rule whose path is absent is no fault (the default policy names /etc/rc.local
    and web roots wherever they may be): init and verify skip it quietly and the
    watcher waits for it, so it is listed, not warned about.
    """
    if os.geteuid() != 0:
        yield Finding(
            "warn",
            f"running as uid {os.geteuid()}, not root: files this user cannot read are"
            " reported as errors, and realtime events cannot name who made a change",
            "run the watcher as root (the shipped systemd unit does)")
    else:
        yield Finding("ok", "running as root: every protected file is readable")
    absent: list[str] = []
    for rule in policy.rules:
        if rule.wildcard:
            if not matches(policy, rule):
                absent.append(f"{rule.name} (no match now)")
            continue
        problem = missing(rule.path)
        if isinstance(problem, FileNotFoundError):
            absent.append(rule.name)
        elif problem is not None:
            yield Finding("warn", f"rule {rule.name}: lstat failed:"
                          f" {problem.strerror or problem} (nothing below it can be checked)")
    if absent:
        yield Finding("ok", f"{len(absent)} rule path{'s' if len(absent) != 1 else ''} "
                      "absent on this host: skipped by init and verify, watched for "
                      "creation", details=tuple(absent))


def check_database(url: str) -> Iterator[Finding]:
    """Whether other users can read the database or learn its password."""
    from integrity.store.files import exposure, sqlite_path

    problems = exposure(url)
    for problem in problems:
        yield Finding("warn", problem, "chmod 600 the database files and 700 their "
                      "directory" if " is mode " in problem else None)
    database = sqlite_path(url)
    if not problems and database is not None and os.path.exists(database):
        yield Finding("ok", f"database {database}: not readable by other users")
