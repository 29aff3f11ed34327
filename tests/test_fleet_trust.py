"""The host's seal and event chain as the central copy sees them: generations that only
grow, policy approvals, kept texts that never leave the host, pruned and alerted
histories that still chain, and the backlog a host reports.

Hosts and the central database are real (tests/fleethosts.py); attacks are made the
way a root attacker on the host would make them, with sqlite3 on the local file.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fleethosts import Central, Host, edit_and_reseal, flags, make_hosts, rejected
from integrity.fleet.push import unpushed_records
from integrity.policy import load
from integrity.store import Store

pytestmark = pytest.mark.usefixtures("no_leaks")


def _key(path: Path) -> bytes:
    return str(path).replace("/", "\0").encode()


def test_an_accepted_policy_edit_arrives_as_an_approval_and_a_new_generation(
        central: Central, tmp_path: Path) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"])
    # A severity change: no entry changes, only the seal (a new root and generation).
    web1.policy.write_text(web1.policy.read_text().replace(
        'severity = "high"', 'severity = "medium"', 1))
    assert web1.run("verify").exit_code == 1  # the policy file differs from the sealed one
    assert web1.run("approve", "--policy", "--reason", "CHG-1").exit_code == 0
    pushed = web1.push_ok()
    assert "baseline generation 2 (delta, 0 entries)" in pushed.stdout
    state = central.host_status("web1")
    assert state["healthy"] and flags(central, "web1") == []
    assert state["baseline"]["root"] == web1.root()
    assert state["baseline"]["generation"] == 2 and state["baseline"]["complete"]
    assert central.sql("SELECT mode, reason FROM integrity.approval") == [("policy", "CHG-1")]
    policy_events = [e for e in json.loads(central.fleet("events", "--json").stdout)
                     if e["kind"] == "policy"]
    assert [(e["severity"], e["status"]) for e in policy_events] == [("critical", "approved")]
    # The digest of the sealed policy is what the central copy keeps, not its text.
    digest = central.sql("SELECT policy_digest FROM integrity.baseline ORDER BY push")
    assert len(digest) == 2 and digest[0] != digest[1] and all(d[0] for d in digest)


def test_a_baseline_rolled_back_to_an_older_genuine_seal_is_flagged_forked(
        central: Central, tmp_path: Path) -> None:
    web1, = make_hosts(central, tmp_path, ["web1"])
    older = tmp_path / "generation-1.db"
    web1.snapshot(older)
    conf = web1.change("etc/app.conf", "listen 8443\n")
    assert web1.run("verify").exit_code == 1
    assert web1.run("approve", str(conf)).exit_code == 0
    web1.push_ok()
    assert central.host_status("web1")["baseline"]["generation"] == 2
    # The attacker puts generation 1 back (its rows and its genuine seal), leaving the
    # event history alone: the host's own seal check passes.
    with sqlite3.connect(web1.db) as conn:
        conn.execute("ATTACH DATABASE ? AS old", (str(older),))
        active = "(SELECT id FROM baseline WHERE state = 'active')"
        conn.execute(f"DELETE FROM entry WHERE baseline_id = {active}")
        conn.execute("INSERT INTO entry SELECT * FROM old.entry WHERE baseline_id = "
                     "(SELECT id FROM old.baseline WHERE state = 'active')")
        conn.execute("UPDATE baseline SET (root, generation, signature, entries) = "
                     "(SELECT root, generation, signature, entries FROM old.baseline "
                     "WHERE state = 'active') WHERE state = 'active'")
    store = Store(f"sqlite:///{web1.db}")
    try:
        from integrity.ops.seal import verify_seal

        info = store.baselines.require()
        assert info.generation == 1
        verify_seal(info, store.baselines.entries(info.id))  # a genuine seal
    finally:
        store.close()
    web1.push_ok()
    found = flags(central, "web1")
    assert [kind for kind, _ in found] == ["forked"], found
    assert "generation 1 is older than generation 2" in found[0][1]
    state = central.host_status("web1")
    assert not state["healthy"] and state["baseline"]["generation"] == 2


def test_an_approval_does_not_cover_a_reseal_made_after_it(central: Central,
                                                           tmp_path: Path) -> None:
    """A genuine approval (generation 2, chained) and then an edited entry re-sealed
    with integrity's own code as generation 3, pushed together: the chain names
    generation 2's root, not the one pushed, so the root is flagged."""
    web1, = make_hosts(central, tmp_path, ["web1"])
    motd = web1.change("etc/motd", "approved\n")
    assert web1.run("verify").exit_code == 1
    assert web1.run("approve", str(motd)).exit_code == 0
    edit_and_reseal(web1, next_generation=True)
    assert web1.local("SELECT generation FROM baseline WHERE state = 'active'") == [(3,)]
    web1.push_ok()
    found = flags(central, "web1")
    assert [kind for kind, _ in found] == ["root"], found
    assert "root changed without an approval" in found[0][1]
    assert "generation 1 -> 3" in found[0][1]


