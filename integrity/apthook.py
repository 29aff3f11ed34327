"""The opt-in apt hook: after every dpkg run apt makes, approve what packages explain.

`integrity apt-hook install` writes an apt.conf.d snippet whose DPkg::Post-Invoke
runs a stat-only `verify --fast` (so the upgrade's changes become events) and then
`approve --package-updates`; what it leaves open is sent to syslog (tag
integrity-apt) and stays open for a person to look at. The hook never fails apt.
It passes no --require-signed of its own: approve reads the sealed policy's
`[packages] require_signed`, so the setting cannot be dropped by editing this
world-readable snippet (nor the policy file, without `approve --policy`).
"""

from __future__ import annotations

import os
import shlex
import sys

from integrity.errors import UsageError

SNIPPET = "80integrity"
DEFAULT_DIR = "/etc/apt/apt.conf.d"
MARKER = "// integrity apt hook"


def command_line(executable: list[str], db: str | None, policy: str | None) -> str:
    """The shell command the hook runs (single-quoted, as apt.conf strings need)."""
    base = [*executable, "-q"]
    if db:
        base += ["--db", db]
    if policy:
        base += ["--policy", policy]
    prefix = " ".join(shlex.quote(part) for part in base)
    log = "logger -t integrity-apt 2>/dev/null || cat >/dev/null"
    return (f"if [ -x {shlex.quote(executable[0])} ]; then "
            f"{prefix} verify --fast >/dev/null 2>&1; "
            f"{prefix} approve --package-updates --reason 'apt: dpkg run' 2>&1 | {{ {log}; }}; "
            "fi; true")


def render(executable: list[str], db: str | None = None, policy: str | None = None) -> str:
    """The apt.conf snippet.

    apt.conf.d is world-readable (apt's users read it), so a --db URL with a password
    is refused: the hook must get its credentials the way libpq does, from the
    ~/.pgpass of the user apt runs as (root), never from this file.
    """
    if db:
        from integrity.store.files import carries_password, redact

        if carries_password(db):
            raise UsageError(f"apt-hook: {redact(db)}: the database URL carries a "
                             "password, which would be written into a world-readable "
                             "apt.conf.d file; put it in /root/.pgpass (mode 0600) and "
                             "give the URL without it")
    command = command_line(executable, db, policy)
    if '"' in command:
        raise UsageError(f"apt-hook: {command!r}: paths with double quotes cannot be "
                         "written into an apt.conf string")
    return (f"{MARKER} (installed by 'integrity apt-hook install'; remove with "
            f"'integrity apt-hook remove')\n"
            f'DPkg::Post-Invoke {{ "{command}"; }};\n')


def executable() -> list[str]:
    """How to run this integrity again: its script; when started as `python -m
    integrity` (the module file is not executable), the installed script, else the
    interpreter with -m."""
    import shutil

    argv0 = sys.argv[0]
    path = os.path.abspath(argv0 if os.sep in argv0 else (shutil.which(argv0) or argv0))
    if os.path.isfile(path) and os.access(path, os.X_OK) and not path.endswith(".py"):
        return [path]
    installed = shutil.which("integrity")
    if installed:
        return [os.path.abspath(installed)]
    return [os.path.abspath(sys.executable), "-m", "integrity"]


def install(directory: str, content: str) -> str:
    """Write the snippet atomically; return its path."""
    target = os.path.join(directory, SNIPPET)
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: no such directory (is apt installed?)")
    temp = target + ".tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(content)
    os.chmod(temp, 0o644)
    os.replace(temp, target)
    return target


def remove(directory: str) -> str | None:
    """Remove our snippet (only if it is ours); return its path, or None if absent."""
    target = os.path.join(directory, SNIPPET)
    try:
        with open(target, encoding="utf-8") as handle:
            if not handle.read().startswith(MARKER):
                raise UsageError(f"{target}: not written by integrity; left alone")
    except FileNotFoundError:
        return None
    os.unlink(target)
    return target
