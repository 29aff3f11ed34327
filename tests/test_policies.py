"""Policies that protect what attackers touch: wildcard rule paths, include globs and
severity overrides, drop-ins, `integrity policy show|check|add`, shipped profiles.

Everything runs on real trees under tmp_path, through the real walker, CLI and
inotify watcher. The shipped default policy on this very machine is tested in
test_default_policy.py.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import integrity.policy

from conftest import Cli, wait_until
from integrity.errors import PolicyError
from integrity.policy import load, parse
from integrity.policy.dropins import dropin_dir, shipped_default
from integrity.policy.effective import rule_doc
from integrity.policy.profiles import names
from integrity.realtime.watcher import Hints, Unwatched, Watcher

SCRIPTS = ["shell.php", "evil.phtml", ".htaccess", "x.php.jpg", "run.sh"]


def b(path: Path | str) -> bytes:
    return os.fsencode(str(path))


def toml_rule(**rule: Any) -> str:
    return "[[rule]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items())


def profile(name: str) -> dict[str, Any]:
    return tomllib.loads(Path(shipped_default()).parent.joinpath(
        "profiles", f"{name}.toml").read_text())


def web_rule(root: Path) -> dict[str, Any]:
    """The web-server profile's /var/www rule, moved to `root`."""
    rule = next(r for r in profile("web-server")["rule"] if r["path"] == "/var/www")
    return json.loads(json.dumps(rule).replace("/var/www", str(root)))


# -- wildcard rule paths ---------------------------------------------------------------

def test_a_wildcard_matches_within_one_component_only() -> None:
    policy = parse({"rule": [{"path": "/home/*/.ssh", "severity": "critical"},
                             {"path": "/home", "severity": "low"}]})
    rule = policy.rule_for(b"/home/alice/.ssh/authorized_keys")
    assert rule is not None and rule.name == "/home/*/.ssh" and rule.severity == "critical"
    assert rule.path == b"/home/alice/.ssh"  # the instance is rooted at the match
    assert policy.rule_for(b"/home/.hidden/.ssh/x").name == "/home/*/.ssh"  # type: ignore[union-attr]
    assert policy.rule_for(b"/home/a/b/.ssh/x").name == "/home"  # type: ignore[union-attr]
    assert policy.rule_for(b"/home/alice/.sshd").name == "/home"  # type: ignore[union-attr]
    assert policy.is_waypoint(b"/home/alice") and policy.is_waypoint(b"/")
    assert not policy.is_waypoint(b"/home/alice/.ssh")


SPECIFIC = [
    {"path": "/srv/www", "severity": "low"},
    {"path": "/srv/*/site/uploads", "severity": "medium"},
    {"path": "/srv/www/*/uploads", "severity": "high"},
    {"path": "/srv/*/*/uploads", "severity": "low", "check": "perms"},
    {"path": "/srv/www/site/uploads/deep", "severity": "critical", "check": "static"},
    {"path": "/srv/w*/site/uploads", "severity": "critical", "check": "perms"},
]


@pytest.mark.parametrize("path, winner", [
    # deeper wins, whatever kind of path it is
    (b"/srv/www/site/uploads/deep/x", "/srv/www/site/uploads/deep"),
    # equal depth: the first differing component that is literal wins
    (b"/srv/www/site/uploads/x", "/srv/www/*/uploads"),
    (b"/srv/wax/site/uploads/x", "/srv/w*/site/uploads"),  # partial beats bare *
    (b"/srv/other/site/uploads/x", "/srv/*/site/uploads"),
    (b"/srv/other/blog/uploads/x", "/srv/*/*/uploads"),
    (b"/srv/www/site/x", "/srv/www"),
])
def test_specificity_is_a_total_order_whatever_the_rule_order(path: bytes,
                                                              winner: str) -> None:
    for order in itertools.permutations(SPECIFIC):
        rule = parse({"rule": list(order)}).rule_for(path)
        assert rule is not None and rule.name == winner, [r["path"] for r in order]


