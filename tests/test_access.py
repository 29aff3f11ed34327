"""Who read the secrets: real fanotify open events, real readers (`cat` of a secret
names /usr/bin/cat), folded into access records in a real SQLite file; nothing mocked.

Readers that must still be alive when /proc is read (a `cat` exits a millisecond after
its open) run `cat SECRET -`: cat opens and prints the secret, then waits on its
stdin, which the test closes once the record is there.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import APT_COPY, Cli, apt_copy, wait_until
from integrity.policy import Policy, load
from integrity.realtime.access import AccessListener
from integrity.store import Store
from integrity.store.access import Read

CAT = os.path.realpath(shutil.which("cat") or "/usr/bin/cat")
NOBODY = 65534
DEADLINE = 10.0

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root"),
              pytest.mark.usefixtures("no_leaks")]


@pytest.fixture
def secrets(world_dir: Path) -> Path:
    """/tmp/…/shadow (a file rule), /tmp/…/keys/ (a directory rule), an ordinary
    file beside them; world-traversable so `nobody` can try to read."""
    (world_dir / "keys" / "old").mkdir(parents=True)
    (world_dir / "shadow").write_text("root:$6$secret:19000::::::\n")
    (world_dir / "keys" / "host.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (world_dir / "keys" / "host.pub").write_text("ssh-ed25519 AAAA\n")
    (world_dir / "keys" / "old" / "2019.key").write_text("old\n")
    (world_dir / "motd").write_text("hello\n")
    for path in world_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return world_dir


@pytest.fixture
def policy(secrets: Path, tmp_path: Path) -> Callable[..., Policy]:
    def write(extra: str = "") -> Policy:
        path = tmp_path / "policy.toml"
        path.write_text(f"""
[[rule]]
path = "{secrets / 'shadow'}"
access = true
{extra}

[[rule]]
path = "{secrets / 'keys'}"
access = true
exclude = ["*.pub"]

