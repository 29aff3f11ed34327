"""Render scans for people (text) and programs (JSON, exactly as SPEC).

Text is for terminals, logs and the apt hook's syslog lines, so every line goes out
through `paths.escape`: a file name cannot forge a line ("Removed (0):"), move the
cursor or retitle a window. JSON keeps every value exact.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from integrity.alerts.text import actor_text
from integrity.paths import display, escape
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


def change_json(change: Change, rule: Rule | None, diff: str | None = None
                ) -> dict[str, Any]:
    """One change as SPEC's JSON object (with `diff` for a kept text)."""
    out: dict[str, Any] = {
        "path": display(change.path), "kind": change.kind,
        "rule": rule.name if rule else None,
        "severity": rule.severity if rule else None,
        "changed": list(change.changed),
    }
    out["old"], out["new"] = change_states(change)
    if diff is not None:
        out["diff"] = diff
    return out


def verify_json(verification: Verification) -> dict[str, Any]:
    """The whole `verify --json` document."""
    baseline, result = verification.baseline, verification.result
    return {
        "baseline": {"created": iso(baseline.created), "entries": baseline.entries},
        "summary": {"scanned": result.scanned, "added": result.count(ADDED),
                    "removed": result.count(REMOVED), "modified": result.count(MODIFIED),
                    "errors": len(result.warnings)},
        "changes": [change_json(c, result.rules.get(c.path), verification.diffs.get(c.path))
                    for c in result.changes],
        "errors": [{"path": display(w.path), "error": w.error} for w in result.warnings],
        "policy": {"sealed": not verification.policy_changes,
                   "differences": verification.policy_changes},
    }


def _short(name: str, raw: Any) -> str:
    shown = value(name, raw)
    if name in ("content", "xattrs") and shown:
        return str(shown)[:16] + "…"
    return "-" if shown is None else str(shown)


def _put(out: TextIO, text: str = "") -> None:
    """One line of text output, escaped (so it stays one line)."""
    out.write(escape(text) + "\n")


def verify_text(verification: Verification, out: TextIO) -> None:
    """Text report: a summary line, then changes grouped by kind, then errors."""
    baseline, result = verification.baseline, verification.result
    _put(out, f"{result.scanned} entries checked against the baseline of "
              f"{iso(baseline.created)} ({baseline.entries} entries): "
              f"{result.count(ADDED)} added, {result.count(REMOVED)} removed, "
              f"{result.count(MODIFIED)} modified, {len(result.warnings)} errors")
    for kind in KINDS:
        changes = [c for c in result.changes if c.kind == kind]
        if not changes:
            continue
        _put(out)
        _put(out, f"{kind.capitalize()} ({len(changes)}):")
        for change in changes:
            rule = result.rules.get(change.path)
            tag = f"  [{rule.severity}, rule {rule.name}]" if rule else ""
            rec = change.new or change.old
            detail = ", ".join(change.changed) if change.changed else (rec.type if rec else "")
            _put(out, f"  {display(change.path)}  {detail}{tag}")
            for name in change.changed:
                _put(out, f"      {name}: {_short(name, getattr(change.old, name))} -> "
                          f"{_short(name, getattr(change.new, name))}")
            diff = verification.diffs.get(change.path)
            for line in diff.splitlines() if diff else ():
                _put(out, f"      {line}")
    if verification.policy_changes:
        _put(out)
        _put(out, "Policy: the policy file differs from the sealed policy, which was "
                  "verified instead (accept it with 'integrity approve --policy'):")
        for difference in verification.policy_changes:
            _put(out, f"  {difference}")
    if result.warnings:
        _put(out)
        _put(out, f"Errors ({len(result.warnings)}):")
        for w in result.warnings:
            _put(out, f"  {w.operation} failed for '{display(w.path)}': {w.cause} "
                      f"({w.consequence})")


def dump_json(data: Any, out: TextIO) -> None:
    """Pretty JSON followed by a newline."""
    json.dump(data, out, indent=2, ensure_ascii=False)
    out.write("\n")


