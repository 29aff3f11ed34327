"""The dispatcher: delivers the outbox to the alert sinks, in a thread of its own.

Recording never waits for a sink: it writes outbox rows and wakes this thread. A
machine sink (jsonl, syslog, exec, JSON webhook) gets every event at once, one per
call, in order. A sink people read (e-mail, chat webhooks) gets a burst as one
digest: the dispatcher waits `gather` seconds after the first alert of a quiet
spell so the rest of the burst joins it, and sends at most one message per
`interval`. A failure keeps the sink's alerts in the outbox with a growing delay
(outbox.BACKOFF), in order, and is logged once; `status` shows the backlog.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from integrity.alerts import Route, routes_of
from integrity.times import iso, utcnow

if TYPE_CHECKING:
    from integrity.alerts import Sink
    from integrity.store import Store
    from integrity.store.events import EventDoc

log = logging.getLogger(__name__)

#: Seconds a digest waits after the first alert of a burst for the rest of it.
GATHER_SECONDS = 10.0
#: Machine-sink deliveries between two outbox deletes (at most this many repeats
#: after a crash; at-least-once beats at-most-once for an alert).
_DELETE_EVERY = 50
#: How long one machine sink delivers before the others have their turn.
TURN_SECONDS = 0.5


class Dispatcher:
    """Drains the outbox into sinks; `run_once` is the whole policy, the thread
    only calls it when woken or every `poll` seconds."""

    def __init__(self, store: Store, sinks: Sequence[Sink], *, poll: float = 5.0,
                 gather: float = GATHER_SECONDS) -> None:
        self.store = store
        self.sinks = list(sinks)
        self.poll = poll
        self.gather = gather
        self.last_digest: dict[str, float] = {}
        self._failing: dict[str, str] = {}
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def routes(self) -> list[Route]:
        """What recording needs to owe events to these sinks."""
        with self._lock:
            return routes_of(self.sinks)

    # -- thread ------------------------------------------------------------------

    def start(self) -> None:
        """Deliver in the background until stop()."""
        self._thread = threading.Thread(target=self._run, name="integrity-alerts",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New alerts are in the outbox."""
        self._wakeup.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the delivery in progress and stop; undelivered alerts stay owed."""
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def replace(self, sinks: Sequence[Sink]) -> list[Sink]:
        """Swap in a reloaded policy's sinks; returns the old ones to close."""
        with self._lock:
            old, self.sinks = self.sinks, list(sinks)
            self._failing.clear()
        self.wake()
        return old

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the database may be busy; retry later
                log.exception("alert delivery round failed")
            self._wakeup.wait(self.poll)

    # -- one round ---------------------------------------------------------------

    def run_once(self, *, flush: bool = False) -> int:
        """Deliver what is due; `flush` sends digests without waiting for a burst to
        end (a one-shot `verify` has no later round). Returns alerts delivered.

        Machine sinks take turns of at most TURN_SECONDS: whoever can create files in
        a protected tree makes events faster than a slow webhook takes them, and the
        sinks after it must not wait for that webhook to run dry. Every sink has its
        turn in every round, one that had nothing due in the last included: alerts
        keep arriving while the slow one works through its backlog.
        """
        with self._lock:
            sinks = list(self.sinks)
        total = 0
        more = True
        while more:
            more = False
            for sink in sinks:  # a digest is looked at each round: it times itself
                if self._stop.is_set() and not flush:
                    return total
                if sink.digest:
                    total += self._digest(sink, flush)
                else:
                    sent, due = self._turn(sink)
                    total += sent
                    more = more or due
        return total

    def _turn(self, sink: Sink) -> tuple[int, bool]:
        """One turn of a machine sink: (alerts delivered, whether more are due)."""
        from integrity.alerts import DeliveryError

        sent = 0
        ends = time.monotonic() + TURN_SECONDS
        while True:
            pending = self.store.outbox.due(sink.name, limit=_DELETE_EVERY)
            if not pending:
                return sent, False
            events = self._events([p.event_id for p in pending])
            done: list[int] = []
            try:
                for item in pending:
                    event = events.get(item.event_id)
                    if event is not None:
                        sink.deliver([event])
                        sent += 1
                    done.append(item.id)
                    if time.monotonic() >= ends:
                        break
            except DeliveryError as exc:
                self.store.outbox.delivered(done)
                self._failed(sink, [p.id for p in pending if p.id not in done], str(exc))
                return sent, False
            self.store.outbox.delivered(done)
            self._recovered(sink)
            if self._stop.is_set() or time.monotonic() >= ends:
                return sent, True

    def _digest(self, sink: Sink, flush: bool) -> int:
        from integrity.alerts import DeliveryError

        pending = self.store.outbox.due(sink.name)
        if not pending:
            return 0
        if not flush:
            now = time.monotonic()
            oldest = min(p.created for p in pending)
            retrying = any(p.attempts for p in pending)
            if not retrying and (utcnow() - oldest) < dt.timedelta(seconds=self.gather):
                return 0  # a burst may still be arriving
            if now - self.last_digest.get(sink.name, -1e18) < sink.interval:
                return 0
        events = self._events([p.event_id for p in pending])
        batch = [events[p.event_id] for p in pending if p.event_id in events]
        try:
            if batch:
                sink.deliver(batch)
        except DeliveryError as exc:
            self._failed(sink, [p.id for p in pending], str(exc))
            return 0
        self.last_digest[sink.name] = time.monotonic()
        self.store.outbox.delivered([p.id for p in pending])
        self._recovered(sink)
        return len(batch)

    def _events(self, ids: Sequence[int]) -> dict[int, EventDoc]:
        return {event["id"]: event for event in self.store.events.list(ids=ids)}

    def _failed(self, sink: Sink, ids: list[int], error: str) -> None:
        retry = self.store.outbox.failed(ids, error)
        if self._failing.get(sink.name) != error:
            log.error("alert delivery failed: %s (%d alerts kept; next try at %s UTC)",
                      error, len(ids), retry.strftime("%H:%M:%S"))
        self._failing[sink.name] = error

    def _recovered(self, sink: Sink) -> None:
        if self._failing.pop(sink.name, None) is not None:
            log.info("alert delivery to %s works again", sink.name)


