"""`fleet monitor`: the dead-man's switch, and alerts only a central place can raise.

Every round it raises an alert (once, remembered in the central database) for:

- a host silent for more than three of its push intervals (a host cannot report its
  own death: someone pulled its network, stopped the service, or powered it off);
- an unresolved flag: a forked chain (the host's local database was rolled back or
  rewritten), a root changed without an approval, a baseline replaced by init;
- a root held for a host whose signature does not verify (once per root);
- a critical event that arrived from any host.

Alerts go to the [[alert]] sinks of the policy given to the monitor and are owed per
sink in the central database until taken, so a sink that is down, or a restart of the
monitor, loses none and repeats none; several monitors may run (alerts being
delivered are locked, the others skip them).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from integrity.errors import IntegrityError
from integrity.fleet.status import SILENT_INTERVALS, event_json, host_json
from integrity.policy.severity import at_least
from integrity.store.central import Central

if TYPE_CHECKING:
    from integrity.alerts import Sink

log = logging.getLogger(__name__)

ROUND_SECONDS = 15.0
#: Critical events that arrived longer ago than this are history, not news.
NEWS = dt.timedelta(days=1)
SEVERITY = {"forked": "critical", "root": "critical", "replaced": "critical",
            "signature": "critical", "silent": "high"}


def _alert(kind: str, host: str, detail: str, when: str | None, severity: str,
           ident: int) -> dict[str, Any]:
    """A fleet finding in the form every sink takes (an event: a warning naming the host)."""
    return {
        "id": ident, "time": when, "last_seen": when, "host": host,
        "path": f"host {host}", "kind": "warning", "changed": [],
        "source": "fleet-monitor", "rule": None, "severity": severity, "status": "open",
        "classification": f"fleet-{kind}", "count": 1, "actor": None, "old": None,
        "new": {"warning": f"{kind}: {detail}"}, "approval": None, "evidence": None,
        "diff": None, "chain": None,
        "fleet": {"kind": kind, "host": host, "detail": detail},
    }


class Monitor:
    """Raises and delivers fleet alerts; `round` is the whole job, `run` repeats it."""

    def __init__(self, central: Central, sinks: Sequence[Sink], *,
                 every: float = ROUND_SECONDS) -> None:
        self.central = central
        self.sinks = list(sinks)
        self.every = every
        self._failing: dict[str, str] = {}

    def run(self, stop: threading.Event, ready: Callable[[], Any] | None = None) -> None:
        """Rounds until `stop` is set; problems are logged once each, never fatal."""
        first = True
        while not stop.is_set():
            try:
                raised, sent = self.round()
                if raised or sent:
                    log.info("fleet monitor: %d alerts raised, %d delivered", raised, sent)
                self._recovered("database")
            except IntegrityError as exc:
                self._problem("database", str(exc))
            if first and ready is not None:
                ready()
                first = False
            stop.wait(self.every)

    def round(self) -> tuple[int, int]:
        """Raise what is new, deliver what is owed: (raised, delivered)."""
        return self.raise_alerts(), self.deliver()

    # -- raising -----------------------------------------------------------------

    def _row(self, key: str, kind: str, host_id: int | None, event: dict[str, Any]
             ) -> dict[str, Any]:
        wanted = [s.name for s in self.sinks if at_least(event["severity"], s.min_severity)]
        return {"key": key, "kind": kind, "host_id": host_id, "event": event,
                "pending": wanted, "attempts": 0}

    def raise_alerts(self) -> int:
        """Record an alert for every finding not alerted yet; returns how many."""
        rows: list[dict[str, Any]] = []
        with self.central.alerts.raising() as session:
            known = session.known()
            ids = session.host_ids()
            now, hosts = session.hosts()
            for host in (host_json(row, now) for row in hosts):
                name = host["host"]
                for flag in host["flags"]:
                    key = f"flag:{flag['id']}"
                    if key not in known:
                        rows.append(self._row(key, flag["kind"], ids[name], _alert(
                            flag["kind"], name, flag["detail"], flag["raised"],
                            SEVERITY.get(flag["kind"], "high"), flag["id"])))
                baseline = host["baseline"]
                if baseline and baseline["signature"] == "invalid":
                    key = f"signature:{name}:{baseline['root']}"
                    if key not in known:
                        detail = (f"root {baseline['root']}: its signature does not verify "
                                  f"with the key it names ({baseline['signer']})")
                        rows.append(self._row(key, "signature", ids[name], _alert(
                            "signature", name, detail, baseline["received"],
                            SEVERITY["signature"], 0)))
                if host["silent"]:
                    since = host["last_seen"] or host["enrolled"]
                    key = f"silent:{name}:{since}"
                    if key not in known:
                        seen = (f"last seen {host['last_seen']}" if host["last_seen"]
                                else f"never reported since enrolment at {since}")
                        detail = (f"silent for {host['seconds_since']} s, more than "
                                  f"{SILENT_INTERVALS} push intervals of "
                                  f"{host['interval']:g} s ({seen})")
                        rows.append(self._row(key, "silent", ids[name], _alert(
                            "silent", name, detail, since, SEVERITY["silent"], 0)))
            for row in session.critical(NEWS):
                key = f"event:{row['uid']}"
                if key in known:
                    continue
                event = event_json(row)
                event["path"] = f"{row['name']}:{event['path']}"
                rows.append(self._row(key, "event", row["host_id"], event))
            session.add(rows)
        return len(rows)

    # -- delivering --------------------------------------------------------------

    def deliver(self) -> int:
        """Hand owed alerts to their sinks; a failing sink keeps its alerts owed."""
        from integrity.alerts import DeliveryError

        names = {s.name for s in self.sinks}
        sent = 0
        with self.central.alerts.owed() as batch:
            if not batch.owed:
                return 0
            left = {row.id: [n for n in row.pending if n in names] for row in batch.owed}
            errors: dict[int, str] = {}
            for sink in self.sinks:
                mine = [row for row in batch.owed if sink.name in left[row.id]]
                if not mine:
                    continue
                groups = [mine] if sink.digest else [[row] for row in mine]
                try:
                    for group in groups:
                        sink.deliver([row.event for row in group])  # type: ignore[misc]
                        for row in group:
                            left[row.id].remove(sink.name)
                        sent += len(group)
                    self._recovered(sink.name)
                except DeliveryError as exc:
                    self._problem(sink.name, str(exc))
                    for row in mine:
                        if sink.name in left[row.id]:
                            errors[row.id] = str(exc)
            for row in batch.owed:
                batch.settle(row.id, left[row.id], errors.get(row.id))
        return sent

    def _problem(self, what: str, message: str) -> None:
        if self._failing.get(what) != message:
            log.error("fleet monitor: %s", message)
        self._failing[what] = message

    def _recovered(self, what: str) -> None:
        if self._failing.pop(what, None) is not None:
            log.info("fleet monitor: %s works again", what)
