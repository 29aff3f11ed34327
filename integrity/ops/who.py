"""Who runs us: the user, and under sudo the login behind it (recorded with approvals)."""

from __future__ import annotations

import getpass
import os


def invoking_user() -> tuple[str, str | None]:
    """The user running us and, under sudo, the user behind it."""
    return getpass.getuser(), os.environ.get("SUDO_USER") or None


def invoking_label() -> str:
    """One string for both, as a baseline's `actor` column holds it."""
    user, sudo = invoking_user()
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user