[[rule]]
path = "{secrets / 'motd'}"
""")
        return load(path)
    return write


class Recorded:
    """The store the listener writes to, and what it holds."""

    def __init__(self, db: Path) -> None:
        self.store = Store(f"sqlite:///{db}", must_exist=False)

    def rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.access.list()]  # type: ignore[arg-type]

    def of(self, path: Path) -> list[dict[str, Any]]:
        return [r for r in self.rows() if r["path"] == str(path)]


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[Recorded]:
    found = Recorded(tmp_path / "state" / "integrity.db")
    yield found
    found.store.close()


@pytest.fixture
def listen(recorded: Recorded) -> Iterator[Callable[..., AccessListener]]:
    started: list[AccessListener] = []

    def make(policy: Policy, **kwargs: Any) -> AccessListener:
        listener = AccessListener(policy, recorded.store.access.fold, **kwargs)
        started.append(listener)
        listener.start()
        return listener

    yield make
    for listener in started:
        listener.close()


class Reader:
    """`cat PATH... -` as a child: opens and prints PATH, then waits on stdin."""

    def __init__(self, *paths: Path, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(prefix or []), CAT, *map(str, paths), "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.proc.communicate(timeout=10)


def wait_rows(recorded: Recorded, path: Path, count: int = 1) -> list[dict[str, Any]]:
    return wait_until(lambda: len(recorded.of(path)) >= count and recorded.of(path),
                      f"{count} access record(s) for {path}", DEADLINE)  # type: ignore


def test_cat_of_the_secret_names_usr_bin_cat(listen: Callable[..., AccessListener],
                                             policy: Callable[..., Policy],
                                             secrets: Path, recorded: Recorded) -> None:
    listener = listen(policy())
    assert listener.available and listener.reason is None
    with Reader(secrets / "shadow") as reader:
        rows = wait_rows(recorded, secrets / "shadow")
    [row] = rows
    assert row["kind"] == "access" and row["count"] == 1
    assert row["rule"] == str(secrets / "shadow")
    actor = row["actor"]
    assert actor["exe"] == CAT and actor["pid"] == reader.pid
    assert actor["uid"] == 0 and actor["user"] == "root"
    assert actor["cmdline"] == f"{CAT} {secrets / 'shadow'} -"
    assert row["hour"].endswith(":00:00Z")
    # Nothing of the content reaches the database.
    with sqlite3.connect(recorded.store.engine.url.database or "") as conn:
        dump = "\n".join(conn.iterdump())
    assert "$6$secret" not in dump


def test_only_access_paths_are_recorded(listen: Callable[..., AccessListener],
                                        policy: Callable[..., Policy], secrets: Path,
                                        recorded: Recorded) -> None:
    listen(policy())
    with Reader(secrets / "motd", secrets / "keys" / "host.pub",
                secrets / "keys" / "old" / "2019.key"):
        wait_rows(recorded, secrets / "keys" / "old" / "2019.key")
    assert {r["path"] for r in recorded.rows()} == {str(secrets / "keys" / "old" / "2019.key")}


def test_opens_fold_per_program_user_and_hour(listen: Callable[..., AccessListener],
                                              policy: Callable[..., Policy],
                                              secrets: Path, recorded: Recorded) -> None:
    listener = listen(policy(), update_seconds=0.0)
    target = secrets / "keys" / "host.key"
    for number in range(1, 4):  # three cat processes: one row, count 3
        with Reader(target):  # each alive until its open is counted
            wait_until(lambda: sum(r["count"] for r in recorded.of(target)) == number,
                       f"open {number} counted", DEADLINE)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    with Reader(target, prefix=[setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                "--clear-groups"]):
        wait_rows(recorded, target, 2)
    rows = recorded.of(target)
    assert sorted((r["actor"]["uid"], r["count"]) for r in rows) == [(0, 3), (NOBODY, 1)], rows
    listener.close()
    assert recorded.store.ledger.check().ok


def test_trusted_readers_are_not_recorded(listen: Callable[..., AccessListener],
                                          policy: Callable[..., Policy], secrets: Path,
                                          recorded: Recorded) -> None:
    listener = listen(policy(f'trusted_processes = ["{CAT}"]'))
    with Reader(secrets / "shadow"):
        wait_until(lambda: listener.trusted_opens >= 1, "the trusted open seen", DEADLINE)
    with Reader(secrets / "keys" / "host.key"):  # the other rule does not trust cat
        wait_rows(recorded, secrets / "keys" / "host.key")
    assert recorded.of(secrets / "shadow") == []


def test_a_user_copying_a_secret_through_a_trusted_program_is_recorded(
        listen: Callable[..., AccessListener], policy: Callable[..., Policy],
        secrets: Path, recorded: Recorded) -> None:
    """apt's copy method is a trusted process (a package manager's), and copies
    whatever it is told: a user who may read a key (a group such as ssl-cert) took a
    copy of it unrecorded. Trusted readers are root's; root's copy stays unrecorded."""
    listener = listen(policy())
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    key = secrets / "keys" / "host.key"
    as_nobody = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    for prefix, stolen in (([], secrets / "by-root"), (as_nobody, secrets / "stolen")):
        secrets.chmod(0o777)
        with apt_copy(key, stolen, prefix):
            wait_until(stolen.exists, "the copy made", DEADLINE)
            if not prefix:
                wait_until(lambda: listener.trusted_opens >= 1, "root's copy seen",
                           DEADLINE)
            else:
                wait_rows(recorded, key)
        assert stolen.read_bytes() == key.read_bytes()
    [row] = recorded.of(key)
    assert row["actor"]["exe"] == APT_COPY and row["actor"]["uid"] == NOBODY


def test_replaced_secret_and_new_directories_are_followed(
        listen: Callable[..., AccessListener], policy: Callable[..., Policy],
        secrets: Path, recorded: Recorded) -> None:
    listen(policy())
    # What passwd does: write a new file, rename it over the old one.
    (secrets / "shadow+").write_text("root:$6$new:19001::::::\n")
    os.rename(secrets / "shadow+", secrets / "shadow")
    (secrets / "keys" / "new" / "deeper").mkdir(parents=True)
    (secrets / "keys" / "new" / "deeper" / "k").write_text("k\n")
    with Reader(secrets / "shadow", secrets / "keys" / "new" / "deeper" / "k"):
        wait_rows(recorded, secrets / "shadow")
        wait_rows(recorded, secrets / "keys" / "new" / "deeper" / "k")


def test_a_secret_created_later_is_followed(listen: Callable[..., AccessListener],
                                            policy: Callable[..., Policy], secrets: Path,
                                            recorded: Recorded) -> None:
    (secrets / "shadow").unlink()
    listen(policy())
    (secrets / "shadow").write_text("created after the start\n")
    # The file is marked when its creation reaches the listener, a moment after the
    # write: a read in between is not seen (README, "who read the secrets"). So read
    # until one is recorded; without the creation followed, none ever would be.
    def read_and_look() -> list[dict[str, Any]]:
        with Reader(secrets / "shadow"):  # alive while its actor is read from /proc
            for _ in range(10):
                if rows := recorded.of(secrets / "shadow"):
                    return rows
                time.sleep(0.05)
        return []
    rows = wait_until(read_and_look, "a recorded read of the new secret", DEADLINE,
                      interval=0.2)
    assert all(r["kind"] == "access" and r["actor"]["exe"] == CAT for r in rows)


def test_unprivileged_listener_says_why(world_dir: Path, tmp_path: Path) -> None:
    """As nobody, under Debian's own python3: unavailable, with the reason."""
    (world_dir / "s").write_text("x\n")
    (world_dir / "p.toml").write_text(f'[[rule]]\npath = "{world_dir / "s"}"\n'
                                      'access = true\n')
    (world_dir / "p.toml").chmod(0o644)
    repo = Path(__file__).resolve().parent.parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from integrity.realtime.access import AccessListener, probe;"
            "from integrity.policy import load;"
            "p = load(sys.argv[2]); l = AccessListener(p, print); l.start();"
            "print(l.available, l.reason); print(probe(p))")
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-c", code, str(repo), str(world_dir / "p.toml")],
        capture_output=True, text=True, timeout=60, cwd="/")
    if "No module named" in result.stderr:
        pytest.fail(f"the package is not readable by nobody: {result.stderr}")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("False fanotify unavailable: not running as root"), result
    assert "reads cannot be recorded: fanotify unavailable: not running as root" in lines[1]


