"""Who runs us: the user, and under sudo the login behind it (recorded with approvals)."""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any


def invoking_user() -> tuple[str, str | None]:
    """The user running us and, under sudo, the user behind it."""
    return getpass.getuser(), os.environ.get("SUDO_USER") or None


def invoking_label() -> str:
    """One string for both, as a baseline's `actor` column holds it."""
    user, sudo = invoking_user()
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def own_actor(command: str, user: str, sudo_user: str | None) -> dict[str, Any]:
    """This process as the actor of an event it records (`command`: "integrity
    restore", ...), in the form the fanotify listener gives a writer."""
    return {"pid": os.getpid(), "exe": os.path.realpath(sys.executable),
            "cmdline": command, "uid": os.geteuid(), "user": user,
            "sudo_user": sudo_user}
