"""Who read the secrets: access records for `access = true` rules, in the watcher.

The helper process (reads.py) reports opens of files under the access trees with the
process behind each; this side keeps those the policy wants (the rule has `access =
true`, the path is not excluded, the reader is not one of the rule's
`trusted_processes`), folds them per (file, hour, executable, uid), and writes them
to the store: a new fold at once (who read it is never held back), more opens of a
known one every UPDATE_SECONDS and when the hour turns. A daemon killed with SIGKILL
therefore loses at most those later counts, never a reader.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from integrity.paths import display
from integrity.policy import Policy
from integrity.realtime.fanotify import privilege_problem
from integrity.realtime import child
from integrity.realtime.reads import unwire, wire

if TYPE_CHECKING:  # the store (SQLAlchemy) is imported only to write
    from integrity.store.access import Read

log = logging.getLogger(__name__)

#: Seconds between writes of further opens of an already recorded (file, hour,
#: program, user): each write is also a ledger row, and a busy reader should cost
#: a few rows an hour, not one a second.
UPDATE_SECONDS = 600.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
OVERFLOWED = ("fanotify queue of the access listener overflowed: opens of that moment "
              "under access = true rules were not recorded")


def access_roots(policy: Policy) -> dict[bytes, bool]:
    """The roots of `access = true` rules, with whether each is recursive."""
    return {rule.path: rule.recursive for rule in policy.rules if rule.access}


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).replace(tzinfo=None)


def hour_of(when: dt.datetime) -> dt.datetime:
    """The (UTC) hour a time falls in: the folding bucket (as store.access has it)."""
    return when.replace(minute=0, second=0, microsecond=0)


@dataclass
class _Fold:
    rule: str
    count: int
    first: float
    last: float
    actor: dict[str, Any]


Fold = tuple[bytes, dt.datetime, str | None, int | None]


class AccessListener:
    """The access helper, and the folding of what it reports into access records.

    `record` writes a batch of Reads (Store.access.fold); `warn(path, message)` is
    told about lost opens (a queue overflow). After start(), `available` and `reason`
    say whether reads are recorded, `dark` which roots could not be marked and why.
    """

    def __init__(self, policy: Policy, record: Callable[[Sequence[Read]], object], *,
                 warn: Callable[[bytes, str], None] | None = None,
                 update_seconds: float = UPDATE_SECONDS) -> None:
        self.policy = policy
        self.roots = access_roots(policy)
        self.record = record
        self.warn = warn
        self.update_seconds = update_seconds
        self.available = False
        self.reason: str | None = "access listener not started"
        self.dark: dict[bytes, str] = {}
        self.helper_pid: int | None = None
        #: Opens skipped because the reader was a trusted process (for tests, logs).
        self.trusted_opens = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._pending: dict[Fold, _Fold] = {}
        self._written: set[Fold] = set()
        self._last_write = 0.0
        self._hour: dt.datetime | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the helper and wait until the trees are marked. Never raises for
        "unavailable": `available` and `reason` say what happened."""
        if not self.roots:
            self.reason = "no rule has access = true"
            return
        problem = privilege_problem() or self._start_helper()
        if problem is not None:
            self._stop_helper()
            self.available, self.reason = False, problem
            return
        self.available, self.reason = True, None
        if self.dark:
            self.reason = "reads are not recorded under: " + "; ".join(
                f"{display(p)}: {why}" for p, why in self.dark.items())
        self._thread = threading.Thread(target=self._pump, name="access", daemon=True)
        self._thread.start()

    def _start_helper(self) -> str | None:
        config = {"roots": [[wire(r), rec] for r, rec in self.roots.items()],
                  "ignore": [os.getpid()]}
        command = child.helper_command("integrity.realtime.reads", "helper_main")
        self._proc, ready = child.spawn(command, config, START_TIMEOUT, "the access helper")
        self.helper_pid = self._proc.pid if self._proc is not None else None
        if isinstance(ready, str):
            return ready
        self.dark = {unwire(p): w for p, w in ready.get("dark", {}).items()}
        return str(ready["problem"]) if ready.get("problem") else None

    def _pump(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            for line in proc.stdout:
                try:
                    self.file(json.loads(line))
                except Exception:  # noqa: BLE001 - a bug must not silence the listener
                    log.exception("filing access records failed")
        except (OSError, ValueError):
            return  # closed under us by close(): it gave up waiting
        if self._proc is not None:  # not closed by us
            self.available = False
            self.reason = "the access helper stopped unexpectedly"
            log.error("%s", self.reason)

    def file(self, message: dict[str, Any]) -> None:
        """Keep what the policy wants from one helper message, and write when due."""
        now = message.get("t")
        if now is None:
            return
        if message.get("overflow"):
            log.warning("%s", OVERFLOWED)
            if self.warn is not None:
                for root in self.roots:
                    self.warn(root, OVERFLOWED)
        actors = message.get("actors", [])
        urgent = False
        with self._lock:
            for path_text, number, count, first, last in message.get("reads", ()):
                path = unwire(path_text)
                actor = actors[number]
                rule = self.policy.rule_for(path)
                if rule is None or not rule.access or not self.policy.covers(path):
                    continue
                # Root's only: another user runs a trusted program as a tool of theirs.
                if rule.judgement.trusted(actor, as_root=True):
                    self.trusted_opens += count
                    continue
                fold = (path, hour_of(_utc(first)), actor.get("exe"), actor.get("uid"))
                known = self._pending.get(fold)
                if known is None:
                    self._pending[fold] = _Fold(rule.name, count, first, last, actor)
                    urgent = urgent or fold not in self._written
                else:
                    known.count += count
                    known.last = max(known.last, last)
            hour = hour_of(_utc(now))
            turned = self._hour is not None and hour != self._hour
            self._hour = hour
            due = self._pending and now - self._last_write >= self.update_seconds
        if urgent or turned or due:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Write what is pending (kept for the next try if the database refuses)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return
            from integrity.store.access import Read

            reads = [Read(path, hour, exe, uid, f.rule, f.count, _utc(f.first),
                          _utc(f.last), f.actor)
                     for (path, hour, exe, uid), f in pending.items()]
            try:
                self.record(reads)
            except Exception:  # noqa: BLE001 - keep the opens, say why, try again
                log.exception("recording access records failed; kept for the next try")
                for fold, value in pending.items():
                    self._pending.setdefault(fold, value)
                return
            self._last_write = now if now is not None else self._last_write
            current = self._hour
            self._written = {f for f in self._written | set(pending)
                             if current is None or f[1] >= current - dt.timedelta(hours=1)}

    def close(self) -> None:
        """Stop the helper (it sends what it holds), then write every pending count."""
        self._stop_helper()
        self.flush()
        if self.available:
            self.available, self.reason = False, "access listener stopped"

    def _stop_helper(self) -> None:
        proc, self._proc = self._proc, None
        thread, self._thread = self._thread, None
        # The thread files what the helper sent last: a flood can be thousands of
        # records for the database, which may also be busy (its timeout is 30 s).
        if not child.stop(proc, thread, STOP_TIMEOUT):
            log.error("access records still being written after %g s; giving up",
                      STOP_TIMEOUT)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


def probe(policy: Policy) -> tuple[str, str, tuple[str, ...]] | None:
    """doctor: (level, message, details) about recording reads, None without any
    `access = true` rule. Marks each root as the helper would, then lets go."""
    from integrity.realtime.reads import OpenMarks

    roots = access_roots(policy)
    if not roots:
        return None
    names = ", ".join(display(r) for r in roots)
    problem = privilege_problem()
    if problem is not None:
        return ("warn", f"access = true ({names}): reads cannot be recorded: {problem}",
                ())
    marks = OpenMarks(roots)
    try:
        problem = marks.start()
        dark = dict(marks.dark)
    finally:
        marks.close()
    if problem is not None:
        return ("warn", f"access = true ({names}): reads cannot be recorded: {problem}",
                ())
    if dark:
        return ("warn", "access = true: reads cannot be recorded under some roots",
                tuple(f"{display(p)}: {why}" for p, why in dark.items()))
    return ("ok", f"fanotify: opens under access = true rules are recorded ({names})", ())
