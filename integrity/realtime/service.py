"""The daemon behind `integrity watch`: watcher thread, scan thread, scheduler, signals.

Start-up order matters: the catch-up scan (what changed while we were down) runs
after the watches are in place, so nothing that changes during it slips through, and
READY is reported to systemd only after it. Realtime re-checks and scans run on
threads of their own, so a nightly full scan never delays a realtime alert and the
inotify reader never waits for either. Everything that changes the database happens
in short transactions: SIGTERM can stop us at any point without half-written rows.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Literal

from integrity.alerts import build_sinks
from integrity.alerts.dispatch import Dispatcher
from integrity.errors import IntegrityError
from integrity.ops.seal import SealedIndex, StaleIndex
from integrity.ops.verify import EventContext, Verification, check_paths, verify
from integrity.paths import display, escape
from integrity.policy import Policy, load
from integrity.realtime.sdnotify import Notifier
from integrity.realtime.usage import UsageServices
from integrity.realtime.watcher import Hints, Unwatched, Watcher
from integrity.scan import Progress
from integrity.scan.priority import Abandoned, abandon_when, scan_priority
from integrity.store import Store
from integrity.store.engine import as_database_error
from integrity.trust import TrustError

if TYPE_CHECKING:  # imported when first used: not every command needs them
    from apscheduler.schedulers.background import BackgroundScheduler

    from integrity.fleet.thread import PushThread
    from integrity.realtime.actor import ActorListener

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10
#: How long the watcher's writes wait for the database's write lock. An `init` holds
#: it from its first row to the switch (~15 s a million files here); an event written
#: late is better than one lost. The same wait `approve` gives an init (exclusive()),
#: but through the busy timeout: the main loop's heartbeat must not wait on the
#: baseline lock as a CLI command's writes do (Database(baseline_wait=)).
WRITE_PATIENCE_SECONDS = 600.0
#: How often subtrees inotify cannot cover (watch limit, NFS) are scanned.
UNWATCHED_SCAN_SECONDS = 300
#: How late a scheduled full scan or prune may still run (a busy or suspended host, a
#: clock step): APScheduler's default of 1 s would skip the night's scan altogether.
MISFIRE_GRACE_SECONDS = 6 * 3600


@dataclass
class _Task:
    kind: str
    paths: list[bytes] = field(default_factory=list)
    hints: Hints | None = None


class Service:
    """One running watcher over one policy and database."""

    def __init__(self, store: Store, policy_path: str, *,
                 heartbeat_seconds: int = HEARTBEAT_SECONDS,
                 notifier: Notifier | None = None) -> None:
        self.store = store
        self.policy_path = policy_path
        self.policy: Policy = load(policy_path)
        self.dispatcher = Dispatcher(store, build_sinks(self.policy))
        #: fanotify's answer to "who changed it?" (actor.py); started by run().
        self.actors: ActorListener | None = None
        self.heartbeat_seconds = heartbeat_seconds
        self.notifier = notifier
        self.stop = threading.Event()
        self.wakeup = threading.Event()
        self.reload_requested = threading.Event()
        self._watcher_stop = threading.Event()
        self._watcher_thread: threading.Thread | None = None
        self.realtime: queue.Queue[_Task | None] = queue.Queue()
        self.scans: queue.Queue[_Task | None] = queue.Queue()
        self.watcher: Watcher | None = None
        self.unwatched: list[Unwatched] = []
        self.watcher_id: int | None = None
        #: The verified baseline's block digests (ops.seal.SealedIndex).
        self.index: SealedIndex | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.threads: list[threading.Thread] = []
        #: Access records, /metrics and the metrics textfile (realtime/usage.py).
        self.usage = UsageServices(store, lambda: self.policy,
                                   lambda: [r.sink for r in self.dispatcher.routes()],
                                   self._warn)
        #: Pushes to the fleet's central database (fleet/thread.py); started by run().
        self.fleet: PushThread | None = None

    # -- callbacks from the watcher ------------------------------------------------

    def _on_hints(self, hints: Hints) -> None:
        self.realtime.put(_Task("hints", hints=hints))

    def _on_overflow(self) -> None:
        log.warning("inotify queue overflow: scheduling a full rescan")
        self.store.runs.overflowed(self.watcher_id)
        self.scans.put(_Task("overflow"))

    def _on_unwatched(self, items: list[Unwatched]) -> None:
        for item in items:
            log.warning("not watched in real time: %s: %s (scanned every %d s instead)",
                        display(item.root), item.reason, UNWATCHED_SCAN_SECONDS)
        self.unwatched += items
        self.scans.put(_Task("unwatched", paths=[i.root for i in items]))

    def _warn(self, path: bytes, message: str, resolved: bool = False) -> None:
        self.store.events.warn(path, message, resolved=resolved,
                               routes=self.dispatcher.routes())
        self.dispatcher.wake()

    # -- work --------------------------------------------------------------------

    def _context(self, realtime: bool = False) -> EventContext:
        """Recording's view of us: the sinks owed alerts, and for realtime changes
        the process fanotify saw writing the path."""
        actors = self.actors if realtime else None
        # Recording takes a plain dict (and stores it as JSON), not the TypedDict.
        return EventContext(actor_of=(lambda path: dict(actors.actor_for(path)))
                            if actors is not None else None,
                            routes=self.dispatcher.routes())

    def _alert(self, verification: Verification) -> None:
        if verification.recorded.new or verification.recorded.warned:
            self.dispatcher.wake()  # the outbox rows were written with the events

    def _full_scan(self, source: str = "scan", progress: Progress | None = None
                   ) -> Verification:
        """A full scan, which ends (Abandoned) at the next 2,048 entries once we are
        told to stop, paced or not."""
        progress = progress or Progress(tick=self._unless_stopping, every=2048)
        verification = verify(lambda: self.store, self.policy, parallel=0, source=source,
                              progress=progress, context=self._context())
        self._alert(verification)
        self.usage.after_scan()
        result = verification.result
        log.info("%s: %d entries, %d changes, %d errors", source, result.scanned,
                 len(result.changes), len(result.warnings))
        return verification

    def _run_queue(self, tasks: queue.Queue[_Task | None],
                   handle: Callable[[_Task], None]) -> None:
        while True:
            task = tasks.get()
            if task is None or self.stop.is_set():
                return
            try:
                handle(task)
            except IntegrityError as exc:
                log.error("%s", exc)
            except Exception:  # noqa: BLE001 - a bug must not kill the daemon silently
                log.exception("unexpected error while handling %s", task.kind)

    def _sealed_index(self) -> SealedIndex | None:
        """The index of the baseline's verified rows, rebuilt (the seal checked again)
        when an approval or init changed the baseline. A baseline that fails is
        recorded as tampering and alerted, and no re-check trusts its rows."""
        if self.index is not None and self.index.current(self.store):
            return self.index
        try:
            self.index = SealedIndex.build(self.store, self.policy)
        except TrustError as exc:
            self.index = None
            self.store.events.warn(os.fsencode(self.store.name()), str(exc),
                                   source="realtime", severity="critical",
                                   routes=self.dispatcher.routes(),
                                   classification="tampering")
            self.dispatcher.wake()
            raise
        return self.index

    def _handle_realtime(self, task: _Task) -> None:
        hints = task.hints
        assert hints is not None
        context = self._context(realtime=True)
        for attempt in (1, 2):
            index = self._sealed_index()
            if index is None:
                return  # no baseline yet: nothing to compare with
            try:
                self._recheck(hints, index, context)
                return
            except StaleIndex:
                # An approval or init committed since the index was built: build it
                # again (the seal is checked again) and re-check the same hints.
                self.index = None
                if attempt == 2:
                    raise
            except TrustError:
                self.index = None  # rows changed behind us: checked again next time
                self.dispatcher.wake()
                raise

    def _recheck(self, hints: Hints, index: SealedIndex, context: EventContext) -> None:
        if hints.paths:
            self._alert(check_paths(self.store, self.policy, sorted(hints.paths),
                                    index, context=context))
        for root in sorted(hints.subtrees):
            if not self.policy.in_scope(root):  # a waypoint: the rule roots below it
                continue
            self._alert(verify(lambda: self.store, self.policy, [root], parallel=0,
                               source="realtime", context=context, index=index))

    def _handle_scan(self, task: _Task) -> None:
        # [scan] nice for every scan of this thread, the idle I/O class (by default)
        # for all but the rescan after an overflow, which events are waiting on. A
        # full scan ends (recording nothing) when the daemon is asked to stop.
        try:
            with scan_priority(self.policy.scan, scheduled=task.kind != "overflow"), \
                    abandon_when(self.stop.is_set):
                self._scan_task(task)
        except Abandoned:
            log.info("%s scan abandoned: stopping", task.kind)

    def _scan_task(self, task: _Task) -> None:
        if task.kind == "full":
            self._full_scan()
        elif task.kind == "prune" and self.policy.retention:
            from integrity.ops.maintenance import prune

            removed, _ = prune(self.store, self.policy.retention)
            log.info("pruned %d closed events older than %s", removed,
                     self.policy.retention)
        elif task.kind == "overflow":
            message = ("inotify queue overflowed: events were lost; a full rescan "
                       "reports every change")
            self._warn(b"/", message)
            self._full_scan()
            self._warn(b"/", message + " (rescan done)", resolved=True)
        elif task.kind == "unwatched":
            for root in task.paths:
                reason = next((u.reason for u in self.unwatched if u.root == root), "")
                self._warn(root, f"not watched in real time: {reason}; scanned every "
                                 f"{UNWATCHED_SCAN_SECONDS} s instead")
            self._scan_task(_Task("subtrees", paths=task.paths))
        elif task.kind == "subtrees":
            roots = [p for p in task.paths if self.policy.in_scope(p)]
            if roots:
                self._alert(verify(lambda: self.store, self.policy, roots, parallel=0,
                                   source="scan", context=self._context()))

    # -- life cycle --------------------------------------------------------------

    def _notify(self, method: Literal["ready", "status", "watchdog", "stopping", "reloading",
                                      "extend_timeout"], *args: str | float) -> None:
        if self.notifier is not None:
            getattr(self.notifier, method)(*args)

    def _beat(self, state: str, patience: float | None = None) -> None:
        watches = len(self.watcher.wd_path) if self.watcher else 0
        # One line per tree, escaped: `status` splits this column on newlines.
        unwatched = "\n".join(escape(f"{display(u.root)}: {u.reason}")
                              for u in self.unwatched)
        self.watcher_id = self.store.runs.heartbeat(
            self.watcher_id, interval=self.heartbeat_seconds, state=state,
            watches=watches, unwatched=unwatched or None, patience=patience)

    def _beat_running(self, interval: float) -> None:
        """A heartbeat that waits one interval at most: while another process holds
        the write lock (an init writing its generation) the main loop goes on
        answering systemd's watchdog, and the next beat tries again."""
        try:
            self._beat("running", patience=interval)
        except Exception as exc:  # noqa: BLE001 - only the driver's errors are expected
            error = as_database_error(exc)
            if error is None:
                raise
            log.warning("heartbeat not recorded: %s", error)

    def _install_signals(self) -> None:
        def on_term(_signum: int, _frame: FrameType | None) -> None:
            self.stop.set()
            self.wakeup.set()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            self.reload_requested.set()
            self.wakeup.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        scheduler = BackgroundScheduler(daemon=True)
        scheduler.add_job(lambda: self.scans.put(_Task("full")),
                          CronTrigger.from_crontab(self.policy.full_scan),
                          id="full-scan", max_instances=1, coalesce=True,
                          misfire_grace_time=MISFIRE_GRACE_SECONDS)
        self._schedule_prune(scheduler)
        scheduler.add_job(self._scan_unwatched, "interval",
                          seconds=UNWATCHED_SCAN_SECONDS, id="unwatched",
                          max_instances=1, coalesce=True)
        scheduler.start()
        self.scheduler = scheduler

    def _schedule_prune(self, scheduler: BackgroundScheduler) -> None:
        """A daily prune while the policy has [retention]; none otherwise (SIGHUP may
        add or remove it)."""
        job = scheduler.get_job("prune")
        if self.policy.retention and job is None:
            scheduler.add_job(lambda: self.scans.put(_Task("prune")), "interval", hours=24,
                              id="prune", max_instances=1, coalesce=True,
                              misfire_grace_time=MISFIRE_GRACE_SECONDS)
        elif not self.policy.retention and job is not None:
            scheduler.remove_job("prune")

    def _scan_unwatched(self) -> None:
        if self.unwatched:
            self.scans.put(_Task("subtrees", paths=[u.root for u in self.unwatched]))

    def _start_watcher(self) -> None:
        watcher = Watcher(self.policy, self._on_hints, self._on_overflow,
                          self._on_unwatched)
        count = watcher.start()
        self.watcher = watcher
        self._watcher_stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(self._watcher_stop,),
                                  name="inotify", daemon=True)
        thread.start()
        self._watcher_thread = thread
        log.info("watching %d directories", count)

    def _stop_watcher(self) -> None:
        """Stop the inotify thread, then release its instance (never the reverse)."""
        self._watcher_stop.set()
        if self._watcher_thread is not None:
            self._watcher_thread.join(timeout=5)
            self._watcher_thread = None
        if self.watcher is not None:
            self.watcher.close()

    def _unless_stopping(self, _progress: Progress) -> None:
        """A scan's progress tick: an unpaced scan has no sleep to ask at."""
        if self.stop.is_set():
            raise Abandoned

    def _starting(self, progress: Progress) -> None:
        self._unless_stopping(progress)
        self._notify("extend_timeout", 90)
        self._notify("status", f"catch-up scan: {progress.files} entries checked")

    def _reload(self) -> None:
        """SIGHUP: re-read the policy; a bad one is refused and the old one kept.

        An unchanged policy (logrotate's SIGHUP) only reopens the sinks' files and
        retries failed alerts now: no rewatch, no rescan.
        """
        self._notify("reloading")
        try:
            policy = load(self.policy_path)
            sinks = build_sinks(policy)
        except IntegrityError as exc:
            log.error("reload refused, keeping the running policy: %s", exc)
            self._notify("ready", f"reload refused: {exc}")
            return
        for sink in self.dispatcher.replace(sinks):
            sink.close()
        self._drop_unknown()  # a sink renamed or removed: say so now, not at a restart
        self.store.outbox.retry_now()
        if policy.digest == self.policy.digest:
            self._notify("ready", "alert sinks reopened")
            log.info("policy unchanged; alert sinks reopened")
            return
        old, self.policy = self.policy, policy
        self._restart_actors()
        self._stop_watcher()
        self.unwatched = []
        self._start_watcher()
        if self.scheduler is not None:
            from apscheduler.triggers.cron import CronTrigger
            self.scheduler.reschedule_job("full-scan",
                                          trigger=CronTrigger.from_crontab(policy.full_scan))
            self._schedule_prune(self.scheduler)
        self.store.events.resolve_warnings(keep=[u.root for u in self.unwatched])
        self.usage.reload(old)
        self.scans.put(_Task("full"))
        watches = len(self.watcher.wd_path) if self.watcher else 0
        self._notify("ready", f"policy reloaded; watching {watches} directories")
        log.info("policy reloaded from %s", self.policy_path)

    def _start_dispatcher(self) -> None:
        self._drop_unknown()
        self.store.outbox.retry_now()  # a restart is the moment to try failed sinks again
        self.dispatcher.start()

    def _drop_unknown(self) -> None:
        """Alerts owed to a sink the policy no longer names have nobody to deliver
        them: drop them, and record and alert (to the sinks that remain) that they
        were dropped, naming the sink, how many and the highest severity. A summary,
        not the alerts re-routed: the remaining sinks chose their severities, and a
        backlog re-sent to them could flood them."""
        routes = self.dispatcher.routes()
        for dropped in self.store.outbox.drop_unknown(
                routes, os.fsencode(self.policy_path)):
            log.warning("dropped %d undelivered alerts (highest severity %s, owed since "
                        "%s UTC) for sink '%s', no longer in the policy (event %d)",
                        dropped.alerts, dropped.severity,
                        dropped.oldest.strftime("%Y-%m-%d %H:%M:%S"),
                        escape(dropped.sink), dropped.event_id)
            self.dispatcher.wake()

    def _start_fleet(self) -> None:
        """Push to the fleet's central database every [fleet] interval, in a thread of
        its own; it follows policy reloads (a [fleet] table added, changed, removed)."""
        from integrity.fleet.thread import PushThread

        self.fleet = PushThread(self.store, lambda: self.policy)
        self.fleet.start()

    def _restart_actors(self) -> None:
        """Listen with fanotify on the protected trees (best effort: actor.py says why
        not, and events then carry that reason)."""
        from integrity.realtime.actor import ActorListener
        from integrity.scan.walker import rule_roots

        if self.actors is not None:
            self.actors.close()
        # Wildcard rules as matched now (a user's .ssh made later has no actor), and
        # only roots with a parent: the default policy names paths most hosts lack.
        roots = [r for r in rule_roots(self.policy)
                 if os.path.isdir(os.path.dirname(r) or b"/")]
        listener = ActorListener(roots)
        listener.start()
        if not listener.available:
            log.warning("changes will not name their actor: %s", listener.reason)
        elif listener.reason:  # some trees only, or without attribute changes
            log.warning("%s", listener.reason)
        self.actors = listener

    def run(self) -> int:
        """Run until SIGTERM; return the exit status (0)."""
        # Refuse a baseline changed behind us; keep what was verified for re-checks.
        self.index = SealedIndex.build(self.store, self.policy)
        self._install_signals()
        self._beat("starting")
        self.store.events.resolve_warnings()  # a new start re-establishes them
        self._start_dispatcher()
        self._start_fleet()
        self._restart_actors()
        self.usage.start()
        for name, tasks, handler in (("realtime", self.realtime, self._handle_realtime),
                                     ("scans", self.scans, self._handle_scan)):
            thread = threading.Thread(target=self._run_queue, args=(tasks, handler),
                                      name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        self._start_watcher()
        # What changed while we were down; systemd hears that we are alive meanwhile.
        # SIGTERM ends it (recording nothing), paced or not: systemd's stop would
        # otherwise wait for the whole tree, then kill us.
        try:
            with abandon_when(self.stop.is_set):
                catch_up = self._full_scan("scan", Progress(tick=self._starting,
                                                            every=2048))
        except Abandoned:
            log.info("catch-up scan abandoned: stopping")
            self._shutdown()
            return 0
        self._start_scheduler()
        self._beat("running")
        watches = len(self.watcher.wd_path) if self.watcher else 0
        self._notify("ready", f"watching {watches} directories; catch-up scan found "
                              f"{len(catch_up.result.changes)} changes")
        interval = min(self.heartbeat_seconds,
                       getattr(self.notifier, "watchdog_interval", None) or 1e9)
        while True:
            self.wakeup.wait(interval)
            self.wakeup.clear()
            if self.stop.is_set():
                break
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self._reload()
            self._notify("watchdog")
            self._beat_running(interval)
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        self._notify("stopping")
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        self.realtime.put(None)
        self.scans.put(None)
        for thread in self.threads:
            thread.join(timeout=3)
        self._stop_watcher()
        if self.actors is not None:
            self.actors.close()
        self.usage.stop()
        self.dispatcher.stop()
        if self.fleet is not None:
            self.fleet.stop()
        for sink in self.dispatcher.sinks:
            sink.close()
        try:
            self._beat("stopped")
        except IntegrityError:
            pass
        log.info("stopped")

