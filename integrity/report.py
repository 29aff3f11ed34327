"""Render scans for people (text) and programs (JSON, exactly as SPEC)."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any, TextIO

from .compare import ADDED, MODIFIED, REMOVED, Change, change_states
from .paths import display
from .policy import Rule
from .record import FileRecord, iso_ns, json_value as value
from .scan import Progress, ScanResult

KINDS = (ADDED, REMOVED, MODIFIED)


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, from a naive UTC datetime."""
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def change_json(change: Change, rule: Rule | None) -> dict[str, Any]:
    """One change as SPEC's JSON object."""
    out: dict[str, Any] = {
        "path": display(change.path), "kind": change.kind,
        "rule": rule.name if rule else None,
        "severity": rule.severity if rule else None,
        "changed": list(change.changed),
    }
    out["old"], out["new"] = change_states(change)
    return out


def verify_json(result: ScanResult) -> dict[str, Any]:
    """The whole `verify --json` document."""
    baseline = result.baseline
    return {
        "baseline": {"created": iso(baseline.created) if baseline else None,
                     "entries": baseline.entries if baseline else 0},
        "summary": {"scanned": result.scanned, "added": result.count(ADDED),
                    "removed": result.count(REMOVED), "modified": result.count(MODIFIED),
                    "errors": len(result.warnings)},
        "changes": [change_json(c, result.rules.get(c.path)) for c in result.changes],
        "errors": [{"path": display(w.path), "error": w.error} for w in result.warnings],
    }


def _short(name: str, raw: Any) -> str:
    shown = value(name, raw)
    if name in ("content", "xattrs") and shown:
        return shown[:16] + "…"
    return "-" if shown is None else str(shown)


def verify_text(result: ScanResult, out: TextIO) -> None:
    """Text report: a summary line, then changes grouped by kind, then errors."""
    baseline = result.baseline
    out.write(f"{result.scanned} entries checked against the baseline of "
              f"{iso(baseline.created) if baseline else '?'} "
              f"({baseline.entries if baseline else 0} entries): "
              f"{result.count(ADDED)} added, {result.count(REMOVED)} removed, "
              f"{result.count(MODIFIED)} modified, {len(result.warnings)} errors\n")
    for kind in KINDS:
        changes = [c for c in result.changes if c.kind == kind]
        if not changes:
            continue
        out.write(f"\n{kind.capitalize()} ({len(changes)}):\n")
        for change in changes:
            rule = result.rules.get(change.path)
            tag = f"  [{rule.severity}, rule {rule.name}]" if rule else ""
            rec = change.new or change.old
            detail = ", ".join(change.changed) if change.changed else (rec.type if rec else "")
            out.write(f"  {display(change.path)}  {detail}{tag}\n")
            for name in change.changed:
                out.write(f"      {name}: {_short(name, getattr(change.old, name))} -> "
                          f"{_short(name, getattr(change.new, name))}\n")
    if result.warnings:
        out.write(f"\nErrors ({len(result.warnings)}):\n")
        for w in result.warnings:
            out.write(f"  {w.operation} failed for '{display(w.path)}': {w.cause} "
                      f"({w.consequence})\n")


def dump_json(data: Any, out: TextIO) -> None:
    """Pretty JSON followed by a newline."""
    json.dump(data, out, indent=2, ensure_ascii=False)
    out.write("\n")


class TerminalProgress:
    """A one-line progress display on a terminal: files, bytes, rate."""

    def __init__(self, label: str, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.last = 0.0
        self.shown = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - progress.started, 1e-6)
        self.stream.write(f"\r{self.label}: {progress.files:,} files, "
                          f"{progress.bytes / 1e6:,.0f} MB, "
                          f"{progress.files / elapsed:,.0f} files/s, "
                          f"{progress.bytes / 1e6 / elapsed:,.0f} MB/s\x1b[K")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        """Clear the line so the report starts on a clean one."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def make_progress(label: str, quiet: bool) -> tuple[Progress | None, TerminalProgress | None]:
    """A Progress with a terminal display when stderr is a terminal, else none."""
    if quiet or not sys.stderr.isatty():
        return None, None
    display_ = TerminalProgress(label)
    return Progress(tick=display_), display_
