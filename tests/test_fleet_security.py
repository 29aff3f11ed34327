"""What a host's role may do in the central database, tried with plain SQL while
connected as that role: insert its own rows, read its own open requests, nothing else.

A root attacker on a host has the host's password file, so every statement here is
one they could send.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleethosts import Central, Host, flags

TABLES = ("host", "host_state", "ledger", "ledger_rejected", "event", "approval",
          "baseline", "entry", "heartbeat", "flag", "request", "request_result",
          "monitor_alert", "alembic_version")


@pytest.fixture
def pair(central: Central, tmp_path: Path) -> tuple[Host, Host]:
    hosts = []
    for name in ("web1", "web2"):
        host = Host(central, tmp_path, name)
        assert host.run("init").exit_code == 0
        host.push_ok()
        hosts.append(host)
    return hosts[0], hosts[1]


def connect(central: Central, host: Host) -> psycopg.Connection[Any]:
    assert host.password_file is not None
    password = host.password_file.read_text().strip()
    return psycopg.connect(central.conninfo(host.name, password), autocommit=True)


def refused(conn: psycopg.Connection[Any], sql: str, *params: Any) -> str:
    """Run a statement that must be refused; return the server's message."""
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(sql, params or None)
    return str(caught.value)


def ids(central: Central) -> dict[str, int]:
    return {name: hid for hid, name in central.sql("SELECT id, name FROM integrity.host")}


def test_a_host_reads_no_table_but_its_own_open_requests(
        central: Central, pair: tuple[Host, Host]) -> None:
    web1, web2 = pair
    for host in (web1, web2):
        central.fleet("approve", "--host", host.name, "/etc/x", "--reason", host.name)
    with connect(central, web1) as conn:
        for table in TABLES:
            if table != "request":
                assert "permission denied" in refused(conn, f"SELECT * FROM integrity.{table}")
        rows = conn.execute('SELECT host_id, reason FROM integrity.request').fetchall()
        assert rows == [(ids(central)["web1"], "web1")]
        assert conn.execute("SELECT integrity.current_host()").fetchone() == (
            ids(central)["web1"],)
    web1.push_ok()  # answers it: gone from what the host can read
    with connect(central, web1) as conn:
        assert conn.execute("SELECT * FROM integrity.request").fetchall() == []


def test_a_host_updates_and_deletes_nothing_not_even_its_own_rows(
        central: Central, pair: tuple[Host, Host]) -> None:
    web1, _ = pair
    before = central.sql("SELECT count(*) FROM integrity.ledger")
    with connect(central, web1) as conn:
        for table in TABLES:
            message = refused(conn, f"DELETE FROM integrity.{table}")
            assert "permission denied" in message, (table, message)
            assert "permission denied" in refused(conn, f"TRUNCATE integrity.{table}")
        for sql in ("UPDATE integrity.ledger SET content = '{}'",
                    "UPDATE integrity.entry SET content = NULL",
                    "UPDATE integrity.host_state SET forked = NULL",
                    "UPDATE integrity.flag SET resolved = now()",
                    "UPDATE integrity.request SET answered = now()",
                    "UPDATE integrity.event SET status = 'approved'"):
            assert "permission denied" in refused(conn, sql)
        assert "permission denied" in refused(conn, "SELECT integrity.fork(1, 'x')")
        assert "permission denied" in refused(
            conn, "SELECT integrity.raise_flag(1, 'x', 'y')")
        assert "permission denied" in refused(conn, "CREATE TABLE integrity.mine (x int)")
        assert "must be owner" in refused(conn, "ALTER TABLE integrity.ledger "
                                                "DISABLE ROW LEVEL SECURITY")
    assert central.sql("SELECT count(*) FROM integrity.ledger") == before


def test_a_host_inserts_only_rows_of_its_own(central: Central,
                                             pair: tuple[Host, Host]) -> None:
    web1, web2 = pair
    other = ids(central)["web2"]
    with connect(central, web1) as conn:
        for sql in (
                "INSERT INTO integrity.ledger (host_id, seq, time, kind, ref, content, prev, "
                "digest) VALUES (%s, 99, now(), 'event', 1, '{}', 'a', 'b')",
                "INSERT INTO integrity.heartbeat (host_id, head_seq, head_digest) "
                "VALUES (%s, 0, 'x')",
                "INSERT INTO integrity.baseline (host_id, push, kind, baseline_id, "
                "generation, root, entries, changes, ledger_seq) VALUES "
                "(%s, 99, 'full', 1, 9, 'r', 0, 0, 0)",
                "INSERT INTO integrity.entry (host_id, push, key) VALUES (%s, 1, 'k')",
                "INSERT INTO integrity.request_result (host_id, request_id, outcome) "
                "VALUES (%s, 1, 'applied')"):
            assert "row-level security" in refused(conn, sql, other)
        # Columns set centrally cannot be given: no forged epoch, arrival or transaction.
        assert "permission denied" in refused(
            conn, "INSERT INTO integrity.ledger (host_id, epoch, seq, time, kind, ref, "
                  "content, prev, digest) VALUES (%s, 7, 99, now(), 'x', 1, '', 'a', 'b')",
            ids(central)["web1"])
        assert "permission denied" in refused(
            conn, "INSERT INTO integrity.entry (host_id, push, key, superseded) "
                  "VALUES (%s, 1, 'k', '1')", ids(central)["web1"])
    assert web2.central_ledger() == web2.ledger()
    assert flags(central, "web2") == [] and central.host_status("web2")["healthy"]