def deliver_after_scan(store: Store, sinks: Sequence[Sink]) -> int:
    """A one-shot run (verify from a timer) delivers what is owed itself, unless a
    running watcher does (two deliverers would race). Failures stay in the outbox
    for the next run. Returns alerts delivered."""
    from integrity.ops.status import watcher_alive

    if not sinks or watcher_alive(store):
        return 0
    dispatcher = Dispatcher(store, sinks)
    try:
        return dispatcher.run_once(flush=True)
    finally:
        for sink in sinks:
            sink.close()


def probe_sinks(sinks: Sequence[Sink], host: str) -> list[tuple[str, str | None]]:
    """Send one test event straight to every sink (no outbox, no severity filter):
    (sink name, None) when it was taken, else the one-line reason."""
    from integrity.alerts import DeliveryError

    event: EventDoc = {
        "id": 0, "time": iso(utcnow()), "last_seen": iso(utcnow()),
        "path": f"(test alert from integrity on {host})", "kind": "test", "changed": [],
        "source": "test", "rule": None, "severity": "low", "status": "resolved",
        "classification": "test", "count": 1, "actor": None, "old": None, "new": None,
        "approval": None, "evidence": None, "diff": None, "chain": None,
        "window": None, "ticket": None,
    }
    results: list[tuple[str, str | None]] = []
    for sink in sinks:
        try:
            sink.deliver([event])
            results.append((sink.name, None))
        except DeliveryError as exc:
            results.append((sink.name, exc.cause))
        finally:
            sink.close()
    return results
