"""Render scans for people (text) and programs (JSON, exactly as SPEC)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from integrity.alerts.text import actor_text, clean
from integrity.paths import display
from integrity.policy import Rule
from integrity.record import json_value as value
from integrity.scan import Progress
from integrity.scan.compare import ADDED, MODIFIED, REMOVED, Change, change_states
from integrity.times import iso

if TYPE_CHECKING:
    from integrity.ops.approve import ApprovalOutcome
    from integrity.ops.verify import Verification
    from integrity.store.events import EventDoc

KINDS = (ADDED, REMOVED, MODIFIED)


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


def verify_json(verification: Verification) -> dict[str, Any]:
    """The whole `verify --json` document."""
    baseline, result = verification.baseline, verification.result
    return {
        "baseline": {"created": iso(baseline.created), "entries": baseline.entries},
        "summary": {"scanned": result.scanned, "added": result.count(ADDED),
                    "removed": result.count(REMOVED), "modified": result.count(MODIFIED),
                    "errors": len(result.warnings)},
        "changes": [change_json(c, result.rules.get(c.path)) for c in result.changes],
        "errors": [{"path": display(w.path), "error": w.error} for w in result.warnings],
    }


def _short(name: str, raw: Any) -> str:
    shown = value(name, raw)
    if name in ("content", "xattrs") and shown:
        return str(shown)[:16] + "…"
    return "-" if shown is None else str(shown)


def verify_text(verification: Verification, out: TextIO) -> None:
    """Text report: a summary line, then changes grouped by kind, then errors."""
    baseline, result = verification.baseline, verification.result
    out.write(f"{result.scanned} entries checked against the baseline of "
              f"{iso(baseline.created)} ({baseline.entries} entries): "
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


def approval_json(outcome: ApprovalOutcome) -> dict[str, Any]:
    """An approval's outcome as JSON."""
    return {
        "approval": outcome.approval_id,
        "approved": [{"path": display(a.path), "kind": a.kind, "evidence": a.evidence}
                     for a in outcome.approved],
        "written": [display(p) for p in outcome.written],
        "left_open": [{"path": display(item.path), "kind": item.kind,
                       "reason": item.reason} for item in outcome.left_open],
        "root": outcome.root,
    }


def approval_text(outcome: ApprovalOutcome, out: TextIO) -> None:
    """What an approval approved, wrote and left open."""
    for a in outcome.approved:
        evidence = f" ({a.evidence})" if a.evidence else ""
        out.write(f"approved {a.kind} {display(a.path)}{evidence}\n")
    approved = {a.path for a in outcome.approved}
    for path in outcome.written:
        if path not in approved:
            out.write(f"baseline updated {display(path)}\n")
    for item in outcome.left_open:
        out.write(f"left open {item.kind} {display(item.path)}: {item.reason}\n")
    if outcome.approval_id is None:
        out.write("nothing approved\n")
        return
    out.write(f"root {outcome.root}\n")
    out.write(f"approval {outcome.approval_id}: {len(outcome.approved)} events closed, "
              f"{len(outcome.written)} baseline entries written"
              + (f", {len(outcome.left_open)} left open" if outcome.left_open else "") + "\n")


def events_text(rows: Sequence[EventDoc], out: TextIO) -> None:
    """One line per event, oldest first."""
    if not rows:
        out.write("no events\n")
        return
    for row in rows:
        changed = ",".join(row["changed"]) or row["kind"]
        count = f" x{row['count']}" if row["count"] > 1 else ""
        extra = f" [{row['classification']}, {row['evidence']}]" if row["evidence"] else ""
        if not extra and row["classification"] == "package-manager":
            extra = " [package-manager]"
        if row.get("ticket"):
            extra += f" [expected, window {row['window']}, ticket {row['ticket']}]"
        actor = actor_text(row["actor"])
        out.write(clean(f"{row['id']:>6} {row['time']} {row['status']:<8} "
                        f"{row['severity']:<8} {row['kind']:<8} {row['path']}  {changed}"
                        f"{count}{extra}" + (f" {actor}" if actor else "")) + "\n")


def status_text(data: dict[str, Any], out: TextIO) -> None:
    """Status for people."""
    baseline = data["baseline"]
    if baseline is None:
        out.write("baseline: none (run 'integrity init')\n")
    else:
        out.write(f"baseline: {baseline['entries']} entries, created {baseline['created']}"
                  f" ({_age(baseline['age_seconds'])} ago) from {baseline['policy']}\n")
        if baseline.get("root"):
            out.write(f"root digest: {baseline['root']}\n")
    events = data["events"]
    by = ", ".join(f"{events[s]} {s}" for s in ("critical", "high", "medium", "low")
                   if events[s])
    out.write(f"open events: {events['open']}" + (f" ({by})" if by else "") + "\n")
    watcher = data["watcher"]
    if watcher["alive"]:
        out.write("watcher: alive, pid {pid}, {watches} watches, heartbeat {heartbeat}\n"
                  .format(**watcher))
        for line in watcher["unwatched"]:
            out.write(f"  on scheduled scanning: {line}\n")
    elif watcher["stale"]:
        out.write("watcher: STALE, pid {pid} on {host}, last heartbeat {heartbeat}\n"
                  .format(**watcher))
    else:
        out.write("watcher: not running\n")
    chain = data["chain"]
    if chain["ok"]:
        out.write(f"event log: {chain['rows']} chained records, head {chain['head']}\n")
    else:
        out.write(f"event log: TAMPERING: the hash chain is broken "
                  f"({len(chain['problems'])} problems)\n")
        for problem in chain["problems"]:
            out.write(f"  {problem}\n")
    scan = data["last_scan"]
    if scan is None:
        out.write("last scan: none\n")
    else:
        out.write(f"last scan: {scan['source']}{' --fast' if scan['fast'] else ''} at "
                  f"{scan['time']}: {scan['scanned']} scanned, {scan['added']} added, "
                  f"{scan['removed']} removed, {scan['modified']} modified, "
                  f"{scan['errors']} errors\n")
    if data.get("windows"):
        from integrity.report_usage import windows_text
        windows_text(data["windows"], out)
    for sink in data.get("alerts", []):
        state = "FAILING" if sink["failing"] else "pending"
        out.write(f"alerts: {sink['sink']}: {state}: {sink['undelivered']} undelivered "
                  f"since {sink['since']}, {sink['attempts']} attempts"
                  + (f"; last error: {sink['last_error']}" if sink["last_error"] else "")
                  + "\n")


def _age(seconds: int) -> str:
    """A duration the way people say it: 45s, 12m, 5h, 3d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"