def test_kept_texts_stay_on_the_host_while_diffs_and_chain_places_arrive(
        central: Central, tmp_path: Path) -> None:
    marker = "only-on-this-host-7f3a"
    lines = [marker, *(f"option{i} = {i}" for i in range(12))]
    files = {"etc/app.conf": "\n".join(lines) + "\n", "etc/motd": "hi\n"}
    web1, = make_hosts(central, tmp_path, ["web1"], files=files)
    conf = web1.tree / "etc/app.conf"
    kept = web1.local("SELECT kept FROM entry WHERE key = ?", _key(conf))[0][0]
    assert kept is not None  # the config preset keeps the text, locally
    assert central.sql("SELECT kept FROM integrity.entry WHERE key = %s AND "
                       "superseded IS NULL", _key(conf)) == [(kept,)]
    conf.write_text("\n".join(lines[:-1] + ["option11 = 12", "db_password = hunter2-9c1e"])
                    + "\n")
    assert web1.run("verify").exit_code == 1
    web1.push_ok()
    local = {e["path"]: e for e in web1.cli.json("events")}
    remote = {e["path"]: e for e in json.loads(central.fleet("events", "--json").stdout)}
    event = remote[str(conf)]
    assert event["host"] == "web1" and event["chain"] == local[str(conf)]["chain"]
    assert event["diff"] == local[str(conf)]["diff"] and "option11 = 12" in event["diff"]
    assert "hunter2" not in event["diff"]  # redacted on the host, before anything left
    dump = central.dump()
    for secret in (marker, "hunter2"):
        assert secret not in dump and secret.encode().hex() not in dump


