"""`integrity doctor`: will the watcher see what the policy protects, on this host?

The realtime watcher depends on things a policy cannot express: inotify's per-user
limits (inotify.py), the filesystems under the protected trees (filesystems.py:
inotify only sees changes made through this kernel, so network and FUSE filesystems
are blind spots), the privileges to read everything (permissions.py) and to learn who
made a change (fanotify.py). Each check turns one of those into a Finding with the
command that fixes it, before the watcher runs into it at 3 a.m.

Everything is read from /proc; nothing is changed. The policy is already valid (the
CLI refuses an invalid one before we get here).
"""

from __future__ import annotations

from integrity.doctor.fanotify import check_access, check_fanotify
from integrity.doctor.filesystems import check_filesystems
from integrity.doctor.findings import Diagnosis
from integrity.doctor.inotify import check_inotify, inotify_holders, inotify_limits
from integrity.doctor.permissions import check_database, check_permissions
from integrity.policy import Policy
from integrity.realtime.mounts import read_mounts


def diagnose(policy: Policy, database: str | None = None) -> Diagnosis:
    """Run every check against this host for `policy` (and its database URL)."""
    diagnosis = Diagnosis()
    diagnosis.findings.extend(check_permissions(policy))
    if database is not None:
        diagnosis.findings.extend(check_database(database))
    diagnosis.findings.extend(check_inotify(policy, inotify_limits(), inotify_holders()))
    diagnosis.findings.extend(check_filesystems(policy, read_mounts()))
    diagnosis.findings.extend(check_fanotify(policy))
    diagnosis.findings.extend(check_access(policy))
    return diagnosis


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def render(diagnosis: Diagnosis) -> str:
    """Text for a terminal: one line per finding, details and advice indented."""
    from integrity.paths import escape

    # Findings quote rule paths, mount points and /proc command lines: escaped, so a
    # newline in one cannot forge a finding.
    lines: list[str] = []
    for finding in diagnosis.findings:
        lines.append(f"{_MARK[finding.level]}  {escape(finding.message)}")
        lines.extend(f"        {escape(detail)}" for detail in finding.details)
        if finding.advice:
            lines.append(f"      fix: {escape(finding.advice)}")
    bad = sum(1 for f in diagnosis.findings if f.level != "ok")
    lines.append("all checks passed" if not bad else
                 f"{bad} check{'s' if bad != 1 else ''} need{'s' if bad == 1 else ''} attention")
    return "\n".join(lines) + "\n"
