"""Crash safety and concurrency: SIGKILL at random points, a full disk, many writers.

Every command under test is a real `python3 -m integrity` process on a real SQLite
file; it is killed with SIGKILL (no handler runs, no transaction is rolled back by
us) and the database is then read from the outside with sqlite3, the way an operator
would find it after a power cut or an OOM kill. Random points come from a seeded
generator, so a failure can be replayed.

The interrupted `init` is test_store.py's; corrupt, foreign and newer databases too.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from conftest import REPO, Cli, ro, rows, wait_until
from integrity.paths import from_key, key_range, to_key

SEED = 20261122

Policy = Callable[..., Path]


# -- helpers --------------------------------------------------------------------------

def integrity_ok(db: Path) -> None:
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


def command(db: Path, policy: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "integrity", "--db", f"sqlite:///{db}", "--policy",
            str(policy), "-q", *args]


def spawn(db: Path, policy: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a command with its stdout and stderr going to log."""
    with open(log, "ab") as out:
        return subprocess.Popen(command(db, policy, *args), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def integrity(db: Path, policy: Path, *args: str, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(db, policy, *args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def clean_stderr(text: str) -> None:
    """No traceback and no SQLite lock error ever reaches the user."""
    assert "Traceback" not in text, text
    assert "database is locked" not in text, text
    assert "internal error" not in text, text


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def write_lock_held(db: Path) -> bool:
    """True while another connection holds SQLite's write lock (probed without
    waiting, and released at once)."""
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return True
        raise
    finally:
        conn.close()


# -- kill -9 during approve ----------------------------------------------------------------

FILES = 2000


def write_versions(sub: Path, version: int) -> dict[bytes, bytes]:
    """Rewrite every file of the subtree; return key -> BLAKE3 of its new content."""
    digests = {}
    for i in range(FILES):
        data = b"version %d of file %d\n" % (version, i)
        path = sub / f"f{i:04d}"
        path.write_bytes(data)
        digests[to_key(os.fsencode(path))] = blake3.blake3(data).digest()
    return digests


def subtree_state(db: Path, sub: Path) -> dict[bytes, bytes | None]:
    """key -> content of every file entry below sub in the active baseline."""
    low, high = key_range(os.fsencode(sub))
    return {key: content for key, content in rows(
        db, "SELECT e.key, e.content FROM entry e JOIN baseline b ON b.id = e.baseline_id "
            "WHERE b.state = 'active' AND e.type = 'file' AND e.key >= ? AND e.key < ?",
        (low, high))}


def test_kill_9_during_approve_leaves_all_or_nothing(tmp_path: Path,
                                                      write_policy: Policy) -> None:
    root = tmp_path / "etc"
    sub = root / "sub"
    sub.mkdir(parents=True)
    for i in range(20):
        (root / f"other{i}").write_text(f"other {i}\n")
    approved_state = write_versions(sub, 0)
    policy = write_policy({"path": str(root), "check": "config", "severity": "high"})
    db = tmp_path / "state" / "integrity.db"
    run = Cli(db, policy)
    assert run("init").exit_code == 0
    assert subtree_state(db, sub) == approved_state

    rng = random.Random(SEED)
    version = 0
    pending: dict[bytes, bytes] = {}
    open_ids: list[int] = []
    duration = locked_at = 0.0
    outcomes = []
    # Round 0 runs to the end: when it took the write lock and when it finished spread
    # the later kills over a whole run. Rounds 1-3 are killed after a random delay;
    # rounds 4-5 at a random point while approve holds the write lock, i.e. inside
    # its one transaction.
    for round_no in range(6):
        if not open_ids:
            version += 1
            pending = write_versions(sub, version)
            result = run("verify")
            assert result.exit_code == 1, result.output
            low, high = key_range(os.fsencode(sub))
            open_ids = [i for (i,) in rows(
                db, "SELECT id FROM event WHERE status = 'open' AND key >= ? AND key < ?",
                (low, high))]
            assert len(open_ids) == FILES
        proc = spawn(db, policy, "approve", str(sub), "--reason", f"round {round_no}",
                     log=tmp_path / f"approve{round_no}.log")
        began = time.monotonic()
        if round_no == 0:
            while proc.poll() is None:
                if not locked_at and write_lock_held(db):
                    locked_at = time.monotonic() - began
                time.sleep(0.005)
            duration = time.monotonic() - began
            assert locked_at, "approve was never seen holding the write lock"
            how = (f"ran to the end in {duration:.2f} s, holding the write lock from "
                   f"{locked_at:.2f} s")
        elif round_no <= 3:
            delay = rng.uniform(0, duration)
            while proc.poll() is None and time.monotonic() - began < delay:
                time.sleep(0.001)
            kill9(proc)
            how = f"killed after {delay * 1000:.0f} ms"
        else:
            wait_until(lambda: proc.poll() is not None or write_lock_held(db),
                       "approve to take the write lock", 60)
            time.sleep(rng.uniform(0, 0.9 * (duration - locked_at)))
            kill9(proc)
            how = f"killed inside its transaction, {time.monotonic() - began:.2f} s in"
        log = (tmp_path / f"approve{round_no}.log").read_text()
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, log
        clean_stderr(log)

        integrity_ok(db)
        state = subtree_state(db, sub)
        statuses = rows(db, f"SELECT status, approval_id FROM event WHERE id IN "
                            f"({','.join(map(str, open_ids))})")
        assert len(statuses) == FILES, "events disappeared"
        if state == pending:
            # All of it: every event closed by one approval that names them all.
            assert {s for s, _ in statuses} == {"approved"}, set(statuses)
            [(approval_id,)] = {(a,) for _, a in statuses}
            [(events, entries)] = rows(db, "SELECT events, entries FROM approval "
                                           "WHERE id = ?", (approval_id,))
            assert events == FILES and entries >= FILES
            approved_state, open_ids = pending, []
            outcomes.append(f"{how}: approved")
        else:
            # None of it: the old digests, every event still open and unattached.
            changed = sum(1 for k, v in state.items() if v != approved_state.get(k))
            assert state == approved_state, (
                f"round {round_no} ({how}): {changed} of {FILES} entries hold new digests")
            assert set(statuses) == {("open", None)}, set(statuses)
            outcomes.append(f"{how}: nothing")
        # The baseline's own count agrees with its rows.
        [(entries, counted)] = rows(
            db, "SELECT b.entries, (SELECT count(*) FROM entry e WHERE e.baseline_id = b.id)"
                " FROM baseline b WHERE b.state = 'active'")
        assert entries == counted
    print("\n".join(outcomes))

    # Whatever the last kill left, the next approve and verify work.
    approve = integrity(db, policy, "approve", str(sub), "--reason", "after the kills")
    assert approve.returncode == 0, approve.stderr
    clean_stderr(approve.stderr)
    verify = integrity(db, policy, "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    doc = json.loads(verify.stdout)
    assert doc["errors"] == [] and doc["changes"] == []
    assert subtree_state(db, sub) == pending
    assert rows(db, "SELECT count(*) FROM event WHERE status = 'open'") == [(0,)]


# -- kill -9 of the watcher under a burst of changes -------------------------------------

REQUIRED = ("key", "kind", "changed", "source", "severity", "classification", "status",
            "count", "first_seen", "last_seen")


def watcher_running(db: Path, policy: Path, pid: int) -> bool:
    result = integrity(db, policy, "status", "--json")
    if not result.stdout:
        return False
    watcher = json.loads(result.stdout)["watcher"]
    return bool(watcher["pid"] == pid and watcher["alive"] and watcher["state"] == "running")


def start_watcher(db: Path, policy: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "integrity", "--db", f"sqlite:///{db}", "--policy",
             str(policy), "watch"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err, cwd=REPO)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"integrity watch exited {proc.returncode}: {log.read_text()}")
        return watcher_running(db, policy, proc.pid)
    try:
        wait_until(ready, "the watcher to run", 30)
    except BaseException:
        kill9(proc)
        raise
    return proc


def watcher_caught_up(db: Path, root: Path) -> None:
    """Return once the watcher has recorded every change made in `root` so far.

    inotify delivers in order to the watcher's one reader, which hands its batches to
    one realtime queue, and each batch is recorded in one transaction. So when the
    event for a first marker written now is visible, every earlier change was handed
    on in that batch or before it; a second marker's event, written after that, is
    recorded by a batch that starts after all of those were recorded.
    """
    for name in ("caught-up-1", "caught-up-2"):
        marker = root / name
        marker.write_text("written after every other change\n")
        key = to_key(os.fsencode(str(marker)))
        wait_until(lambda: rows(db, "SELECT 1 FROM event WHERE key = ? AND source = "
                                    "'realtime'", (key,)),
                   f"the watcher to record {marker}", 60)


def event_rows(db: Path) -> list[dict[str, Any]]:
    conn = ro(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM event ORDER BY id")]
    finally:
        conn.close()


def test_kill_9_of_the_watcher_under_a_burst_loses_nothing(tmp_path: Path,
                                                           write_policy: Policy) -> None:
    root = tmp_path / "etc"
    dirs = [root / f"d{d}" for d in range(4)]
    files = []
    for d in dirs:
        d.mkdir(parents=True)
        for i in range(100):
            path = d / f"c{i:03d}.conf"
            path.write_text(f"setting = {i}\n")
            files.append(path)
    policy = write_policy({"path": str(root), "check": "config", "severity": "high"})
    db = tmp_path / "state" / "integrity.db"
    log = tmp_path / "watch.log"
    assert Cli(db, policy)("init").exit_code == 0

    rng = random.Random(SEED)
    order = files[:]
    rng.shuffle(order)
    written: list[int] = []

    def burst() -> None:
        for n, path in enumerate(order):
            path.write_text(f"setting = changed {n}\n")
            written.append(n)
            time.sleep(0.003)

    watcher = start_watcher(db, policy, log)
    writer = threading.Thread(target=burst, name="burst")
    try:
        writer.start()
        # Kill it at a random moment while it is recording the burst.
        wait_until(lambda: rows(db, "SELECT count(*) FROM event")[0][0] > 0,
                   "the first realtime events", 10)
        time.sleep(rng.uniform(0.1, 0.6))
        kill9(watcher)
        kill_after = len(written)
    finally:
        writer.join()
        kill9(watcher)
    assert watcher.returncode == -signal.SIGKILL
    assert kill_after < len(files), "the burst was over before the kill"

    integrity_ok(db)
    before = event_rows(db)
    assert before, "no event was recorded before the kill"
    for row in before:
        missing = [c for c in REQUIRED if row[c] is None]
        assert not missing, f"event {row['id']} lacks {missing}: {row}"
        assert row["kind"] in ("added", "removed", "modified", "warning"), row
        assert row["status"] in ("open", "approved", "reverted", "resolved"), row
        assert row["count"] >= 1
        for column in ("old", "new"):
            if row[column] is not None:
                json.loads(row[column])
    recorded = {os.fsdecode(from_key(r["key"])) for r in before if r["kind"] != "warning"}
    unrecorded = {str(p) for p in files} - recorded
    print(f"killed after {kill_after} of {len(files)} writes: {len(recorded)} events "
          f"recorded, {len(unrecorded)} changes without one")

    watcher = start_watcher(db, policy, log)  # its catch-up scan is done when it runs
    try:
        after = [r for r in event_rows(db) if r["kind"] != "warning"]
        open_by_path: dict[str, list[dict[str, Any]]] = {}
        for row in after:
            if row["status"] == "open":
                open_by_path.setdefault(os.fsdecode(from_key(row["key"])), []).append(row)
        for path in files:
            found = open_by_path.get(str(path), [])
            assert len(found) == 1, f"{path}: {len(found)} open events"
            if str(path) in unrecorded:
                assert found[0]["source"] == "scan", found[0]
            assert found[0]["kind"] == "modified" and "content" in found[0]["changed"]
        directories = {str(d) for d in dirs} | {str(root)}
        assert set(open_by_path) <= {str(p) for p in files} | directories
        assert "Traceback" not in log.read_text()
    finally:
        watcher.send_signal(signal.SIGTERM)
        try:
            assert watcher.wait(timeout=15) == 0
        finally:
            kill9(watcher)


# -- a full disk during init -----------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted again whatever happens."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (root needed): {mounted.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_during_init_keeps_the_old_baseline(tmp_path: Path, write_policy: Policy,
                                                      small_disk: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    for i in range(20):
        (small / f"f{i}").write_text(f"{i}\n")
    big = tmp_path / "big"
    for d in range(30):
        (big / f"d{d:02d}").mkdir(parents=True)
        for i in range(1000):
            fd = os.open(big / f"d{d:02d}" / f"f{i:04d}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"%d" % i)
            os.close(fd)
    small_policy = write_policy({"path": str(small), "check": "config"}, name="small.toml")
    big_policy = write_policy({"path": str(big), "check": "config"}, name="big.toml")
    db = small_disk / "integrity.db"

    first = integrity(db, small_policy, "init")
    assert first.returncode == 0, first.stderr
    [(old_id, old_root)] = rows(db, "SELECT id, root FROM baseline WHERE state = 'active'")

    full = integrity(db, big_policy, "init", "--force")
    assert full.returncode == 2, full.stdout + full.stderr
    lines = full.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "database" in lines[0] and "full" in lines[0], lines[0]
    clean_stderr(full.stderr)
    print(lines[0])

    # The old baseline is still the one in force, untouched, and usable.
    assert rows(db, "SELECT id, root FROM baseline WHERE state = 'active'") == [
        (old_id, old_root)]
    assert rows(db, "SELECT count(*) FROM entry WHERE baseline_id = ?", (old_id,)) == [(21,)]
    integrity_ok(db)
    verify = integrity(db, small_policy, "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["summary"]["scanned"] == 21

    # Trying again on the still-full disk is refused as clearly, never as a crash.
    again = integrity(db, small_policy, "init", "--force")
    clean_stderr(again.stderr)
    if again.returncode != 0:
        assert again.returncode == 2
        assert len(again.stderr.splitlines()) == 1, again.stderr
        assert "full" in again.stderr, again.stderr
    verify = integrity(db, small_policy, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


# -- several verify runs, an approve and a watcher on one database ---------------------

def test_concurrent_verify_approve_and_watch_share_the_database(
        tmp_path: Path, write_policy: Policy) -> None:
    root = tmp_path / "etc"
    files = []
    for d in range(6):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(300):
            path = root / f"d{d}" / f"f{i:03d}"
            path.write_text(f"{d} {i}\n")
            files.append(path)
    policy = write_policy({"path": str(root), "check": "config", "severity": "high"})
    db = tmp_path / "state" / "integrity.db"
    assert Cli(db, policy)("init").exit_code == 0
    watch_log = tmp_path / "watch.log"
    watcher = start_watcher(db, policy, watch_log)

    stop = threading.Event()
    rng = random.Random(SEED)

    def change() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            path = rng.choice(files)
            path.write_text(f"changed {n}\n")
            if n % 7 == 0:
                (root / f"d{n % 6}" / f"new{n}").write_text("new\n")
            time.sleep(0.002)

    changer = threading.Thread(target=change, name="changer")
    changer.start()
    results: list[tuple[str, int, str]] = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            procs = [(name, subprocess.Popen(command(db, policy, *args),
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True, cwd=REPO))
                     for name, args in (("verify", ["verify"]), ("verify", ["verify"]),
                                        ("verify", ["verify", "--fast"]),
                                        ("approve", ["approve", "--all",
                                                     "--reason", "concurrent"]))]
            for name, proc in procs:
                try:
                    _, err = proc.communicate(timeout=120)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                results.append((name, proc.returncode, err))
    finally:
        stop.set()
        changer.join()
    try:
        for name, code, err in results:
            clean_stderr(err)
            assert code in ((0, 1) if name == "verify" else (0,)), (name, code, err)
        assert any(code == 1 for name, code, _ in results if name == "verify")
        # Quiet now: let the watcher record the last changes, record anything else,
        # then approve everything.
        watcher_caught_up(db, root)
        last = integrity(db, policy, "verify")
        clean_stderr(last.stderr)
        assert last.returncode in (0, 1)
        approve = integrity(db, policy, "approve", "--all", "--reason", "final")
        assert approve.returncode == 0, approve.stderr
        verify = integrity(db, policy, "verify", "--json")
        clean_stderr(verify.stderr)
        doc = json.loads(verify.stdout)
        assert verify.returncode == 0, doc
        assert doc["changes"] == [] and doc["errors"] == []
        open_events = [e for e in json.loads(integrity(db, policy, "events", "--open",
                                                       "--json").stdout)
                       if e["kind"] != "warning"]
        assert open_events == [], open_events
        integrity_ok(db)
        assert watcher.poll() is None, "the watcher died"
    finally:
        watcher.send_signal(signal.SIGTERM)
        try:
            code = watcher.wait(timeout=15)
        finally:
            kill9(watcher)
    log = watch_log.read_text()
    clean_stderr(log)
    assert not re.search(r"^(ERROR|CRITICAL)", log, re.MULTILINE), log
    assert code == 0
    print(f"{len(results)} concurrent runs: "
          f"{sorted((n, c) for n, c, _ in results).count(('verify', 1))} verify runs saw "
          "changes")
