"""The watcher service's scheduled jobs: the cron full scan, the retention prune and the
rescans of subtrees inotify cannot watch.

A real `Service` runs in this process over a real SQLite file, with its real
APScheduler scheduler, watcher, fanotify listener and scan threads. Nothing waits for
a wall-clock time to come round: the scheduler is paused once its jobs are in place,
each test reads a job's trigger with a fixed "now" (when would it fire?) and runs the
job's function, as the scheduler would when that time comes, then waits for what the
job must record. A subtree on bpffs (a pseudo
filesystem inotify cannot see) stands for NFS and friends: only scans find changes
there, so an event for it proves that the scan ran.

`Service.run()` installs signal handlers, which Python allows in the main thread
only, so the service runs there and the test's steps on a thread of their own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli, wait_until
from integrity.realtime.service import (MISFIRE_GRACE_SECONDS, UNWATCHED_SCAN_SECONDS,
                                        Service)
from integrity.store import Store

#: Long enough for a scan of a few files on a loaded machine: a deadline, not a target.
DEADLINE = 20.0
FULL_SCAN = "30 3 * * *"

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="mounts a bpffs (root only)"),
              pytest.mark.usefixtures("no_leaks")]


class Site:
    """A watched tree, a subtree on bpffs, the policy, the database, the CLI over them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tree = tmp_path / "etc"
        self.tree.mkdir()
        for name in ("a.conf", "b.conf", "c.conf"):
            (self.tree / name).write_text(f"{name}\n")
        self.blind = tmp_path / "pseudo" / "sub"  # made once the bpffs is mounted
        self.db = tmp_path / "state" / "integrity.db"
        self.policy = tmp_path / "policy.toml"
        rules = [{"path": str(self.tree), "check": "config"},
                 {"path": str(self.blind), "check": "config"}]
        lines = [line for rule in rules for line in
                 ["[[rule]]", *(f"{k} = {json.dumps(v)}" for k, v in rule.items()), ""]]
        lines += ["[schedule]", f"full_scan = {json.dumps(FULL_SCAN)}", "",
                  "[retention]", 'events = "30d"', ""]
        self.policy.write_text("\n".join(lines))
        self.cli = Cli(self.db, self.policy)

    def events(self, path: Path) -> list[dict[str, Any]]:
        return [e for e in self.cli.json("events") if e["path"] == str(path)]

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            return conn.execute(query, args).fetchall()

    def scan_runs(self) -> list[tuple[int, str | None, int]]:
        """(id, paths, added) of every finished run of the watcher's scans."""
        return self.sql("SELECT id, paths, added FROM run WHERE command = 'scan' "
                        "AND finished IS NOT NULL ORDER BY id")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    site.blind.parent.mkdir()
    subprocess.run(["mount", "-t", "bpf", "integrity-test", str(site.blind.parent)],
                   check=True)
    try:
        site.blind.mkdir()
        result = site.cli("init")
        assert result.exit_code == 0, result.output
        yield site
    finally:
        subprocess.run(["umount", str(site.blind.parent)], check=True)


def serve(site: Site, steps: Callable[[Service], None]) -> None:
    """Run a Service over the site until `steps(service)`, run on a thread once the
    catch-up scan is done and the scheduler holds its jobs, returns (or fails)."""
    store = Store(f"sqlite:///{site.db}")
    service = Service(store, str(site.policy))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT,
                                                   signal.SIGHUP)}
    returned = threading.Event()
    failures: list[BaseException] = []

    def drive() -> None:
        try:
            wait_until(lambda: returned.is_set() or service.scheduler is not None,
                       "the service to finish its catch-up scan", DEADLINE)
            if not returned.is_set():
                assert service.scheduler is not None
                service.scheduler.pause()  # jobs run when the test fires them, only
                steps(service)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failures.append(exc)
        finally:
            service.stop.set()
            service.wakeup.set()

    driver = threading.Thread(target=drive, name="test-steps")
    driver.start()
    try:
        code = service.run()
    finally:
        returned.set()
        driver.join()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        store.close()
    if failures:
        raise failures[0]
    assert code == 0