def test_a_pruned_and_alerted_history_still_extends_the_central_chain(
        central: Central, tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.jsonl"
    web1, = make_hosts(central, tmp_path, ["web1"], alert=alerts)
    web1.change("etc/motd", "changed\n")
    web1.change("etc/app.conf", "listen 81\n")
    assert web1.run("verify").exit_code == 1
    assert len(alerts.read_text().splitlines()) == 2  # delivered: the outbox is emptied
    assert web1.run("approve", "--all").exit_code == 0
    web1.push_ok()
    kinds = {kind for kind, *_ in web1.central_ledger()}
    assert {"event", "approval", "baseline", "outbox"} <= kinds
    pruned_before = web1.central_events()
    assert web1.run("prune", "--older-than", "0s").exit_code == 0
    assert web1.local_events() == []  # every event was closed: pruned on the host
    web1.push_ok()
    state = central.host_status("web1")
    assert state["healthy"] and state["chain"]["state"] == "ok"
    assert flags(central, "web1") == [] and rejected(central, "web1") == 0
    # The central copy keeps what the host pruned, and the chain runs on through the
    # checkpoint that names the previous head.
    assert web1.central_events() == pruned_before
    held = web1.central_ledger()
    assert held[-len(web1.ledger()):] == web1.ledger()
    assert web1.ledger()[0][0] == "checkpoint"


def test_the_backlog_a_host_reports_counts_what_the_central_copy_lacks(
        central: Central, tmp_path: Path) -> None:
    web1 = Host(central, tmp_path, "web1")
    assert web1.run("init").exit_code == 0
    store = Store(f"sqlite:///{web1.db}")
    try:
        # Before the first push: every chain record, and the baseline.
        chain = len(web1.ledger())
        assert chain > 0 and unpushed_records(store) == chain + 1
        web1.push_ok()
        assert unpushed_records(store) == 0
        assert central.host_status("web1")["unpushed"] == 0
        web1.change("etc/motd", "changed\n")
        assert web1.run("verify").exit_code == 1
        assert unpushed_records(store) == 1  # one event record
        # ... which is what the host's metrics report too.
        metrics = web1.run("metrics")
        assert metrics.exit_code == 0
        assert "\nintegrity_fleet_unpushed_records 1.0\n" in metrics.output
        assert web1.run("approve", "--all").exit_code == 0
        assert unpushed_records(store) > 1
        web1.push_ok()
        assert unpushed_records(store) == 0
    finally:
        store.close()


def test_the_fleet_table_may_come_from_a_drop_in(central: Central, tmp_path: Path) -> None:
    web1 = Host(central, tmp_path, "web1")
    text = web1.policy.read_text()
    fleet = text[text.index("[fleet]"):]
    web1.policy.write_text(text[:text.index("[fleet]")])
    dropins = web1.policy.parent / "policy.d"
    dropins.mkdir()
    (dropins / "10-fleet.toml").write_text(fleet)
    (dropins / "20-interval.toml").write_text('[fleet]\ninterval = "5m"\n')
    policy = load(web1.policy)
    assert policy.fleet is not None and policy.fleet.host == "web1"
    assert policy.fleet.group == "web" and policy.fleet.interval == 300.0
    assert web1.run("init").exit_code == 0
    web1.push_ok()
    assert central.host_status("web1")["interval"] == 300
    shown = web1.run("policy", "show")
    assert shown.exit_code == 0 and "[fleet]" in shown.stdout
    assert 'interval = "5m"' in shown.stdout


def test_a_baseline_resealed_behind_the_spool_shows_at_the_next_heartbeat(
        central: Central, tmp_path: Path) -> None:
    """The attack: drop the spool's triggers, plant a backdoor's digest in its entry
    and re-seal the baseline with integrity's own code, note the new root in the
    spool's own state, and put the triggers back. The host's verify passes, its
    pushes carry no baseline change, and the central copy kept the old root with
    nothing flagged (a later genuine approval would carry the planted entry in).
    Every heartbeat now says which seal the host holds: central compares."""
    from fleethosts import edit_entry, reseal
    from integrity.store.ledger import journal
    from integrity.store.spool import TRIGGERS

    web1, = make_hosts(central, tmp_path, ["web1"])
    held = central.host_status("web1")["baseline"]["root"]
    for name in TRIGGERS:
        web1.local(f"DROP TRIGGER {name}")
    edit_entry(web1)
    tool = web1.tree / "bin" / "tool"
    st = tool.stat()  # the rest of what the backdoor changed, as `static` checks it
    web1.local("UPDATE entry SET inode = ?, mtime = ?, ctime = ?, nlink = ? WHERE key = ?",
               st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, _key(tool))
    reseal(web1, next_generation=False)
    web1.local("UPDATE fleet_state SET root = (SELECT root FROM baseline "
               "WHERE state = 'active')")
    with sqlite3.connect(web1.db) as conn:
        for ddl in TRIGGERS.values():
            conn.execute(ddl)
    store = Store(f"sqlite:///{web1.db}")
    try:  # the new state entered in the chain, as integrity would have
        with store.writer() as conn, conn.begin():
            journal(conn, "baseline", [store.baselines.require().id])
    finally:
        store.close()
    assert web1.run("verify").exit_code == 0  # the host alone is fooled
    assert web1.root() != held
    web1.push_ok()
    found = flags(central, "web1")
    assert [kind for kind, _ in found] == ["root"], found
    assert web1.root()[:16] in found[0][1] and held[:16] in found[0][1]
    assert not central.host_status("web1")["healthy"]
    web1.push_ok()  # said once, not at every heartbeat
    assert len(flags(central, "web1")) == 1