def test_a_literal_rule_beats_a_wildcard_at_the_same_depth() -> None:
    policy = parse({"rule": [{"path": "/home/*/.ssh", "severity": "critical"},
                             {"path": "/home/git/.ssh", "severity": "low"}]})
    assert policy.rule_for(b"/home/git/.ssh/authorized_keys").severity == "low"  # type: ignore[union-attr]
    assert policy.rule_for(b"/home/ann/.ssh/authorized_keys").severity == "critical"  # type: ignore[union-attr]


def test_double_star_in_a_rule_path_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"rule\[0\]\.path: '\*' matches within one"):
        parse({"rule": [{"path": "/home/**/.ssh"}]}, "/p.toml")


@pytest.fixture
def homes(tmp_path: Path) -> Path:
    """tmp/home with alice (a key), bob (no .ssh), and mallory: a symlink to a tree
    outside with its own .ssh, which a wildcard must not follow."""
    home = tmp_path / "home"
    (home / "alice" / ".ssh").mkdir(parents=True)
    (home / "alice" / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA alice\n")
    (home / "alice" / ".ssh" / "known_hosts").write_text("host key\n")
    (home / "bob").mkdir()
    (tmp_path / "outside" / ".ssh").mkdir(parents=True)
    (tmp_path / "outside" / ".ssh" / "authorized_keys").write_text("elsewhere\n")
    os.symlink(tmp_path / "outside", home / "mallory")
    return home


@pytest.fixture
def ssh_cli(tmp_path: Path, homes: Path) -> Cli:
    policy = tmp_path / "policy.toml"
    policy.write_text(toml_rule(path=f"{homes}/*/.ssh", check="config",
                                severity="critical", exclude=["known_hosts"]))
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    assert cli("init").exit_code == 0
    return cli


def changes(cli: Cli, *args: str) -> dict[str, dict[str, Any]]:
    result = cli("verify", "--json", *args)
    assert result.exit_code in (0, 1), result.output
    return {c["path"]: c for c in json.loads(result.stdout)["changes"]}


def test_a_wildcard_is_expanded_at_every_scan(ssh_cli: Cli, homes: Path) -> None:
    result = ssh_cli("verify")
    assert result.exit_code == 0 and "2 entries checked" in result.stdout, result.stdout
    # A user created after init: their .ssh is protected from its creation.
    (homes / "carol" / ".ssh").mkdir(parents=True)
    (homes / "carol" / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA x\n")
    (homes / "bob" / ".ssh").mkdir()
    found = changes(ssh_cli)
    assert {p: (c["kind"], c["rule"], c["severity"]) for p, c in found.items()} == {
        str(homes / "bob" / ".ssh"): ("added", f"{homes}/*/.ssh", "critical"),
        str(homes / "carol" / ".ssh"): ("added", f"{homes}/*/.ssh", "critical"),
        str(homes / "carol" / ".ssh" / "authorized_keys"):
            ("added", f"{homes}/*/.ssh", "critical")}
    # Verifying the waypoint above the matches checks them all; a user's .ssh that
    # goes away is a removal, not an entry the policy stopped covering.
    (homes / "alice" / ".ssh" / "authorized_keys").unlink()
    found = changes(ssh_cli, str(homes))
    assert found[str(homes / "alice" / ".ssh" / "authorized_keys")]["kind"] == "removed"
    assert not any("mallory" in p for p in found)  # the symlinked home: never followed


def test_a_wildcard_rule_in_forked_workers_and_fast_verify(ssh_cli: Cli,
                                                           homes: Path) -> None:
    key = homes / "alice" / ".ssh" / "authorized_keys"
    key.write_text("ssh-ed25519 AAAA alice\nssh-ed25519 AAAA attacker\n")
    for args in ((), ("--fast",)):
        found = changes(ssh_cli, *args)
        assert found[str(key)]["kind"] == "modified" and \
            found[str(key)]["severity"] == "critical", (args, found)


# -- include globs and severity overrides (the web-server profile) ---------------------

@pytest.fixture
def webroot(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "html" / "wp-content" / "uploads" / "2025").mkdir(parents=True)
    (root / "html" / "index.php").write_text("<?php echo 'hi';\n")
    (root / "html" / "index.html").write_text("<h1>hi</h1>\n")
    (root / "html" / "wp-content" / "uploads" / "cat.jpg").write_bytes(os.urandom(500))
    (root / "html" / "wp-content" / "uploads" / "2025" / "doc.pdf").write_bytes(b"%PDF")
    return root


def test_scripts_anywhere_under_a_web_root_are_critical_and_uploads_churn_is_not(
        tmp_path: Path, webroot: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(tomllib_dumps_rule(web_rule(webroot)))
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    assert cli("init").exit_code == 0
    uploads = webroot / "html" / "wp-content" / "uploads"
    for name in SCRIPTS:
        (uploads / "2025" / name).write_text("<?php system($_GET['c']);\n")
    (uploads / "cat.jpg").write_bytes(os.urandom(600))  # replaced image: churn
    (uploads / "2025" / "new.png").write_bytes(os.urandom(100))  # new image: churn
    (webroot / "html" / "index.html").write_text("<h1>hacked</h1>\n")  # defacement
    for args in ((), ("--fast",)):
        found = changes(cli, *args)
        expected = {str(uploads / "2025" / n): ("added", "critical") for n in SCRIPTS}
        expected[str(webroot / "html" / "index.html")] = ("modified", "high")
        assert {p: (c["kind"], c["severity"]) for p, c in found.items()} == expected


def tomllib_dumps_rule(rule: dict[str, Any]) -> str:
    overrides = rule.pop("override", [])
    text = toml_rule(**rule)
    for override in overrides:
        text += "[[rule.override]]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in override.items())
    return text


class Collector:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hints: list[Hints] = []

    def on_hints(self, hints: Hints) -> None:
        with self.lock:
            self.hints.append(Hints(set(hints.paths), set(hints.subtrees)))

    def covered(self, path: bytes) -> bool:
        with self.lock:
            return any(path in h.paths or any(path == s or path.startswith(s + b"/")
                                              for s in h.subtrees) for h in self.hints)


@pytest.fixture
def watching() -> Iterator[Any]:
    """Run watchers on threads; each is stopped and closed after the test."""
    running: list[tuple[Watcher, threading.Event, threading.Thread]] = []

    def start(policy_text: str, tmp_path: Path) -> tuple[Watcher, Collector]:
        path = tmp_path / "watch-policy.toml"
        path.write_text(policy_text)
        got = Collector()
        unwatched: list[Unwatched] = []
        watcher = Watcher(load(path), got.on_hints, lambda: None, unwatched.extend)
        watcher.start()
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,))
        thread.start()
        running.append((watcher, stop, thread))
        return watcher, got

    yield start
    for watcher, stop, thread in running:
        stop.set()
        thread.join(timeout=5)
        watcher.close()


def test_the_watcher_sees_a_new_users_ssh_and_scripts_in_new_upload_dirs(
        tmp_path: Path, homes: Path, webroot: Path, watching: Any) -> None:
    text = toml_rule(path=f"{homes}/*/.ssh", severity="critical") + \
        tomllib_dumps_rule(web_rule(webroot))
    watcher, got = watching(text, tmp_path)
    # A user created now: their home, then .ssh, then the key.
    (homes / "dave").mkdir()
    wait_until(lambda: watcher.watching(b(homes / "dave")), "a watch on the new home", 5)
    (homes / "dave" / ".ssh").mkdir()
    wait_until(lambda: watcher.watching(b(homes / "dave" / ".ssh")),
               "a watch on the new .ssh", 5)
    key = homes / "dave" / ".ssh" / "authorized_keys"
    key.write_text("ssh-ed25519 AAAA attacker\n")
    wait_until(lambda: got.covered(b(key)), "a hint for the new authorized_keys", 5)
    # An upload directory made now is searched, and so watched, for scripts.
    month = webroot / "html" / "wp-content" / "uploads" / "2026"
    month.mkdir()
    wait_until(lambda: watcher.watching(b(month)), "a watch on the new upload dir", 5)
    (month / "shell.php").write_text("<?php system($_GET['c']);\n")
    wait_until(lambda: got.covered(b(month / "shell.php")), "a hint for shell.php", 5)
    assert not watcher.watching(b(homes / "mallory")), "a symlinked home is not followed"


# -- drop-ins ---------------------------------------------------------------------------

@pytest.fixture
def layered(tmp_path: Path) -> Path:
    policy = tmp_path / "policy.toml"
    policy.write_text(toml_rule(path="/etc", check="config", severity="high",
                                exclude=["*.swp"])
                      + '[schedule]\nfull_scan = "0 3 * * *"\n'
                      + '[severity]\ntrusted_severity = "low"\n')
    (tmp_path / "policy.d").mkdir()
    return policy


def test_drop_ins_merge_in_name_order_and_a_later_file_wins(layered: Path) -> None:
    dropins = layered.parent / "policy.d"
    (dropins / "20-later.toml").write_text(
        '[schedule]\nfull_scan = "30 4 * * *"\n'
        + toml_rule(path="/etc", severity="critical"))
    (dropins / "10-first.toml").write_text(
        '[schedule]\nfull_scan = "0 1 * * *"\n'
        + toml_rule(path="/srv", check="static", severity="low"))
    (dropins / "notes.txt").write_text("not a drop-in")
    (dropins / ".hidden.toml").write_text("not = 'toml policy'")
    policy = load(layered)
    assert policy.files == (str(layered), str(dropins / "10-first.toml"),
                            str(dropins / "20-later.toml"))
    assert policy.full_scan == "30 4 * * *"  # tables key by key, the later file wins
    etc, srv = policy.rule_at(b"/etc"), policy.rule_at(b"/srv")
    assert etc is not None and srv is not None
    # The same rule named again is merged key by key: severity from the drop-in,
    # check and excludes from the policy file.
    assert (etc.severity, etc.excludes.patterns, etc.origin) == (
        "critical", ("*.swp",), str(dropins / "20-later.toml"))
    assert srv.origin == str(dropins / "10-first.toml")
    assert load(layered).digest != load(layered, []).digest


@pytest.mark.parametrize("text, key", [
    (toml_rule(path="/srv", severty="high"), "rule[0].severty: unknown key"),
    (toml_rule(path="/srv") + toml_rule(path="/srv/"), "rule[1].path: duplicate rule"),
    ('[schedule]\nful_scan = "x"\n', "schedule.ful_scan: unknown key"),
    ("rule = 3\n", "rule: must be an array"),
    ("[[rule]\n", "invalid TOML"),
    (toml_rule(path="/etc", exclude="*.swp"), "rule[0].exclude: must be a list"),
])
def test_a_bad_drop_in_refuses_the_policy_naming_the_drop_in(
        layered: Path, text: str, key: str) -> None:
    bad = layered.parent / "policy.d" / "50-bad.toml"
    (layered.parent / "policy.d" / "10-good.toml").write_text(toml_rule(path="/opt"))
    bad.write_text(text)
    with pytest.raises(PolicyError) as info:
        load(layered)
    assert str(info.value).startswith(f"{bad}: ") and key in str(info.value)


def test_hostile_drop_ins_cannot_stall_or_forge_lines(layered: Path, tmp_path: Path) -> None:
    dropins = layered.parent / "policy.d"
    fifo = dropins / "10-fifo.toml"
    os.mkfifo(fifo)  # opening it for reading would block a reload for ever
    with pytest.raises(PolicyError, match=r"10-fifo.toml: cannot read policy: not a "
                                          r"regular file"):
        load(layered)
    fifo.unlink()
    forged = dropins / "20-x\nintegrity: all is well.toml"
    forged.write_text(toml_rule(path="/srv", severty="high"))
    result = Cli(tmp_path / "db", layered)("policy", "check", str(layered))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"integrity: {dropins}/20-x\\x0aintegrity: all is well.toml: rule[0].severty: "
        "unknown key"]