def fire(service: Service, job_id: str) -> None:
    """Run a scheduled job now, as the scheduler does when its time comes."""
    assert service.scheduler is not None
    job = service.scheduler.get_job(job_id)
    assert job is not None, f"no job {job_id!r}"
    job.func(*job.args, **job.kwargs)


def settled(site: Site, service: Service) -> None:
    """Wait for the start-up's scan of the unwatched subtree (queued when the watcher
    found it), so that a change made from now on is the next scan's to find."""
    assert [u.root for u in service.unwatched] == [os.fsencode(site.blind)]
    wait_until(lambda: any(paths == str(site.blind) for _, paths, _ in site.scan_runs()),
               "the first scan of the unwatched subtree", DEADLINE)


# -- when the jobs fire ------------------------------------------------------------------

def test_the_jobs_and_their_triggers(site: Site) -> None:
    def steps(service: Service) -> None:
        assert service.scheduler is not None
        jobs = {job.id: job for job in service.scheduler.get_jobs()}
        assert set(jobs) == {"full-scan", "prune", "unwatched"}
        cron = jobs["full-scan"].trigger
        tz = cron.timezone
        noon = dt.datetime(2030, 1, 1, 12, 0, tzinfo=tz)
        assert cron.get_next_fire_time(None, noon) == dt.datetime(2030, 1, 2, 3, 30,
                                                                  tzinfo=tz)
        early = dt.datetime(2030, 1, 2, 3, 29, 59, tzinfo=tz)
        assert cron.get_next_fire_time(None, early) == dt.datetime(2030, 1, 2, 3, 30,
                                                                   tzinfo=tz)
        assert jobs["prune"].trigger.interval == dt.timedelta(hours=24)
        assert jobs["unwatched"].trigger.interval == dt.timedelta(
            seconds=UNWATCHED_SCAN_SECONDS)
        for job in jobs.values():  # a late or overlapping run never doubles up
            assert job.coalesce and job.max_instances == 1
        # A night's scan that comes late (a busy or suspended host) still runs.
        assert jobs["full-scan"].misfire_grace_time == MISFIRE_GRACE_SECONDS
        assert jobs["prune"].misfire_grace_time == MISFIRE_GRACE_SECONDS

    serve(site, steps)


def test_no_prune_job_without_retention(site: Site) -> None:
    site.policy.write_text(site.policy.read_text().replace('[retention]\nevents = "30d"\n',
                                                           ""))

    def steps(service: Service) -> None:
        assert service.scheduler is not None
        assert {job.id for job in service.scheduler.get_jobs()} == {"full-scan",
                                                                     "unwatched"}

    serve(site, steps)


def test_sighup_adds_and_removes_the_prune_job(site: Site) -> None:
    with_retention = site.policy.read_text()
    without = with_retention.replace('[retention]\nevents = "30d"\n', "")
    assert without != with_retention
    site.policy.write_text(without)

    def steps(service: Service) -> None:
        def jobs() -> set[str]:
            assert service.scheduler is not None
            return {job.id for job in service.scheduler.get_jobs()}

        assert "prune" not in jobs()
        site.policy.write_text(with_retention)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: "prune" in jobs(), "the prune job after a reload", DEADLINE)
        site.policy.write_text(without)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: "prune" not in jobs(), "no prune job after a reload", DEADLINE)

    serve(site, steps)


# -- what they do ------------------------------------------------------------------------