def test_entries_without_a_baseline_push_of_the_same_transaction_are_dropped(
        central: Central, pair: tuple[Host, Host]) -> None:
    web1, _ = pair
    me = ids(central)["web1"]
    before = central.sql("SELECT count(*) FROM integrity.entry WHERE host_id = %s", me)
    with connect(central, web1) as conn:
        conn.execute("INSERT INTO integrity.entry (host_id, push, key, type, content) "
                     "VALUES (%s, 1, %s, 'file', 'x')", (me, b"\0etc\0passwd"))
    assert central.sql("SELECT count(*) FROM integrity.entry WHERE host_id = %s", me) \
        == before
    assert central.host_status("web1")["baseline"]["complete"]


def test_a_record_that_contradicts_the_central_chain_is_kept_aside_and_flags(
        central: Central, pair: tuple[Host, Host]) -> None:
    web1, _ = pair
    web1.change("etc/motd", "changed\n")
    web1.run("verify")
    web1.push_ok()
    me = ids(central)["web1"]
    seq, digest = central.sql("SELECT seq, digest FROM integrity.ledger WHERE host_id = %s "
                              "ORDER BY seq DESC LIMIT 1", me)[0]
    with connect(central, web1) as conn:
        # The same record again: dropped silently (a retried batch).
        row = central.sql("SELECT seq, time, kind, ref, content, prev, digest FROM "
                          "integrity.ledger WHERE host_id = %s AND seq = %s", me, seq)[0]
        conn.execute("INSERT INTO integrity.ledger (host_id, seq, time, kind, ref, content, "
                     "prev, digest) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", (me, *row))
        assert flags(central, "web1") == []
        # A rewritten history: same number, other content.
        conn.execute("INSERT INTO integrity.ledger (host_id, seq, time, kind, ref, content, "
                     "prev, digest) VALUES (%s, %s, now(), 'event', 1, '{}', %s, %s)",
                     (me, seq, row[5], "f" * 64))
    assert [k for k, _ in flags(central, "web1")] == ["forked"]
    assert central.sql("SELECT digest FROM integrity.ledger WHERE host_id = %s AND seq = %s",
                       me, seq) == [(digest,)]
    assert central.sql("SELECT digest FROM integrity.ledger_rejected") == [("f" * 64,)]


def test_enrolment_prints_once_or_writes_a_private_file_and_never_sends_the_password(
        central: Central, tmp_path: Path) -> None:
    shown = central.fleet("enroll", "web7", "--group", "web")
    assert shown.exit_code == 0
    password = shown.stdout.strip().rsplit(" ", 1)[1]
    stored = central.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'web7'")[0][0]
    assert stored.startswith("SCRAM-SHA-256$") and password not in stored
    assert central.sql("SELECT grp FROM integrity.host WHERE name = 'web7'") == [("web",)]
    with psycopg.connect(central.conninfo("web7", password)) as conn:
        assert conn.execute("SELECT integrity.current_host()").fetchone()[0] is not None
    again = central.fleet("enroll", "web7")
    assert again.exit_code == 2 and "enrolled already" in again.stderr
    for taken in ("postgres", "integrity_admin", "bad name"):
        assert central.fleet("enroll", taken).exit_code == 2
    central.cluster.psql("CREATE ROLE someone_else")
    try:
        clash = central.fleet("enroll", "someone_else")
        assert clash.exit_code == 2 and "not an enrolled host" in clash.stderr
    finally:
        central.cluster.psql("DROP ROLE someone_else")
    target = tmp_path / "web8.pass"
    assert central.fleet("enroll", "web8", "--password-file", str(target)).exit_code == 0
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert central.fleet("enroll", "web9", "--password-file", str(target)).exit_code == 2
    assert central.sql("SELECT count(*) FROM integrity.host WHERE name = 'web9'") == [(0,)]
    rotated = central.fleet("enroll", "web7", "--rotate")
    assert rotated.exit_code == 0 and password not in rotated.stdout
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(central.conninfo("web7", password))