def test_the_shipped_default_takes_the_system_drop_ins() -> None:
    # clean_env moved the system policy into tmp_path: its policy.d goes with it.
    system = os.path.dirname(integrity.policy.SYSTEM_POLICY)
    assert dropin_dir(shipped_default()) == os.path.join(system, "policy.d")
    assert dropin_dir("/srv/p/policy.toml") == "/srv/p/policy.d"


# -- integrity policy show / check / add ------------------------------------------------

def test_policy_show_names_each_rules_file_and_round_trips(layered: Path,
                                                           tmp_path: Path) -> None:
    dropin = layered.parent / "policy.d" / "web.toml"
    dropin.write_text(tomllib_dumps_rule(web_rule(tmp_path / "www")))
    cli = Cli(tmp_path / "db", layered)
    doc = cli.json("policy", "show")
    assert doc["files"] == [str(layered), str(dropin)]
    by_path = {r["path"]: r for r in doc["rules"]}
    assert by_path["/etc"]["file"] == str(layered)
    assert by_path[str(tmp_path / "www")]["file"] == str(dropin)
    assert by_path[str(tmp_path / "www")]["override"][0]["severity"] == "critical"
    assert "content" in by_path["/etc"]["attributes"]
    # The text form is TOML that loads as the same policy.
    shown = cli("policy", "show")
    assert shown.exit_code == 0 and f"# from {dropin}" in shown.stdout
    again = tmp_path / "elsewhere" / "shown.toml"
    again.parent.mkdir()
    again.write_text(shown.stdout)
    assert [{**rule_doc(r), "file": None} for r in load(again).rules] == \
        [{**r, "file": None} for r in doc["rules"]]


