"""The database: atomic baseline swaps, hostile database files, migrations.

Real SQLite files throughout; the interrupted init is a real process killed with
SIGKILL part-way through writing its new baseline. Read-only sqlite3 queries look at
the file from the outside, the way an operator would.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from conftest import REPO, Cli, database_at, one_line, ro, rows, wait_until
from integrity.errors import DatabaseError
from integrity.paths import to_key
from integrity.store import Store
from integrity.store.engine import HEAD, REVISIONS

MANY = 30_000


# -- interrupted init ------------------------------------------------------------------

def test_interrupted_init_leaves_the_old_baseline_in_force(run: Cli, tree: Path,
                                                           tmp_path: Path) -> None:
    assert run("init").exit_code == 0
    [(old_id, old_entries)] = rows(run.db, "SELECT id, entries FROM baseline")
    assert old_entries == 7

    for i in range(MANY):
        fd = os.open(tree / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"%d\n" % i)
        os.close(fd)

    log = open(tmp_path / "init.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "integrity", "--db", f"sqlite:///{run.db}", "--policy",
         str(run.policy), "-q", "init", "--force"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wal = Path(f"{run.db}-wal")
    locked = grown = False
    try:
        deadline = time.monotonic() + 120
        probe = sqlite3.connect(run.db, timeout=0, isolation_level=None)
        try:
            # init writes its generation in one transaction, holding the write lock
            # from its first statement to the switch: wait for the lock, then for its
            # rows to reach the WAL (SQLite spills a large transaction's pages there
            # before the commit), to kill it mid-write rather than just after it began.
            # However long that takes: a loaded machine hashes 30,000 files slowly.
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.execute("ROLLBACK")
                except sqlite3.OperationalError as exc:
                    assert "locked" in str(exc), exc
                    if not locked:
                        locked, before = True, wal.stat().st_size
                    grown = wal.stat().st_size > before + 1024 * 1024
                    if grown:
                        break
                time.sleep(0.002)
        finally:
            probe.close()
        assert locked, ("init finished before it could be interrupted: "
                        f"{(tmp_path / 'init.log').read_text()!r}")
        assert grown, ("init wrote no rows to the WAL while it held the write lock "
                       f"(exit status {proc.poll()}): "
                       f"{(tmp_path / 'init.log').read_text()!r}")
        proc.send_signal(signal.SIGKILL)
        print(f"killed init holding the write lock, its WAL grown {grown}: "
              f"{wal.stat().st_size:,} bytes")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # The old generation is still the only one: nothing of the dead one is left.
    assert rows(run.db, "SELECT id, state, entries FROM baseline") == [
        (old_id, "active", 7)]
    assert rows(run.db, "SELECT baseline_id, count(*) FROM entry GROUP BY baseline_id") \
        == [(old_id, 7)]

    # verify works and measures against the old baseline: the new files are added.
    result = run("verify", "--json")
    assert result.exit_code == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["baseline"]["entries"] == 7
    assert doc["summary"]["added"] == MANY
    assert doc["summary"]["removed"] == 0
    added = {c["path"] for c in doc["changes"] if c["kind"] == "added"}
    assert added == {str(tree / f"f{i:05d}") for i in range(MANY)}

    # The next init --force completes.
    result = run("init", "--force")
    assert result.exit_code == 0, result.stderr
    [(new_id, state, entries)] = rows(run.db, "SELECT id, state, entries FROM baseline")
    assert state == "active" and entries == MANY + 7 and new_id != old_id
    assert rows(run.db, "SELECT baseline_id, count(*) FROM entry GROUP BY baseline_id") \
        == [(new_id, MANY + 7)]
    assert run("verify", "--fast").exit_code == 0


# -- writers and a running init ----------------------------------------------------------

#: Another process doing what init and approve do: the baseline lock (an flock on
#: `<database>.lock`), then SQLite's write lock, held until its stdin ends: the test
#: lets go when it has seen what happens meanwhile, however slow the machine is.
HOLDER = r"""
import fcntl, os, sqlite3, sys
lock = os.open(sys.argv[1] + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX)
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()
db.execute("COMMIT")
os.close(lock)
"""


class Holder:
    """The holding process: `held` is the time.monotonic() it held both locks."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.held = time.monotonic()

    def release(self) -> None:
        """Let go of both locks (the holder commits and exits)."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()


@contextlib.contextmanager
def init_holding(db: Path) -> Iterator[Holder]:
    """A process holding both locks as a long init does, until `release()` or the end
    of the block; yields once it holds them and reaps it after."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    holder = Holder(proc)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        holder.held = time.monotonic()
        yield holder
    finally:
        holder.release()
        assert proc.wait(timeout=30) == 0


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def _begin_write(store: Store) -> None:
    with store.writer() as conn, conn.begin():
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")