class EscapingFormatter(logging.Formatter):
    """Log records whose message is escaped: the daemon logs paths to journald, where
    a newline in a name would otherwise forge a log line. A traceback (-vv) keeps its
    lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's
        return escape(super().formatMessage(record))


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
    # Paths and reasons (which quote paths, tools' messages) are shown escaped.
    for a in outcome.approved:
        evidence = f" ({a.evidence})" if a.evidence else ""
        _put(out, f"approved {a.kind} {display(a.path)}{evidence}")
    approved = {a.path for a in outcome.approved}
    for path in outcome.written:
        if path not in approved:
            _put(out, f"baseline updated {display(path)}")
    for item in outcome.left_open:
        _put(out, f"left open {item.kind} {display(item.path)}: {item.reason}")
    if outcome.approval_id is None:
        _put(out, "nothing approved")
        return
    _put(out, f"root {outcome.root}")
    _put(out, f"approval {outcome.approval_id}: {len(outcome.approved)} events closed, "
              f"{len(outcome.written)} baseline entries written"
              + (f", {len(outcome.left_open)} left open" if outcome.left_open else ""))


def events_text(rows: Sequence[EventDoc], out: TextIO) -> None:
    """One line per event, oldest first."""
    if not rows:
        _put(out, "no events")
        return
    for row in rows:
        changed = ",".join(row["changed"]) or row["kind"]
        count = f" x{row['count']}" if row["count"] > 1 else ""
        extra = f" [{row['classification']}, {row['evidence']}]" if row["evidence"] else ""
        if not extra and row["classification"] == "package-manager":
            extra = " [package-manager]"
        if row.get("ticket"):
            what = "opened" if row["kind"] == "window" else "expected"
            extra += f" [{what}, window {row['window']}, ticket {row['ticket']}]"
        actor = actor_text(row["actor"])
        _put(out, f"{row['id']:>6} {row['time']} {row['status']:<8} "
                  f"{row['severity']:<8} {row['kind']:<8} {row['path']}  {changed}"
                  f"{count}{extra}" + (f" {actor}" if actor else ""))


def status_text(data: dict[str, Any], out: TextIO) -> None:
    """Status for people."""
    baseline = data["baseline"]
    if baseline is None:
        _put(out, "baseline: none (run 'integrity init')")
    else:
        _put(out, f"baseline: {baseline['entries']} entries, created {baseline['created']}"
                  f" ({_age(baseline['age_seconds'])} ago) from {baseline['policy']}")
        seal = baseline["seal"]
        if seal["valid"]:
            signed = (f", signed by {seal['signer']}" if baseline["signed"] else
                      ", not signed")
            _put(out, f"root digest: {baseline['root']} (seal verified, generation "
                      f"{seal['generation']}{signed})")
            if seal["version"] < 2:
                _put(out, "  a version 1 seal: it covers the entries but not the policy; "
                          "seal the policy in with 'integrity approve --policy'")
        else:
            _put(out, f"root digest: TAMPERING: {seal['problem']}")
    policy = data.get("policy") or {}
    if policy.get("error"):
        _put(out, f"policy: INVALID: {policy['error']}")
    if policy.get("differences"):
        _put(out, f"policy: {policy['source']} DIFFERS from the sealed policy (verify "
                  "follows the sealed one until 'approve --policy'): "
                  + "; ".join(policy["differences"]))
    events = data["events"]
    by = ", ".join(f"{events[s]} {s}" for s in ("critical", "high", "medium", "low")
                   if events[s])
    _put(out, f"open events: {events['open']}" + (f" ({by})" if by else ""))
    watcher = data["watcher"]
    if watcher["alive"]:
        _put(out, "watcher: alive, pid {pid}, {watches} watches, heartbeat {heartbeat}"
                  .format(**watcher))
        for line in watcher["unwatched"]:
            _put(out, f"  on scheduled scanning: {line}")
    elif watcher["stale"]:
        _put(out, "watcher: STALE, pid {pid} on {host}, last heartbeat {heartbeat}"
                  .format(**watcher))
    else:
        _put(out, "watcher: not running")
    chain = data["chain"]
    if chain["ok"]:
        _put(out, f"event log: {chain['rows']} chained records, head {chain['head']}")
    else:
        _put(out, f"event log: TAMPERING: the hash chain is broken "
                  f"({len(chain['problems'])} problems)")
        for problem in chain["problems"]:
            _put(out, f"  {problem}")
    scan = data["last_scan"]
    if scan is None:
        _put(out, "last scan: none")
    else:
        _put(out, f"last scan: {scan['source']}{' --fast' if scan['fast'] else ''} at "
                  f"{scan['time']}: {scan['scanned']} scanned, {scan['added']} added, "
                  f"{scan['removed']} removed, {scan['modified']} modified, "
                  f"{scan['errors']} errors")
    if data.get("windows"):
        from integrity.report_usage import windows_text
        windows_text(data["windows"], out)
    for sink in data.get("alerts", []):
        state = "FAILING" if sink["failing"] else "pending"
        if sink.get("in_policy") is False:
            state = ("NOT IN THE POLICY (dropped, and reported to the other sinks, when "
                     "the watcher starts or reloads)")
        _put(out, f"alerts: {sink['sink']}: {state}: {sink['undelivered']} undelivered "
                  f"since {sink['since']}, {sink['attempts']} attempts"
                  + (f"; last error: {sink['last_error']}" if sink["last_error"] else ""))
    for drop in data.get("alerts_dropped", []):
        _put(out, f"alerts: {drop['sink']}: DROPPED at {drop['time']}, no longer in the "
                  f"policy: {drop['alerts']} undelivered (highest {drop['severity']}, "
                  f"owed since {drop['since']}); see event {drop['event']}")


def _age(seconds: int) -> str:
    """A duration the way people say it: 45s, 12m, 5h, 3d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"
