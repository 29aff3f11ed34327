"""Text for people from the fleet commands (JSON goes through report.dump_json).

Host names are checked at enrolment, but paths, flag details and event fields come
from hosts, any of which may be compromised: every line is passed through
`paths.escape`, so a control character in them cannot forge a line of this output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TextIO

from integrity.alerts.text import actor_text
from integrity.paths import escape

if TYPE_CHECKING:
    from integrity.fleet.push import PushReport

_SHORT = 16


def _line(out: TextIO, text: str) -> None:
    out.write(escape(text) + "\n")


def _age(seconds: int) -> str:
    """45s, 12m, 5h, 3d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _short(digest: str | None) -> str:
    return f"{digest[:_SHORT]}…" if digest else "-"


def status_text(data: dict[str, Any], out: TextIO) -> None:
    """One line per host, then the reasons for every flagged one."""
    hosts = data["hosts"]
    if not hosts:
        _line(out, "no hosts enrolled (integrity fleet enroll HOST)")
        return
    width = max(len(h["host"]) for h in hosts)
    for host in hosts:
        seen = ("never seen" if host["last_seen"] is None
                else f"seen {_age(host['seconds_since'])} ago")
        watcher = host["watcher"] or {}
        alive = ("watcher alive" if watcher.get("alive") else
                 f"watcher {watcher.get('state') or 'none'}")
        events = host["events"]
        opened = "/".join(str(events[s]) for s in ("critical", "high", "medium", "low"))
        baseline = host["baseline"]
        root = _short(baseline["root"]) if baseline else "no baseline"
        if baseline:
            root += f" gen {baseline['generation']}"
            if not baseline["complete"]:
                root += f" (copy {baseline['central_entries']}/{baseline['entries']})"
        mark = "ok" if host["healthy"] else "FLAGGED"
        _line(out, f"{host['host']:<{width}}  {mark:<7}  group {host['group']}  {seen}  "
                   f"{alive}  open c/h/m/l {opened}  root {root}  "
                   f"chain {host['chain']['state']}")
        if host["silent"]:
            _line(out, f"    silent: nothing for {_age(host['seconds_since'])}, more than "
                       f"3 intervals of {host['interval']:g} s")
        if baseline and baseline["signature"] == "invalid":
            _line(out, f"    signature does not verify: root {_short(baseline['root'])} is "
                       f"not signed by {baseline['signer'] or 'the key it names'} "
                       "(the host pushed a signature that is not one)")
        for flag in host["flags"]:
            _line(out, f"    {flag['kind']} (flag {flag['id']}, {flag['raised']}): "
                       f"{flag['detail']}")
        if host["requests_pending"]:
            _line(out, f"    {host['requests_pending']} request(s) waiting for its next push")
    _line(out, f"{len(hosts)} hosts, {data['flagged']} flagged")


def events_text(rows: list[dict[str, Any]], out: TextIO) -> None:
    """One line per event: host, id, time, status, severity, kind, path, what changed."""
    if not rows:
        _line(out, "no events")
        return
    for row in rows:
        changed = ",".join(row["changed"]) or row["kind"]
        count = f" x{row['count']}" if (row["count"] or 1) > 1 else ""
        actor = actor_text(row["actor"])
        _line(out, f"{row['host']} {row['id']:>6} {row['time']} {row['status']:<8} "
                   f"{row['severity']:<8} {row['kind']:<8} {row['path']}  {changed}"
                   f"{count}" + (f" {actor}" if actor else ""))


def drift_text(items: list[dict[str, Any]], out: TextIO) -> None:
    """Per path: the majority, then each host that differs."""
    if not items:
        _line(out, "no drift: every host agrees with its group")
        return
    for item in items:
        majority = item["majority"]
        if majority is None:
            head = "no majority"
        elif majority.get("absent"):
            head = f"absent on {majority['hosts']} of {item['hosts']} hosts"
        else:
            head = (f"{majority['hosts']} of {item['hosts']} hosts: {majority['type']} "
                    f"mode {majority['mode']} content {_short(majority['content'])}")
        _line(out, f"{item['path']}  [{item['group']}] {head}")
        for outlier in item["outliers"]:
            if outlier["state"] == "missing":
                text = "missing"
            else:
                what = ",".join(outlier.get("changed") or []) or outlier["state"]
                text = (f"{what}: {outlier['type']} mode {outlier['mode']} content "
                        f"{_short(outlier['content'])}"
                        + (f" -> {outlier['link']}" if outlier.get("link") else ""))
            _line(out, f"    {outlier['host']}: {text}")
    hosts = {o["host"] for item in items for o in item["outliers"]}
    _line(out, f"{len(items)} paths differ, on {len(hosts)} hosts")


def push_text(report: PushReport, out: TextIO) -> None:
    """What a push sent."""
    for line in report.repaired:
        _line(out, f"repaired: {line}")
    for line in report.requests:
        _line(out, line)
    parts = [f"{report.ledger} chain records"]
    if report.push is not None:
        state = "" if report.accepted else " (already held, or refused: see fleet status)"
        parts.append(f"baseline generation {report.generation} ({report.kind}, "
                     f"{report.entries} entries){state}")
    parts.append("heartbeat")
    _line(out, f"pushed as {report.host}: " + ", ".join(parts)
          + (f"; {report.unpushed} records still owed" if report.unpushed else ""))
