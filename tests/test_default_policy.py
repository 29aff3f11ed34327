"""The shipped default policy, on this machine, against what attackers plant.

Each test copies the shipped default policy unchanged except for its jsonl alert sink
(moved under tmp_path, so no test writes /var/log), builds a baseline of this host's
real trees into a private database, plants on the real system what an attacker
plants (a PAM module, a key appended to root's authorized_keys, a web shell in
/var/www/html/uploads, a new user's authorized_keys) and reads the outcome as an
operator would. Everything planted is removed in a `finally`; /root/.ssh and /var/www
are put back exactly as they were (or removed when they did not exist).

The new user is a home directory made for the test (owned by nobody), not an account:
useradd would rewrite /etc/passwd and /etc/shadow under other tests' baselines.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli, wait_until
from integrity.policy.dropins import shipped_default

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants files in /usr/lib, "
                                "/root/.ssh and /var/www: needs root (CI runs as root)")

ROOT_KEYS = Path("/root/.ssh/authorized_keys")
WEB = Path("/var/www")
#: The catch-up scan of the whole default policy (~80,000 entries) on a busy machine.
WATCH_START_SECONDS = 180.0
REALTIME_SECONDS = 15.0


def pam_dir() -> Path:
    """Where this system keeps its PAM modules (beside pam_unix.so), under /usr."""
    found = [os.path.realpath(p) for pattern in (
        "/usr/lib/*/security/pam_unix.so", "/usr/lib64/security/pam_unix.so",
        "/usr/lib/security/pam_unix.so") for p in glob.glob(pattern)]
    assert found, "no pam_unix.so on this system (Debian's libpam-modules)"
    return Path(found[0]).parent


class Restore:
    """Undo what a test did to the real system: paths it created are removed, files
    it changed get their bytes, mode and times back."""

    def __init__(self) -> None:
        self.created: list[Path] = []
        self.saved: list[tuple[Path, bytes, os.stat_result]] = []

    def make_dirs(self, path: Path) -> None:
        """mkdir -p, remembering the topmost directory this made."""
        missing = [p for p in [path, *path.parents] if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        if missing:
            self.created.append(missing[-1])

    def create(self, path: Path, data: bytes) -> None:
        assert not path.exists(), f"{path} exists already: not ours to overwrite"
        self.make_dirs(path.parent)
        path.write_bytes(data)
        self.created.append(path)

    def keep(self, path: Path) -> None:
        """Remember a file's bytes and attributes before it is changed."""
        self.saved.append((path, path.read_bytes(), path.stat()))

    def undo(self) -> None:
        for path, data, st in reversed(self.saved):
            with open(path, "r+b") as handle:  # in place: same inode, same owner
                handle.truncate(0)
                handle.write(data)
            os.chmod(path, st.st_mode & 0o7777)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        for path in reversed(self.created):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()


@pytest.fixture
def restore() -> Iterator[Restore]:
    undo = Restore()
    try:
        yield undo
    finally:
        undo.undo()


def test_the_shipped_default_is_the_packaged_resource() -> None:
    """shipped_default() spells the path out (importlib.resources costs every policy
    load ~7 ms); it must still be the file the package ships, and exist."""
    from importlib import resources

    assert shipped_default() == str(resources.files("integrity.policies")
                                    .joinpath("default.toml"))
    assert Path(shipped_default()).is_file()


def default_policy(tmp_path: Path) -> Path:
    """The shipped default policy, its alert sink moved under tmp_path."""
    text = Path(shipped_default()).read_text()
    assert text.count('"/var/log/integrity/alerts.jsonl"') == 1
    policy = tmp_path / "policy.toml"
    policy.write_text(text.replace('"/var/log/integrity/alerts.jsonl"',
                                  json.dumps(str(tmp_path / "alerts.jsonl"))))
    return policy


def log_after(log: Path, what: str) -> None:
    """None while the daemon is still healthy; its stderr in the failure otherwise."""
    text = log.read_text(errors="replace")
    if "ERROR" in text or "not watched in real time" in text or "Traceback" in text:
        pytest.fail(f"no {what}; the watcher said:\n{text}")


def changes(cli: Cli, *args: str) -> dict[str, dict[str, Any]]:
    result = cli("verify", "--json", *args)
    assert result.exit_code in (0, 1), result.output
    return {c["path"]: c for c in json.loads(result.stdout)["changes"]}


def seen(found: dict[str, dict[str, Any]], path: Path) -> tuple[str, str, str] | None:
    change = found.get(str(path))
    return (change["kind"], change["rule"], change["severity"]) if change else None


