"""What an intruder (or a slip of the admin's) can hand integrity: issue 11, rows 13-17.

A cron field out of range, a database URL with its password, an alert file planted as
a link in a directory everyone may write to, files others can read, command lines
carrying secrets, and exclude globs built to make the matcher backtrack. Real files,
real processes and a real watcher daemon; the cron meaning is checked against
APScheduler, which runs the schedule.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from conftest import Cli
from integrity.alerts import DeliveryError
from integrity.alerts.jsonl import JsonlSink
from integrity.errors import PolicyError
from integrity.policy import Excludes, parse
from integrity.policy.severity import Judgement
from integrity.realtime.processes import Processes
from test_service import (RELOAD_SECONDS, Daemon, assert_no_crash, rewrite, site, start,
                          wait_for_event, wait_for_log)

__all__ = ["site", "start"]  # fixtures of test_service, used here as they are

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, another uid)")
RULE = [{"path": "/etc"}]


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    assert "Traceback" not in text and "internal error" not in text
    return lines[0]


# -- row 13: cron fields validated whole, with cron's meaning ------------------------------

@pytest.mark.parametrize(("expr", "words"), [
    ("61 3 * * *", "minute 61 is out of range 0-59"),
    ("0 24 * * *", "hour 24 is out of range 0-23"),
    ("0 3 0 * *", "day of month 0 is out of range 1-31"),
    ("0 3 * 13 *", "month 13 is out of range 1-12"),
    ("0 3 * * 8", "day of week 8 is out of range 0-7"),
    ("*/0 * * * *", "step must be at least 1"),
    ("5-3 * * * *", "runs backwards"),
    ("0 3 L * *", "'L' is not a number"),
    ("0 3 31 2 *", "never runs"),
    ("0 3 1 * mon", "both the day of month and the day of week"),
    ("0 3 * *", "not a 5-field cron expression"),
])
def test_a_bad_cron_expression_is_refused_naming_the_key(expr: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse({"rule": RULE, "schedule": {"full_scan": expr}}, "/etc/integrity/policy.toml")
    message = str(info.value)
    assert message.startswith("/etc/integrity/policy.toml: schedule.full_scan: "), message
    assert words in message, message


def test_doctor_reports_a_bad_schedule_in_one_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[rule]]\npath = "{tmp_path}"\n\n[schedule]\nfull_scan = "61 3 * * *"\n')
    result = Cli(tmp_path / "state" / "integrity.db", policy)("doctor")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "schedule.full_scan" in line and "minute 61" in line, line


def _fire_days(expr: str, days: int = 14) -> set[str]:
    """The weekdays APScheduler (which the watcher uses) runs expr on, over `days`."""
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(expr, timezone=dt.timezone.utc)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)  # a Monday
    seen, when, previous = set(), start, None
    while True:
        when = trigger.get_next_fire_time(previous, when)
        if when is None or when >= start + dt.timedelta(days=days):
            return seen
        seen.add(when.strftime("%a").lower())
        previous, when = when, when + dt.timedelta(minutes=1)


@pytest.mark.parametrize(("expr", "days"), [
    ("0 3 * * 1-5", {"mon", "tue", "wed", "thu", "fri"}),
    ("0 3 * * 0", {"sun"}),
    ("0 3 * * 7", {"sun"}),
    ("0 3 * * 6,7", {"sat", "sun"}),
    ("0 3 * * */2", {"sun", "tue", "thu", "sat"}),
    ("0 3 * * sun", {"sun"}),
    ("0 3 * * *", {"mon", "tue", "wed", "thu", "fri", "sat", "sun"}),
])
def test_the_schedule_runs_on_the_days_cron_means(expr: str, days: set[str]) -> None:
    """cron's 0 (and 7) is Sunday, APScheduler's 0 Monday: `1-5` must not run
    Tuesday to Saturday."""
    policy = parse({"rule": RULE, "schedule": {"full_scan": expr}})
    assert _fire_days(policy.full_scan) == days


cron_item = st.one_of(
    st.just("*"),
    st.builds(lambda step: f"*/{step}", st.integers(1, 9)),
    st.integers(0, 70).map(str),
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 40), st.integers(0, 40)),
    st.builds(lambda a, b, s: f"{a}-{b}/{s}", st.integers(0, 40), st.integers(0, 40),
              st.integers(0, 5)),
    st.sampled_from(["jan", "feb-apr", "mon", "fri", "sun", "x", "1#2", "L", ""]))
cron_field = st.lists(cron_item, min_size=1, max_size=3).map(",".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(cron_field, min_size=5, max_size=5))
def test_every_accepted_schedule_is_one_the_watcher_can_run(fields: list[str]) -> None:
    """Whatever the loader accepts, APScheduler accepts too (the SIGHUP that killed
    the watcher was a ValueError raised there, after load had said yes)."""
    from apscheduler.triggers.cron import CronTrigger

    try:
        policy = parse({"rule": RULE, "schedule": {"full_scan": " ".join(fields)}})
    except PolicyError as exc:
        assert "schedule.full_scan" in str(exc)
        return
    CronTrigger.from_crontab(policy.full_scan)


@pytest.mark.usefixtures("no_leaks")
def test_sighup_with_an_impossible_schedule_keeps_the_watcher_running(
        site: Any, start: Callable[..., Daemon]) -> None:
    daemon = start()
    site.policy.write_text(site.policy.read_text()
                           + '\n[schedule]\nfull_scan = "61 3 * * *"\n')
    daemon.signal(signal.SIGHUP)
    wait_for_log(site, "reload refused", RELOAD_SECONDS)
    refusal = site.stderr().split("reload refused", 1)[1].splitlines()[0]
    assert "schedule.full_scan" in refusal and "minute 61" in refusal, refusal
    assert "internal error" not in site.stderr()
    assert daemon.proc.poll() is None and daemon.running()
    rewrite(site.tree / "a.conf", b"after a refused reload\n")
    wait_for_event(site, site.tree / "a.conf", source="realtime")
    assert daemon.terminate() == 0
    assert_no_crash(site)


# -- row 14: the apt hook never holds a credential --------------------------------------

@pytest.mark.parametrize("url", [
    "postgresql://integrity:PASSWORD@db.example/integrity",
    "postgresql://integrity@db.example/integrity?sslmode=require&password=PASSWORD",
])
def test_apt_hook_refuses_a_database_url_with_a_password(run: Cli, tmp_path: Path,
                                                         url: str) -> None:
    from click.testing import CliRunner

    from integrity.cli import cli

    directory = tmp_path / "apt.conf.d"
    directory.mkdir()
    for args in (["--db", url, "apt-hook", "install", "--dir", str(directory)],
                 ["--db", url, "apt-hook", "show"],
                 ["apt-hook", "install", "--dir", str(directory)]):  # INTEGRITY_DB
        result = CliRunner().invoke(cli, ["--policy", str(run.policy), *args],
                                    env={"INTEGRITY_DB": url}, catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        line = one_line(result.stderr)
        assert "password" in line and "pgpass" in line, line
        assert "PASSWORD" not in result.output
        assert list(directory.iterdir()) == []


def test_apt_hook_with_a_password_free_url_installs(run: Cli, tmp_path: Path) -> None:
    directory = tmp_path / "apt.conf.d"
    directory.mkdir()
    url = "postgresql://integrity@db.example/integrity?sslmode=require"
    result = run("--db", url, "apt-hook", "install", "--dir", str(directory))
    assert result.exit_code == 0, result.output
    assert url in (directory / "80integrity").read_text()


# -- row 15: alert files: never through a link, never readable by others ------------------

def _event(n: int = 1) -> dict[str, Any]:
    return {"id": n, "path": "/etc/x", "kind": "modified", "severity": "high"}


@pytest.fixture
def sticky() -> Iterator[Path]:
    """A world-writable directory with the sticky bit, like /tmp."""
    path = Path(tempfile.mkdtemp(prefix="integrity-sticky-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        import shutil
        shutil.rmtree(path, ignore_errors=True)


def _refused(sink: JsonlSink, words: str) -> str:
    with pytest.raises(DeliveryError) as info:
        sink.deliver([_event()])
    message = str(info.value)
    assert words in message and "refusing to write alerts there" in message, message
    return message


def test_a_symlink_at_the_alert_path_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_bytes(b"root:*:19000:0:99999:7:::\n")
    (tmp_path / "log").mkdir()
    os.symlink(victim, tmp_path / "log" / "alerts.jsonl")
    _refused(JsonlSink(str(tmp_path / "log" / "alerts.jsonl")), "symbolic link")
    assert victim.read_bytes() == b"root:*:19000:0:99999:7:::\n"


def test_a_hard_link_at_the_alert_path_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep\n")
    os.link(victim, tmp_path / "alerts.jsonl")
    _refused(JsonlSink(str(tmp_path / "alerts.jsonl")), "2 hard links")
    assert victim.read_bytes() == b"keep\n"


def test_a_fifo_at_the_alert_path_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "alerts.jsonl"
    os.mkfifo(fifo)
    # A reader holds it open, so opening it for writing would succeed.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _refused(JsonlSink(str(fifo)), "not a regular file")
        assert os.read(reader, 4096) == b""  # nothing was written into it
    finally:
        os.close(reader)


@needs_root
def test_files_planted_by_another_user_in_a_sticky_directory_are_refused(
        sticky: Path) -> None:
    planted = sticky / "alerts.jsonl"
    planted.write_bytes(b"")
    os.chown(planted, NOBODY, NOBODY)
    _refused(JsonlSink(str(planted)), f"owned by uid {NOBODY}")
    assert planted.read_bytes() == b""
    # A directory planted there: the alert file would be created inside it.
    (sticky / "alerts").mkdir()
    os.chown(sticky / "alerts", NOBODY, NOBODY)
    _refused(JsonlSink(str(sticky / "alerts" / "a.jsonl")), f"owned by uid {NOBODY}")
    assert not (sticky / "alerts" / "a.jsonl").exists()
    # A link planted there, to a directory of root's.
    target = sticky / "roots"
    target.mkdir()
    os.symlink(target, sticky / "linked")
    os.lchown(sticky / "linked", NOBODY, NOBODY)
    _refused(JsonlSink(str(sticky / "linked" / "a.jsonl")), f"owned by uid {NOBODY}")
    assert list(target.iterdir()) == []


@needs_root
def test_an_alert_file_of_ours_in_a_sticky_directory_is_written(sticky: Path) -> None:
    sink = JsonlSink(str(sticky / "mine" / "alerts.jsonl"))
    sink.deliver([_event()])
    sink.close()
    assert (sticky / "mine" / "alerts.jsonl").read_text().count("\n") == 1


def test_alert_files_are_not_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        sink = JsonlSink(str(tmp_path / "new" / "alerts.jsonl"))
        sink.deliver([_event()])
        sink.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "alerts.jsonl").stat().st_mode) == 0o640
    # A file of ours that others could read (an older version's, a restored backup).
    exposed = tmp_path / "old.jsonl"
    exposed.write_bytes(b"")
    exposed.chmod(0o644)
    sink = JsonlSink(str(exposed))
    sink.deliver([_event()])
    sink.close()
    assert stat.S_IMODE(exposed.stat().st_mode) == 0o640


# -- row 16: the database is private; command lines are capped ---------------------------

def test_the_database_is_created_0600_in_an_existing_open_directory(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    shared = tmp_path / "var-lib"
    shared.mkdir()
    shared.chmod(0o755)  # a directory that exists already, as /var/lib/integrity may
    policy = write_policy({"path": str(tree), "check": "static"})
    old = os.umask(0o022)
    try:
        run = Cli(shared / "integrity.db", policy)
        assert run("init").exit_code == 0
        assert run("verify").exit_code == 0
    finally:
        os.umask(old)
    files = [p for p in shared.iterdir() if p.name.startswith("integrity.db")]
    assert shared / "integrity.db" in files
    for path in files:  # the database, its -wal and -shm
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
    # A directory integrity creates is 0700.
    run = Cli(tmp_path / "fresh" / "state" / "integrity.db", policy)
    assert run("init").exit_code == 0
    assert stat.S_IMODE((tmp_path / "fresh" / "state").stat().st_mode) == 0o700


def test_doctor_warns_about_a_database_others_can_read(run: Cli) -> None:
    assert run("init").exit_code == 0
    run.db.chmod(0o644)
    result = run("doctor")
    assert result.exit_code == 1
    assert f"WARN  {run.db} is mode 0644: other users can read" in result.stdout
    assert "chmod 600" in result.stdout
    run.db.chmod(0o600)
    assert f"ok    database {run.db}: not readable by other users" in run("doctor").stdout


#: A parent whose own command line is long, running a child with 40 arguments of 1,000
#: bytes (a secret among them): the actor reader reads both from /proc.
FAMILY = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                          "--password=" + "s" * 990] + ["x" * 1000] * 39)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_actor_command_lines_are_capped() -> None:
    parent = subprocess.Popen([sys.executable, "-c", FAMILY, *(["p" * 300] * 10)],
                              stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # Popen returns once the child's execve let go of the old memory, before the
        # new command line is in place: wait for it, or the read races the exec.
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{child}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the child never finished its exec"
            time.sleep(0.01)
        actor = Processes().get(child, time.monotonic())
        assert isinstance(actor, dict), actor
        cmdline = actor["cmdline"]
        assert len(cmdline.encode()) <= 1024 + 256 + 32, len(cmdline)
        words = cmdline.split(" ")
        assert all(len(word.encode()) <= 256 + len("[...]") for word in words), words
        assert words[0] == sys.executable and words[-1] == "[...]"
        assert "s" * 300 not in cmdline  # the secret argument is cut at 256 bytes
        [nearest] = [a for a in actor["ancestors"] if a["pid"] == parent.pid]
        # A parent keeps the words the trusted-process check reads, and a mark.
        assert nearest["cmdline"] == f"{sys.executable} -c {FAMILY.split()[0]} [...]"
    finally:
        if child:
            os.kill(child, signal.SIGKILL)  # our grandchild: its pid is the one it printed
        parent.kill()
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]


def test_a_cut_argument_never_passes_for_a_trusted_program() -> None:
    """`/usr/lib/apt/methods/` + 240 bytes + `/../../../tmp/evil`, cut to 256 bytes,
    must not match the trusted `/usr/lib/apt/methods/*`."""
    from integrity.realtime.processes import capped_cmdline

    raw = b"\0".join([b"/usr/bin/python3",
                      b"/usr/lib/apt/methods/" + b"a" * 240 + b"/../../../tmp/evil"])
    actor = {"exe": "/usr/bin/python3.11", "cmdline": capped_cmdline(raw)}
    assert actor["cmdline"].endswith("a[...]")
    assert not Judgement().trusted(actor)
    actor["cmdline"] = "/usr/bin/python3 /usr/lib/apt/methods/http"
    assert Judgement().trusted(actor)  # and an uncut one still is
    actor["cmdline"] = "/usr/bin/python3 - /usr/lib/apt/methods/http"
    assert not Judgement().trusted(actor)  # a mere argument of code read from stdin


# -- row 17: exclude globs match in linear time, with the documented meaning ---------------

def _reference(glob: str, path: str) -> bool:
    """The documented meaning, as a plain dynamic programme over (glob, path)
    positions: `**` anything, `*` and `?` and `[!a]` anything but '/'."""
    tokens: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            while i < len(glob) and glob[i] == "*":
                i += 1
            tokens.append("**")
            continue
        if glob.startswith("[!a]", i):
            tokens.append("[!a]")
            i += 4
            continue
        tokens.append(glob[i])
        i += 1

    @functools.lru_cache(maxsize=None)
    def at(t: int, p: int) -> bool:
        if t == len(tokens):
            return p == len(path)
        token = tokens[t]
        if token == "**":
            return any(at(t + 1, q) for q in range(p, len(path) + 1))
        if token == "*":
            q = p
            while True:
                if at(t + 1, q):
                    return True
                if q == len(path) or path[q] == "/":
                    return False
                q += 1
        if p == len(path):
            return False
        if token == "?":
            return path[p] != "/" and at(t + 1, p + 1)
        if token == "[!a]":
            return path[p] not in "a/" and at(t + 1, p + 1)
        return path[p] == token and at(t + 1, p + 1)

    return at(0, 0)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "/", "*", "**", "?", "[!a]"]),
                max_size=8).map(lambda parts: "/" + "".join(parts)),
       st.text(alphabet="ab/", max_size=12).map(lambda text: "/" + text))
def test_absolute_globs_match_what_the_documentation_says(glob: str, path: str) -> None:
    excludes = Excludes.compile((glob,))
    name = path.rsplit("/", 1)[1].encode()
    assert excludes.match(path.encode(), name) == _reference(glob.rstrip("/") or "/", path), \
        (glob, path)


def test_bracket_expressions_stay_within_one_component() -> None:
    excludes = Excludes.compile(("/srv/b[!a]c", "/srv/x[/]y"))
    assert excludes.match(b"/srv/bxc", b"bxc")
    assert not excludes.match(b"/srv/b/c", b"c")  # as in the shell: '/' is never matched
    assert not excludes.match(b"/srv/x/y", b"y")


def test_the_backtracking_pattern_of_issue_11_means_what_it_says() -> None:
    """`/tmp/**a**a**a**a**a**a**b`: six a's then a b, across any components. The
    time it takes is benchmarks/bench_globs.py's business; here, the answers."""
    excludes = Excludes.compile(("/tmp/**a**a**a**a**a**a**b",))
    deep = b"/tmp/" + b"/".join([b"a" * 30] * 60)
    assert not excludes.match(deep, b"a" * 30)
    assert excludes.match(deep + b"/b", b"b")
    assert excludes.match(b"/tmp/aaaaaab", b"aaaaaab")
    assert excludes.match(b"/tmp/a/xa/a/a/ya/a/zb", b"zb")
    assert not excludes.match(b"/tmp/aaaaab", b"aaaaab")
    assert not excludes.match(b"/tmp/aaaaaa/bc", b"bc")


def test_init_with_a_backtracking_exclude_records_the_rest(
        tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    root = tmp_path / "tmp"
    deep = root.joinpath(*(["a" * 20] * 20))
    deep.mkdir(parents=True)
    (deep / "b").write_text("excluded\n")
    (deep / "c").write_text("kept\n")
    policy = write_policy({"path": str(root), "check": "static",
                           "exclude": [f"{root}/**a**a**a**a**a**a**b"]})
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    assert run("init").exit_code == 0
    conn = sqlite3.connect(f"file:{run.db}?mode=ro", uri=True)
    try:
        keys = {row[0] for row in conn.execute("SELECT key FROM entry")}
    finally:
        conn.close()
    assert os.fsencode(deep / "c").replace(b"/", b"\0") in keys
    assert os.fsencode(deep / "b").replace(b"/", b"\0") not in keys
    assert len(keys) == 1 + 20 + 1

