"""Kept content: diffs of config files in verify, events and every sink; restore; and
secrets never kept, redacted values nowhere."""

from __future__ import annotations

import email
import email.policy
import json
import os
import sqlite3
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli, Inbox, Receiver, one_line, rows
from integrity.store import Store

MARKER = "s3cr3t-MARKER-4711"
PRIVATE = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA" + MARKER
           + "\n-----END OPENSSH PRIVATE KEY-----\n")


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A config tree: an sshd_config, a file with a password, secrets by name and by
    content, a binary, and a file over max_diff_size."""
    root = tmp_path / "etc"
    (root / "ssh").mkdir(parents=True)
    (root / "ssh" / "sshd_config").write_text("Port 22\nPermitRootLogin no\nUsePAM yes\n")
    (root / "app.conf").write_text(f"user = app\npassword = {MARKER}\nurl = "
                                   f"postgresql://app:{MARKER}@db/app\n")
    (root / "shadow").write_text(f"root:{MARKER}:19000:0:99999:7:::\n")
    (root / "ssh" / "ssh_host_ed25519_key").write_text(PRIVATE)
    (root / "deploy.txt").write_text("notes\n" + PRIVATE)          # secret by content
    (root / "server.key").write_text(f"{MARKER}\n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" + MARKER.encode())
    (root / "large.conf").write_text("x" * (300 << 10))
    return root


@pytest.fixture
def cfg(tmp_path: Path, etc: Path, write_policy: Callable[..., Path]) -> Cli:
    policy = write_policy({"path": str(etc), "check": "config", "severity": "high"},
                          extra=f'\n[content]\nsecret = ["{etc}/shadow"]\n')
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    result = cli("init")
    assert result.exit_code == 0, result.output
    return cli


def kept_texts(db: Path) -> list[bytes]:
    """Every text the database keeps, read back through the store."""
    store = Store(f"sqlite:///{db}")
    try:
        found = []
        for (digest,) in rows(db, "SELECT digest FROM content"):
            got = store.contents.get(bytes(digest))
            assert got is not None
            found.append(got[0])
        return found
    finally:
        store.close()


def database_bytes(db: Path) -> bytes:
    """The database file and its WAL as bytes, blobs decompressed where they are zlib."""
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    blobs = [zlib.decompress(bytes(data)) for (data,) in rows(db, "SELECT data FROM content")]
    return raw + b"".join(blobs)


def test_secrets_are_never_kept_and_redacted_values_appear_nowhere(
        cfg: Cli, etc: Path) -> None:
    texts = kept_texts(cfg.db)
    assert any(b"PermitRootLogin no" in t for t in texts)
    assert not any(MARKER.encode() in t for t in texts)
    assert MARKER.encode() not in database_bytes(cfg.db)
    [app] = [t for t in texts if b"user = app" in t]
    assert b"password = <redacted:" in app and b"postgresql://app:<redacted:" in app
    # Which files kept nothing: the secrets (by glob, by name, by content), a binary,
    # and a file over max_diff_size.
    kept = {os.fsdecode(bytes(k)).replace("\x00", "/") for (k,) in rows(
        cfg.db, "SELECT key FROM entry WHERE kept IS NOT NULL")}
    assert kept == {str(etc / "ssh" / "sshd_config"), str(etc / "app.conf")}


def test_a_config_change_shows_as_a_diff_everywhere(
        tmp_path: Path, etc: Path, write_policy: Callable[..., Path], receiver: Receiver,
        smtp_server: Any) -> None:
    inbox = Inbox()
    server = smtp_server(inbox)
    alerts = tmp_path / "alerts.jsonl"
    policy = write_policy(
        {"path": str(etc), "check": "config", "severity": "high"},
        extra=f'''
        [content]
        secret = ["{etc}/shadow"]

        [[alert]]
        type = "jsonl"
        path = "{alerts}"

        [[alert]]
        type = "webhook"
        url = "{receiver.url}"

        [[alert]]
        type = "email"
        host = "127.0.0.1"
        port = {server.port}
        security = "none"
        from = "integrity@web1.example"
        to = ["ops@example.org"]
        ''')
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    assert cli("init").exit_code == 0
    (etc / "ssh" / "sshd_config").write_text("Port 22\nPermitRootLogin yes\nUsePAM yes\n")
    (etc / "app.conf").write_text(f"user = app\npassword = {MARKER}-new\nurl = "
                                  f"postgresql://app:{MARKER}@db/app\n")
    result = cli("verify")
    assert result.exit_code == 1
    assert "-PermitRootLogin no" in result.stdout and "+PermitRootLogin yes" in result.stdout
    # A changed password shows as a changed line, its value nowhere.
    assert "-password = <redacted:" in result.stdout and "+password = <redacted:" in result.stdout
    report = json.loads(cli("verify", "--json").stdout)
    by_path = {c["path"]: c for c in report["changes"]}
    assert "+PermitRootLogin yes" in by_path[str(etc / "ssh" / "sshd_config")]["diff"]
    events = {e["path"]: e for e in cli.json("events")}
    sshd = events[str(etc / "ssh" / "sshd_config")]
    assert "-PermitRootLogin no\n+PermitRootLogin yes\n" in sshd["diff"]
    # The sinks: the jsonl line, the webhook's JSON body, the e-mail's text.
    lines = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert any("+PermitRootLogin yes" in (a.get("diff") or "") for a in lines)
    assert any("+PermitRootLogin yes" in (b.get("diff") or "") for b in receiver.bodies)
    [message] = inbox.messages
    text = email.message_from_bytes(message["content"], policy=email.policy.default)
    body = text.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "+PermitRootLogin yes" in body and "-PermitRootLogin no" in body
    everything = (result.stdout + json.dumps(report) + json.dumps(events) + alerts.read_text()
                  + json.dumps(receiver.bodies) + body)
    assert MARKER not in everything
    assert MARKER.encode() not in database_bytes(cli.db)


def test_a_large_file_changes_without_a_diff_and_a_secret_says_so(
        cfg: Cli, etc: Path) -> None:
    (etc / "large.conf").write_text("y" * (300 << 10))
    (etc / "server.key").write_text("another\n")
    report = json.loads(cfg("verify", "--json").stdout)
    by_path = {c["path"]: c for c in report["changes"]}
    assert "content" in by_path[str(etc / "large.conf")]["changed"]
    assert "diff" not in by_path[str(etc / "large.conf")]
    assert by_path[str(etc / "server.key")]["diff"] == "content not kept (secret)"
    shown = cfg("diff", str(etc / "server.key"))
    assert shown.exit_code == 2 and "content not kept (secret)" in one_line(shown.stderr)


def test_password_hashes_are_secret_whatever_the_file_is_called(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    root = tmp_path / "srv"
    root.mkdir()
    (root / "users.db.txt").write_text("alice:$6$rounds=5000$abcdefgh$" + "x" * 86 + ":19000::\n")
    (root / "plain.txt").write_text("nothing to hide\n")
    cli = Cli(tmp_path / "h.db", write_policy({"path": str(root), "check": "config"}))
    assert cli("init").exit_code == 0
    texts = kept_texts(cli.db)
    assert texts == [b"nothing to hide\n"]


def test_diff_command_shows_baseline_against_live(cfg: Cli, etc: Path) -> None:
    assert cfg("diff", str(etc / "ssh" / "sshd_config")).exit_code == 0
    (etc / "ssh" / "sshd_config").write_text("Port 2222\nPermitRootLogin no\nUsePAM yes\n")
    shown = cfg("diff", str(etc / "ssh" / "sshd_config"))
    assert shown.exit_code == 1
    assert "-Port 22\n+Port 2222\n" in shown.stdout
    binary = cfg("diff", str(etc / "blob.bin"))
    assert binary.exit_code == 2 and "content not kept" in one_line(binary.stderr)


def test_restore_puts_back_bytes_mode_and_owner_and_records_it(
        cfg: Cli, etc: Path) -> None:
    target = etc / "ssh" / "sshd_config"
    original = target.read_bytes()
    target.chmod(0o644)
    os.chown(target, 0, 0)
    assert cfg("approve", str(target)).exit_code == 0
    target.write_text("PermitRootLogin yes\n")
    target.chmod(0o600)
    os.chown(target, 1234, 1234)
    assert cfg("verify").exit_code == 1
    [opened] = [e for e in cfg.json("events", "--open") if e["path"] == str(target)]
    refused = cfg("restore", str(target))  # no terminal, no --yes
    assert refused.exit_code == 2 and "--yes" in one_line(refused.stderr)
    done = cfg("restore", "--yes", str(target))
    assert done.exit_code == 0, done.output
    st = target.stat()
    assert target.read_bytes() == original
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0)
    assert not list(etc.glob("ssh/.*integrity-restore*"))
    events = {e["id"]: e for e in cfg.json("events")}
    assert events[opened["id"]]["status"] == "restored"
    [restored] = [e for e in events.values() if e["kind"] == "restored"]
    assert restored["actor"]["user"] == "root" and restored["chain"]
    assert cfg("verify").exit_code == 0
    assert cfg("status").exit_code == 0  # the chain holds the restore


def test_restore_refuses_what_was_not_kept_or_was_redacted(cfg: Cli, etc: Path) -> None:
    for name, reason in (("blob.bin", "no content was kept"),
                         ("shadow", "no content was kept"),
                         ("app.conf", "redacted")):
        (etc / name).write_bytes(b"tampered\n")
        refused = cfg("restore", "--yes", str(etc / name))
        assert refused.exit_code == 2 and reason in one_line(refused.stderr), name
        assert (etc / name).read_bytes() == b"tampered\n"


def test_restore_never_writes_a_text_planted_in_the_database(cfg: Cli, etc: Path) -> None:
    target = etc / "ssh" / "sshd_config"
    target.write_text("changed\n")
    with sqlite3.connect(cfg.db) as conn:
        conn.execute("UPDATE content SET data = ?", (zlib.compress(b"PermitRootLogin yes\n"),))
    refused = cfg("restore", "--yes", str(target))
    assert refused.exit_code == 2 and "tampering" in one_line(refused.stderr)
    assert target.read_text() == "changed\n"


def test_kept_texts_follow_approvals_and_unused_ones_are_swept(cfg: Cli, etc: Path) -> None:
    before = kept_texts(cfg.db)
    (etc / "ssh" / "sshd_config").write_text("Port 2200\n")
    assert cfg("verify").exit_code == 1
    assert cfg("approve", "--all").exit_code == 0
    after = kept_texts(cfg.db)
    assert b"Port 2200\n" in after and not any(b"PermitRootLogin no" in t for t in after)
    assert len(after) == len(before)
    (etc / "ssh" / "sshd_config").write_text("Port 2222\n")
    shown = cfg("diff", str(etc / "ssh" / "sshd_config"))
    assert "-Port 2200\n+Port 2222\n" in shown.stdout


def test_a_redact_pattern_of_the_policy_hides_its_values(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    root = tmp_path / "app"
    root.mkdir()
    (root / "db.ini").write_text(f"dsn = host=db user=app pw={MARKER}\nport = 5432\n")
    policy = write_policy({"path": str(root), "check": "config"}, extra=(
        "[content]\nredact = ['(?m)^(?P<keep>dsn\\s*=\\s*)(?P<value>.+)$']\n"))
    cli = Cli(tmp_path / "r.db", policy)
    result = cli("init")
    assert result.exit_code == 0, result.output
    [text] = kept_texts(cli.db)
    assert text.startswith(b"dsn = <redacted:") and b"port = 5432" in text
    assert MARKER.encode() not in database_bytes(cli.db)


def test_content_settings_are_validated(tmp_path: Path, etc: Path,
                                        write_policy: Callable[..., Path]) -> None:
    for extra, key in (("[content]\nmax_diff_size = -1\n", "content.max_diff_size"),
                       ("[content]\nredact = [\"(\"]\n", "content.redact[0]"),
                       ("[content]\nredact = [\"pw=.*\"]\n", "content.redact[0]"),
                       ("[content]\nsecrets = []\n", "content.secrets")):
        policy = write_policy({"path": str(etc), "check": "config"}, extra=extra)
        result = Cli(tmp_path / "v.db", policy)("init")
        assert result.exit_code == 2 and key in one_line(result.stderr), extra


def test_a_secret_named_after_init_leaves_the_database_when_the_policy_is_accepted(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    """An operator who finds credentials kept (postfix's sasl_passwd holds no
    `name = value` line to redact; a DSN) names the file secret and adds a redact
    pattern: after `approve --policy` neither value stays in the database, nor comes
    back in a diff from the baseline's side, as init under that policy would never
    have kept them. Nothing is approved by it."""
    root = tmp_path / "etc"
    (root / "postfix").mkdir(parents=True)
    sasl = root / "postfix" / "sasl_passwd"
    sasl.write_text(f"[smtp.example.com]:587 relay@example.com:{MARKER}\n")
    (root / "main.cf").write_text("relayhost = [smtp.example.com]:587\n")
    app = root / "app.ini"
    app.write_text(f"dsn = host=db pw={MARKER}\nport = 5432\n")
    rule = {"path": str(root), "check": "config"}
    cli = Cli(tmp_path / "p.db", write_policy(rule))
    assert cli("init").exit_code == 0
    assert sum(MARKER.encode() in t for t in kept_texts(cli.db)) == 2  # as the policy said
    stricter = write_policy(rule, name="stricter.toml", extra=(
        '\n[content]\nsecret = ["sasl_passwd"]\n'
        "redact = ['(?m)^(?P<keep>dsn\\s*=\\s*)(?P<value>.+)$']\n"))
    accepted = cli("approve", "--policy", "--reason", "credentials", policy=stricter)
    assert accepted.exit_code == 0, accepted.output
    texts = kept_texts(cli.db)
    assert not any(MARKER.encode() in t for t in texts)
    assert b"relayhost = [smtp.example.com]:587\n" in texts  # the others stay
    assert any(t.startswith(b"dsn = <redacted:") for t in texts)
    assert cli("verify", policy=stricter).exit_code == 0  # nothing was approved
    refused = cli("restore", "--yes", str(sasl), policy=stricter)
    assert refused.exit_code == 2 and "no content was kept" in one_line(refused.stderr)
    app.write_text(f"dsn = host=db pw={MARKER}\nport = 5433\n")
    changed = cli("verify", policy=stricter)
    assert changed.exit_code == 1 and "+port = 5433" in changed.stdout
    assert MARKER not in changed.stdout


def test_credentials_in_php_json_and_xml_configs_are_redacted(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    """A web root is kept (the web-server profile's `config`): wp-config.php's
    define('DB_PASSWORD', ...), a JSON "password", a PHP property and an XML element
    hold credentials in lines `name = value` does not describe; editing a line near
    them put the password in the diff of every alert."""
    root = tmp_path / "www"
    root.mkdir()
    wp = root / "wp-config.php"
    wp.write_text("<?php\ndefine( 'DB_NAME', 'wordpress' );\n"
                  f"define( 'DB_PASSWORD', '{MARKER}' );\n"
                  f"define( 'AUTH_KEY', '{MARKER}' );\ndefine( 'DB_HOST', 'db1' );\n")
    app = root / "app.json"
    app.write_text('{\n  "db": {\n    "user": "app",\n'
                   f'    "password": "{MARKER}",\n    "host": "db1"\n  }}\n}}\n')
    joomla = root / "configuration.php"
    joomla.write_text(f"<?php\nclass JConfig {{\n\tpublic $password = '{MARKER}';\n"
                      "\tpublic $host = 'db1';\n}\n")
    xml = root / "web.xml"
    xml.write_text(f"<db>\n  <password>{MARKER}</password>\n  <host>db1</host>\n</db>\n")
    cli = Cli(tmp_path / "w.db", write_policy({"path": str(root), "check": "config"}))
    assert cli("init").exit_code == 0
    for path in (wp, app, joomla, xml):
        path.write_text(path.read_text().replace("db1", "db2"))
    result = cli("verify")
    assert result.exit_code == 1
    assert "db2" in result.stdout and "<redacted:" in result.stdout
    everything = result.stdout + json.dumps(cli.json("events"))
    assert MARKER not in everything
    assert MARKER.encode() not in database_bytes(cli.db)


def test_a_diff_never_shows_a_value_a_redact_pattern_added_later_hides(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    """`[content]` applies at once: a pattern added after init hides the value in the
    live text, and must hide it on the baseline's side of a diff as well."""
    root = tmp_path / "app"
    root.mkdir()
    ini = root / "db.ini"
    ini.write_text(f"dsn = host=db pw={MARKER}\nport = 5432\n")
    rule = {"path": str(root), "check": "config"}
    cli = Cli(tmp_path / "r.db", write_policy(rule))
    assert cli("init").exit_code == 0
    later = write_policy(rule, name="later.toml", extra=(
        "[content]\nredact = ['(?m)^(?P<keep>dsn\\s*=\\s*)(?P<value>.+)$']\n"))
    ini.write_text(f"dsn = host=db pw={MARKER}\nport = 5433\n")
    result = cli("verify", policy=later)
    assert result.exit_code == 1 and "+port = 5433" in result.stdout
    shown = cli("diff", str(ini), policy=later)
    assert "+port = 5433" in shown.stdout
    everything = result.stdout + shown.stdout + json.dumps(cli.json("events"))
    assert MARKER not in everything
    assert " dsn = <redacted:" in result.stdout  # unchanged: a context line, not -/+


def test_keys_that_are_not_pem_blocks_are_secret(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    """WireGuard's quick start (`wg genkey | tee privatekey`) leaves a bare base64 key
    in a file called privatekey; age (sops) identities and PuTTY keys are no PEM
    block either: each was kept, and a new key showed old and new in a diff."""
    root = tmp_path / "etc"
    (root / "wireguard").mkdir(parents=True)
    (root / "wireguard" / "privatekey").write_text("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
                                                   f"{MARKER}\n")
    (root / "wireguard" / "publickey").write_text("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n")
    (root / "keys.txt").write_text("# created: 2026-01-01\n# public key: age1ql3z7hjy54pw3h\n"
                                   f"AGE-SECRET-KEY-1{MARKER.upper().replace('-', '')}\n")
    (root / "deploy.ppk").write_text("PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n"
                                     f"Private-Lines: 1\n{MARKER}\n")
    cli = Cli(tmp_path / "k.db", write_policy({"path": str(root), "check": "config"}))
    assert cli("init").exit_code == 0
    texts = kept_texts(cli.db)
    assert texts == [b"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n"]  # the public key
    assert MARKER.encode() not in database_bytes(cli.db)


def test_htpasswd_hashes_are_secret(tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    """`htpasswd` writes Apache's MD5 ($apr1$) by default, or {SHA}: password hashes as
    much as shadow's, and a web server's config tree (config: kept) holds them."""
    root = tmp_path / "apache2"
    root.mkdir()
    (root / ".htpasswd").write_text("admin:$apr1$Zq9cVd1x$" + "A" * 22 + "\n")
    (root / ".htpasswd-sha").write_text("ops:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    (root / "apache2.conf").write_text("ServerName web1\n")
    cli = Cli(tmp_path / "h.db", write_policy({"path": str(root), "check": "config"}))
    assert cli("init").exit_code == 0
    assert kept_texts(cli.db) == [b"ServerName web1\n"]


def test_diff_and_restore_before_the_first_init_say_so_in_one_line(
        tmp_path: Path, etc: Path, write_policy: Callable[..., Path]) -> None:
    policy = write_policy({"path": str(etc), "check": "config"})
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    assert cli("db", "upgrade").exit_code == 0  # a database, but no baseline in it
    for command in (["diff", str(etc / "app.conf")],
                    ["restore", "--yes", str(etc / "app.conf")]):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert one_line(result.stderr).endswith("no baseline yet: run 'integrity init'")
        assert "internal error" not in result.stderr
