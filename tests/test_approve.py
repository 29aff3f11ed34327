"""Approvals, end to end: real trees, a real SQLite database, the real CLI, real packages.

The first half approves paths a person names (or all open ones) and checks what was
written, what was closed and what was left alone. The second half installs real
`.deb` packages with dpkg, upgrades them, tampers with files by hand and checks that
`approve --package-updates` approves exactly what dpkg vouches for, and leaves open
everything else with its reason. Those tests own the package `integrity-test-upg`
and always purge it again; they take the test packages' lock (tests/debs.py), so two
runs on one machine never install and purge under each other. The CLI's package
evidence reads a dpkg log of the test's own, never the host's /var/log/dpkg.log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pwd
import shutil
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import integrity.packages
from integrity.packages import PackageManagers

from conftest import REPO, Cli, one_line
from aptrepo import PREFIX
from debs import build_deb, dpkg, dpkg_tool, owned


def events(run: Cli, *args: str) -> dict[str, dict[str, Any]]:
    """`events --json` by path (the newest event of each path)."""
    result = run("events", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return {row["path"]: row for row in json.loads(result.stdout)}


def approve_json(run: Cli, *args: str) -> dict[str, Any]:
    result = run("approve", *args, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def changed_paths(run: Cli, *args: str, expect: int) -> dict[str, dict[str, Any]]:
    result = run("verify", "--json", *args)
    assert result.exit_code == expect, result.stdout + result.stderr
    return {c["path"]: c for c in json.loads(result.stdout)["changes"]}


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute(sql, params))


def approvals(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM approval ORDER BY id")]


def baseline_rows(db: Path) -> dict[bytes, tuple[Any, ...]]:
    """Every entry of the active baseline, by key, exactly as stored."""
    return {bytes(row[0]): row[1:] for row in query(
        db, "SELECT e.key, e.type, e.content, e.size, e.mode, e.uid, e.gid, e.inode, "
            "e.nlink, e.mtime, e.ctime, e.link, e.xattrs, e.dev FROM entry e "
            "JOIN baseline b ON b.id = e.baseline_id WHERE b.state = 'active'")}


def key(path: str | Path) -> bytes:
    return os.fsencode(str(path)).replace(b"/", b"\x00")


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


# -- approving named paths ----------------------------------------------------------------

def test_approve_path_approves_its_subtree_and_records_who_and_why(
        run: Cli, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("init").exit_code == 0
    (tree / "sub" / "c.txt").write_text("changed\n")
    (tree / "sub" / "new.txt").write_text("new\n")
    (tree / "a.conf").write_text("changed elsewhere\n")
    assert run("verify").exit_code == 1
    before = events(run)
    sub = {str(tree / "sub"), str(tree / "sub" / "c.txt"), str(tree / "sub" / "new.txt")}
    assert set(before) == sub | {str(tree / "a.conf")}

    monkeypatch.setenv("SUDO_USER", "alice")
    started = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    result = run("approve", str(tree / "sub"), "--reason", "ticket 4711")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"approved modified {tree / 'sub' / 'c.txt'}" in lines
    assert f"approved added {tree / 'sub' / 'new.txt'}" in lines
    assert lines[-1] == "approval 1: 3 events closed, 3 baseline entries written"

    [approval] = approvals(run.db)
    assert (approval["user"], approval["sudo_user"], approval["reason"], approval["mode"]) \
        == (me(), "alice", "ticket 4711", "paths")
    assert (approval["events"], approval["entries"]) == (3, 3)
    when = dt.datetime.fromisoformat(str(approval["time"]))
    assert started <= when <= dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

    after = events(run)
    for path in sub:
        row = after[path]
        assert row["id"] == before[path]["id"]
        assert (row["status"], row["approval"]) == ("approved", approval["id"]), row
        assert row["classification"] == "unexplained"  # a person's word, not evidence
        assert row["evidence"] is None
    assert after[str(tree / "a.conf")] == before[str(tree / "a.conf")]

    assert changed_paths(run, str(tree / "sub"), expect=0) == {}
    assert set(changed_paths(run, expect=1)) == {str(tree / "a.conf")}
    again = events(run)[str(tree / "a.conf")]
    assert (again["id"], again["count"], again["status"]) == \
        (before[str(tree / "a.conf")]["id"], 1, "open")
    assert query(run.db, "SELECT entries FROM baseline WHERE state = 'active'") == [(8,)]


def test_approve_all_takes_the_current_state(run: Cli, tree: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    (tree / "b.bin").unlink()
    (tree / "sub" / "d.txt").write_text("new\n")
    assert run("verify").exit_code == 1
    opened = events(run, "--open")
    # Changed again after the verify: the approval reads what is there now.
    (tree / "a.conf").write_text("changed again, after the verify\n")

    doc = approve_json(run, "--all")
    assert set(doc) >= {"approval", "approved", "written", "left_open"}
    assert doc["left_open"] == []
    assert {a["path"] for a in doc["approved"]} == set(opened)
    assert {a["path"]: a["kind"] for a in doc["approved"]}[str(tree / "b.bin")] == "removed"
    assert all(a["evidence"] is None for a in doc["approved"])
    assert set(doc["written"]) == set(opened)
    [approval] = approvals(run.db)
    assert approval["id"] == doc["approval"]
    assert (approval["mode"], approval["sudo_user"], approval["reason"]) == ("all", None, None)
    assert approval["events"] == len(opened)

    assert events(run, "--open") == {}
    assert run("verify").exit_code == 0
    assert run("status").exit_code == 0
    # Approving again has nothing to do.
    result = run("approve", "--all")
    assert (result.exit_code, result.stdout) == (0, "nothing approved\n")
    assert len(approvals(run.db)) == 1

    # A change after an approval is a new event, not the approved one reopened.
    (tree / "a.conf").write_text("and a third time\n")
    assert run("verify").exit_code == 1
    rows = json.loads(run("events", "--json").stdout)
    a_conf = [r for r in rows if r["path"] == str(tree / "a.conf")]
    assert [r["status"] for r in a_conf] == ["approved", "open"]


def test_approving_touches_nothing_outside_the_named_paths(
        run: Cli, tree: Path, tmp_path: Path) -> None:
    (tree / "sub2").mkdir()
    (tree / "sub2" / "d.txt").write_text("a sibling whose name starts like sub\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("not protected\n")
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    (tree / "sub2" / "d.txt").write_text("changed too\n")
    (tree / "sub" / "c.txt").write_text("changed in sub\n")
    os.symlink(outside, tree / "sub" / "out")  # leads outside: never followed
    assert run("verify").exit_code == 1
    before = events(run)
    rows_before = baseline_rows(run.db)

    doc = approve_json(run, str(tree / "sub"))
    assert set(doc["written"]) == {str(tree / "sub"), str(tree / "sub" / "c.txt"),
                                   str(tree / "sub" / "out")}
    rows_after = baseline_rows(run.db)
    low, high = key(tree / "sub"), key(tree / "sub") + b"\x01"
    assert {k: v for k, v in rows_after.items() if not low <= k < high} == \
        {k: v for k, v in rows_before.items() if not low <= k < high}
    assert not any(k.startswith(key(outside)) for k in rows_after)
    assert rows_after[key(tree / "sub" / "out")][0] == "symlink"

    after = events(run)
    for path in (str(tree / "a.conf"), str(tree / "sub2" / "d.txt")):
        assert after[path] == before[path]
    assert set(changed_paths(run, expect=1)) == {str(tree / "a.conf"),
                                                 str(tree / "sub2" / "d.txt")}
    assert {r["count"] for r in events(run, "--open").values()} == {1}


def test_approving_a_path_without_changes_changes_nothing(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    before, rows = events(run), baseline_rows(run.db)
    for target in (tree / "sub", tree / "sub" / "never-existed"):
        result = run("approve", str(target), "--reason", "nothing to see")
        assert (result.exit_code, result.stdout) == (0, "nothing approved\n")
    assert approvals(run.db) == []
    assert baseline_rows(run.db) == rows
    assert events(run) == before


def test_approving_a_removed_subtree(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    shutil.rmtree(tree / "sub")
    changes = changed_paths(run, expect=1)
    assert {p for p, c in changes.items() if c["kind"] == "removed"} == \
        {str(tree / "sub"), str(tree / "sub" / "c.txt")}
    doc = approve_json(run, str(tree / "sub"))
    assert sorted(a["path"] for a in doc["approved"]) == [str(tree / "sub"),
                                                          str(tree / "sub" / "c.txt")]
    assert {a["kind"] for a in doc["approved"]} == {"removed"}
    assert query(run.db, "SELECT entries FROM baseline WHERE state = 'active'") == [(5,)]
    # Only the root directory's own change (its listing) is left.
    assert set(changed_paths(run, expect=1)) == {str(tree)}


def test_approve_relative_path(run: Cli, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("init").exit_code == 0
    (tree / "sub" / "c.txt").write_text("changed\n")
    assert run("verify").exit_code == 1
    monkeypatch.chdir(tree)
    doc = approve_json(run, "sub/c.txt")
    assert [a["path"] for a in doc["approved"]] == [str(tree / "sub" / "c.txt")]
    assert run("verify").exit_code == 0


@pytest.mark.parametrize("args", [[], ["PATH", "--all"], ["--all", "--package-updates"],
                                  ["PATH", "--package-updates"], ["--reason", "why"],
                                  ["PATH", "--all", "--package-updates"]],
                         ids=["nothing", "path+all", "all+package-updates",
                              "path+package-updates", "only-reason", "all-three"])
def test_approve_needs_exactly_one_mode(run: Cli, tree: Path, args: list[str]) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    before = events(run)
    result = run("approve", *[str(tree / "a.conf") if a == "PATH" else a for a in args])
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith("integrity: approve: ") and "--all" in line
    assert result.stdout == ""
    assert approvals(run.db) == [] and events(run) == before


def test_approve_outside_every_rule_exits_2(run: Cli, tree: Path, tmp_path: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    for outside in (tmp_path / "elsewhere", tmp_path / "tree-other", tmp_path):
        result = run("approve", str(outside))
        assert result.exit_code == 2
        assert str(outside) in one_line(result.stderr)
        assert result.stdout == ""
    # One bad path among good ones: nothing is approved.
    result = run("approve", str(tree / "a.conf"), str(tmp_path / "elsewhere"))
    assert result.exit_code == 2
    assert approvals(run.db) == []
    assert events(run)[str(tree / "a.conf")]["status"] == "open"


def test_approve_without_a_baseline_exits_2(run: Cli, tree: Path) -> None:
    for args in (["--all"], [str(tree)], ["--package-updates"]):
        result = run("approve", *args)
        assert result.exit_code == 2
        assert "run 'integrity init'" in one_line(result.stderr)
        assert not run.db.exists()
    assert run("db", "upgrade").exit_code == 0
    result = run("approve", "--all")
    assert result.exit_code == 2
    assert "run 'integrity init'" in one_line(result.stderr)


# -- a path the approval cannot read ------------------------------------------------------

SETPRIV = shutil.which("setpriv")
#: Root without the capabilities that bypass file permissions: 0000 means "no" to it.
NO_DAC = [SETPRIV or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _no_dac_works(probe_dir: Path) -> bool:
    if SETPRIV is None or os.geteuid() != 0:
        return False
    probe_dir.mkdir()
    probe_dir.chmod(0o000)
    try:
        proc = subprocess.run([*NO_DAC, sys.executable, "-c",
                               f"import os; os.listdir({str(probe_dir)!r})"],
                              capture_output=True, timeout=30)
        return proc.returncode != 0 and b"PermissionError" in proc.stderr
    finally:
        probe_dir.chmod(0o755)


def without_dac(run: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as root that cannot override file permissions (what a walk meets when a
    directory is unreadable, which plain root never does)."""
    return subprocess.run([*NO_DAC, sys.executable, "-m", "integrity", "--db",
                           f"sqlite:///{run.db}", "--policy", str(run.policy), "-q", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture
def locked(run: Cli, tree: Path, tmp_path: Path) -> Iterator[Path]:
    """tree/locked/f changed and tree/a.conf changed (open events), then tree/locked
    made unreadable (mode 0000); unlocked again afterwards."""
    if not _no_dac_works(tmp_path / "probe"):
        pytest.skip("needs root and setpriv able to drop CAP_DAC_OVERRIDE")
    (tree / "locked").mkdir()
    (tree / "locked" / "f").write_text("one\n")
    assert run("init").exit_code == 0
    (tree / "locked" / "f").write_text("two\n")
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    (tree / "locked").chmod(0o000)
    try:
        yield tree / "locked"
    finally:
        (tree / "locked").chmod(0o755)


def test_approve_all_leaves_an_unreadable_path_open(run: Cli, tree: Path,
                                                    locked: Path) -> None:
    rows = baseline_rows(run.db)
    proc = without_dac(run, "approve", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [a["path"] for a in doc["approved"]] == [str(tree / "a.conf")]
    [left] = doc["left_open"]
    assert (left["path"], left["kind"]) == (str(locked / "f"), "unreadable")
    assert "Permission denied" in left["reason"]
    # Nothing of what could not be read was written; its event stays open.
    assert baseline_rows(run.db)[key(locked / "f")] == rows[key(locked / "f")]
    assert events(run)[str(locked / "f")]["status"] == "open"
    locked.chmod(0o755)
    doc = approve_json(run, str(locked))  # (the chmods changed the directory's ctime)
    assert [a["path"] for a in doc["approved"]] == [str(locked / "f")]
    assert run("verify").exit_code == 0


def test_approving_an_unreadable_directory_by_name_leaves_it_open(
        run: Cli, tree: Path, locked: Path) -> None:
    rows = baseline_rows(run.db)
    proc = without_dac(run, "approve", str(locked), str(tree / "a.conf"), "--json")
    assert "Usage:" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [a["path"] for a in doc["approved"]] == [str(tree / "a.conf")]
    [left] = doc["left_open"]
    assert (left["path"], left["kind"]) == (str(locked), "unreadable")
    assert "Permission denied" in left["reason"]
    assert baseline_rows(run.db)[key(locked / "f")] == rows[key(locked / "f")]
    assert events(run)[str(locked / "f")]["status"] == "open"


# -- package updates, with real packages -------------------------------------------------

PKG = "integrity-test-upg"
SHARE = "/usr/share/integrity-test-upg"
DATA = f"{SHARE}/data"              # changes in 1.1
NOTES = f"{SHARE}/notes"            # the same bytes in both versions
DROPPED = f"{SHARE}/dropped"        # only in 1.0
LIB = "/usr/lib/integrity-test-upg"
TOOL = f"{LIB}/tool"                # executable, changes in 1.1
LINK = f"{LIB}/current"             # symlink to the tool
CONF = "/etc/integrity-test-upg.conf"            # conffile, changes in 1.1
CONFD = "/etc/integrity-test-upg.d"
OLD_CONF = f"{CONFD}/old.conf"      # conffile only in 1.0: obsolete after the upgrade
NEW_CONF = f"{CONFD}/new.conf"      # conffile only in 1.1: added by the upgrade
UNOWNED = f"{SHARE}/unowned"        # created by hand
OWN_DIRS = (SHARE, LIB, CONFD)

needs_dpkg = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None,
    reason="installs real packages: needs root and dpkg")


def _files(version: str) -> dict[str, bytes | tuple[bytes, int]]:
    files: dict[str, bytes | tuple[bytes, int]] = {
        DATA: f"data of version {version}\n".encode(),
        NOTES: b"notes no version changes\n",
        TOOL: (f"#!/bin/sh\necho integrity-test-upg {version}\n".encode(), 0o755),
        CONF: f"setting = {version}\n".encode(),
    }
    if version == "1.0":
        files[DROPPED] = b"dropped in 1.1\n"
        files[OLD_CONF] = b"old = yes\n"
    else:
        files[NEW_CONF] = b"new = yes\n"
    return files


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("upg-debs")
    return {version: build_deb(
        work, PKG, version, _files(version),
        [CONF, OLD_CONF if version == "1.0" else NEW_CONF], links={LINK: "tool"})
        for version in ("1.0", "1.1")}


@dataclass
class Host:
    """Installs the test package; undoes everything a test did to the system.

    dpkg logs to `log`, except for `install(..., logged=True)`: that goes to
    `system_log`, the log the CLI's package evidence reads in place of
    /var/log/dpkg.log (what explains the files the new version no longer ships).
    """

    log: Path
    system_log: Path
    cli: Cli
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def install(self, deb: Path, logged: bool = False) -> None:
        dpkg(self.system_log if logged else self.log, "-i", str(deb))

    def create(self, path: str, content: bytes) -> None:
        self.cleanups.append(lambda: os.unlink(path))
        _write(path, content)


def _write(path: str, content: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(content)


def policy_for(tmp_path: Path, *, exclude_link: bool = True) -> Path:
    """Rules for the package's trees. The symlink is excluded unless a test is about it:
    dpkg's database states no link targets, so without the package's .deb in apt's
    cache every upgrade leaves a replaced symlink open (by design)."""
    exclude = 'exclude = ["current"]\n' if exclude_link else ""
    policy = tmp_path / ("policy.toml" if exclude_link else "policy-links.toml")
    policy.write_text(
        f'[[rule]]\npath = "{SHARE}"\ncheck = "static"\nseverity = "high"\n\n'
        f'[[rule]]\npath = "{LIB}"\ncheck = "static"\nseverity = "critical"\n{exclude}\n'
        f'[[rule]]\npath = "{CONF}"\ncheck = "config"\nseverity = "medium"\n\n'
        f'[[rule]]\npath = "{CONFD}"\ncheck = "config"\nseverity = "medium"\n')
    return policy


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    log, system_log = tmp_path / "dpkg.log", tmp_path / "system-dpkg.log"
    log.touch()
    system_log.touch()

    class OwnLogManagers(PackageManagers):
        """The real package managers, reading the test's own dpkg log."""

        def __init__(self, **paths: Any) -> None:
            super().__init__(**{"dpkg_log": str(system_log), **paths})

    # The in-process CLI looks the class up here each time it needs one.
    monkeypatch.setattr(integrity.packages, "PackageManagers", OwnLogManagers)
    state = Host(log, system_log, Cli(tmp_path / "state" / "integrity.db",
                                      policy_for(tmp_path)))
    with owned(PKG, log, (*OWN_DIRS, CONF), scratch=OWN_DIRS):
        try:
            yield state
        finally:
            for cleanup in reversed(state.cleanups):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    cleanup()


def _left(doc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {item["path"]: (item["kind"], item["reason"]) for item in doc["left_open"]}


def upgrade_and_delete(host: Host, debs: dict[str, Path], path: str) -> tuple[str, str]:
    """Upgrade to 1.1 and delete `path` by hand meanwhile: the upgrade's own removal
    (DROPPED) is approved, and `path`'s is left open: its (kind, reason)."""
    host.install(debs["1.1"], logged=True)
    os.unlink(path)
    changes = changed_paths(host.cli, expect=1)
    assert changes[path]["kind"] == "removed" and changes[DROPPED]["kind"] == "removed"
    doc = approve_json(host.cli, "--package-updates")
    approved = {a["path"] for a in doc["approved"]}
    assert DROPPED in approved
    assert path not in approved, f"{path}'s removal was approved with the upgrade"
    return _left(doc)[path]


def left_open(run: Cli, path: str) -> tuple[str, str]:
    """Run approve --package-updates, which must leave `path` open: its (kind, reason)."""
    doc = approve_json(run, "--package-updates")
    assert path not in {a["path"] for a in doc["approved"]}, f"{path} was approved"
    return _left(doc)[path]


@needs_dpkg
def test_package_updates_approve_exactly_the_upgrade(host: Host,
                                                     debs: dict[str, Path]) -> None:
    run = host.cli
    host.install(debs["1.0"])
    assert run("init").exit_code == 0
    host.install(debs["1.1"], logged=True)
    _write(NOTES, b"tampered by hand\n")
    host.create(UNOWNED, b"nobody ships this\n")
    changes = changed_paths(run, expect=1)
    assert {DATA, TOOL, CONF, DROPPED, NEW_CONF, NOTES, UNOWNED} <= set(changes)

    doc = approve_json(run, "--package-updates")
    approved = {a["path"]: a for a in doc["approved"]}
    # Exactly the upgrade: every change but the two made by hand.
    assert set(approved) == set(changes) - {NOTES, UNOWNED}
    assert set(approved) <= {DATA, TOOL, CONF, DROPPED, NEW_CONF, *OWN_DIRS}
    assert {approved[p]["kind"] for p in (DATA, TOOL, CONF)} == {"modified"}
    assert (approved[DROPPED]["kind"], approved[NEW_CONF]["kind"]) == ("removed", "added")
    # The .deb is not in apt's cache: dpkg's own records are the evidence.
    assert {a["evidence"] for a in approved.values()} == {"package-db"}
    assert set(doc["written"]) == set(approved)
    left = _left(doc)
    assert set(left) == {NOTES, UNOWNED}
    assert left[NOTES][0] == "modified" and "differs" in left[NOTES][1]
    assert left[NOTES][1] == f"content differs from what dpkg shipped ({PKG} 1.1)"
    assert left[UNOWNED] == ("added", "not owned by any package")

    rows = events(run)
    for path in approved:
        assert (rows[path]["status"], rows[path]["classification"], rows[path]["evidence"],
                rows[path]["approval"]) == ("approved", "package-update", "package-db",
                                            doc["approval"]), rows[path]
    for path in (NOTES, UNOWNED):
        assert (rows[path]["status"], rows[path]["classification"]) == ("open", "unexplained")
    [approval] = approvals(run.db)
    assert (approval["mode"], approval["events"]) == ("package-updates", len(approved))
    assert set(changed_paths(run, expect=1)) == {NOTES, UNOWNED}

    # An attribute-only change by hand: dpkg's database does not state modes.
    os.chmod(TOOL, 0o4755)
    assert set(changed_paths(run, expect=1)) == {NOTES, UNOWNED, TOOL}
    doc = approve_json(run, "--package-updates")
    assert doc["approval"] is None and doc["approved"] == []
    left = _left(doc)
    assert set(left) == {NOTES, UNOWNED, TOOL}
    assert left[TOOL][0] == "modified" and "does not state" in left[TOOL][1]
    assert left[TOOL][1].startswith("package does not state file attributes")
    text = run("approve", "--package-updates")
    assert text.exit_code == 0
    assert f"left open modified {TOOL}: package does not state file attributes" in text.stdout
    assert text.stdout.endswith("nothing approved\n")
    changes = changed_paths(run, expect=1)
    assert set(changes) == {NOTES, UNOWNED, TOOL}
    assert "mode" in changes[TOOL]["changed"]
    assert len(approvals(run.db)) == 1


@needs_dpkg
def test_a_mode_changed_after_the_verify_is_not_approved_with_the_upgrade(
        host: Host, debs: dict[str, Path]) -> None:
    """The vouching must look at what is approved now, not at what verify saw then."""
    run = host.cli
    host.install(debs["1.0"])
    assert run("init").exit_code == 0
    host.install(debs["1.1"])
    assert TOOL in changed_paths(run, expect=1)
    os.chmod(TOOL, 0o4755)  # setuid, after the verify recorded the upgrade's change
    doc = approve_json(run, "--package-updates")
    assert TOOL not in {a["path"] for a in doc["approved"]}, \
        "the setuid bit went into the baseline as part of a package update"
    assert TOOL in _left(doc)
    changes = changed_paths(run, expect=1)
    assert TOOL in changes and "mode" in changes[TOOL]["changed"]


@needs_dpkg
def test_removing_a_file_no_package_ever_owned_is_not_explained_by_an_upgrade(
        host: Host, debs: dict[str, Path]) -> None:
    """An upgrade explains the files its old version had; not a local file deleted
    at the same time (dpkg's log names the package, not the files)."""
    run = host.cli
    host.install(debs["1.0"])
    local = f"{SHARE}/local-notes"
    host.create(local, b"the admin's own file\n")
    assert run("init").exit_code == 0
    assert upgrade_and_delete(host, debs, local)[0] == "removed"


@needs_dpkg
def test_removing_a_locally_diverted_file_is_not_explained_by_an_upgrade(
        host: Host, debs: dict[str, Path]) -> None:
    """After `dpkg-divert --local --rename`, the file at the original name is the
    admin's and the package's lives at the diverted name. An attacker who deletes the
    admin's file while the package is upgraded must not have it approved as the
    upgrade's: the baseline records it as nobody's, as dpkg says."""
    run = host.cli
    host.install(debs["1.0"])
    diverted = NOTES + ".distrib"
    dpkg_tool("dpkg-divert", "--local", "--rename", "--divert", diverted, "--add", NOTES)
    host.cleanups.append(
        lambda: dpkg_tool("dpkg-divert", "--local", "--rename", "--remove", NOTES))
    host.create(NOTES, b"the admin's own notes\n")
    assert run("init").exit_code == 0
    owners = dict(query(run.db, "SELECT e.key, e.package FROM entry e JOIN baseline b "
                               "ON b.id = e.baseline_id WHERE b.state = 'active'"))
    assert (owners[key(NOTES)], owners[key(diverted)]) == (None, PKG)
    assert upgrade_and_delete(host, debs, NOTES) == (
        "removed", "not owned by any package when the baseline was taken: its removal is "
                   "not explained by a package")


@needs_dpkg
def test_an_added_file_passes_only_in_the_shape_a_package_gives_it(
        host: Host, debs: dict[str, Path]) -> None:
    """dpkg's database states no modes or owners: an added file whose content
    matches is approved only as root's, without setuid, setgid, sticky or
    world-writable bits. An attacker's setuid bit or chown on a file a fresh install
    or an upgrade added stays open."""
    run = host.cli
    assert run("init").exit_code == 0
    host.install(debs["1.0"], logged=True)
    os.chmod(TOOL, 0o4755)
    os.chmod(LIB, 0o1777)
    host.install(debs["1.1"], logged=True)  # adds NEW_CONF; the tool is replaced
    os.chmod(TOOL, 0o4755)
    os.chown(NEW_CONF, 65534, 65534)
    changes = changed_paths(run, expect=1)
    assert {changes[p]["kind"] for p in (TOOL, LIB, NEW_CONF, DATA)} == {"added"}
    doc = approve_json(run, "--package-updates")
    approved = {a["path"] for a in doc["approved"]}
    assert {DATA, CONF, SHARE} <= approved
    assert not {TOOL, LIB, NEW_CONF} & approved, "added paths' attributes went unchecked"
    left = _left(doc)
    assert left[TOOL] == ("added", f"added as 4755 0:0, and the package does not state "
                                   f"file attributes ({PKG} 1.1: no {PKG}_1.1_all.deb in "
                                   f"/var/cache/apt/archives; no dpkg-statoverride entry)")
    assert left[LIB][1].startswith("added as 1777 0:0, and the package does not state")
    assert left[NEW_CONF][1].startswith("added as 0644 65534:65534, and the package")
    assert {TOOL, LIB, NEW_CONF} <= set(changed_paths(run, expect=1))


@needs_dpkg
def test_an_added_file_with_a_capability_is_left_open(host: Host,
                                                      debs: dict[str, Path]) -> None:
    run = host.cli
    assert run("init").exit_code == 0
    host.install(debs["1.1"], logged=True)
    # vfs_cap_data revision 2: cap_setuid (7) effective and permitted.
    os.setxattr(TOOL, "security.capability", struct.pack("<IIIII", 0x02000001, 1 << 7,
                                                          0, 0, 0))
    changed_paths(run, expect=1)
    assert left_open(run, TOOL) == ("added", "package managers do not state extended "
                                             "attributes")


@needs_dpkg
def test_a_packaged_file_replaced_by_a_directory_is_left_open(
        host: Host, debs: dict[str, Path]) -> None:
    """A directory is vouched for by being listed; not where the package ships a file
    (an AppArmor profile or a PAM file emptied out by a directory in its place)."""
    run = host.cli
    host.install(debs["1.1"])
    assert run("init").exit_code == 0
    mode = os.stat(DATA).st_mode & 0o7777
    os.unlink(DATA)
    os.mkdir(DATA, mode)
    host.cleanups.append(lambda: os.rmdir(DATA))
    assert changed_paths(run, expect=1)[DATA]["kind"] == "modified"
    assert left_open(run, DATA) == ("modified", f"a directory where {PKG} 1.1 ships a file")


@needs_dpkg
def test_a_hard_link_to_a_packaged_file_is_left_open(host: Host, debs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """No package run makes a second link to a file it installed: the old setuid
    binary kept alive through a link outside the tree, for one."""
    run = host.cli
    host.install(debs["1.1"])
    assert run("init").exit_code == 0
    kept = f"{LIB}/.kept"  # in the package's directory, on its filesystem
    os.link(TOOL, kept)
    host.cleanups.append(lambda: os.unlink(kept))
    assert "nlink" in changed_paths(run, expect=1)[TOOL]["changed"]
    assert left_open(run, TOOL) == ("modified", "a hard link was made to it (links 1 -> 2, "
                                                "the same inode): no package run does that")


@needs_dpkg
def test_a_removed_packages_conffile_recreated_by_hand_is_left_open(
        host: Host, debs: dict[str, Path]) -> None:
    """dpkg keeps a removed package's conffiles (config-files) and writes none of them
    until the package is installed again: one deleted before the baseline and put
    back with the package's bytes afterwards was put back by someone else."""
    run = host.cli
    host.install(debs["1.1"])
    dpkg(host.log, "-r", PKG)
    os.unlink(CONF)
    assert run("init").exit_code == 0
    host.create(CONF, b"setting = 1.1\n")  # what 1.1 shipped
    assert changed_paths(run, expect=1)[CONF]["kind"] == "added"
    assert left_open(run, CONF) == ("added", f"{PKG} 1.1 is not installed (config-files); "
                                             "dpkg writes no conffile of it")


RACE_PKG = "integrity-test-race"
RACE_DIR = "/usr/share/integrity-test-race"
RACE_FILE = f"{RACE_DIR}/big"


@needs_dpkg
def test_bytes_swapped_in_during_the_vouching_are_not_approved(tmp_path: Path) -> None:
    """The attack: the approval records the tampered file as read through the tree,
    then the package check reads the path again. An attacker watching with inotify
    swaps the parent directory for a link to a decoy holding the package's bytes
    just then (renameat2 RENAME_EXCHANGE, atomic), and back once the decoy is opened.
    The tampered file's inode, size and times never change. What is judged must be
    what is recorded: the change stays open."""
    good = bytes(range(256)) * (64 << 12)  # 16 MiB: a window wide enough to hit
    deb = build_deb(tmp_path, RACE_PKG, "1.0", {RACE_FILE: good})
    log = tmp_path / "dpkg.log"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[rule]]\npath = "{RACE_DIR}"\ncheck = "static"\n')
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "big").write_bytes(good)
    aside = RACE_DIR + ".real"
    attacker = f"""
import ctypes, os, select, sys
from inotify_simple import INotify, flags
libc = ctypes.CDLL(None, use_errno=True)
def exchange(a, b):
    if libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
read = INotify(); read.add_watch({RACE_FILE!r}, flags.CLOSE_NOWRITE)
opened = INotify(); opened.add_watch({str(decoy / "big")!r}, flags.OPEN)
os.symlink({str(decoy)!r}, {aside!r})
print("ready", flush=True)
# The approval has read the tampered file (if it ends without reading it: no swap).
if sys.stdin.fileno() in select.select([read.fileno(), sys.stdin.fileno()], [], [])[0]:
    sys.exit(3)
exchange({aside!r}, {RACE_DIR!r})
# Back once the package check opens the decoy, or (it never does) once the approval
# is over: the test closes our stdin then. No deadline, so a slow check is still inside.
select.select([opened.fileno(), sys.stdin.fileno()], [], [])
exchange({aside!r}, {RACE_DIR!r})
os.unlink({aside!r})
"""
    with owned(RACE_PKG, log, [RACE_FILE, aside]):
        dpkg(log, "-i", str(deb))
        assert run("init").exit_code == 0
        with open(RACE_FILE, "r+b") as handle:  # same inode, same size
            handle.write(b"EVIL")
        assert set(changed_paths(run, expect=1)) == {RACE_FILE}
        proc = subprocess.Popen([sys.executable, "-c", attacker], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        try:
            doc = approve_json(run, "--package-updates")
        finally:
            proc.communicate(timeout=30)  # closes its stdin: the approval is over
            if os.path.islink(RACE_DIR) and os.path.isdir(aside):
                os.unlink(RACE_DIR)
                os.rename(aside, RACE_DIR)
            if os.path.islink(aside):
                os.unlink(aside)
        assert proc.returncode == 0  # the swap happened, and was undone
        assert doc["approved"] == [], "the decoy's bytes vouched for the tampered file"
        assert _left(doc)[RACE_FILE] == ("modified", "changed while it was being "
                                                     "approved: not the state that was read")
        # (The swaps themselves changed the directory's ctime: a change of its own.)
        assert changed_paths(run, expect=1)[RACE_FILE]["kind"] == "modified"


@dataclass(frozen=True)
class Reason:
    """A change made by hand and what --package-updates must say about it."""

    perturb: Callable[[Host], None]
    path: str
    kind: str
    reason: str
    exact: bool = True
    setup: Callable[[Host], None] | None = None
    upgraded: bool = False
    links: bool = False


def _fifo(_: Host) -> None:
    os.unlink(NOTES)
    os.mkfifo(NOTES)


def _retarget(_: Host) -> None:
    os.unlink(LINK)
    os.symlink("/bin/sh", LINK)


def _local_file(host: Host) -> None:
    host.create(f"{SHARE}/local-notes", b"the admin's own file\n")


REASONS = {
    "added-unowned": Reason(lambda h: h.create(UNOWNED, b"x\n"), UNOWNED, "added",
                            "not owned by any package"),
    "modified-unowned": Reason(lambda h: _write(f"{SHARE}/local-notes", b"edited\n"),
                               f"{SHARE}/local-notes", "modified",
                               "not owned by any package", setup=_local_file),
    "content-differs": Reason(lambda h: _write(DATA, b"tampered\n"), DATA, "modified",
                              f"content differs from what dpkg shipped ({PKG} 1.1)"),
    "conffile-differs": Reason(lambda h: _write(CONF, b"setting = local\n"), CONF,
                               "modified", f"content differs from what dpkg shipped "
                               f"({PKG} 1.1, conffile changed locally)"),
    "setuid": Reason(lambda h: os.chmod(TOOL, 0o4755), TOOL, "modified",
                     "package does not state file attributes", exact=False),
    "chown": Reason(lambda h: os.chown(DATA, 1, 1), DATA, "modified",
                    "package does not state file attributes", exact=False),
    "xattrs": Reason(lambda h: os.setxattr(NOTES, "user.integrity-test", b"1"), NOTES,
                     "modified", "package managers do not state extended attributes"),
    "removed-by-hand": Reason(lambda h: os.unlink(DATA), DATA, "removed",
                              f"still listed by package {PKG}: its removal is not "
                              f"explained"),
    "removed-unowned": Reason(lambda h: os.unlink(f"{SHARE}/local-notes"),
                              f"{SHARE}/local-notes", "removed",
                              "not owned by any package when the baseline was taken: its "
                              "removal is not explained by a package", setup=_local_file),
    "fifo": Reason(_fifo, NOTES, "modified",
                   f"dpkg records no content for this other ({PKG} 1.1)"),
    "symlink": Reason(_retarget, LINK, "modified", "package does not state symlink targets",
                      exact=False, links=True),
    "obsolete-conffile": Reason(lambda h: _write(OLD_CONF, b"old = edited\n"), OLD_CONF,
                                "modified", f"obsolete conffile: {PKG} 1.1 no longer ships "
                                f"it", upgraded=True),
}


@needs_dpkg
@pytest.mark.parametrize("name", list(REASONS))
def test_each_left_open_reason(host: Host, debs: dict[str, Path], tmp_path: Path,
                               name: str) -> None:
    case = REASONS[name]
    run = host.cli
    if case.links:
        run = Cli(run.db, policy_for(tmp_path, exclude_link=False))
    if case.upgraded:
        host.install(debs["1.0"])
    host.install(debs["1.1"])
    if case.setup is not None:
        case.setup(host)
    assert run("init").exit_code == 0
    case.perturb(host)
    changes = changed_paths(run, expect=1)
    assert changes[case.path]["kind"] == case.kind

    doc = approve_json(run, "--package-updates")
    left = _left(doc)
    assert set(left) == {case.path}, left
    kind, reason = left[case.path]
    assert kind == case.kind
    if case.exact:
        assert reason == case.reason
    else:
        assert reason.startswith(case.reason), reason
    # Only a directory whose listing changed with it may have been approved.
    assert {a["path"] for a in doc["approved"]} <= set(OWN_DIRS)
    row = events(run)[case.path]
    assert (row["status"], row["classification"], row["approval"]) == \
        ("open", "unexplained", None)
    assert case.path in changed_paths(run, expect=1)


@needs_dpkg
def test_an_unreadable_package_file_is_left_open_with_the_cause(
        host: Host, debs: dict[str, Path], tmp_path: Path) -> None:
    if not _no_dac_works(tmp_path / "probe"):
        pytest.skip("needs root and setpriv able to drop CAP_DAC_OVERRIDE")
    run = host.cli
    host.install(debs["1.1"])
    assert run("init").exit_code == 0
    os.chmod(DATA, 0o000)
    assert DATA in changed_paths(run, expect=1)
    proc = without_dac(run, "approve", "--package-updates", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    kind, reason = _left(doc)[DATA]
    assert kind == "modified"
    assert reason.startswith("cannot read") and "Permission denied" in reason, reason
    assert DATA not in {a["path"] for a in doc["approved"]}


def _signed_archive(host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    require: bool = True) -> tuple[Any, Path]:
    """A signed repository, apt's cache and lists of the test's own for the CLI's
    package evidence, and a policy covering its keyring and the files of the tools it
    is read with (gpgv, dpkg-deb, their libraries: what the default's /usr/bin and
    /usr/lib rules hold), requiring signed evidence: (repository, archive cache)."""
    from aptrepo import AptRepo, SigningKey, tool_files

    repo = AptRepo(tmp_path / "repo", SigningKey.generate(tmp_path / "gnupg"))
    host.cleanups.append(repo.key.stop)
    cache = tmp_path / "archives"
    cache.mkdir()

    class SignedManagers(PackageManagers):
        """The real package managers, with the test's apt cache, lists and sources."""

        def __init__(self, **options: Any) -> None:
            super().__init__(**{"dpkg_log": str(host.system_log),
                                "apt_archives": str(cache), "apt_lists": str(repo.lists),
                                "apt_etc": str(repo.etc), **options})

    monkeypatch.setattr(integrity.packages, "PackageManagers", SignedManagers)
    with open(host.cli.policy, "a") as policy:
        policy.write(f'\n[[rule]]\npath = "{repo.keyring.parent}"\ncheck = "static"\n')
        for path in tool_files():
            policy.write(f'\n[[rule]]\npath = "{path}"\ncheck = "static"\n')
        if require:
            policy.write('\n[packages]\nrequire_signed = true\n')
    return repo, cache


@needs_dpkg
def test_require_signed_approves_only_on_the_signed_archive(
        host: Host, debs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the archive's keyring is in the baseline; signed evidence required
    (by the sealed policy's `[packages]`, as the apt hook runs it, then by the flag)
    leaves what only dpkg's database vouches for open, approves on the signed archive
    once the .deb is kept, and refuses an archive re-signed with a replaced keyring."""
    from aptrepo import SigningKey
    from debs import packages_stanza, sha256

    repo, cache = _signed_archive(host, tmp_path, monkeypatch)
    run = host.cli
    host.install(debs["1.0"])
    assert run("init").exit_code == 0
    host.install(debs["1.1"], logged=True)
    assert {DATA, TOOL, CONF, DROPPED, NEW_CONF} <= set(changed_paths(run, expect=1))

    # No .deb kept: dpkg's database alone vouches, which the policy refuses.
    doc = approve_json(run, "--package-updates")
    assert {a["path"] for a in doc["approved"]} == {DROPPED}  # removals: dpkg's log
    kind, reason = _left(doc)[DATA]
    assert reason == (f"only dpkg's database vouches for it (matches {PKG} 1.1 (dpkg "
                      f"md5sums); no {PKG}_1.1_all.deb in {cache}), and --require-signed "
                      "asks for the signed archive (keep downloaded .debs: "
                      "APT::Keep-Downloaded-Packages)")

    # The .deb kept and listed in a signed list: approved on the signed archive.
    shutil.copy(debs["1.1"], cache / f"{PKG}_1.1_all.deb")
    repo.publish(packages_stanza(PKG, "1.1", "all", sha256(debs["1.1"])))
    doc = approve_json(run, "--package-updates", "--require-signed")
    approved = {a["path"]: a["evidence"] for a in doc["approved"]}
    assert {DATA, TOOL, CONF, NEW_CONF} <= set(approved), _left(doc)
    assert set(approved.values()) == {"signed-archive"}
    assert doc["left_open"] == []

    # The intruder: a backdoored notes.txt in a forged 1.1, the keyring replaced by
    # one of their own and the list re-signed with it.
    attacker = SigningKey.generate(tmp_path / "attacker", "attacker")
    host.cleanups.append(attacker.stop)
    files = _files("1.1")
    files[NOTES] = b"backdoor\n"
    (tmp_path / "forged").mkdir()
    forged = build_deb(tmp_path / "forged", PKG, "1.1", files, [CONF, NEW_CONF],
                       links={LINK: "tool"})
    shutil.copy(forged, cache / f"{PKG}_1.1_all.deb")
    _write(NOTES, b"backdoor\n")
    repo.keyring.write_bytes(attacker.keyring)
    repo.publish(packages_stanza(PKG, "1.1", "all", sha256(forged)), sign_with=attacker)
    assert {NOTES, str(repo.keyring)} <= set(changed_paths(run, expect=1))
    for flags in (["--require-signed"], []):
        doc = approve_json(run, "--package-updates", *flags)
        assert doc["approved"] == []
        left = _left(doc)
        assert f"keyring {repo.keyring}: differs from the integrity baseline" in \
            left[NOTES][1], left[NOTES]
        assert left[str(repo.keyring)] == ("modified", "not owned by any package")


@needs_dpkg
def test_a_replayed_expired_inrelease_does_not_approve_a_downgrade(
        host: Host, debs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay, end to end: 1.1 is the baseline's; the intruder restores an old,
    genuinely signed InRelease whose Valid-Until has passed, with its list and the old
    1.0 .deb, and downgrades to it. --require-signed leaves the downgrade open, saying
    the InRelease expired before the install, even once dpkg's log is backdated into
    its validity; the same lists, valid when the install ran, approve it."""
    import time

    from aptrepo import rfc1123
    from debs import packages_stanza, sha256

    repo, cache = _signed_archive(host, tmp_path, monkeypatch, require=False)
    run = host.cli
    host.install(debs["1.1"])
    assert run("init").exit_code == 0
    day, now = 86400, time.time()
    stanza = packages_stanza(PKG, "1.0", "all", sha256(debs["1.0"]))
    expired = now - 10 * day
    repo.publish(stanza, date=rfc1123(now - 30 * day), valid_until=rfc1123(expired))
    shutil.copy(debs["1.0"], cache / f"{PKG}_1.0_all.deb")
    host.install(debs["1.0"], logged=True)
    assert {DATA, TOOL, DROPPED} <= set(changed_paths(run, expect=1))

    def utc(when: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))

    doc = approve_json(run, "--package-updates", "--require-signed")
    approved = {a["path"] for a in doc["approved"]}
    assert not {DATA, TOOL, DROPPED} & approved, doc["approved"]
    left = _left(doc)
    stamp = next(line[:19] for line in host.system_log.read_text().splitlines()
                 if f" {PKG}:all 1.1 1.0" in line)
    installed = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
    assert (f"{PREFIX}InRelease expired {utc(expired)}, before the install of {PKG} 1.0 "
            f"at {utc(installed)}") in left[DATA][1], left[DATA]
    assert "expired" in left[DROPPED][1], left[DROPPED]
    assert set(events(run, "--open")) >= {DATA, TOOL, DROPPED}

    # dpkg's log is root's: backdated into the InRelease's validity, it still cannot
    # place the change before the path was last seen as recorded (the baseline).
    forged = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now - 20 * day))
    host.system_log.write_text("".join(
        forged + line[19:] + "\n" for line in host.system_log.read_text().splitlines()))
    doc = approve_json(run, "--package-updates", "--require-signed")
    assert not {DATA, TOOL, DROPPED} & {a["path"] for a in doc["approved"]}
    assert (f"{PREFIX}InRelease expired {utc(expired)}, before the change it would "
            f"explain: the path was last seen as recorded at") in _left(doc)[DATA][1]

    # The same list in an InRelease still valid at the install: approved on it.
    host.system_log.write_text(f"{stamp}{host.system_log.read_text()[19:]}")
    repo.publish(stanza, date=rfc1123(now - 30 * day), valid_until=rfc1123(now + day))
    doc = approve_json(run, "--package-updates", "--require-signed")
    approved_evidence = {a["path"]: a["evidence"] for a in doc["approved"]}
    assert {DATA, TOOL, DROPPED} <= set(approved_evidence), _left(doc)
    assert approved_evidence[DATA] == "signed-archive"


def _installed(package: str) -> tuple[str, str]:
    """(version, architecture) of an installed package, as dpkg has it."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version} ${Architecture}",
                          package], capture_output=True, check=True, text=True).stdout
    version, arch = out.split()
    return version, arch


def _forged(tmp_path: Path, compression: str = "xz") -> Path:
    """The intruder's 1.1: notes.txt is a backdoor."""
    files = _files("1.1")
    files[NOTES] = b"backdoor\n"
    work = tmp_path / f"forged-{compression}"
    work.mkdir()
    return build_deb(work, PKG, "1.1", files, [CONF, NEW_CONF], links={LINK: "tool"},
                     compression=compression)


@needs_dpkg
def test_a_gpgv_that_passes_every_signature_vouches_for_nothing(
        host: Host, debs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The intruder replaces /usr/bin/gpgv by a script that prints GOODSIG and VALIDSIG
    and exits 0, and rewrites the InRelease (unsigned) to list a Packages list naming a
    forged 1.1 and a forged gpgv package holding that script. The fake gpgv's verdict
    was believed: the backdoor and gpgv's own change were approved as signed-archive.
    gpgv is not as the baseline recorded it, so its word counts for nothing."""
    from aptrepo import FAKE_GPGV, replaced
    from debs import packages_stanza, sha256
    from integrity.packages.debfile import archive_name

    repo, cache = _signed_archive(host, tmp_path, monkeypatch)
    run = host.cli
    host.install(debs["1.0"])
    assert run("init").exit_code == 0
    host.install(debs["1.1"], logged=True)
    forged = _forged(tmp_path)
    version, arch = _installed("gpgv")
    fake_gpgv = build_deb(tmp_path / "forged-xz", "gpgv", version,
                          {"/usr/bin/gpgv": (FAKE_GPGV, 0o755)}, arch=arch)
    shutil.copy(forged, cache / f"{PKG}_1.1_all.deb")
    shutil.copy(fake_gpgv, cache / archive_name("gpgv", version, arch))
    repo.publish(packages_stanza(PKG, "1.1", "all", sha256(forged))
                 + packages_stanza("gpgv", version, arch, sha256(fake_gpgv)), signed=False)
    _write(NOTES, b"backdoor\n")
    # The host fixture holds the test packages' lock, which other runs' gpgv users take.
    with replaced("/usr/bin/gpgv", FAKE_GPGV):
        assert {NOTES, "/usr/bin/gpgv"} <= set(changed_paths(run, expect=1))
        doc = approve_json(run, "--package-updates", "--require-signed")
    approved = {a["path"] for a in doc["approved"]}
    assert approved <= {DROPPED}, doc["approved"]  # removals rest on dpkg's log
    left = _left(doc)
    why = "/usr/bin/gpgv differs from the integrity baseline: gpgv's word is not used"
    for path in (NOTES, "/usr/bin/gpgv", DATA):
        assert why in left[path][1], (path, left[path])
    assert "approve that first: integrity approve /usr/bin/gpgv" in left[NOTES][1]


@needs_dpkg
def test_a_dpkg_deb_earlier_in_path_does_not_say_what_a_deb_holds(
        host: Host, debs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The genuine 1.1, zstd-compressed (read through dpkg-deb), kept and listed in a
    genuinely signed list: approved on the signed archive, dpkg-deb's reading of it
    included. Then the intruder backdoors notes.txt and puts a dpkg-deb earlier in PATH
    that emits the forged package's tar: the genuine .deb's SHA-256 still matched, and
    the tar said the backdoor is what the package holds. dpkg-deb now runs by its
    baseline-pinned real path only, and reads the genuine package."""
    from debs import packages_stanza, sha256

    repo, cache = _signed_archive(host, tmp_path, monkeypatch)
    work = tmp_path / "genuine"
    work.mkdir()
    genuine = build_deb(work, PKG, "1.1", _files("1.1"), [CONF, NEW_CONF],
                        links={LINK: "tool"}, compression="zstd")
    run = host.cli
    host.install(debs["1.0"])
    assert run("init").exit_code == 0
    host.install(genuine, logged=True)
    shutil.copy(genuine, cache / f"{PKG}_1.1_all.deb")
    repo.publish(packages_stanza(PKG, "1.1", "all", sha256(genuine)))
    assert {DATA, TOOL, CONF, NEW_CONF} <= set(changed_paths(run, expect=1))
    # Untouched tools: the genuine upgrade passes on the signed archive.
    doc = approve_json(run, "--package-updates", "--require-signed")
    approved = {a["path"]: a["evidence"] for a in doc["approved"]}
    assert {DATA, TOOL, CONF, NEW_CONF} <= set(approved), _left(doc)
    assert {approved[p] for p in (DATA, TOOL, CONF, NEW_CONF)} == {"signed-archive"}
    assert approved[DROPPED] == "package-db"  # removals rest on dpkg's log

    forged = _forged(tmp_path, "zstd")
    fake = tmp_path / "bin" / "dpkg-deb"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nexec /usr/bin/dpkg-deb --fsys-tarfile {forged}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    _write(NOTES, b"backdoor\n")
    assert set(changed_paths(run, expect=1)) == {NOTES}
    doc = approve_json(run, "--package-updates", "--require-signed")
    assert doc["approved"] == []
    assert _left(doc)[NOTES] == ("modified", f"content differs from what dpkg shipped "
                                             f"({PKG} 1.1, verified .deb)")


def test_require_signed_goes_with_package_updates(run: Cli) -> None:
    result = run("approve", "--all", "--require-signed")
    assert result.exit_code == 2
    assert one_line(result.stderr) == \
        "integrity: approve: --require-signed goes with --package-updates"
