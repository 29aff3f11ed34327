"""The outbox and the dispatcher: alerts survive a dead webhook, bursts become one
digest for people, repeats are not re-sent, and status names a sink that keeps failing.

Real parts only: a real HTTP server on loopback, a real SQLite file, the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integrity.alerts import build_sinks
from integrity.alerts.dispatch import Dispatcher
from integrity.alerts import Route
from integrity.policy import load
from integrity.ops.verify import EventContext, verify
from integrity.ops.status import FAILING_AFTER
from integrity.store import Store
from integrity.store.events import Sighting

from conftest import REPO, Cli, Receiver, wait_until


@pytest.fixture
def alerting(tmp_path: Path, tree: Path, write_policy: Callable[..., Path],
             receiver: Receiver) -> Callable[..., Cli]:
    """A CLI whose policy sends to a jsonl file and to the receiver."""
    def make(fmt: str = "json") -> Cli:
        policy = write_policy({"path": str(tree), "check": "static", "severity": "high"},
                              extra=f"""
            [[alert]]
            type = "jsonl"
            path = "{tmp_path}/alerts.jsonl"

            [[alert]]
            type = "webhook"
            url = "{receiver.url}"
            format = "{fmt}"
            retries = 0
            timeout = 5
            """)
        cli = Cli(tmp_path / "state" / "integrity.db", policy)
        assert cli("init").exit_code == 0
        return cli
    return make


@contextlib.contextmanager
def opened(cli: Cli) -> Iterator[Store]:
    store = Store(f"sqlite:///{cli.db}")
    try:
        yield store
    finally:
        store.close()


def jsonl(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_outage_loses_nothing_and_repeats_are_not_resent(
        tmp_path: Path, tree: Path, alerting: Callable[..., Cli], receiver: Receiver) -> None:
    cli = alerting()
    receiver.status = 503
    (tree / "a.conf").write_text("changed\n")
    assert cli("verify").exit_code == 1
    # The machine sink that works got the event at once; the webhook's copy is owed.
    [line] = jsonl(tmp_path)
    assert line["path"] == str(tree / "a.conf") and line["severity"] == "high"
    assert receiver.attempts == 1 and receiver.bodies == []
    status = cli.json("status")
    [owed] = status["alerts"]
    assert owed["sink"].endswith(":webhook") and owed["undelivered"] == 1
    assert owed["attempts"] == 1 and "503" in owed["last_error"]
    assert not owed["failing"]

    # The same open change seen again is an update of the event, not a new alert.
    (tree / "a.conf").write_text("changed again\n")
    assert cli("verify").exit_code == 1
    assert len(jsonl(tmp_path)) == 1
    [event] = cli.json("events")
    assert event["count"] == 2

    # The webhook comes back: the owed alert arrives once, and the outbox is empty.
    receiver.status = 200
    with opened(cli) as store:
        assert store.outbox.retry_now() == 1
    assert cli("verify").exit_code == 1
    assert [body["id"] for body in receiver.bodies] == [line["id"]]
    assert cli.json("status")["alerts"] == []


def test_a_sink_that_keeps_failing_makes_status_unhealthy(
        tmp_path: Path, tree: Path, alerting: Callable[..., Cli], receiver: Receiver) -> None:
    cli = alerting()
    receiver.status = 500
    (tree / "a.conf").write_text("changed\n")
    assert cli("verify").exit_code == 1
    policy = load(cli.policy)
    with opened(cli) as store:
        dispatcher = Dispatcher(store, build_sinks(policy))
        for _ in range(FAILING_AFTER - 1):
            store.outbox.retry_now()
            assert dispatcher.run_once() == 0
        [owed] = store.outbox.backlog()
        assert owed.attempts == FAILING_AFTER
    assert receiver.attempts == FAILING_AFTER
    status = cli("status")
    assert status.exit_code != 0
    assert "FAILING" in status.stdout and "HTTP 500" in status.stdout
    assert cli.json("status")["alerts"][0]["failing"] is True


def test_a_burst_reaches_people_as_one_digest(
        tmp_path: Path, tree: Path, alerting: Callable[..., Cli], receiver: Receiver) -> None:
    cli = alerting("slack")
    for i in range(30):
        (tree / f"new{i:02d}.conf").write_text(f"{i}\n")
    assert cli("verify").exit_code == 1
    # Machine sink: every event (thirty files and their directory's new mtime);
    # the chat webhook: one message naming them all.
    assert len(jsonl(tmp_path)) == 31
    [message] = receiver.bodies
    assert all(f"new{i:02d}.conf" in message["text"] for i in range(30))
    assert "31" in message["text"]


def test_the_dispatcher_waits_for_a_burst_to_end_then_sends_one_per_interval(
        tmp_path: Path, tree: Path, alerting: Callable[..., Cli], receiver: Receiver) -> None:
    cli = alerting("slack")
    policy = load(cli.policy)
    with opened(cli) as store:
        sinks = build_sinks(policy)
        context = EventContext(routes=[Route(s.name, s.min_severity) for s in sinks])

        def change(name: str) -> None:
            (tree / name).write_text("x")
            verify(lambda: store, policy, parallel=0, source="scan", context=context)

        change("first")  # two new events: the file and its directory's mtime
        waiting = Dispatcher(store, sinks, gather=3600)
        assert waiting.run_once() == 2  # the machine sink gets both at once ...
        assert receiver.attempts == 0  # ... the digest waits: the burst may go on
        dispatcher = Dispatcher(store, sinks, gather=0)
        assert dispatcher.run_once() == 2  # one digest of the two
        assert len(receiver.bodies) == 1 and "first" in receiver.bodies[0]["text"]
        # Within the digest interval (60 s for chat) the next change waits ...
        change("second")  # one new event (the directory's is still open)
        assert dispatcher.run_once() == 1  # ... except for the machine sink
        assert len(receiver.bodies) == 1
        assert [b.pending for b in store.outbox.backlog()] == [1]
        # ... and goes as soon as the interval has passed.
        dispatcher.last_digest = {}
        assert dispatcher.run_once() == 1
        assert len(receiver.bodies) == 2 and "second" in receiver.bodies[1]["text"]
    assert len(jsonl(tmp_path)) == 3


def test_alert_test_reaches_every_sink_and_names_the_one_that_fails(
        tmp_path: Path, alerting: Callable[..., Cli], receiver: Receiver) -> None:
    cli = alerting()
    sent = cli("alert", "test")
    assert sent.exit_code == 0, sent.output
    assert sent.stdout.splitlines() == ["alert[0]:jsonl: delivered",
                                        "alert[1]:webhook: delivered"]
    [line] = jsonl(tmp_path)
    assert line["kind"] == "test" and "test alert" in line["path"]
    assert [body["kind"] for body in receiver.bodies] == ["test"]
    receiver.status = 503
    failed = cli("alert", "test")
    assert failed.exit_code == 1
    assert "alert[1]:webhook: FAILED:" in failed.stdout and "503" in failed.stdout
    # A test is not an event: nothing recorded, nothing owed.
    assert cli.json("events") == []
    assert cli.json("status")["alerts"] == []


def test_a_named_sink_keeps_what_it_is_owed_when_the_tables_are_reordered(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path],
        receiver: Receiver) -> None:
    webhook = f'[[alert]]\nname = "siem"\ntype = "webhook"\nurl = "{receiver.url}"\nretries = 0\n'
    jsonl_sink = f'[[alert]]\ntype = "jsonl"\npath = "{tmp_path}/alerts.jsonl"\n'
    rule = {"path": str(tree), "check": "static"}
    cli = Cli(tmp_path / "state" / "integrity.db", write_policy(rule, extra=webhook))
    assert cli("init").exit_code == 0
    receiver.status = 503
    (tree / "a.conf").write_text("changed\n")
    assert cli("verify").exit_code == 1
    assert [a["sink"] for a in cli.json("status")["alerts"]] == ["siem"]
    # A jsonl sink added in front: the webhook is alert[1] now, still "siem".
    write_policy(rule, extra=jsonl_sink + "\n" + webhook)
    receiver.status = 200
    with opened(cli) as store:
        store.outbox.retry_now()
    assert cli("verify").exit_code == 1
    assert [body["path"] for body in receiver.bodies] == [str(tree / "a.conf")]
    assert cli.json("status")["alerts"] == []
    # Two sinks may not share a name.
    clash = write_policy(rule, extra=webhook + "\n" + webhook.replace("webhook", "jsonl", 1)
                         .replace(f'url = "{receiver.url}"', f'path = "{tmp_path}/x"')
                         .replace("retries = 0\n", ""), name="clash.toml")
    refused = cli("verify", policy=clash)
    assert refused.exit_code == 2
    assert "alert[1].name: 'siem' names another sink already" in refused.stderr


def test_alerts_owed_to_a_sink_no_longer_in_the_policy_are_flagged_by_status(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path],
        receiver: Receiver) -> None:
    # A host without a watcher: one-shot runs deliver, and never drop what is owed to
    # a sink their --policy lacks (it may be a one-off policy); status says so.
    webhook = f'[[alert]]\nname = "pager"\ntype = "webhook"\nurl = "{receiver.url}"\nretries = 0\n'
    jsonl_sink = f'[[alert]]\ntype = "jsonl"\npath = "{tmp_path}/alerts.jsonl"\n'
    rule = {"path": str(tree), "check": "static", "severity": "critical"}
    cli = Cli(tmp_path / "state" / "integrity.db", write_policy(rule, extra=jsonl_sink + webhook))
    assert cli("init").exit_code == 0
    receiver.status = 503
    (tree / "a.conf").write_text("changed\n")
    assert cli("verify").exit_code == 1
    write_policy(rule, extra=jsonl_sink)
    assert cli("verify").exit_code == 1
    [owed] = cli.json("status")["alerts"]
    assert (owed["sink"], owed["undelivered"], owed["in_policy"]) == ("pager", 1, False)
    text = cli("status").stdout
    assert "alerts: pager: NOT IN THE POLICY" in text and "1 undelivered" in text
    assert cli.json("status")["alerts_dropped"] == []


class Trickle:
    """A peer that starts a reply (`opening`, after reading the request when `listens`
    first), then sends one more byte every 0.2 s: no socket timeout ever fires, and
    the reply never ends (for a minute)."""

    def __init__(self, opening: bytes, listens: bool) -> None:
        self.opening, self.listens = opening, listens
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if self.listens:
                conn.recv(65536)
            conn.sendall(self.opening)
            deadline = time.monotonic() + 60
            while not self.stop.wait(0.2) and time.monotonic() < deadline:
                conn.sendall(b"x")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.mark.parametrize("sink", ["webhook", "email"])
def test_a_peer_that_never_finishes_its_reply_holds_up_no_other_sink(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path], sink: str) -> None:
    """Socket timeouts bound each read, not a reply: a webhook or mail server trickling
    a byte at a time held the dispatcher, so the jsonl sink behind it got nothing and
    the timer's `verify` never ended (and no later scheduled verify could start)."""
    if sink == "webhook":
        peer = Trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ", listens=True)
        table = f'type = "webhook"\nurl = "http://127.0.0.1:{peer.port}/hook"\nretries = 0'
    else:
        peer = Trickle(b"220-", listens=False)
        table = (f'type = "email"\nhost = "127.0.0.1"\nport = {peer.port}\n'
                 'security = "none"\nfrom = "fim@example.org"\nto = ["ops@example.org"]')
    try:
        policy = write_policy({"path": str(tree), "check": "static", "severity": "high"},
                              extra=f"""
[[alert]]
{table}
timeout = 1

[[alert]]
type = "jsonl"
path = "{tmp_path}/alerts.jsonl"
""")
        cli = Cli(tmp_path / "state" / "integrity.db", policy)
        assert cli("init").exit_code == 0
        (tree / "a.conf").write_text("changed\n")
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "integrity", "--db", f"sqlite:///{cli.db}",
             "--policy", str(policy), "-q", "verify"], capture_output=True, text=True,
            timeout=30, cwd=REPO)
        assert done.returncode == 1, done.stderr
        assert time.monotonic() - started < 15
        [line] = jsonl(tmp_path)
        assert line["path"] == str(tree / "a.conf")
        [owed] = cli.json("status")["alerts"]  # owed still, with why
        assert owed["sink"].endswith(f":{sink}") and owed["undelivered"] == 1
        assert "within" in owed["last_error"], owed
    finally:
        peer.close()


