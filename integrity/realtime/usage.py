"""What the watcher adds for operations: the access listener, /metrics, the textfile.

One object the daemon (service.py) starts, reloads and stops, so the daemon's own
life cycle stays as it was: access records for `access = true` rules (access.py),
a bounded /metrics server on `[metrics] listen` (metrics_http.py), and node_exporter's textfile
after every full scan. Each is best effort and says so: a port in use or a textfile
directory that is missing is logged, and never stops the watcher from watching.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from integrity.ops.metrics import CHECK_EVERY, Checks, StoreCollector
from integrity.paths import display
from integrity.policy import Policy
from integrity.realtime.metrics_http import MetricsServer

if TYPE_CHECKING:
    from integrity.realtime.access import AccessListener
    from integrity.store import Store

log = logging.getLogger(__name__)


class UsageServices:
    """The access listener and the metrics outputs of one running watcher."""

    def __init__(self, store: Store, policy: Callable[[], Policy],
                 sinks: Callable[[], Sequence[str]],
                 warn: Callable[..., None]) -> None:
        self.store = store
        self.policy = policy
        self.sinks = sinks
        self.warn = warn
        self.checks = Checks(CHECK_EVERY)
        self.access: AccessListener | None = None
        self.server: MetricsServer | None = None

    def start(self) -> None:
        self._start_access()
        self._start_server()

    def reload(self, old: Policy) -> None:
        """A new policy is in force: listen on its access trees and its address."""
        self._start_access()
        if old.metrics.listen != self.policy().metrics.listen:
            self._start_server()
        self.checks.forget()

    def stop(self) -> None:
        if self.access is not None:
            self.access.close()
            self.access = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def after_scan(self) -> None:
        """A full scan finished: the textfile, if the policy names one."""
        from integrity.ops.metrics import textfile_problem

        self.checks.forget()
        problem = textfile_problem(self.store, self.policy(), checks=self.checks,
                                   sinks=self.sinks())
        if problem:
            log.error("%s", problem)

    def _start_access(self) -> None:
        from integrity.realtime.access import AccessListener

        if self.access is not None:
            self.access.close()
            self.access = None
        policy = self.policy()
        # Opens lost to an overflow cannot be recovered by a rescan: the warning is
        # recorded and alerted as resolved at once, not left open forever.
        listener = AccessListener(policy, self.store.access.fold,
                                  warn=lambda path, text: self.warn(path, text, True))
        if not listener.roots:
            return
        listener.start()
        if not listener.available:
            message = f"reads are not recorded: {listener.reason}"
            log.warning("access = true: %s", message)
            for root in listener.roots:
                self.warn(root, message)
            return
        for root, why in listener.dark.items():
            log.warning("reads are not recorded under %s: %s", display(root), why)
            self.warn(root, f"reads are not recorded: {why}")
        log.info("recording reads under %s",
                 ", ".join(display(r) for r in listener.roots))
        self.access = listener

    def _start_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        address = self.policy().metrics.listen
        if address is None:
            return
        server = MetricsServer(address, StoreCollector(self.store, self.policy,
                                                       self.sinks, self.checks))
        try:
            server.start()
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d: %s (no /metrics)", address[0],
                      address[1], exc.strerror or exc)
            return
        log.info("serving /metrics on %s:%d", address[0], server.port)
        self.server = server
