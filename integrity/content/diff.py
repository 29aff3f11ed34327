"""Unified diffs of kept texts, and the one way they are cut short for small outputs."""

from __future__ import annotations

import difflib

#: What an event keeps of a diff; chat and syslog cut further (`shorten`).
STORED_DIFF_BYTES = 64 << 10
NOT_KEPT_SECRET = "content not kept (secret)"


def unified(old: bytes, new: bytes, path: str) -> str:
    """A unified diff, baseline -> live, with three lines of context."""
    before = old.decode("utf-8", "replace").splitlines(keepends=True)
    after = new.decode("utf-8", "replace").splitlines(keepends=True)
    lines = difflib.unified_diff(before, after, f"{path} (baseline)", f"{path} (live)")
    return shorten("".join(line if line.endswith("\n") else line + "\n\\ No newline at "
                           "end of file\n" for line in lines), STORED_DIFF_BYTES)


def shorten(diff: str, limit: int) -> str:
    """At most `limit` bytes of a diff, cut at a line, with a note saying what was left
    out: a chat message, a syslog line or an event must never carry it all."""
    if len(diff.encode()) <= limit:
        return diff
    lines = diff.splitlines(keepends=True)
    kept: list[str] = []
    size = 0
    for line in lines:
        size += len(line.encode())
        if size > limit - 80:
            break
        kept.append(line)
    return "".join(kept) + f"[diff truncated: {len(lines) - len(kept)} more lines]\n"