def test_doctor_says_reads_are_recorded(secrets: Path, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(f'[[rule]]\npath = "{secrets / "keys"}"\naccess = true\n')
    out = Cli(tmp_path / "db", policy)("doctor").stdout
    assert f"ok    fanotify: opens under access = true rules are recorded ({secrets / 'keys'})" \
        in out


# -- the watcher, end to end -----------------------------------------------------------

def test_the_watcher_records_who_read_and_the_chain_covers_it(
        tmp_path: Path, secrets: Path) -> None:
    from test_service import Daemon, Site

    site = Site(tmp_path)
    site.policy.write_text(site.policy.read_text() + f"""
[[rule]]
path = "{secrets / 'shadow'}"
check = "perms"
access = true
""")
    assert site.cli("init").exit_code == 0
    daemon = Daemon(site)
    try:
        daemon.wait_running()
        with Reader(secrets / "shadow") as reader:
            rows = wait_until(lambda: site.cli.json("events", "--access"),
                              "an access record from the watcher", DEADLINE)
        assert rows[0]["path"] == str(secrets / "shadow")
        assert rows[0]["actor"]["exe"] == CAT and rows[0]["actor"]["pid"] == reader.pid
        text = site.cli("events", "--access").stdout
        assert f"{secrets / 'shadow'}  opened x1 by {CAT}" in text
        assert "recording reads under" in site.stderr()
        stats = json.loads(site.cli("events", "--stats", "--access", "--by", "actor",
                                    "--json").stdout)
        assert stats["buckets"][0]["exe"] == CAT and stats["total"] == 1
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    assert site.status()["chain"]["ok"] is True
    with sqlite3.connect(site.db) as conn:  # the reader covers their tracks...
        conn.execute("DELETE FROM access")
    chain = site.status()["chain"]  # ...and it shows
    assert chain["ok"] is False and any("access" in p for p in chain["problems"])
    assert "Traceback" not in site.stderr()


def test_store_fold_is_one_row_per_hour(recorded: Recorded) -> None:
    import datetime as dt
    hour = dt.datetime(2026, 11, 30, 2, 0)
    reads = [Read(b"/etc/shadow", hour + dt.timedelta(minutes=m), "/usr/bin/cat", 0,
                  "/etc/shadow", 1, hour + dt.timedelta(minutes=m),
                  hour + dt.timedelta(minutes=m), {"exe": "/usr/bin/cat"})
             for m in (1, 59, 61)]
    recorded.store.access.fold(reads)
    assert [(r["hour"], r["count"]) for r in recorded.rows()] == [
        ("2026-11-30T02:00:00Z", 2), ("2026-11-30T03:00:00Z", 1)]


def test_a_flood_of_opens_that_overflows_the_queue_is_a_warning(
        policy: Callable[..., Policy], secrets: Path, recorded: Recorded) -> None:
    """An attacker floods the access tree with opens to hide their own read among
    lost events: the loss itself is reported."""
    import signal

    limit = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    flood = secrets / "keys" / "flood"
    flood.mkdir()
    for index in range(limit + 500):
        (flood / f"{index}").write_bytes(b"")
    warned: list[tuple[bytes, str]] = []
    listener = AccessListener(policy(), recorded.store.access.fold,
                              warn=lambda path, text: warned.append((path, text)))
    listener.start()
    try:
        assert listener.helper_pid is not None
        os.kill(listener.helper_pid, signal.SIGSTOP)  # nobody reads: the queue fills
        try:
            subprocess.run([sys.executable, "-c", "import os, sys\n"
                            "for name in os.listdir(sys.argv[1]):\n"
                            "    os.close(os.open(os.path.join(sys.argv[1], name), 0))",
                            str(flood)], check=True, timeout=120)
        finally:
            os.kill(listener.helper_pid, signal.SIGCONT)
        wait_until(lambda: warned, "the overflow reported", DEADLINE)
    finally:
        listener.close()
    assert {path for path, _ in warned} == {os.fsencode(secrets / "shadow"),
                                            os.fsencode(secrets / "keys")}
    assert all("overflowed" in text for _, text in warned)
    assert len(recorded.rows()) > 0  # what was queued before the loss is recorded