def test_policy_check_exit_codes(layered: Path, tmp_path: Path) -> None:
    cli = Cli(tmp_path / "db", layered)
    ok = cli("policy", "check", str(layered))
    assert ok.exit_code == 0 and "valid: 1 rules" in ok.stdout
    dropin = layered.parent / "policy.d" / "30-x.toml"
    dropin.write_text(toml_rule(path="/srv", severity="urgent"))
    bad = cli("policy", "check", str(dropin))
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == [
        f"integrity: {dropin}: rule[0].severity: must be one of low, medium, high, "
        "critical, not 'urgent'"]
    # The policy that now has this drop-in is refused as a whole, by every command.
    assert cli("verify").exit_code == 2


def test_policy_add_writes_a_profile_and_refuses_to_overwrite(layered: Path,
                                                              tmp_path: Path) -> None:
    cli = Cli(tmp_path / "db", layered)
    target = layered.parent / "policy.d" / "web-server.toml"
    first = cli("policy", "add", "web-server")
    assert first.exit_code == 0 and f"wrote {target}" in first.stdout
    assert "shipped profile" in target.read_text()
    assert tomllib.loads(target.read_text()) == profile("web-server")
    target.write_text(target.read_text() + "# local edit\n")
    again = cli("policy", "add", "web-server")
    assert again.exit_code == 2 and "exists already; --force replaces it" in again.stderr
    assert target.read_text().endswith("# local edit\n")
    forced = cli("policy", "add", "web-server", "--force")
    assert forced.exit_code == 0 and not target.read_text().endswith("# local edit\n")
    unknown = cli("policy", "add", "mail-server")
    assert unknown.exit_code == 2 and "known: container-host, database-server, " \
        "web-server" in unknown.stderr
    # A profile that would leave the policy invalid is not written.
    (layered.parent / "policy.d" / "zz-broken.toml").write_text("rule = 1\n")
    refused = cli("policy", "add", "database-server")
    assert refused.exit_code == 2 and "zz-broken.toml: rule: must be an array" in \
        refused.stderr
    assert not (layered.parent / "policy.d" / "database-server.toml").exists()
    assert [p.name for p in (layered.parent / "policy.d").iterdir()
            if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("name", ["web-server", "container-host", "database-server"])
def test_every_profile_merges_onto_the_default_policy(tmp_path: Path, name: str) -> None:
    assert name in names()
    policy = tmp_path / "policy.toml"
    policy.write_text(Path(shipped_default()).read_text())
    cli = Cli(tmp_path / "db", policy)
    assert cli("policy", "add", name).exit_code == 0
    merged = load(policy)
    assert len(merged.files) == 2
    assert any(r.origin.endswith(f"{name}.toml") for r in merged.rules)


def test_the_default_web_root_rule_is_the_web_server_profiles() -> None:
    default = next(r for r in tomllib.loads(Path(shipped_default()).read_text())["rule"]
                   if r["path"] == "/var/www")
    assert default == next(r for r in profile("web-server")["rule"]
                           if r["path"] == "/var/www")
