"""What a doctor check says: a level, a message, and the fix when there is one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    """One result: its level, a one-line message, and the fix when there is one."""

    level: Level
    message: str
    advice: str | None = None
    #: Supporting lines (e.g. which processes hold inotify watches), shown indented.
    details: tuple[str, ...] = ()


@dataclass
class Diagnosis:
    """All findings, in the order they were checked."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every finding is ok, else 1 (there is advice to follow)."""
        return 0 if all(f.level == "ok" for f in self.findings) else 1
