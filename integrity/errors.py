"""Error tree: every fatal error carries its own message and exit status.

Per-file problems are not exceptions that escape a scan: they are collected as
`Warning_` records so one unreadable file never stops a run (borg's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_CHANGES = 1
EXIT_ERROR = 2


class IntegrityError(Exception):
    """A fatal error: one line for the user and the exit status to leave with."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PolicyError(IntegrityError):
    """The policy file is missing, unreadable or invalid (names file and key)."""


class DatabaseError(IntegrityError):
    """The database cannot be opened, is corrupt, not ours, or of another schema."""


class BaselineError(IntegrityError):
    """The requested operation conflicts with the baseline's state."""


class UsageError(IntegrityError):
    """Arguments that make no sense together or name nothing we protect."""


@dataclass(frozen=True)
class ScanWarning:
    """A per-file problem: 'operation failed for path: cause (consequence)'."""

    path: bytes
    operation: str
    cause: str
    consequence: str = "skipped"

    @property
    def error(self) -> str:
        return f"{self.operation} failed: {self.cause} ({self.consequence})"


@dataclass(frozen=True)
class Vanished(ScanWarning):
    """A path gone from the tree (deleted, or a directory on the way replaced) when it
    was to be read: for an entry of the baseline that is a removal, not an error."""

    consequence: str = "vanished during scan"