def test_admin_commands_on_a_database_without_the_fleet_schema(central: Central) -> None:
    central.cluster.psql("CREATE DATABASE empty_one")
    try:
        url = central.url.rsplit("/", 1)[0] + "/empty_one"
        from click.testing import CliRunner

        from integrity.cli import cli

        result = CliRunner().invoke(cli, ["fleet", "status", "--url", url])
        assert result.exit_code == 2 and "fleet init" in result.stderr
        assert result.stderr.count("\n") == 1
        made = CliRunner().invoke(cli, ["fleet", "init", "--url", url])
        assert made.exit_code == 0 and "upgraded from (empty) to f0002" in made.stdout
        again = CliRunner().invoke(cli, ["fleet", "init", "--url", url])
        assert again.exit_code == 0 and "is at revision f0002" in again.stdout
        empty = CliRunner().invoke(cli, ["fleet", "status", "--url", url])
        assert empty.exit_code == 0 and "no hosts enrolled" in empty.stdout
        bad = CliRunner().invoke(cli, ["fleet", "status", "--url", "mysql://x/y"])
        assert bad.exit_code == 2 and "PostgreSQL" in bad.stderr
        missing = CliRunner().invoke(cli, ["fleet", "status"])
        assert missing.exit_code == 2 and "INTEGRITY_FLEET_URL" in missing.stderr
    finally:
        central.cluster.psql("DROP DATABASE empty_one WITH (FORCE)")


def test_control_characters_from_a_host_are_escaped_in_fleet_output(
        central: Central, pair: tuple[Host, Host]) -> None:
    web1, _ = pair
    evil = web1.tree / "etc" / "x\n[critical] web2  ok  forged\x1b]0;owned\x07"
    evil.write_text("boo\n")
    web1.run("verify")
    web1.push_ok()
    text = central.fleet("events", "--host", "web1").stdout
    assert "\x1b" not in text and "\x07" not in text
    assert len(text.splitlines()) == 1 and "\\x0a[critical]" in text
    rows = json.loads(central.fleet("events", "--host", "web1", "--json").stdout)
    assert rows[0]["path"] == str(evil)


def _push_entries_under_the_held_seal(central: Central, host: Host, kind: str,
                                      entries: list[tuple[bytes, bytes]]) -> None:
    """What a host's password lets root send: a baseline push under the seal central
    holds (same baseline, root, generation) that claims no entry changed, with
    entries that say otherwise."""
    me = ids(central)[host.name]
    push, baseline_id, generation, root, ledger_seq = central.sql(
        "SELECT push, baseline_id, generation, root, ledger_seq FROM integrity.host_state "
        "WHERE host_id = %s", me)[0]
    with connect(central, host) as conn, conn.transaction():
        conn.execute("INSERT INTO integrity.baseline (host_id, push, kind, baseline_id, "
                     "generation, root, entries, changes, ledger_seq) VALUES "
                     "(%s, %s, %s, %s, %s, %s, %s, 0, %s)",
                     (me, push + 1, kind, baseline_id, generation, root, len(entries),
                      ledger_seq))
        for key, content in entries:
            conn.execute("INSERT INTO integrity.entry (host_id, push, key, type, content, "
                         "size, mode, uid, gid) VALUES (%s, %s, %s, 'file', %s, 1, 493, "
                         "0, 0)", (me, push + 1, key, content))


@pytest.mark.parametrize("kind", ["delta", "full"])
def test_entries_pushed_under_an_unchanged_seal_are_compared_not_taken_on_the_word(
        central: Central, pair: tuple[Host, Host], kind: str) -> None:
    """The attack: after approving a backdoor on web1, make the central copy show the
    entry its peers hold (so `fleet drift` finds nothing), by pushing it under the seal
    already held with `changes` = 0. Central holds the rows: it compares them."""
    web1, _ = pair
    me = ids(central)["web1"]
    tool = central.sql("SELECT key FROM integrity.entry WHERE host_id = %s AND "
                       "superseded IS NULL AND encode(key, 'escape') LIKE '%%tool'", me)
    assert tool
    _push_entries_under_the_held_seal(central, web1, kind, [(bytes(tool[0][0]), b"x" * 32)])
    found = flags(central, "web1")
    assert [k for k, _ in found] == ["root"], found
    assert "without a new root" in found[0][1]
    assert not central.host_status("web1")["healthy"]


