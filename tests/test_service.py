"""`integrity watch` as an operator runs it: a real daemon, real signals, real SQLite.

Each test runs `python3 -m integrity --db sqlite:///DB --policy P watch` as a child
process over a small tree under tmp_path (one `check = "config"` rule and a jsonl alert
sink), after `init`. It waits for `status --json` to show that very process running,
changes files, and reads the outcome where an operator would: `events --json`, the
jsonl alert file, `status`, the daemon's stderr, and the systemd notify socket.
Every daemon is stopped by its test (SIGTERM, or SIGKILL where that is the point), and
the fixtures check that no thread, child process or zombie is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli, Receiver, rows, wait_until

#: How long to wait for a realtime change to be recorded. A deadline, not the target:
#: latency is measured by benchmarks/bench_watch.py.
REALTIME_SECONDS = 2.0
#: How long SIGTERM may take to stop the daemon before the test gives up on it.
STOP_SECONDS = 10.0
#: SIGHUP is acted on at the daemon's next heartbeat tick (10 s): allow for one.
RELOAD_SECONDS = 15.0


pytestmark = pytest.mark.usefixtures("no_leaks")


# -- the daemon -----------------------------------------------------------------------

class Site:
    """A protected tree, its policy, database and alert file, and the CLI over them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.tree = tmp_path / "etc"
        self.db = tmp_path / "state" / "integrity.db"
        self.policy = tmp_path / "policy.toml"
        self.alerts = tmp_path / "log" / "alerts.jsonl"
        self.log = tmp_path / "watch.log"
        self.cli = Cli(self.db, self.policy)
        (self.tree / "app").mkdir(parents=True)
        (self.tree / "spool").mkdir()
        for name, text in (("a.conf", "alpha\n"), ("b.conf", "beta\n"),
                           ("c.conf", "gamma\n"), ("app/d.conf", "delta\n"),
                           ("spool/queued", "job\n")):
            (self.tree / name).write_text(text)
        self.write_policy()

    def write_policy(self, exclude: list[str] | None = None) -> None:
        rule = {"path": str(self.tree), "check": "config", "severity": "high",
                "exclude": exclude or []}
        lines = ["[[rule]]", *(f"{k} = {json.dumps(v)}" for k, v in rule.items()), "",
                 "[[alert]]", 'type = "jsonl"', f"path = {json.dumps(str(self.alerts))}", ""]
        self.policy.write_text("\n".join(lines))

    def status(self) -> dict[str, Any]:
        return self.cli.json("status")  # type: ignore[no-any-return]

    def events(self, path: Path) -> list[dict[str, Any]]:
        return [e for e in self.cli.json("events") if e["path"] == str(path)]

    def alert_lines(self) -> list[dict[str, Any]]:
        """The complete lines of the jsonl file: a large batch is one write(), but a
        reader of a regular file may see part of it, as `tail -F` can."""
        if not self.alerts.exists():
            return []
        complete = self.alerts.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines()]

    def alerts_for(self, path: Path) -> list[dict[str, Any]]:
        return [a for a in self.alert_lines() if a["path"] == str(path)]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Daemon:
    """One `integrity watch` child process."""

    def __init__(self, site: Site, env: dict[str, str] | None = None) -> None:
        self.site = site
        with open(site.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "integrity", "--db", f"sqlite:///{site.db}",
                 "--policy", str(site.policy), "watch"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        """status --json names this process, running (watches set, catch-up done)."""
        watcher = self.site.status()["watcher"]
        return bool(watcher["pid"] == self.pid and watcher["alive"]
                    and watcher["state"] == "running")

    def wait_running(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"integrity watch exited {self.proc.returncode}:\n"
                            f"{self.site.stderr()}")
            return self.running()
        wait_until(ready, "status to show the watcher running", timeout)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def terminate(self) -> int:
        """SIGTERM; the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"integrity watch ignored SIGTERM for {STOP_SECONDS} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    result = site.cli("init")
    assert result.exit_code == 0, result.output
    return site


@pytest.fixture
def start(site: Site) -> Iterator[Callable[..., Daemon]]:
    """Start daemons; whatever a failing test left running is killed and reaped."""
    started: list[Daemon] = []

    def launch(env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
        daemon = Daemon(site, env)
        started.append(daemon)
        if wait:
            daemon.wait_running()
        return daemon

    yield launch
    for daemon in started:
        daemon.kill()


def rewrite(path: Path, data: bytes) -> None:
    """Write in place (one CLOSE_WRITE), the way an editor without backups would."""
    with open(path, "r+b") as handle:
        handle.truncate(0)
        handle.write(data)


def wait_for_event(site: Site, path: Path, timeout: float = REALTIME_SECONDS + 3,
                   **match: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for event in site.events(path):
            if all(event[k] == v for k, v in match.items()):
                return event
        return None
    return wait_until(found, f"an event for {path} {match}", timeout)  # type: ignore


def wait_for_log(site: Site, text: str, timeout: float) -> None:
    wait_until(lambda: text in site.stderr(), f"{text!r} in the daemon's stderr", timeout)


def full_scans(site: Site) -> int:
    """How many full scans (the catch-up, a reload's, a scheduled one) have finished."""
    return len(re.findall(r"^INFO scan: \d+ entries", site.stderr(), re.M))


def assert_no_crash(site: Site) -> None:
    log = site.stderr()
    assert "Traceback" not in log and "Exception in thread" not in log, log


# -- realtime ---------------------------------------------------------------------------

def test_a_content_change_is_a_realtime_event_and_one_alert(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    target = site.tree / "a.conf"
    with open(target, "r+b") as handle:  # thirty writes, one close: one alert
        handle.truncate(0)
        for i in range(30):
            handle.write(b"line %d\n" % i)
            handle.flush()
    event = wait_for_event(site, target, source="realtime")
    assert event["kind"] == "modified" and "content" in event["changed"]
    assert event["severity"] == "high" and event["status"] == "open"
    wait_until(lambda: site.alerts_for(target), "the jsonl alert", REALTIME_SECONDS)
    # A later, unrelated change: once its alert is out, nothing more can follow for a.conf.
    rewrite(site.tree / "app" / "d.conf", b"delta 2\n")
    wait_until(lambda: site.alerts_for(site.tree / "app" / "d.conf"), "the second alert",
               REALTIME_SECONDS + 3)
    alerts = site.alerts_for(target)
    assert len(alerts) == 1, alerts
    assert alerts[0]["id"] == event["id"] and alerts[0]["source"] == "realtime"
    assert len(site.events(target)) == 1
    assert daemon.terminate() == 0
    assert_no_crash(site)


def test_same_bytes_and_a_touch_under_config_produce_nothing(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    rewrite(site.tree / "a.conf", b"alpha\n")  # the same bytes again
    os.utime(site.tree / "b.conf", (time.time() + 3600, time.time() + 3600))  # touch
    rewrite(site.tree / "c.conf", b"gamma, really changed\n")  # the control
    wait_for_event(site, site.tree / "c.conf", source="realtime")
    wait_until(lambda: site.alerts_for(site.tree / "c.conf"), "the control's alert",
               REALTIME_SECONDS)
    assert site.events(site.tree / "a.conf") == []
    assert site.events(site.tree / "b.conf") == []
    assert [a["path"] for a in site.alert_lines()] == [str(site.tree / "c.conf")]
    assert daemon.terminate() == 0


def test_new_directory_and_file_right_after_mkdir(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    planted = site.tree / "app" / "new"
    planted.mkdir()
    (planted / "payload").write_bytes(b"#!/bin/sh\n")
    wait_for_event(site, planted / "payload", kind="added", source="realtime")
    wait_for_event(site, planted, kind="added", source="realtime")
    assert daemon.terminate() == 0


# -- life cycle -----------------------------------------------------------------------

def test_sigterm_exits_0_and_status_says_stopped(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    assert site.cli("status").exit_code == 0  # healthy: no open events, watcher alive
    assert daemon.terminate() == 0
    watcher = site.status()["watcher"]
    assert watcher["pid"] == daemon.pid
    assert watcher["state"] == "stopped" and not watcher["alive"] and not watcher["stale"]
    assert "INFO stopped" in site.stderr()
    assert_no_crash(site)


def test_catch_up_scan_reports_what_changed_while_stopped(
        site: Site, start: Callable[..., Daemon]) -> None:
    first = start()
    assert first.terminate() == 0
    target = site.tree / "app" / "d.conf"
    rewrite(target, b"changed while nobody watched\n")
    (site.tree / "b.conf").unlink()
    second = start(wait=False)
    second.wait_running()
    # "running" is written after the catch-up scan: its events are already there.
    events = site.events(target)
    assert [(e["source"], e["kind"]) for e in events] == [("scan", "modified")]
    assert [(e["source"], e["kind"]) for e in site.events(site.tree / "b.conf")] == [
        ("scan", "removed")]
    assert site.status()["last_scan"]["source"] == "scan"
    wait_until(lambda: site.alerts_for(target), "the catch-up alert", REALTIME_SECONDS)
    assert second.terminate() == 0


def test_a_killed_watcher_is_reported_stale(site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    assert site.cli("status").exit_code == 0
    daemon.signal(signal.SIGKILL)
    daemon.proc.wait(timeout=5)
    # Three missed heartbeats (10 s each) without waiting 30 s: age the row instead.
    with contextlib.closing(sqlite3.connect(site.db)) as conn, conn:
        conn.execute("UPDATE watcher SET heartbeat = datetime('now', '-5 minutes') "
                     "WHERE pid = ?", (daemon.pid,))
    result = site.cli("status", "--json")
    assert result.exit_code == 1
    watcher = json.loads(result.stdout)["watcher"]
    assert watcher["pid"] == daemon.pid
    assert watcher["stale"] is True and watcher["alive"] is False
    assert watcher["state"] == "running"  # what it last said: it never said goodbye
    text = site.cli("status")
    assert text.exit_code == 1 and "STALE" in text.stdout


# -- SIGHUP ---------------------------------------------------------------------------

def test_sighup_with_a_broken_policy_keeps_running(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    good = site.policy.read_text()
    site.policy.write_text(good.replace('check = "config"', 'check = "nonsense"'))
    daemon.signal(signal.SIGHUP)
    wait_for_log(site, "reload refused", RELOAD_SECONDS)
    assert "check" in site.stderr().split("reload refused", 1)[1].splitlines()[0]
    assert daemon.proc.poll() is None
    assert daemon.running()
    rewrite(site.tree / "a.conf", b"after a refused reload\n")
    wait_for_event(site, site.tree / "a.conf", source="realtime")
    assert daemon.terminate() == 0
    assert_no_crash(site)


def test_a_mount_over_a_watched_file_is_alerted_at_once_and_its_end_too(
        site: Site, start: Callable[..., Daemon], tmp_path: Path) -> None:
    """The attack: bind-mount a decoy over a.conf. A mount makes no inotify event; the
    watcher polls the mount table, re-checks what was mounted on, and the walk reports
    the mount: an alerted warning now, not at the next full scan. Its end, too."""
    daemon = start()
    target = site.tree / "a.conf"
    decoy = tmp_path / "decoy.conf"
    decoy.write_bytes(target.read_bytes())  # even the same bytes
    subprocess.run(["mount", "--bind", str(decoy), str(target)], check=True)
    try:
        warning = wait_for_event(site, target, kind="warning", status="open")
        assert warning["classification"] == "unreadable"
        assert "a filesystem is mounted on it" in warning["new"]["warning"]
        wait_until(lambda: site.alerts_for(target), "the mount's alert", REALTIME_SECONDS)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    wait_for_event(site, target, kind="warning", status="resolved")
    wait_until(lambda: len(site.alerts_for(target)) == 2, "the alert of its end",
               REALTIME_SECONDS)
    assert daemon.terminate() == 0
    assert_no_crash(site)


def test_sighup_with_a_valid_policy_takes_effect(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    watches = site.status()["watcher"]["watches"]
    (site.tree / "spool" / "before").write_text("seen\n")  # watched before the reload
    wait_for_event(site, site.tree / "spool" / "before", kind="added", source="realtime")
    scans = full_scans(site)
    site.write_policy(exclude=["spool"])
    daemon.signal(signal.SIGHUP)
    wait_for_log(site, "policy reloaded", RELOAD_SECONDS)
    wait_until(lambda: site.status()["watcher"]["watches"] == watches - 1,
               "one watch fewer (spool is excluded now)", 5)
    # The reload rescans: a change it saw first would be a scan's event, not ours.
    wait_until(lambda: full_scans(site) > scans, "the rescan after the reload",
               RELOAD_SECONDS)
    (site.tree / "spool" / "after").write_text("not watched any more\n")
    rewrite(site.tree / "c.conf", b"control after reload\n")
    wait_for_event(site, site.tree / "c.conf", source="realtime")
    wait_until(lambda: site.alerts_for(site.tree / "c.conf"), "the control's alert",
               REALTIME_SECONDS)
    assert site.events(site.tree / "spool" / "after") == []
    assert site.alerts_for(site.tree / "spool" / "after") == []
    assert daemon.terminate() == 0
    assert_no_crash(site)  # the old watcher's loop must end cleanly, not die


def test_sighup_after_logrotate_reopens_the_alert_file_without_a_rescan(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    rewrite(site.tree / "a.conf", b"before rotation\n")
    wait_until(lambda: site.alerts_for(site.tree / "a.conf"), "the first alert",
               REALTIME_SECONDS)
    rotated = site.alerts.with_name("alerts.jsonl.1")
    site.alerts.rename(rotated)  # what logrotate does before its postrotate HUP
    daemon.signal(signal.SIGHUP)
    wait_for_log(site, "alert sinks reopened", RELOAD_SECONDS)
    rewrite(site.tree / "b.conf", b"after rotation\n")
    wait_until(lambda: site.alerts_for(site.tree / "b.conf"), "the alert in the new file",
               REALTIME_SECONDS)
    assert [a["path"] for a in site.alert_lines()] == [str(site.tree / "b.conf")]
    assert [json.loads(line)["path"] for line in rotated.read_text().splitlines()] == [
        str(site.tree / "a.conf")]
    assert "policy reloaded" not in site.stderr()  # no rewatch, no full rescan
    assert daemon.terminate() == 0
    assert_no_crash(site)


def test_alerts_owed_to_a_dead_webhook_survive_a_restart(
        site: Site, start: Callable[..., Daemon], receiver: Receiver) -> None:
    with open(site.policy, "a") as policy:
        policy.write(f'\n[[alert]]\ntype = "webhook"\nurl = "{receiver.url}"\n'
                     'retries = 0\ntimeout = 5\n')
    receiver.status = 503
    daemon = start()
    rewrite(site.tree / "a.conf", b"while the webhook is down\n")
    event = wait_for_event(site, site.tree / "a.conf", source="realtime")
    [owed] = wait_until(lambda: [a for a in site.status()["alerts"] if a["attempts"]],
                        "status to show the undelivered alert", REALTIME_SECONDS + 3)
    assert owed["sink"].endswith(":webhook") and "503" in owed["last_error"]
    assert daemon.terminate() == 0
    # Back up, and a new watcher delivers what the old one owed, once.
    receiver.status = 200
    daemon = start()
    wait_until(lambda: receiver.bodies, "the owed alert", REALTIME_SECONDS + 3)
    assert [body["id"] for body in receiver.bodies] == [event["id"]]
    wait_until(lambda: site.status()["alerts"] == [], "an empty outbox", 5)
    assert len(site.alerts_for(site.tree / "a.conf")) == 1  # jsonl: delivered once
    assert daemon.terminate() == 0
    assert_no_crash(site)


def unreachable_url() -> str:
    """A webhook URL on loopback that nothing listens on: connections are refused,
    as they are to a pager an intruder has firewalled off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/page"


def write_paging_policy(site: Site, pager: str | None) -> None:
    """The site's policy: a.conf's tree high, app/ critical, the jsonl sink and, when
    `pager` names it, a webhook sink that cannot be reached."""
    lines = ["[[rule]]", f"path = {json.dumps(str(site.tree))}", 'check = "config"',
             'severity = "high"', "",
             "[[rule]]", f"path = {json.dumps(str(site.tree / 'app'))}",
             'check = "config"', 'severity = "critical"', "",
             "[[alert]]", 'name = "log"', 'type = "jsonl"',
             f"path = {json.dumps(str(site.alerts))}", ""]
    if pager is not None:
        lines += ["[[alert]]", f"name = {json.dumps(pager)}", 'type = "webhook"',
                  f"url = {json.dumps(unreachable_url())}", "retries = 0", "timeout = 2",
                  ""]
    site.policy.write_text("\n".join(lines))


def owe_the_pager(site: Site) -> str:
    """A high and a critical change, recorded by a one-shot verify: the jsonl sink
    takes both, the pager's copies stay owed. Returns since when they are owed."""
    write_paging_policy(site, "pager")
    assert site.cli("init", "--force").exit_code == 0  # its rules sealed
    rewrite(site.tree / "a.conf", b"intruder was here\n")
    rewrite(site.tree / "app" / "d.conf", b"intruder was here too\n")
    assert site.cli("verify").exit_code == 1
    assert {a["severity"] for a in site.alert_lines()} == {"high", "critical"}
    [owed] = site.status()["alerts"]
    assert owed["sink"] == "pager" and owed["undelivered"] == 2
    return str(owed["since"])


def dropped_reports(site: Site) -> list[dict[str, Any]]:
    return [a for a in site.alert_lines() if a["classification"] == "alerts-dropped"]


def assert_reported(site: Site, since: str) -> None:
    """The remaining sink got one report of the pager's dropped alerts, recorded as an
    event in the hash chain, and status shows the drop."""
    [report] = wait_until(lambda: dropped_reports(site),
                          "the report of the dropped alerts in the jsonl sink", 15)
    assert report["kind"] == "warning" and report["severity"] == "critical"
    assert report["path"] == str(site.policy) and report["status"] == "resolved"
    details = report["new"]
    assert (details["sink"], details["alerts"], details["severity"], details["oldest"]) == (
        "pager", 2, "critical", since)
    assert "2 undelivered alerts owed to sink 'pager' dropped" in details["warning"]
    changes = [e for e in site.cli.json("events") if e["kind"] == "modified"]
    assert sorted(details["events"]) == sorted(e["id"] for e in changes)
    [event] = [e for e in site.cli.json("events") if e["id"] == report["id"]]
    assert event["classification"] == "alerts-dropped" and event["severity"] == "critical"
    # Chained: the report's place in the chain is in the history status checks.
    assert report["chain"] and event["chain"] == report["chain"]
    status = site.status()
    assert status["chain"]["ok"], status["chain"]["problems"]
    assert site.cli("status", "--expect-head", report["chain"]).exit_code != 2
    assert rows(site.db, "SELECT count(*) FROM ledger WHERE kind = 'event' AND ref = ?",
                (report["id"],)) == [(1,)]
    # Nothing owed to the old name any more ...
    assert "pager" not in [a["sink"] for a in status["alerts"]]
    [drop] = status["alerts_dropped"]  # ... and status says where it went
    assert (drop["sink"], drop["alerts"], drop["severity"], drop["event"]) == (
        "pager", 2, "critical", report["id"])
    assert "alerts: pager: DROPPED" in site.cli("status").stdout


def test_alerts_owed_to_a_sink_removed_from_the_policy_are_reported_at_restart(
        site: Site, start: Callable[..., Daemon]) -> None:
    # The attack: the pager is firewalled, so its critical alert stays owed; the
    # intruder removes the pager from the policy (sinks are not sealed) and restarts.
    since = owe_the_pager(site)
    write_paging_policy(site, None)
    daemon = start()
    assert_reported(site, since)
    assert "for sink 'pager', no longer in the policy" in site.stderr()
    assert daemon.terminate() == 0
    # Reported once: a second start has nothing left to drop.
    daemon = start()
    assert daemon.terminate() == 0
    assert len(dropped_reports(site)) == 1
    assert_no_crash(site)


def test_a_sink_renamed_on_sighup_reports_the_alerts_its_old_name_was_owed(
        site: Site, start: Callable[..., Daemon]) -> None:
    since = owe_the_pager(site)
    daemon = start()
    assert site.status()["alerts"][0]["sink"] == "pager"  # still owed: still named
    write_paging_policy(site, "pager-v2")
    daemon.signal(signal.SIGHUP)
    assert_reported(site, since)
    # The renamed pager is owed the report (not the backlog): one summary when it is back.
    [owed] = site.status()["alerts"]
    assert (owed["sink"], owed["undelivered"]) == ("pager-v2", 1)
    assert daemon.terminate() == 0
    assert_no_crash(site)


def test_a_start_interrupted_while_dropping_deletes_nothing_unrecorded(
        site: Site, start: Callable[..., Daemon]) -> None:
    since = owe_the_pager(site)
    write_paging_policy(site, None)
    # The database refuses the report (as a full disk or a kill would cut it short):
    # the drop must go with it, not happen on its own.
    conn = sqlite3.connect(site.db)
    with conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON event "
                     "WHEN NEW.classification = 'alerts-dropped' "
                     "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    conn.close()
    daemon = start(wait=False)
    code = daemon.proc.wait(timeout=30)
    owed = rows(site.db, "SELECT sink, count(*) FROM outbox GROUP BY sink")
    assert (code, owed) == (2, [("pager", 2)]), site.stderr()
    assert dropped_reports(site) == []
    conn = sqlite3.connect(site.db)
    with conn:
        conn.execute("DROP TRIGGER refuse")
    conn.close()
    daemon = start()
    assert_reported(site, since)
    assert daemon.terminate() == 0


# -- who made the change ------------------------------------------------------------------

def test_a_realtime_event_names_the_process_that_made_it(
        site: Site, start: Callable[..., Daemon]) -> None:
    daemon = start()
    target = site.tree / "a.conf"
    # The writer lives on for a moment after its write, as an editor or a shell
    # session does; one that exits at once is caught only as far as /proc allows.
    writer = subprocess.Popen(["/bin/sh", "-c", f"printf 'by sh\\n' > '{target}'; sleep 1"])
    event = wait_for_event(site, target, source="realtime")
    assert writer.wait(timeout=10) == 0
    actor = event["actor"]
    assert actor is not None, event
    assert actor["pid"] == writer.pid, actor.get("unknown")
    assert actor["exe"] == os.path.realpath("/bin/sh")
    assert actor["cmdline"].startswith("/bin/sh -c printf")
    assert actor["uid"] == 0 and actor["user"] == "root"
    loginuid = int(Path("/proc/self/loginuid").read_text())
    assert actor["loginuid"] == (None if loginuid == 4294967295 else loginuid)
    assert event["classification"] == "unexplained" and event["severity"] == "high"
    # The alert carries the same actor.
    [alert] = wait_until(lambda: site.alerts_for(target), "the alert", REALTIME_SECONDS)
    assert alert["actor"] == actor
    assert daemon.terminate() == 0
    assert_no_crash(site)


def test_a_package_install_is_marked_package_manager_not_shouted(
        site: Site, start: Callable[..., Daemon], tmp_path: Path) -> None:
    from debs import build_deb, dpkg_cmd

    target = site.tree / "app" / "from-package.conf"
    deb = build_deb(tmp_path / "debs", "integrity-test-actor", "1.0",
                    {str(target): b"installed by dpkg\n"})
    daemon = start()
    try:
        dpkg_cmd("-i", str(deb))  # waits while another test's dpkg holds the lock
        event = wait_for_event(site, target, source="realtime")
        assert event["kind"] == "added"
        assert event["classification"] == "package-manager", event
        assert event["severity"] == "low"  # the rule says high; dpkg did it
        assert event["actor"]["exe"] == "/usr/bin/dpkg"
        # A change by hand in the same tree meanwhile is still shouted.
        rewrite(site.tree / "b.conf", b"by hand during the upgrade\n")
        manual = wait_for_event(site, site.tree / "b.conf", source="realtime")
        assert manual["classification"] == "unexplained" and manual["severity"] == "high"
    finally:
        dpkg_cmd("--purge", "integrity-test-actor", check=False)
    assert not target.exists()
    assert daemon.terminate() == 0
    assert_no_crash(site)


# -- what it must survive, and say -----------------------------------------------------

INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes /proc/sys")


@contextlib.contextmanager
def sysctl(name: str, value: int) -> Iterator[Callable[[], None]]:
    """Set /proc/sys/fs/inotify/NAME; the block gets a function that restores it early.
    The original value is always back when the block ends."""
    path = INOTIFY_SYSCTL / name
    original = path.read_text().strip()

    def restore() -> None:
        path.write_text(f"{original}\n")

    try:
        path.write_text(f"{value}\n")
        yield restore
    finally:
        restore()
    assert path.read_text().strip() == original


def watches_in_use() -> int:
    """Inotify watches held by all processes (everything here runs as root)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    total += sum(1 for line in f if line.startswith("inotify wd:"))
    return total


@pytest.mark.inotify_limits
@needs_root
def test_queue_overflow_is_a_warning_and_every_change_is_reported(
        site: Site, start: Callable[..., Daemon]) -> None:
    with sysctl("max_queued_events", 64) as restore:
        daemon = start(wait=False)
        wait_for_log(site, "watching 3 directories", 15)  # inotify_init has read it
        restore()
    daemon.wait_running()
    planted = [site.tree / "app" / f"dropped{i:03d}" for i in range(150)]
    daemon.signal(signal.SIGSTOP)  # the reader stalls; the kernel queue overflows
    try:
        for path in planted:
            path.write_text("written while events were being lost\n")
        rewrite(site.tree / "a.conf", b"changed during the overflow too\n")
    finally:
        daemon.signal(signal.SIGCONT)
    planted.append(site.tree / "a.conf")
    wait_until(lambda: all(site.alerts_for(p) for p in planted),
               "an alert for every change made during the overflow", 20)
    assert "overflow" in site.stderr()
    warnings = [e for e in site.cli.json("events") if e["kind"] == "warning"]
    assert warnings, "no warning event for the overflow"
    assert warnings[-1]["path"] == "/" and "overflow" in json.dumps(warnings[-1]["new"])
    wait_until(lambda: all(e["status"] == "resolved" for e in site.cli.json("events")
                           if e["kind"] == "warning"),
               "the overflow warning resolved after its rescan", 10)
    assert any(a["kind"] == "warning" for a in site.alert_lines())
    # Counted for the dashboards (issue 16): a counter that survives restarts.
    overflows = [line for line in site.cli("metrics").stdout.splitlines()
                 if line.startswith("integrity_watcher_overflows_total ")]
    assert overflows and float(overflows[0].split()[1]) >= 1, overflows
    assert daemon.terminate() == 0
    assert_no_crash(site)


@pytest.mark.inotify_limits
@needs_root
def test_watch_limit_is_a_warning_that_names_the_sysctl(
        site: Site, start: Callable[..., Daemon]) -> None:
    # The tree has 3 directories; leave room for 2 watches, for as short as we can.
    with sysctl("max_user_watches", watches_in_use() + 2) as restore:
        daemon = start(wait=False)
        wait_for_log(site, "watching 2 directories", 15)
        restore()
    daemon.wait_running()
    watcher = site.status()["watcher"]
    assert watcher["watches"] == 2
    [unwatched] = watcher["unwatched"]
    assert str(site.tree / "spool") in unwatched
    assert "fs.inotify.max_user_watches" in unwatched
    warnings = wait_until(lambda: [e for e in site.cli.json("events")
                                   if e["kind"] == "warning"], "a warning event", 5)
    [warning] = warnings
    assert warning["path"] == str(site.tree / "spool") and warning["status"] == "open"
    text = json.dumps(warning["new"])
    assert "needs 3" in text and "sysctl -w fs.inotify.max_user_watches=" in text, text
    assert daemon.running()
    assert daemon.terminate() == 0
    assert_no_crash(site)

# -- systemd --------------------------------------------------------------------------

class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET: a datagram socket we bind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def next(self, key: str, timeout: float) -> dict[str, str]:
        """The next message holding KEY (earlier ones are kept in `messages`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {key} within {timeout} s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                raw = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in raw.decode().splitlines())
            self.messages.append(message)
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = NotifySocket(path)
    try:
        yield sock
    finally:
        sock.close()


def test_systemd_notify_protocol(site: Site, start: Callable[..., Daemon],
                                 notify_socket: NotifySocket) -> None:
    target = site.tree / "a.conf"
    rewrite(target, b"changed before the first start\n")
    daemon = start(env={"NOTIFY_SOCKET": str(notify_socket.path),
                        "WATCHDOG_USEC": "1000000"}, wait=False)
    ready = notify_socket.next("READY", 15)
    assert ready["READY"] == "1"
    # READY=1 comes after the catch-up scan: its event is already recorded.
    assert [e["source"] for e in site.events(target)] == ["scan"]
    assert "catch-up scan found 1 change" in ready.get("STATUS", ""), ready
    assert not [m for m in notify_socket.messages[:-1] if "STOPPING" in m]
    assert daemon.running()
    assert notify_socket.next("WATCHDOG", 3)["WATCHDOG"] == "1"  # every 0.5 s
    daemon.signal(signal.SIGHUP)  # an unchanged policy: RELOADING=1, then READY=1 again
    reloading = notify_socket.next("RELOADING", 3)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert notify_socket.next("READY", 5)["READY"] == "1"
    daemon.signal(signal.SIGTERM)
    assert notify_socket.next("STOPPING", STOP_SECONDS)["STOPPING"] == "1"
    assert daemon.proc.wait(timeout=STOP_SECONDS) == 0
    assert_no_crash(site)


#: How long the test holds the write lock, as an init writing its generation does.
LOCK_HELD_SECONDS = 4.0


def test_the_watcher_waits_out_an_init_holding_the_write_lock(
        site: Site, start: Callable[..., Daemon], notify_socket: NotifySocket) -> None:
    """`init` holds the database's write lock from its first row to the switch (~15 s
    for a million files). The daemon's realtime write waits for it, and its main loop
    goes on answering systemd's watchdog: a heartbeat that cannot be written within
    one interval is skipped (it used to wait for the lock, and no ping was sent).
    The baseline lock is held too, as init holds it: the daemon, unlike a CLI
    command, must not wait on it before its writes."""
    import fcntl

    daemon = start(env={"NOTIFY_SOCKET": str(notify_socket.path),
                        "WATCHDOG_USEC": "1000000"})  # a ping, and a heartbeat, every 0.5 s
    notify_socket.next("WATCHDOG", 3)
    target = site.tree / "a.conf"
    baseline_lock = os.open(f"{site.db}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    holder = sqlite3.connect(site.db, timeout=10, isolation_level=None)
    pings = 0
    try:
        fcntl.flock(baseline_lock, fcntl.LOCK_EX)
        holder.execute("BEGIN IMMEDIATE")
        held = time.monotonic()
        rewrite(target, b"changed while init holds the write lock\n")
        while time.monotonic() - held < LOCK_HELD_SECONDS:
            notify_socket.next("WATCHDOG", 2)
            pings += 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        os.close(baseline_lock)
    assert pings >= LOCK_HELD_SECONDS, pings  # ~2 a second
    event = wait_for_event(site, target)
    assert event["source"] == "realtime" and event["kind"] == "modified", event
    assert "heartbeat not recorded: database error: database is locked" in site.stderr()
    assert daemon.running()  # the next heartbeat was written
    assert daemon.terminate() == 0
    assert_no_crash(site)


# -- a root attacker against the running watcher -----------------------------------------

def test_a_digest_planted_in_the_baseline_before_the_write_is_caught_in_real_time(
        site: Site, start: Callable[..., Daemon]) -> None:
    """Trust issue, row 10: the attacker writes the malicious file's digest into its
    baseline row first, so that the realtime re-check would find nothing changed.
    The watcher re-checks the rows it reads against the seal it verified at start:
    the planted row is caught, recorded as tampering (critical) and alerted."""
    import blake3
    import sqlite3

    from integrity.paths import to_key

    daemon = start()
    target = site.tree / "a.conf"
    payload = b"PermitRootLogin yes\n"
    with sqlite3.connect(site.db) as conn:
        assert conn.execute("UPDATE entry SET content = ?, size = ? WHERE key = ?",
                            (blake3.blake3(payload).digest(), len(payload),
                             to_key(os.fsencode(target)))).rowcount == 1
    rewrite(target, payload)

    def tampering() -> list[dict[str, Any]]:
        return [e for e in site.cli.json("events") if e["classification"] == "tampering"]
    [event] = wait_until(tampering, "a tampering event", REALTIME_SECONDS + 3)
    assert event["severity"] == "critical" and "tampering" in event["new"]["warning"]
    assert str(target) in event["new"]["warning"]
    wait_until(lambda: [a for a in site.alert_lines()
                        if a["classification"] == "tampering"],
               "the tampering alert", REALTIME_SECONDS + 6)
    assert daemon.terminate() == 0
    assert_no_crash(site)
