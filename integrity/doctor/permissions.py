"""Whether doctor (and so the watcher run the same way) can read what the policy names."""

from __future__ import annotations

import os
from collections.abc import Iterator

from integrity.doctor.findings import Finding
from integrity.policy import Policy


def missing(path: bytes) -> OSError | None:
    """Why path cannot be examined (FileNotFoundError when absent), or None."""
    try:
        os.lstat(path)
    except OSError as exc:
        return exc
    return None


def check_permissions(policy: Policy) -> Iterator[Finding]:
    """Whether we run as root, and rule paths that do not exist."""
    if os.geteuid() != 0:
        yield Finding(
            "warn",
            f"running as uid {os.geteuid()}, not root: files this user cannot read are"
            " reported as errors, and realtime events cannot name who made a change",
            "run the watcher as root (the shipped systemd unit does)")
    else:
        yield Finding("ok", "running as root: every protected file is readable")
    for rule in policy.rules:
        problem = missing(rule.path)
        if isinstance(problem, FileNotFoundError):
            yield Finding("warn", f"rule {rule.name}: path does not exist; nothing to protect",
                          "remove the rule, or create the path and run `integrity init`")
        elif problem is not None:
            yield Finding("warn", f"rule {rule.name}: lstat failed:"
                          f" {problem.strerror or problem} (nothing below it can be checked)")


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
