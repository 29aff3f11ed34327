"""`verify` end to end: every kind of change, every preset, on real files.

Each test builds a baseline of a real tree under tmp_path into a real SQLite file,
changes the tree the way an intruder or a package manager would, and reads what
`verify --json` says: SPEC's JSON shape, the attributes named in `changed`, and the
exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from conftest import REPO, Cli
from integrity.store import Store

TOP_KEYS = {"baseline", "summary", "changes", "errors", "policy"}
SUMMARY_KEYS = {"scanned", "added", "removed", "modified", "errors"}
CHANGE_KEYS = {"path", "kind", "rule", "severity", "changed", "old", "new"}
#: Present on a modification of a file whose text the baseline kept.
OPTIONAL_CHANGE_KEYS = {"diff"}

Policy = Callable[..., Path]


def verify_json(run: Cli, *args: str, policy: Path | None = None,
                expect: int | None = None) -> dict[str, Any]:
    """`verify --json`, checked against SPEC's shape; returns the document."""
    result = run("verify", "--json", *args, policy=policy)
    assert result.exit_code in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    check_shape(doc)
    assert result.exit_code == (1 if doc["changes"] or doc["errors"] else 0)
    if expect is not None:
        assert result.exit_code == expect, doc
    return doc


def check_shape(doc: dict[str, Any]) -> None:
    """SPEC: the top-level keys, the summary, and the keys of every change and error."""
    assert set(doc) == TOP_KEYS
    assert set(doc["baseline"]) >= {"created", "entries"}
    assert doc["baseline"]["created"].endswith("Z")
    assert set(doc["summary"]) == SUMMARY_KEYS
    for change in doc["changes"]:
        # Every key is SPEC's; that all of them are always there is
        # test_every_change_has_all_spec_keys's business.
        assert CHANGE_KEYS - {"old", "new"} <= set(change) <= CHANGE_KEYS | OPTIONAL_CHANGE_KEYS, change
        assert change["kind"] in ("added", "removed", "modified")
        assert isinstance(change["changed"], list)
    for error in doc["errors"]:
        assert set(error) == {"path", "error"}
    summary = doc["summary"]
    for kind in ("added", "removed", "modified"):
        assert summary[kind] == sum(1 for c in doc["changes"] if c["kind"] == kind)
    assert summary["errors"] == len(doc["errors"])


def by_path(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["path"]: c for c in doc["changes"]}


def only_change(doc: dict[str, Any]) -> dict[str, Any]:
    assert len(doc["changes"]) == 1, doc["changes"]
    return doc["changes"][0]


# -- clean -----------------------------------------------------------------------------

def test_clean_verify_exits_0_with_a_summary(run: Cli) -> None:
    assert run("init").exit_code == 0
    result = run("verify")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stderr == ""
    first = result.stdout.splitlines()[0]
    assert "7 entries checked" in first
    assert "0 added, 0 removed, 0 modified, 0 errors" in first
    doc = verify_json(run, expect=0)
    assert doc["summary"] == {"scanned": 7, "added": 0, "removed": 0, "modified": 0,
                              "errors": 0}
    assert doc["baseline"]["entries"] == 7
    assert doc["changes"] == [] and doc["errors"] == []


def test_text_report_groups_by_kind(config_run: Cli, tree: Path) -> None:
    (tree / "new").write_text("n")
    (tree / "b.bin").unlink()
    (tree / "a.conf").chmod(0o600)
    result = config_run("verify")
    assert result.exit_code == 1
    out = result.stdout
    assert "1 added, 1 removed, 1 modified, 0 errors" in out.splitlines()[0]
    assert out.index("Added (1):") < out.index("Removed (1):") < out.index("Modified (1):")
    assert f"{tree}/new" in out and f"{tree}/b.bin" in out
    assert "mode: 0644 -> 0600" in out


# -- modifications, attribute by attribute ----------------------------------------------