def test_a_write_waits_for_an_init_past_its_busy_timeout(
        run: Cli, caplog: pytest.LogCaptureFixture) -> None:
    """A cold init of a million files holds SQLite's write lock for over a minute,
    past any busy timeout a command should have for an unknown holder: a command's
    write (a timer's `verify` recording its events) waits for the baseline lock."""
    assert run("init").exit_code == 0
    url = f"sqlite:///{run.db}"
    impatient = Store(url, busy_timeout=0.5)
    patient = Store(url, busy_timeout=0.5, baseline_wait=30)
    try:
        with init_holding(run.db) as holder:
            with pytest.raises(OperationalError, match="database is locked"):
                _begin_write(impatient)  # the busy timeout alone gives up
            outcome: list[BaseException | None] = []

            def write() -> None:
                try:
                    _begin_write(patient)
                    outcome.append(None)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    outcome.append(exc)
            writer = threading.Thread(target=write)
            writer.start()
            try:
                wait_until(lambda: warnings(caplog) or outcome,
                           "the patient write to say it waits", 30)
                # Twice its busy timeout later, it is waiting still: the holder holds
                # both locks until we let go, however long the machine took till now.
                time.sleep(1.0)
                assert writer.is_alive() and outcome == [], outcome
            finally:
                holder.release()
                writer.join(timeout=60)
            assert outcome == [None], outcome  # it wrote once the holder let go
        assert warnings(caplog) == [(f"{url}: another init or approve is writing the "
                                     "baseline; waiting for it (up to 30 s)")]
    finally:
        impatient.close()
        patient.close()


def test_a_write_gives_up_on_an_init_after_its_wait(run: Cli) -> None:
    assert run("init").exit_code == 0
    store = Store(f"sqlite:///{run.db}", busy_timeout=0.2, baseline_wait=1)
    try:
        with init_holding(run.db) as holder:
            with pytest.raises(DatabaseError) as raised:
                _begin_write(store)  # the holder holds on till the end of the block
            assert time.monotonic() - holder.held >= 1.0
        assert str(raised.value) == (f"sqlite:///{run.db}: another init or approve "
                                     "holds the baseline lock (waited 1 s)")
    finally:
        store.close()


def test_writes_under_our_own_baseline_lock_do_not_wait_for_it(run: Cli) -> None:
    """init's generation writer and approve's transaction run inside exclusive():
    they must not wait for the lock their own process holds."""
    assert run("init").exit_code == 0
    store = Store(f"sqlite:///{run.db}", baseline_wait=5)
    try:
        with store.exclusive():
            _begin_write(store)  # waiting for itself, it would fail after 5 s
        _begin_write(store)
    finally:
        store.close()