def test_a_full_push_of_the_same_entries_under_the_held_seal_is_not_flagged(
        central: Central, pair: tuple[Host, Host]) -> None:
    """What an honest host sends after its spool triggers were repaired: the whole
    baseline again, unchanged."""
    web1, _ = pair
    web1.local("DROP TRIGGER fleet_entry_update")
    web1.push_ok()
    assert web1.local("SELECT count(*) FROM fleet_entry") == [(0,)]
    assert central.sql("SELECT kind FROM integrity.baseline ORDER BY push DESC LIMIT 1") \
        == [("full",)]
    assert flags(central, "web1") == [] and central.host_status("web1")["healthy"]


def test_fleet_init_upgrades_a_central_database_of_f0001(
        central: Central, pair: tuple[Host, Host]) -> None:
    """A central database set up before f0002 (its entries_in took the host's word)
    compares the rows once `fleet init` upgraded it; downgrading puts f0001 back."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config
    from importlib import resources

    engine = sa.create_engine(central.url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SET LOCAL ROLE integrity_admin"))
            config = Config()
            config.set_main_option("script_location", str(
                resources.files("integrity.store.central.migrations")))
            config.attributes["connection"] = conn
            command.downgrade(config, "f0001")
            conn.commit()
    finally:
        engine.dispose()
    assert central.sql("SELECT version_num FROM integrity.alembic_version") == [("f0001",)]
    web1, _ = pair
    tool = bytes(central.sql("SELECT key FROM integrity.entry WHERE host_id = %s AND "
                             "superseded IS NULL AND encode(key, 'escape') LIKE '%%tool'",
                             ids(central)["web1"])[0][0])
    _push_entries_under_the_held_seal(central, web1, "delta", [(tool, b"x" * 32)])
    assert flags(central, "web1") == []  # f0001 took the host's word
    refused = central.fleet("status")
    assert refused.exit_code == 2 and "fleet init" in refused.stderr
    upgraded = central.fleet("init")
    assert upgraded.exit_code == 0 and "f0002" in upgraded.stdout
    _push_entries_under_the_held_seal(central, web1, "delta", [(tool, b"y" * 32)])
    assert [k for k, _ in flags(central, "web1")] == ["root"]


def test_the_signature_central_shows_is_one_that_verifies(
        central: Central, tmp_path: Path) -> None:
    """The attack: with the host's password, push under the held seal a signature
    that is not one, naming the operator's public key (it is public) as the signer:
    `fleet status` showed the host's baseline as signed by the operator's key, from
    the host's word. Central holds the root, the signature and the key: it checks."""
    from integrity.trust import fingerprint, public_key_bytes

    web1 = Host(central, tmp_path, "web1")
    private = tmp_path / "signing.key"
    assert web1.run("key", "generate", str(private)).exit_code == 0
    public = Path(f"{private}.pub")
    web1.policy.write_text(f'public_key = "{public}"\n' + web1.policy.read_text())
    assert web1.run("init", "--sign-key", str(private)).exit_code == 0
    web1.push_ok()
    state = central.host_status("web1")
    operator = fingerprint(public_key_bytes(str(public)))
    assert state["healthy"] and state["baseline"]["signed"] is True
    assert state["baseline"]["signer"] == operator
    me = ids(central)["web1"]
    push, baseline_id, generation, root, ledger_seq = central.sql(
        "SELECT push, baseline_id, generation, root, ledger_seq FROM integrity.host_state "
        "WHERE host_id = %s", me)[0]
    with connect(central, web1) as conn:
        conn.execute("INSERT INTO integrity.baseline (host_id, push, kind, baseline_id, "
                     "generation, root, signature, signer, entries, changes, ledger_seq) "
                     "VALUES (%s, %s, 'delta', %s, %s, %s, %s, %s, 0, 0, %s)",
                     (me, push + 1, baseline_id, generation, root, b"\x01" * 64,
                      public_key_bytes(str(public)), ledger_seq))
    state = central.host_status("web1")
    assert state["baseline"]["signed"] is False and not state["healthy"]
    assert state["baseline"]["signature"] == "invalid"
    text = central.fleet("status")
    assert text.exit_code == 1 and "signature does not verify" in text.stdout
    from integrity.fleet.monitor import Monitor
    from integrity.store.central import Central as CentralDatabase

    database = CentralDatabase(central.url)
    try:
        monitor = Monitor(database, [])
        assert monitor.raise_alerts() == 1 and monitor.raise_alerts() == 0
    finally:
        database.close()
    assert central.sql("SELECT kind, event->>'severity' FROM integrity.monitor_alert") \
        == [("signature", "critical")]