def test_the_default_policy_catches_what_attackers_plant(tmp_path: Path,
                                                         restore: Restore) -> None:
    # What a host with keys and a web site has before the baseline.
    if ROOT_KEYS.exists():
        restore.keep(ROOT_KEYS)
    else:
        restore.create(ROOT_KEYS, b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIadmin admin\n")
    uploads = WEB / "html" / "uploads"
    restore.make_dirs(uploads)
    for path, data in ((uploads / "cat-integrity-test.jpg", os.urandom(2000)),
                       (WEB / "html" / "build-integrity-test.txt", b"build 1\n")):
        restore.create(path, data)
    policy = default_policy(tmp_path)
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    result = cli("init")
    assert result.exit_code == 0, result.output

    pam_module = pam_dir() / f"pam_integrity_test_{os.getpid()}.so"
    restore.create(pam_module, b"\x7fELF backdoor that logs every password")
    with open(ROOT_KEYS, "ab") as keys:
        keys.write(b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIattacker attacker@evil\n")
    shell = uploads / "shell.php"
    restore.create(shell, b"<?php system($_GET['c']); ?>\n")
    restore.create(uploads / "holiday-integrity-test.png", os.urandom(3000))  # churn
    home = Path(f"/home/integrity-test-{os.getpid()}")
    restore.create(home / ".ssh" / "authorized_keys", b"ssh-ed25519 AAAA newuser\n")
    os.chown(home, 65534, 65534)
    (WEB / "html" / "build-integrity-test.txt").write_bytes(b"build 2\n")
    # Names editors and package managers leave behind: logrotate runs a drop-in
    # called .#x as root, nginx includes sites-enabled/x~. None may hide.
    leftovers = [Path("/etc/default") / name.format(os.getpid()) for name in (
        ".#integrity-test-{}", "integrity-test-{}~", ".integrity-test-{}.swp",
        "integrity-test-{}.dpkg-tmp", "integrity-test-{}.rpmnew.tmp")]
    for leftover in leftovers:
        restore.create(leftover, b"/var/log/x {\n  postrotate\n    id\n  endscript\n}\n")

    found = changes(cli)
    for leftover in leftovers:
        assert seen(found, leftover) == ("added", "/etc", "high"), leftover
    assert seen(found, pam_module) == ("added", "/usr/lib", "critical")
    assert seen(found, ROOT_KEYS) == ("modified", "/root/.ssh", "critical")
    assert found[str(ROOT_KEYS)]["changed"] == ["content", "size"]
    assert seen(found, shell) == ("added", "/var/www", "critical")
    for path in (home / ".ssh", home / ".ssh" / "authorized_keys"):
        assert seen(found, path) == ("added", "/home/*/.ssh", "critical")
    assert seen(found, WEB / "html" / "build-integrity-test.txt") == \
        ("modified", "/var/www", "high")
    assert not [p for p in found if "integrity-test" in p and p.endswith((".png", ".jpg"))]
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text()
              .splitlines()]
    assert any(a["path"] == str(shell) and a["severity"] == "critical" for a in alerts)

    # A drop-in that adds an exclude: the rule is merged key by key, so the web root
    # keeps its includes and overrides, and only the build file goes quiet.
    dropins = tmp_path / "policy.d"
    dropins.mkdir()
    web_rule = next(r for r in cli.json("policy", "show")["rules"]
                    if r["path"] == "/var/www")
    (dropins / "50-deploy.toml").write_text(
        "[[rule]]\npath = \"/var/www\"\nexclude = "
        + json.dumps([*web_rule["exclude"], "build-integrity-test.txt"]) + "\n")
    # Until the edited policy is accepted, the sealed one is verified: nothing goes
    # quiet by a drop-in alone.
    report = json.loads(cli("verify", "--json", str(WEB)).stdout)
    assert report["policy"]["differences"] == ["rule /var/www: exclude"]
    assert str(WEB / "html" / "build-integrity-test.txt") in {c["path"] for c in report["changes"]}
    assert cli("approve", "--policy", "--reason", "deploy artefacts").exit_code == 0
    found = changes(cli, str(WEB))
    assert seen(found, shell) == ("added", "/var/www", "critical")
    assert str(WEB / "html" / "build-integrity-test.txt") not in found
    # A drop-in with a bad key: nothing runs, one line names the drop-in and the key.
    (dropins / "60-typo.toml").write_text('[[rule]]\npath = "/srv"\nseverty = "high"\n')
    refused = cli("verify")
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [
        f"integrity: {dropins / '60-typo.toml'}: rule[0].severty: unknown key"]


def test_the_watcher_covers_a_new_users_keys_and_a_web_root_made_later(
        tmp_path: Path, restore: Restore) -> None:
    if WEB.exists():
        pytest.skip("this host has a web root: /var/www appearing cannot be shown here")
    policy = default_policy(tmp_path)
    db = tmp_path / "state" / "integrity.db"
    cli = Cli(db, policy)
    assert cli("init").exit_code == 0
    log = tmp_path / "watch.log"
    with open(log, "wb") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "integrity", "--db", f"sqlite:///{db}", "--policy",
             str(policy), "watch"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err)
    try:
        def running() -> bool:
            assert daemon.poll() is None, log.read_text()
            watcher = cli.json("status")["watcher"]
            return bool(watcher["pid"] == daemon.pid and watcher["state"] == "running")
        wait_until(running, "the watcher to run", WATCH_START_SECONDS, interval=0.5)

        def event(path: Path) -> dict[str, Any] | None:
            return next((e for e in cli.json("events") if e["path"] == str(path)
                         and e["source"] == "realtime"), None)

        home = Path(f"/home/integrity-rt-{os.getpid()}")
        restore.create(home / ".ssh" / "authorized_keys", b"ssh-ed25519 AAAA newuser\n")
        key = wait_until(lambda: event(home / ".ssh" / "authorized_keys") or (
            log_after(log, f"realtime event for {home}")), "a realtime event for the new "
            "user's key", REALTIME_SECONDS)
        assert (key["kind"], key["severity"]) == ("added", "critical")
        # The web root did not exist when the watcher started; it is watched as it
        # appears, and a web shell in its uploads is critical.
        restore.make_dirs(WEB / "html" / "uploads")
        shell = WEB / "html" / "uploads" / "shell.php"
        restore.create(shell, b"<?php system($_GET['c']); ?>\n")
        found = wait_until(lambda: event(shell) or log_after(log, f"realtime event for "
                                                             f"{shell}"),
                           "a realtime event for shell.php", REALTIME_SECONDS)
        assert (found["kind"], found["severity"]) == ("added", "critical")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    assert daemon.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
