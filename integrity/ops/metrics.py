"""Metrics for the dashboards teams already have: OpenMetrics, node_exporter's textfile,
and the registry the watcher serves on /metrics (realtime/metrics_http.py).

Every value is read from the database when it is collected, so `integrity metrics`,
the textfile that verify and scheduled scans write, and a scrape of the watcher all
say the same thing. The two checks that read every row (the baseline's seal, the
event chain) are cached for `check_every` seconds in the watcher, so a 15-second
scrape interval does not rehash a million-entry baseline four times a minute.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from integrity.errors import IntegrityError
from integrity.policy import Policy
from integrity.policy.severity import SEVERITIES
from integrity.times import utcnow

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry
    from prometheus_client.samples import Sample  # noqa: F401

    from integrity.store import Store

log = logging.getLogger(__name__)

#: Seconds the watcher reuses a seal and chain check for scrapes.
CHECK_EVERY = 300.0
#: Kinds of change always present in integrity_changes_total, zero or not, so that a
#: rate() over them exists before the first change.
KINDS = ("added", "removed", "modified")


def fleet_unpushed(store: Store, policy: Policy) -> int:
    """Records (chain records and baseline changes) this host still owes the fleet's
    central database; 0 for a host outside a fleet, which owes nobody anything."""
    if policy.fleet is None:
        return 0
    return store.spool.unpushed_records()


def _epoch(when: dt.datetime) -> float:
    """Seconds since the epoch of a naive UTC time."""
    return calendar.timegm(when.timetuple()) + when.microsecond / 1e6


class Checks:
    """The seal and chain verdicts, recomputed at most every `ttl` seconds."""

    def __init__(self, ttl: float = 0.0) -> None:
        self.ttl = ttl
        self._at = -1e18
        self._verdict: tuple[bool, bool] = (False, False)
        self._lock = threading.Lock()

    def verdict(self, store: Store, policy: Policy) -> tuple[bool, bool]:
        """(baseline seal valid, event chain valid)."""
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.ttl:
                self._verdict = (seal_valid(store, policy), store.ledger.check().ok)
                self._at = now
            return self._verdict

    def forget(self) -> None:
        """Recompute at the next collection (after a scan or an approval)."""
        with self._lock:
            self._at = -1e18


def seal_valid(store: Store, policy: Policy) -> bool:
    """Whether an active baseline hashes to its recorded root (and, with a public
    key, carries that key's signature). No baseline: nothing is sealed, False."""
    from integrity.ops.seal import check_baseline

    if store.baselines.active() is None:
        return False
    try:
        check_baseline(store, policy)
    except IntegrityError:
        return False
    return True


class StoreCollector:
    """A prometheus_client collector over one database and the policy in force."""

    def __init__(self, store: Store, policy: Callable[[], Policy],
                 sinks: Callable[[], Sequence[str]], checks: Checks | None = None) -> None:
        self.store = store
        self.policy = policy
        self.sinks = sinks
        self.checks = checks or Checks()

    def describe(self) -> list[Any]:
        return []  # collected lazily: registering must not query the database

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from integrity.ops.status import watcher_alive

        store, policy = self.store, self.policy()
        now = utcnow()
        run = store.runs.last_success("verify", "scan")
        last = GaugeMetricFamily(
            "integrity_last_scan_success_timestamp_seconds",
            "When the last full verify or scheduled scan that ran to the end finished "
            "(changes found counts as success)", unit="seconds")
        duration = GaugeMetricFamily(
            "integrity_scan_duration_seconds",
            "How long that scan took, from start to recorded result", unit="seconds")
        if run is not None and run.finished is not None:
            last.add_metric([], _epoch(run.finished))
            duration.add_metric([], (run.finished - run.started).total_seconds())
        yield last
        yield duration
        baseline = store.baselines.active()
        yield GaugeMetricFamily("integrity_baseline_entries",
                                "Entries in the active baseline (0: none)",
                                value=baseline.entries if baseline else 0)
        opened = GaugeMetricFamily("integrity_open_events",
                                   "Events not yet approved or resolved, by severity",
                                   labels=["severity"])
        counts = store.events.open_counts()
        for severity in SEVERITIES:
            opened.add_metric([severity], counts.get(severity, 0))
        yield opened
        totals = dict.fromkeys(KINDS, 0)
        for source in (store.usage.totals(), store.ledger.pruned_changes()):
            for kind, count in source.items():
                totals[kind] = totals.get(kind, 0) + count
        changes = CounterMetricFamily(
            "integrity_changes", "Changes recorded, by kind (every sighting of a path "
            "that changed again while its event was open counts)", labels=["kind"])
        for kind in sorted(totals):
            changes.add_metric([kind], totals[kind])
        yield changes
        yield CounterMetricFamily("integrity_watcher_overflows",
                                  "inotify queue overflows (each followed by a full "
                                  "rescan), over every watcher run on this database",
                                  value=store.runs.overflows())
        undelivered = GaugeMetricFamily("integrity_alerts_undelivered",
                                        "Alerts recorded but not yet taken by their sink",
                                        labels=["sink"])
        owed = dict.fromkeys(self.sinks(), 0)
        for backlog in store.outbox.backlog():
            owed[backlog.sink] = backlog.pending
        for sink in sorted(owed):
            undelivered.add_metric([sink], owed[sink])
        yield undelivered
        seal, chain = self.checks.verdict(store, policy)
        yield GaugeMetricFamily("integrity_baseline_seal_valid",
                                "1 when the baseline hashes to its recorded root (and "
                                "signature), 0 when tampered with or absent",
                                value=int(seal))
        yield GaugeMetricFamily("integrity_event_chain_valid",
                                "1 when the hash chain over events, approvals, windows "
                                "and access records is intact", value=int(chain))
        yield GaugeMetricFamily("integrity_fleet_unpushed_records",
                                "Records not yet pushed to the fleet's central database",
                                value=fleet_unpushed(store, policy))
        yield GaugeMetricFamily("integrity_watcher_up",
                                "1 while a watcher's heartbeat on this database is fresh",
                                value=int(watcher_alive(store)))
        windows = sum(1 for w in store.windows.all() if w.is_open(now))
        yield GaugeMetricFamily("integrity_maintenance_windows_open",
                                "Maintenance windows (integrity expect) open now",
                                value=windows)


def registry_for(collector: StoreCollector) -> CollectorRegistry:
    """A registry of our own (never the process-global one): just these metrics."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def policy_sinks(policy: Policy) -> list[str]:
    """Names of the policy's alert sinks (built, not opened)."""
    from integrity.alerts import build_sinks

    sinks = build_sinks(policy)
    for sink in sinks:
        sink.close()
    return [sink.name for sink in sinks]


def openmetrics(store: Store, policy: Policy) -> bytes:
    """The OpenMetrics text `integrity metrics` prints."""
    from prometheus_client.openmetrics.exposition import generate_latest

    names = policy_sinks(policy)
    registry = registry_for(StoreCollector(store, lambda: policy, lambda: names))
    return bytes(generate_latest(registry))  # type: ignore[no-untyped-call, unused-ignore]


def write_textfile(path: str, store: Store, policy: Policy, *,
                   checks: Checks | None = None, sinks: Sequence[str] | None = None
                   ) -> None:
    """node_exporter's textfile format at `path`, replaced atomically: written to a
    temporary file beside it (not *.prom, so never scraped half-written), fsync'd,
    renamed over it, and the directory fsync'd, so a crash leaves the old file or the
    new one. Mode 0644: node_exporter runs as another user; it holds counts only."""
    from prometheus_client import generate_latest

    names = list(sinks) if sinks is not None else policy_sinks(policy)
    data = generate_latest(registry_for(StoreCollector(store, lambda: policy,
                                                       lambda: names, checks)))
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask (the units set 0077)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def textfile_problem(store: Store, policy: Policy, **kwargs: Any) -> str | None:
    """Write the policy's textfile if it has one; the warning line when that failed."""
    path = policy.metrics.textfile
    if path is None:
        return None
    try:
        write_textfile(path, store, policy, **kwargs)
    except OSError as exc:
        return (f"writing metrics failed for '{path}': {exc.strerror or exc} "
                "(metrics not updated)")
    return None