def test_content_change_same_size(run: Cli, config_run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    before = (tree / "a.conf").read_bytes()
    (tree / "a.conf").write_text("alphb\n")  # same size, different bytes
    change = only_change(verify_json(config_run, expect=1))
    assert change["path"] == str(tree / "a.conf")
    assert change["kind"] == "modified"
    assert change["rule"] == str(tree)
    assert change["severity"] == "critical"
    assert change["changed"] == ["content"]
    assert len(change["old"]["content"]) == 64 and change["old"] != change["new"]
    assert set(change["old"]) == set(change["new"]) == {"content"}
    assert change["old"]["content"] == blake3.blake3(before).hexdigest()
    assert change["new"]["content"] == blake3.blake3(b"alphb\n").hexdigest()

    # `static` also sees the times that the write moved.
    change = only_change(verify_json(run, expect=1))
    assert change["severity"] == "high"
    assert change["changed"][0] == "content"
    assert {"mtime", "ctime"} <= set(change["changed"])
    assert "size" not in change["changed"]


def test_size_change(config_run: Cli, tree: Path) -> None:
    with open(tree / "a.conf", "a") as f:
        f.write("more\n")
    change = only_change(verify_json(config_run, expect=1))
    assert change["changed"] == ["content", "size"]
    assert change["old"]["size"] == 6 and change["new"]["size"] == 11


def test_chmod_is_mode(config_run: Cli, tree: Path) -> None:
    (tree / "b.bin").chmod(0o4755)
    change = only_change(verify_json(config_run, expect=1))
    assert change["path"] == str(tree / "b.bin")
    assert change["changed"] == ["mode"]
    assert change["old"] == {"mode": "0644"} and change["new"] == {"mode": "4755"}


def test_chown_is_uid_and_gid(config_run: Cli, tree: Path) -> None:
    os.chown(tree / "sub" / "c.txt", 1234, 5678)
    change = only_change(verify_json(config_run, expect=1))
    assert change["path"] == str(tree / "sub" / "c.txt")
    assert change["changed"] == ["uid", "gid"]
    assert change["old"] == {"uid": os.getuid(), "gid": os.getgid()}
    assert change["new"] == {"uid": 1234, "gid": 5678}


def test_symlink_retarget_is_link(config_run: Cli, tree: Path) -> None:
    (tree / "link").unlink()
    os.symlink("b.conf", tree / "link")  # same length, so only the target differs
    change = only_change(verify_json(config_run, expect=1))
    assert change["path"] == str(tree / "link")
    assert change["changed"] == ["link"]
    assert change["old"] == {"link": "a.conf"} and change["new"] == {"link": "b.conf"}
    # A longer target changes the link's size too; the target is never read.
    (tree / "link").unlink()
    os.symlink("sub/c.txt", tree / "link")
    change = only_change(verify_json(config_run, expect=1))
    assert change["changed"] == ["size", "link"]
    assert change["new"] == {"size": 9, "link": "sub/c.txt"}


def test_file_replaced_by_directory_is_type(config_run: Cli, tree: Path) -> None:
    (tree / "a.conf").unlink()
    (tree / "a.conf").mkdir()
    doc = verify_json(config_run, expect=1)
    change = by_path(doc)[str(tree / "a.conf")]
    assert change["kind"] == "modified"
    assert change["changed"][0] == "type"
    assert change["old"]["type"] == "file" and change["new"]["type"] == "dir"
    assert doc["summary"]["modified"] == 1


def test_added_file(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "sub" / "new.conf").write_text("hello\n")
    doc = verify_json(run, expect=1)
    change = by_path(doc)[str(tree / "sub" / "new.conf")]
    assert change["kind"] == "added"
    assert change["rule"] == str(tree) and change["severity"] == "high"
    assert change["new"]["type"] == "file" and change["new"]["size"] == 6
    assert change.get("old") is None
    assert doc["summary"]["added"] == 1
    # Adding an entry moved the directory's times: `static` reports that too.
    assert by_path(doc)[str(tree / "sub")]["kind"] == "modified"


def test_every_change_has_all_spec_keys(config_run: Cli, tree: Path) -> None:
    """SPEC's change object has path, kind, rule, severity, changed, old and new.

    A consumer reads `change["old"]` and `change["new"]` whatever the kind: an added
    entry has no old state (null), a removed one no new state (null).
    """
    (tree / "added").write_text("new")
    (tree / "b.bin").unlink()
    (tree / "a.conf").chmod(0o600)
    doc = verify_json(config_run, expect=1)
    assert sorted(c["kind"] for c in doc["changes"]) == ["added", "modified", "removed"]
    for change in doc["changes"]:
        assert set(change) - OPTIONAL_CHANGE_KEYS == CHANGE_KEYS, change
    changes = by_path(doc)
    assert changes[str(tree / "added")]["old"] is None
    assert changes[str(tree / "b.bin")]["new"] is None


def test_removed_file(config_run: Cli, tree: Path) -> None:
    (tree / "b.bin").unlink()
    change = only_change(verify_json(config_run, expect=1))
    assert change["kind"] == "removed"
    assert change["path"] == str(tree / "b.bin")
    assert change["old"]["type"] == "file" and change["old"]["size"] == 3000
    assert change.get("new") is None


def test_removed_directory_subtree(config_run: Cli, tree: Path) -> None:
    (tree / "sub" / "deeper").mkdir()
    (tree / "sub" / "deeper" / "d").write_text("d")
    assert config_run("init", "--force").exit_code == 0
    shutil.rmtree(tree / "sub")
    doc = verify_json(config_run, expect=1)
    assert {p: c["kind"] for p, c in by_path(doc).items()} == {
        str(tree / "sub"): "removed", str(tree / "sub" / "c.txt"): "removed",
        str(tree / "sub" / "deeper"): "removed",
        str(tree / "sub" / "deeper" / "d"): "removed"}
    assert by_path(doc)[str(tree / "sub")]["old"]["type"] == "dir"


@pytest.mark.parametrize("check", ["static", "config"])
def test_user_xattr_is_xattrs(tmp_path: Path, tree: Path, write_policy: Policy,
                              check: str) -> None:
    target = tree / "a.conf"
    try:
        os.setxattr(target, "user.integrity-test", b"one")
    except OSError as exc:  # pragma: no cover - depends on the filesystem
        pytest.fail(f"tmp_path does not support user xattrs: {exc}")
    cli = Cli(tmp_path / f"{check}.db", write_policy({"path": str(tree), "check": check}))
    assert cli("init").exit_code == 0
    assert cli("verify").exit_code == 0
    os.setxattr(target, "user.integrity-test", b"two")
    change = by_path(verify_json(cli, expect=1))[str(target)]
    expected = ["ctime", "xattrs"] if check == "static" else ["xattrs"]
    assert change["changed"] == expected
    assert change["old"]["xattrs"] != change["new"]["xattrs"]
    # Removing the last attribute is a change too.
    os.removexattr(target, "user.integrity-test")
    change = by_path(verify_json(cli, expect=1))[str(target)]
    assert "xattrs" in change["changed"] and change["new"]["xattrs"] is None


# -- presets ---------------------------------------------------------------------------

def test_config_ignores_mtime_only_change_static_does_not(
        tmp_path: Path, tree: Path, write_policy: Policy) -> None:
    policy = write_policy({"path": str(tree), "check": "static"},
                          {"path": str(tree / "sub"), "check": "config"})
    cli = Cli(tmp_path / "mixed.db", policy)
    assert cli("init").exit_code == 0
    for name in ("a.conf", "sub/c.txt"):
        os.utime(tree / name, (1_000_000_000, 1_000_000_000))
    doc = verify_json(cli, expect=1)
    assert list(by_path(doc)) == [str(tree / "a.conf")]
    change = by_path(doc)[str(tree / "a.conf")]
    assert change["rule"] == str(tree)
    assert change["changed"] == ["mtime", "ctime"]
    assert change["new"]["mtime"] == "2001-09-09T01:46:40.000000000Z"


def test_perms_rule_ignores_content(tmp_path: Path, tree: Path, write_policy: Policy) -> None:
    cli = Cli(tmp_path / "perms.db", write_policy({"path": str(tree), "check": "perms"}))
    assert cli("init").exit_code == 0
    (tree / "a.conf").write_text("completely different and longer\n")
    (tree / "b.bin").write_bytes(b"x")
    verify_json(cli, expect=0)
    (tree / "a.conf").chmod(0o640)
    assert only_change(verify_json(cli, expect=1))["changed"] == ["mode"]


def test_log_rule_reports_shrink_not_growth(tmp_path: Path, tree: Path,
                                            write_policy: Policy) -> None:
    log = tree / "sub" / "app.log"
    log.write_text("line 1\nline 2\n")
    cli = Cli(tmp_path / "log.db", write_policy({"path": str(tree), "check": "log"}))
    assert cli("init").exit_code == 0
    with open(log, "a") as f:
        f.write("line 3\n")
    verify_json(cli, expect=0)
    log.write_text("x\n")  # truncated: a log was wiped
    change = only_change(verify_json(cli, expect=1))
    assert change["path"] == str(log)
    assert change["changed"] == ["size"]
    assert change["old"]["size"] == 14 and change["new"]["size"] == 2


def test_excluded_files_are_hidden(tmp_path: Path, tree: Path, write_policy: Policy) -> None:
    (tree / "a.conf.swp").write_text("swap")
    (tree / "sub" / "cache").mkdir()
    (tree / "sub" / "cache" / "x").write_text("x")
    policy = write_policy({"path": str(tree), "check": "config",
                           "exclude": ["*.swp", f"{tree}/sub/cache"]})
    cli = Cli(tmp_path / "ex.db", policy)
    assert cli("init").exit_code == 0
    (tree / "a.conf.swp").write_text("swap changed")
    (tree / "sub" / "cache" / "x").write_text("changed")
    (tree / "sub" / "cache" / "y").write_text("new")
    (tree / "sub" / ".c.txt.swp").write_text("new swap")
    doc = verify_json(cli, expect=0)
    assert doc["summary"]["scanned"] == 7
    (tree / "a.conf").write_text("not excluded\n")
    assert list(by_path(verify_json(cli, expect=1))) == [str(tree / "a.conf")]


def test_verify_path_limits_report_to_subtree(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("outside the subtree\n")
    (tree / "b.bin").unlink()
    (tree / "sub" / "c.txt").write_text("inside\n")
    doc = verify_json(run, str(tree / "sub"), expect=1)
    assert list(by_path(doc)) == [str(tree / "sub" / "c.txt")]
    assert doc["summary"]["scanned"] == 2  # sub and sub/c.txt
    assert doc["summary"]["removed"] == 0
    # A clean subtree is a clean run, whatever happens elsewhere.
    verify_json(run, str(tree / "big.dat"), expect=0)
    # Several paths: each is checked, nothing else.
    doc = verify_json(run, str(tree / "big.dat"), str(tree / "a.conf"), expect=1)
    assert list(by_path(doc)) == [str(tree / "a.conf")]


# -- names that are not UTF-8 ------------------------------------------------------------

def test_non_utf8_names_round_trip(run: Cli, tree: Path) -> None:
    raw = os.fsencode(tree) + b"/\xff\xfe.conf"
    with open(raw, "wb") as f:
        f.write(b"v1\n")
    assert run("init").exit_code == 0
    assert run("verify").exit_code == 0
    escaped = str(tree) + "/\\xff\\xfe.conf"
    with open(raw, "wb") as f:
        f.write(b"v2 longer\n")
    doc = verify_json(run, expect=1)
    change = by_path(doc)[escaped]
    assert change["kind"] == "modified" and "content" in change["changed"]
    # Escaped text in the report, never lone surrogates.
    assert all("\udcff" not in p and "\udcfe" not in p for p in by_path(doc))
    os.unlink(raw)
    raw2 = os.fsencode(tree) + b"/sub/caf\xe9"
    with open(raw2, "wb") as f:
        f.write(b"latin-1 name")
    doc = verify_json(run, expect=1)
    assert by_path(doc)[escaped]["kind"] == "removed"
    assert by_path(doc)[str(tree) + "/sub/caf\\xe9"]["kind"] == "added"
    # The exact bytes went into the database: a new baseline verifies clean.
    assert run("init", "--force").exit_code == 0
    assert run("verify").exit_code == 0


def test_non_utf8_path_argument(run: Cli, tree: Path) -> None:
    raw_dir = os.fsencode(tree) + b"/\xffdir"
    os.mkdir(raw_dir)
    with open(raw_dir + b"/f", "wb") as f:
        f.write(b"1")
    assert run("init").exit_code == 0
    with open(raw_dir + b"/f", "wb") as f:
        f.write(b"22")
    proc = subprocess.run([sys.executable, "-m", "integrity", "--db", f"sqlite:///{run.db}",
                           "--policy", str(run.policy), "verify", "--json", raw_dir],
                          capture_output=True, timeout=60, cwd=REPO)
    assert "Traceback" not in proc.stderr.decode(), proc.stderr.decode().splitlines()[-1]
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert list(by_path(doc)) == [str(tree) + "/\\xffdir/f"]
    # The run is recorded with the path it was limited to.
    store = Store(f"sqlite:///{run.db}")
    try:
        last = store.runs.last("verify")
        assert last is not None and last.modified == 1
        assert "\\xffdir" in (last.paths or "")
    finally:
        store.close()


# -- --fast ------------------------------------------------------------------------------

def test_fast_rehashes_only_touched_files_and_says_why(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed content\n")
    result = run("-v", "verify", "--fast")
    assert result.exit_code == 1
    lines = [l for l in result.stderr.splitlines() if l.startswith("rehashing ")]
    assert lines == [f"rehashing {tree / 'a.conf'}: file size has changed"]
    for untouched in ("b.bin", "big.dat", "sub/c.txt"):
        assert str(tree / untouched) not in result.stderr
    assert "a.conf" in result.stdout and "content" in result.stdout
    # Without -v, --fast says nothing on stderr.
    quiet = run("verify", "--fast")
    assert quiet.exit_code == 1 and quiet.stderr == ""


def test_fast_finds_touched_content_change(config_run: Cli, tree: Path) -> None:
    (tree / "sub" / "c.txt").write_text("gammb\n")  # same size, new mtime
    result = config_run("-v", "verify", "--fast", "--json")
    assert result.exit_code == 1
    assert "rehashing " + str(tree / "sub" / "c.txt") + ": file mtime has changed" \
        in result.stderr
    change = only_change(json.loads(result.stdout))
    assert change["changed"] == ["content"]


def test_fast_counts_the_files_it_passes_over_and_diffs_the_changed_one(
        config_run: Cli, tree: Path) -> None:
    """--fast passes over the files whose every field is as recorded without building
    their records: they still count as checked, and the changed file among them still
    gets the diff of its kept text."""
    whole = verify_json(config_run, expect=0)
    assert whole["summary"]["scanned"] == 7  # the root, sub, four files and the link
    (tree / "sub" / "c.txt").write_text("gammb\n")
    doc = verify_json(config_run, "--fast", expect=1)
    assert doc["summary"]["scanned"] == 7
    change = only_change(doc)
    assert change["path"] == str(tree / "sub" / "c.txt")
    assert "-gamma\n+gammb\n" in change["diff"]


def _forge(path: Path, data: bytes) -> None:
    """Rewrite a file with same-size content and put its old mtime back."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def test_full_verify_catches_forged_mtime(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    _forge(tree / "b.bin", os.urandom(3000))
    change = only_change(verify_json(run, expect=1))
    assert change["path"] == str(tree / "b.bin")
    # The forgery held for mtime (and size); the content gives it away.
    assert change["changed"] == ["content", "ctime"]


def test_fast_verify_catches_forged_mtime_via_ctime(config_run: Cli, tree: Path) -> None:
    _forge(tree / "big.dat", os.urandom(3 * 1024 * 1024 + 17))
    result = config_run("-v", "verify", "--fast", "--json")
    assert result.exit_code == 1
    assert f"rehashing {tree / 'big.dat'}: file ctime has changed" in result.stderr
    change = only_change(json.loads(result.stdout))
    assert change["path"] == str(tree / "big.dat")
    assert change["changed"] == ["content"]


# -- FIFOs, sockets, devices ------------------------------------------------------------

def _special_files(root: Path) -> Iterator[socket.socket]:
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.getcwd()
    os.chdir(root)  # sun_path is short: bind by relative name
    try:
        sock.bind("sock")
        sock.listen(1)
    finally:
        os.chdir(here)
    yield sock


def _proc(run: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """A separate process with a timeout: a FIFO that is opened would hang forever."""
    return subprocess.run([sys.executable, "-m", "integrity", "--db", f"sqlite:///{run.db}",
                           "--policy", str(run.policy), "-q", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_fifo_socket_and_device_are_recorded_never_opened(run: Cli, tree: Path) -> None:
    special = tree / "special"
    special.mkdir()
    assert _proc(run, "init").returncode == 0
    sockets = list(_special_files(special))
    try:
        proc = _proc(run, "verify", "--json")
        assert proc.returncode == 1, proc.stderr
        doc = json.loads(proc.stdout)
        check_shape(doc)
        added = {c["path"]: c["new"]["type"] for c in doc["changes"] if c["kind"] == "added"}
        assert added == {str(special / "fifo"): "fifo", str(special / "null"): "char",
                         str(special / "sock"): "socket"}
        assert doc["errors"] == []

        proc = _proc(run, "init", "--force")
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr
        proc = _proc(run, "verify", "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = _proc(run, "verify", "--fast")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        for sock in sockets:
            sock.close()
    for name in ("fifo", "null", "sock"):
        (special / name).unlink()
    proc = _proc(run, "verify", "--json", str(special))
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    removed = {c["path"]: c["old"]["type"] for c in doc["changes"] if c["kind"] == "removed"}
    assert removed == {str(special / "fifo"): "fifo", str(special / "null"): "char",
                       str(special / "sock"): "socket"}


# -- runs are recorded -------------------------------------------------------------------

def test_runs_are_recorded(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    url = f"sqlite:///{run.db}"
    assert run("verify").exit_code == 0
    store = Store(url)
    try:
        last = store.runs.last("verify")
        assert last is not None
        assert (last.scanned, last.added, last.removed, last.modified,
                last.errors, last.exit_code) == (7, 0, 0, 0, 0, 0)
        assert last.finished is not None and last.finished >= last.started
        first_id = last.id

        (tree / "new").write_text("n")
        (tree / "b.bin").unlink()
        (tree / "a.conf").write_text("changed\n")
        assert run("verify", "--fast", str(tree)).exit_code == 1
        last = store.runs.last("verify")
        assert last is not None and last.id > first_id
        assert (last.scanned, last.added, last.removed, last.errors,
                last.exit_code, last.fast) == (7, 1, 1, 0, 1, True)
        assert last.modified >= 2  # a.conf, and the root directory's times
        assert last.paths == str(tree)
    finally:
        store.close()


# -- permission denied, as an unprivileged user ---------------------------------------

NOBODY = 65534
#: Imported lazily by alembic's upgrade: name them, in case nothing else pulls them in.
LAZY_IMPORTS = ("alembic.command", "alembic.config", "alembic.script",
                "alembic.runtime.migration", "alembic.runtime.environment")


def _third_party_modules() -> list[str]:
    """Top-level names of what `integrity` imports from site-packages (not the stdlib)."""
    code = (
        "import importlib, pathlib, site, sys\n"
        "top = pathlib.Path(sys.argv[1])\n"
        "for f in sorted(top.rglob('*.py')):\n"
        "    parts = f.relative_to(top.parent).with_suffix('').parts\n"
        "    if parts[-1] == '__init__':\n"
        "        parts = parts[:-1]\n"
        "    if parts[-1] != '__main__' and 'migrations' not in parts:\n"
        "        importlib.import_module('.'.join(parts))\n"
        "for name in sys.argv[2:]:\n"
        "    importlib.import_module(name)\n"
        "sites = tuple(site.getsitepackages())\n"
        "print('\\n'.join(sorted({n.split('.')[0] for n, m in list(sys.modules.items())\n"
        "    if (getattr(m, '__file__', None) or '').startswith(sites)\n"
        "    and not n.startswith(('integrity', '__editable__', '_distutils_hack'))})))\n")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "integrity"),
                          *LAZY_IMPORTS], capture_output=True, text=True, timeout=60,
                         check=True, cwd=REPO).stdout
    return out.split()


def _stage_imports(stage: Path) -> str:
    """A PYTHONPATH an unprivileged user can read.

    The test interpreter may live under /root (mode 0700), out of reach for nobody:
    the system /usr/bin/python3 runs instead, with the dependencies hard-linked (no
    bytes copied; a copy where linking fails) and the package assembled from
    symlinks into the working tree, laid out as the installed package is.
    """
    import importlib.util

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    stage.mkdir(mode=0o755)
    for name in _third_party_modules():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        if source.is_dir():
            shutil.copytree(source, stage / source.name, copy_function=link,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            link(str(source), str(stage / source.name))
    package = stage / "integrity"
    package.mkdir()
    for child in (REPO / "integrity").iterdir():
        if child.name != "__pycache__":
            (package / child.name).symlink_to(child)
    for path in [stage, *stage.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return str(stage)


def test_permission_denied_as_nobody(world_dir: Path) -> None:
    setpriv = shutil.which("setpriv")
    python = "/usr/bin/python3"
    assert setpriv, "setpriv (util-linux) is needed to drop privileges"
    assert os.access(python, os.X_OK), f"{python} is needed"
    pythonpath = _stage_imports(world_dir / "site")

    root = world_dir / "tree"
    (root / "open").mkdir(parents=True)
    (root / "open" / "readable").write_text("fine\n")
    (root / "secret").write_text("top secret\n")
    (root / "locked").mkdir()
    (root / "locked" / "child-a").write_text("a")
    (root / "locked" / "child-b").mkdir()
    (root / "locked" / "child-b" / "x").write_text("x")
    (root / "secret").chmod(0o000)
    (root / "locked").chmod(0o000)
    state = world_dir / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    dbdir = world_dir / "db"
    dbdir.mkdir()
    os.chown(dbdir, NOBODY, NOBODY)
    policy = world_dir / "policy.toml"
    policy.write_text(f'[[rule]]\npath = "{root}"\ncheck = "config"\n')
    policy.chmod(0o644)
    db = dbdir / "integrity.db"

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath,
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(state),
           "XDG_STATE_HOME": str(state), "LC_ALL": "C.UTF-8"}

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python,
             "-m", "integrity", "--db", f"sqlite:///{db}", "--policy", str(policy), "-q",
             *args], capture_output=True, text=True, timeout=60, env=env, cwd=str(state))

    probe = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", python, "-c", "import os; print(os.geteuid())"],
                           capture_output=True, text=True, timeout=30, env=env)
    assert probe.stdout.strip() == str(NOBODY), probe.stderr

    init = as_nobody("init")
    assert init.returncode == 0, init.stderr
    warnings = init.stderr.splitlines()
    assert "Traceback" not in init.stderr
    assert any(f"'{root / 'secret'}'" in w and "Permission denied" in w
               for w in warnings), warnings
    assert any(f"'{root / 'locked'}'" in w and "subtree skipped" in w
               for w in warnings), warnings
    assert all(w.startswith("warning: ") for w in warnings), warnings
    assert "(2 warnings)" in init.stdout
    assert os.stat(db).st_uid == NOBODY

    # A baseline that knows the directory's children, then the directory is locked.
    (root / "locked").chmod(0o755)
    init = as_nobody("init", "--force")
    assert init.returncode == 0, init.stderr
    assert "(1 warnings)" in init.stdout or "(1 warning)" in init.stdout
    (root / "locked").chmod(0o000)

    verify = as_nobody("verify", "--json")
    assert verify.returncode == 1, verify.stderr
    assert "Traceback" not in verify.stderr
    doc = json.loads(verify.stdout)
    check_shape(doc)
    errors = {e["path"]: e["error"] for e in doc["errors"]}
    assert set(errors) == {str(root / "secret"), str(root / "locked")}
    assert "Permission denied" in errors[str(root / "secret")]
    assert "Permission denied" in errors[str(root / "locked")]
    assert "subtree skipped" in errors[str(root / "locked")]
    # The locked directory's children are unknown now, not removed.
    removed = [c["path"] for c in doc["changes"] if c["kind"] == "removed"]
    assert removed == []
    # Only the chmod itself is a change.
    assert [(c["path"], c["changed"]) for c in doc["changes"]] == [
        (str(root / "locked"), ["mode"])]
    assert doc["summary"]["errors"] == 2

    # Unlocked again: everything is back, the unreadable file stays an error.
    (root / "locked").chmod(0o755)
    verify = as_nobody("verify", "--json")
    assert verify.returncode == 1
    doc = json.loads(verify.stdout)
    assert doc["changes"] == []
    assert [e["path"] for e in doc["errors"]] == [str(root / "secret")]