def test_the_cron_full_scan_finds_what_inotify_cannot(site: Site) -> None:
    planted = site.blind / "planted"

    def steps(service: Service) -> None:
        settled(site, service)
        before = site.scan_runs()
        planted.mkdir()  # on bpffs: no inotify event, only a scan can find it
        fire(service, "full-scan")
        [event] = wait_until(lambda: site.events(planted), "the full scan's event",
                             DEADLINE)
        assert (event["kind"], event["source"], event["status"]) == ("added", "scan",
                                                                     "open")
        # The run is finished just after its events are recorded: wait for it too.
        [(_, paths, added)] = wait_until(
            lambda: [r for r in site.scan_runs() if r not in before], "the scan's run",
            DEADLINE)
        assert paths is None and added == 1  # a full scan: every rule, one addition

    serve(site, steps)


def test_the_unwatched_subtrees_are_rescanned(site: Site) -> None:
    later = site.blind / "later"

    def steps(service: Service) -> None:
        settled(site, service)
        [warning] = [e for e in site.events(site.blind) if e["kind"] == "warning"]
        assert "not watched in real time" in json.dumps(warning["new"])
        before = site.scan_runs()
        later.mkdir()
        fire(service, "unwatched")
        [event] = wait_until(lambda: site.events(later), "the rescan's event", DEADLINE)
        assert (event["kind"], event["source"]) == ("added", "scan")
        # The run is finished just after its events are recorded: wait for it too.
        [(_, paths, added)] = wait_until(
            lambda: [r for r in site.scan_runs() if r not in before], "the scan's run",
            DEADLINE)
        assert paths == str(site.blind) and added == 1  # that subtree only

    serve(site, steps)


def closed_and_open_events(site: Site) -> tuple[int, int, int]:
    """Before the service starts: a.conf and b.conf changed and put back (closed,
    "reverted"), c.conf changed (open). Their event ids, in that order."""
    for name in ("a.conf", "b.conf", "c.conf"):
        (site.tree / name).write_text("changed\n")
    assert site.cli("verify").exit_code != 0
    for name in ("a.conf", "b.conf"):
        (site.tree / name).write_text(f"{name}\n")
    site.cli("verify")
    ids = []
    for name, status in (("a.conf", "reverted"), ("b.conf", "reverted"),
                         ("c.conf", "open")):
        [event] = site.events(site.tree / name)
        assert event["status"] == status, event
        ids.append(event["id"])
    return ids[0], ids[1], ids[2]


def age(site: Site, *ids: int) -> None:
    """Last seen 60 days ago (last_seen is outside the hash chain: it changes on every
    sighting)."""
    for event_id in ids:
        site.sql("UPDATE event SET last_seen = datetime('now', '-60 days') WHERE id = ?",
                 event_id)


def test_retention_prunes_old_closed_events_only(site: Site) -> None:
    old_closed, new_closed, old_open = closed_and_open_events(site)

    def steps(service: Service) -> None:
        age(site, old_closed, old_open)  # after the catch-up scan saw c.conf again
        fire(service, "prune")
        wait_until(lambda: old_closed not in {e["id"] for e in site.cli.json("events")},
                   "the old closed event pruned", DEADLINE)
        assert {e["id"] for e in site.cli.json("events")} >= {new_closed, old_open}
        # Pruning leaves a checkpoint at the head of the chain, which still verifies.
        [(kind, content)] = site.sql("SELECT kind, content FROM ledger ORDER BY seq "
                                     "LIMIT 1")
        assert kind == "checkpoint" and json.loads(content)["pruned_events"] == 1
        chain = site.cli.json("status")["chain"]
        assert chain["ok"] is True, chain["problems"]

    serve(site, steps)


def test_no_pruning_over_a_broken_chain(site: Site,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """An attacker who edited an event must not get the evidence pruned as well."""
    old_closed, _, _ = closed_and_open_events(site)
    caplog.set_level(logging.INFO, logger="integrity")

    def steps(service: Service) -> None:
        age(site, old_closed)
        site.sql("UPDATE event SET severity = 'low' WHERE id = ?", old_closed)
        fire(service, "prune")
        wait_until(lambda: "hash chain is broken; refusing to prune" in caplog.text,
                   "the refusal in the log", DEADLINE)
        assert old_closed in {e["id"] for e in site.cli.json("events")}

    serve(site, steps)