def test_verify_during_an_init_waits_and_records_its_events(run: Cli, tree: Path) -> None:
    """The whole command, in its own process: one line on stderr says it waits, then
    the change is recorded as usual."""
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed during an init\n")
    with init_holding(run.db) as holder:
        verify = subprocess.Popen(
            [sys.executable, "-m", "integrity", "--db", f"sqlite:///{run.db}", "--policy",
             str(run.policy), "-q", "verify"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert verify.stderr is not None
            # It says it waits, and waits: the holder lets go only after that line.
            assert select.select([verify.stderr], [], [], 60)[0], "verify said nothing"
            said = verify.stderr.readline()
            holder.release()
            _, rest = verify.communicate(timeout=60)
        finally:
            if verify.poll() is None:
                verify.kill()
                verify.communicate()
    assert verify.returncode == 1, said + rest
    assert one_line(said + rest) == (
        f"sqlite:///{run.db}: another init or approve is writing the baseline; "
        "waiting for it (up to 600 s)")
    assert rows(run.db, "SELECT kind, key FROM event") == [
        ("modified", to_key(os.fsencode(tree / "a.conf")))]


# -- hostile database files -------------------------------------------------------------

def _corrupt(db: Path) -> None:
    db.write_bytes(os.urandom(64 * 1024))


def _foreign(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE foo (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO foo (name) VALUES ('somebody else''s data')")
    conn.commit()
    conn.close()


def _future(db: Path) -> None:
    url = f"sqlite:///{db}"
    store = Store(url, check_schema=False)
    try:
        store.upgrade()
    finally:
        store.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE alembic_version SET version_num = 'ffff'")
    conn.commit()
    conn.close()


HOSTILE = {"corrupt": (_corrupt, "database"), "foreign": (_foreign, "not an integrity"),
           "future": (_future, "ffff")}


@pytest.mark.parametrize("command", [["verify"], ["verify", "--json"], ["init"],
                                     ["init", "--force"], ["db", "upgrade"]])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_database_exits_2_with_one_line(run: Cli, kind: str,
                                                command: list[str]) -> None:
    make, fragment = HOSTILE[kind]
    run.db.parent.mkdir(parents=True, exist_ok=True)
    make(run.db)
    before = run.db.read_bytes()
    result = run(*command)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("integrity: ")
    assert str(run.db) in line
    assert fragment in line
    assert result.stdout == ""
    # Never "repaired", migrated or overwritten (a foreign file's header is
    # test_foreign_database_is_not_modified's business).
    if kind == "foreign":
        assert rows(run.db, "SELECT name FROM sqlite_master") == [("foo",)]
    else:
        assert run.db.read_bytes() == before


def test_hostile_database_in_a_real_process(run: Cli) -> None:
    run.db.parent.mkdir(parents=True, exist_ok=True)
    _corrupt(run.db)
    proc = subprocess.run([sys.executable, "-m", "integrity", "--db", f"sqlite:///{run.db}",
                           "--policy", str(run.policy), "verify"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert str(run.db) in one_line(proc.stderr)


def test_foreign_database_is_not_modified(run: Cli) -> None:
    """Another program's database is refused before anything is written to it.

    Not even its journal mode: switching it to WAL (file header bytes 18-19 go from
    1 to 2) is permanent and changes how its owner must open it.
    """
    run.db.parent.mkdir(parents=True)
    _foreign(run.db)
    before = run.db.read_bytes()
    for command in (["verify"], ["init"], ["db", "upgrade"]):
        assert run(*command).exit_code == 2
    assert rows(run.db, "SELECT name FROM sqlite_master") == [("foo",)]
    assert rows(run.db, "PRAGMA journal_mode") == [("delete",)]
    assert run.db.read_bytes() == before


# -- migrations -------------------------------------------------------------------------

def test_db_upgrade_creates_the_schema(run: Cli) -> None:
    assert not run.db.exists()
    result = run("db", "upgrade")
    assert result.exit_code == 0, result.stderr
    assert HEAD in result.stdout and "(empty)" in result.stdout
    assert str(run.db) in result.stdout
    tables = {t for (t,) in rows(run.db, "SELECT name FROM sqlite_master "
                                         "WHERE type = 'table'")}
    assert {"alembic_version", "baseline", "entry", "run"} <= tables
    assert rows(run.db, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    assert rows(run.db, "SELECT count(*) FROM baseline") == [(0,)]

    again = run("db", "upgrade")
    assert again.exit_code == 0
    assert f"at revision {HEAD}" in again.stdout

    # A schema with no baseline is usable: init fills it.
    assert run("init").exit_code == 0
    assert run("verify").exit_code == 0


def test_init_creates_a_new_database_at_head(run: Cli) -> None:
    assert run("init").exit_code == 0
    assert rows(run.db, "SELECT version_num FROM alembic_version") == [(HEAD,)]


def _revision_files() -> dict[str, str | None]:
    """revision -> down_revision, read from the migration scripts' assignments."""
    found: dict[str, str | None] = {}
    for script in sorted((REPO / "integrity" / "store" / "migrations" / "versions").glob("*.py")):
        values: dict[str, object] = {}
        for node in ast.parse(script.read_text()).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in ("revision", "down_revision")):
                values[node.targets[0].id] = ast.literal_eval(node.value)
        if "revision" in values:
            found[str(values["revision"])] = values.get("down_revision")  # type: ignore[assignment]
    return found


def test_revisions_match_the_migration_scripts() -> None:
    files = _revision_files()
    assert files, "no migration scripts found"
    assert set(REVISIONS) == set(files)
    # REVISIONS is oldest first: each one's down_revision is the one before it.
    chain = [None, *REVISIONS[:-1]]
    assert [files[r] for r in REVISIONS] == chain
    assert HEAD == REVISIONS[-1]
    # Every script text states it in the same `revision = "..."` form alembic writes.
    for script in (REPO / "integrity" / "store" / "migrations" / "versions").glob("0*.py"):
        text = script.read_text()
        assert any(f'revision = "{r}"' in text for r in REVISIONS), script


def test_older_schema_is_refused_then_upgraded_keeping_the_baseline(run: Cli) -> None:
    """A database at an older revision is never used silently: refused with the
    command to run, and `db upgrade` brings it to head without losing the baseline."""
    from integrity.store.engine import HEAD, REVISIONS

    assert len(REVISIONS) >= 2
    with database_at(run.db, REVISIONS[0]) as conn:
        conn.exec_driver_sql(
            "INSERT INTO baseline (state, created, activated, policy_source, "
            "policy_digest, entries) VALUES ('active', '2026-01-01 00:00:00', "
            "'2026-01-01 00:00:00', 'old.toml', 'x', 0)")
    refused = run("verify")
    assert refused.exit_code == 2
    assert refused.stderr.strip().count("\n") == 0
    assert f"revision {REVISIONS[0]}" in refused.stderr
    assert "integrity db upgrade" in refused.stderr
    upgraded = run("db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert f"from revision {REVISIONS[0]} to {HEAD}" in upgraded.stdout
    assert rows(run.db, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    assert rows(run.db, "SELECT policy_source FROM baseline") == [("old.toml",)]
