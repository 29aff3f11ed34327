"""What the central copy says about the fleet: every host's state, events across hosts.

A host is flagged when it has been silent for more than three of its push intervals
(counted from enrolment when it never reported), when its chain forked, when it
has an unresolved flag (a root changed without an approval, a baseline replaced), or
when the signature of the root held for it does not verify.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from integrity.paths import display, from_key
from integrity.policy.fleet import DEFAULT_INTERVAL
from integrity.policy.severity import SEVERITIES
from integrity.store.central import Central
from integrity.times import iso

#: Intervals of silence after which a host is flagged (the dead-man's switch).
SILENT_INTERVALS = 3


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Naive UTC from an aware time (what times.iso prints)."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None)


def host_json(row: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """One host's status object, from its central row."""
    from integrity.trust import fingerprint

    interval = row["interval_s"] or DEFAULT_INTERVAL
    since = row["last_seen"] or row["enrolled"]
    quiet = (now - since).total_seconds()
    silent = quiet > SILENT_INTERVALS * interval
    if row["forked"] is not None:
        chain = "forked"
    elif row["head_seq"] is None:
        chain = "none yet"
    else:
        chain = "ok"
    opened: dict[str, int] = row["opened"]
    flags = [{"id": f["id"], "kind": f["kind"], "detail": f["detail"],
              "raised": iso(_utc(f["raised"]))} for f in row["flags"]]
    complete = row["entries"] is not None and row["entries"] == row["central_entries"]
    signature = _signature(row)
    return {
        "host": row["name"], "group": row["grp"] or row["reported_group"] or "default",
        "group_reported": row["reported_group"], "group_pinned": row["grp"],
        "enrolled": iso(_utc(row["enrolled"])), "last_seen": iso(_utc(row["last_seen"])),
        "seconds_since": int(quiet), "interval": interval, "silent": silent,
        "watcher": row["watcher"], "version": row["version"],
        "unpushed": row["unpushed"],
        "events": {"open": sum(opened.values()),
                   **{severity: opened.get(severity, 0) for severity in SEVERITIES}},
        "baseline": None if row["push"] is None else {
            "root": row["root"], "generation": row["generation"],
            "entries": row["entries"], "central_entries": row["central_entries"],
            "complete": complete, "signed": signature == "valid", "signature": signature,
            "signer": fingerprint(bytes(row["signer"])) if row["signer"] else None,
            "received": iso(_utc(row["baseline_received"]))},
        "chain": {"state": chain, "head": row["head_digest"], "records": row["chain_rows"],
                  "epoch": row["epoch"], "forked": iso(_utc(row["forked"]))},
        "flags": flags, "requests_pending": row["pending"],
        "healthy": not silent and row["forked"] is None and not flags
        and signature != "invalid",
    }


def _signature(row: dict[str, Any]) -> str | None:
    """Whether the held root's signature verifies with the key it names: "valid",
    "invalid", or None when the host sent none. Checked here, on the root, signature
    and key central holds: a host's role can push any bytes as a signature."""
    from integrity.trust import signature_valid

    if row["push"] is None or not row["signature"]:
        return None
    if row["signer"] and row["root"] and signature_valid(
            row["root"], bytes(row["signature"]), bytes(row["signer"])):
        return "valid"
    return "invalid"


def status(central: Central) -> dict[str, Any]:
    """Every host's state, and whether all are healthy."""
    now, rows = central.reads.hosts()
    found = [host_json(row, now) for row in rows]
    return {"hosts": found, "healthy": all(h["healthy"] for h in found),
            "flagged": sum(not h["healthy"] for h in found)}


def events(central: Central, *, host: str | None = None, open_only: bool = False,
           since: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Events across hosts as local `events --json` shows them, plus `host`."""
    return [event_json(row) for row in central.reads.events(
        host=host, open_only=open_only, since=since)]


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    """One central event row in SPEC's event form (EventDoc), with its host."""
    def parsed(text: str | None) -> Any:
        try:
            return json.loads(text) if text else None
        except ValueError:
            return text

    return {
        "host": row["name"], "id": row["id"], "time": iso(row["first_seen"]),
        "last_seen": iso(row["last_seen"]), "path": display(from_key(bytes(row["key"]))),
        "kind": row["kind"], "changed": row["changed"].split(",") if row["changed"] else [],
        "source": row["source"], "rule": row["rule"], "severity": row["severity"],
        "status": row["status"], "classification": row["classification"],
        "count": row["count"], "actor": parsed(row["actor"]), "old": parsed(row["old"]),
        "new": parsed(row["new"]), "approval": row["approval_id"],
        "evidence": row["evidence"], "diff": row["diff"], "chain": row["chain"],
    }