class SlowReceiver(Receiver):
    """The receiver, taking `delay` seconds over each answer (a far SIEM)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        handler = self.server.RequestHandlerClass
        original = handler.do_POST  # type: ignore[attr-defined]

        def slow(request: Any) -> None:
            time.sleep(delay)
            original(request)
        handler.do_POST = slow  # type: ignore[attr-defined]


def test_a_flood_of_events_through_a_slow_sink_starves_no_other_sink(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    """A user who can create files in a protected tree (www-data in a web root) makes
    events faster than a slow webhook takes them: the dispatcher stayed with the
    webhook as long as any was due, and the sinks after it (here jsonl, the one an
    operator tails) got nothing, the alert about what mattered included."""
    slow = SlowReceiver(0.2)
    try:
        policy = write_policy({"path": str(tree), "check": "static", "severity": "high"},
                              extra=f"""
            [[alert]]
            type = "webhook"
            url = "{slow.url}"
            retries = 0

            [[alert]]
            type = "jsonl"
            path = "{tmp_path}/alerts.jsonl"
            """)
        cli = Cli(tmp_path / "state" / "integrity.db", policy)
        assert cli("init").exit_code == 0
        with opened(cli) as store:
            dispatcher = Dispatcher(store, build_sinks(load(policy)), poll=0.05)
            dispatcher.start()
            try:
                for number in range(40):  # 20 a second; the webhook takes 5
                    store.events.record([Sighting(
                        f"{tree}/flood-{number}".encode(), "added", (), None, {},
                        str(tree), "high", "unexplained")], "realtime", [],
                        routes=dispatcher.routes())
                    dispatcher.wake()
                    time.sleep(0.05)
                # jsonl has them all while the webhook is still ~30 behind (it takes
                # 8 s over the 40); before, jsonl waited for that whole backlog.
                wait_until(lambda: len(jsonl(tmp_path)) == 40, "all 40 alerts in jsonl", 20)
                assert len(slow.bodies) < 30
            finally:
                dispatcher.stop()
    finally:
        slow.close()


def readdress_owed_alerts(db: Path, sink: str, to: str) -> None:
    """Root's edit behind the product's back: alerts owed to `sink` now name `to`."""
    import sqlite3

    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE outbox SET sink = ? WHERE sink = ?", (to, sink))
    conn.close()


def test_an_alert_whose_sink_was_edited_is_not_dropped_as_a_removed_sink(
        tmp_path: Path) -> None:
    # The intruder renames the pager's owed critical alert to a sink nobody names
    # (an edit the chain check reports). Dropping it as owed to a removed sink
    # deleted the edited row and chained a tombstone over it: the evidence of the
    # edit was gone, and the report named the intruder's sink. An alert not as the
    # chain recorded it is tampering to report, not an alert to drop.
    db = tmp_path / "integrity.db"
    store = Store(f"sqlite:///{db}")
    routes = [Route("pager", "high"), Route("log", "low")]
    try:
        store.events.warn(b"/etc/shadow", "changed", source="scan",
                          severity="critical", routes=routes)
        readdress_owed_alerts(db, "pager", "gone")
        assert any("edited" in p for p in store.ledger.check().problems)
        assert store.outbox.drop_unknown(routes, b"/etc/integrity/policy.toml") == []
        assert any("edited" in p for p in store.ledger.check().problems)
        assert [(b.sink, b.pending) for b in store.outbox.backlog()] == [
            ("gone", 1), ("log", 1)]
        # An alert as recorded is dropped (and reported) as before.
        store.events.warn(b"/etc/passwd", "changed", source="scan",
                          severity="high", routes=routes)
        [dropped] = store.outbox.drop_unknown(routes[1:], b"/etc/integrity/policy.toml")
        assert (dropped.sink, dropped.alerts, dropped.severity) == ("pager", 1, "high")
    finally:
        store.close()


def test_prune_keeps_an_event_whose_alert_is_still_owed(tmp_path: Path) -> None:
    # The intruder firewalls the pager (its critical alert stays owed), closes the
    # event (approve) and prunes: the event went, and the dispatcher, finding no
    # event for the owed alert, deleted it as sent. The alert vanished with nothing
    # but a prune checkpoint to show for it.
    import datetime as dt

    store = Store(f"sqlite:///{tmp_path / 'integrity.db'}")
    try:
        event = store.events.warn(b"/etc/shadow", "changed", source="scan",
                                  severity="critical", resolved=True,
                                  routes=[Route("pager", "high")])
        later = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(hours=1)
        assert store.ledger.prune(later)[0] == 0
        assert [e["id"] for e in store.events.list(ids=[event])] == [event]
        [owed] = store.outbox.due("pager")
        assert owed.event_id == event
        store.outbox.delivered([owed.id])  # once the pager took it, it may go
        assert store.ledger.prune(later)[0] == 1
        assert store.ledger.check().problems == []
    finally:
        store.close()


def test_an_alert_whose_sink_was_edited_is_not_delivered_to_that_sink(
        tmp_path: Path) -> None:
    # The same edit pointed at another sink the policy names: the row was sent there
    # and deleted under a tombstone, so the pager never heard of it and the chain
    # check no longer showed the edit.
    db = tmp_path / "integrity.db"
    store = Store(f"sqlite:///{db}")
    routes = [Route("pager", "critical"), Route("log", "critical")]
    try:
        store.events.warn(b"/etc/shadow", "changed", source="scan",
                          severity="critical", routes=routes)
        [first] = store.outbox.due("log")
        store.outbox.delivered([first.id])
        readdress_owed_alerts(db, "pager", "log")
        assert store.outbox.due("log") == [] and store.outbox.due("pager") == []
        assert any("edited" in p for p in store.ledger.check().problems)
        # Alerts as recorded after it are still sent, past the edited one.
        second = store.events.warn(b"/etc/passwd", "changed", source="scan",
                                   severity="critical", routes=routes)
        assert [p.event_id for p in store.outbox.due("log", limit=1)] == [second]
    finally:
        store.close()
