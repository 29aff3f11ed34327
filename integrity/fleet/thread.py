"""The watcher's pusher: `integrity watch` pushes every [fleet] interval, in a thread of
its own, so a slow or absent central database never delays the watcher."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from integrity.errors import IntegrityError
from integrity.fleet.push import Pusher, PushReport
from integrity.policy import Policy
from integrity.store import Store
from integrity.times import utcnow

log = logging.getLogger(__name__)

#: Seconds between looks at a policy without [fleet] (a reload may add one).
IDLE_SECONDS = 5.0


class PushThread:
    """Pushes every interval; picks up a reloaded policy ([fleet] added, changed or
    removed). Failures are logged once each, and the spool keeps what they held."""

    def __init__(self, store: Store, policy_of: Callable[[], Policy]) -> None:
        self.store = store
        self.policy_of = policy_of
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pusher: Pusher | None = None
        self._failing: str | None = None
        self.last: PushReport | None = None
        self.last_success: dt.datetime | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-push", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after the push in progress; one stuck on a dead link is left behind (a
        daemon thread: it ends with the process, and the spool keeps what it held)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pusher is not None:
            self._pusher.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            policy = self.policy_of()
            config = policy.fleet
            if config is None:
                self._stop.wait(IDLE_SECONDS)
                continue
            try:
                if self._pusher is None or self._pusher.config != config:
                    if self._pusher is not None:
                        self._pusher.close()
                    self._pusher = Pusher(self.store, policy)
                self._pusher.policy = policy
                self.last = self._pusher.push()
                self.last_success = utcnow()
                if self._failing is not None:
                    log.info("fleet push to %s works again", self._pusher.central.name())
                self._failing = None
                for line in self.last.requests:
                    log.info("fleet: %s", line)
            except IntegrityError as exc:
                if str(exc) != self._failing:
                    log.error("fleet push failed (kept in the local spool, retried every "
                              "%g s): %s", config.interval, exc)
                self._failing = str(exc)
            except Exception:  # noqa: BLE001 - a bug must not end the pushes silently
                log.exception("fleet push failed unexpectedly")
            self._stop.wait(config.interval)
