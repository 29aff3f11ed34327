"""`[scan]`: a scan's nice level, I/O class and read-rate ceiling, on real processes.

The read-rate tests time real scans of a tree of known size and assert only the
lower bound the ceiling implies (with a generous margin): a busy machine can make a
scan slower, never faster. The priority tests look at the running processes (and
the watcher's scan thread) from outside, with getpriority and ioprio_get.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import child_pids, wait_until
from integrity.errors import PolicyError
from integrity.ops.baseline import build_baseline
from integrity.ops.verify import verify
from integrity.policy import ScanSettings, parse
from integrity.scan.priority import (IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE, ioprio_get,
                                     scan_priority)
from integrity.store import Store
from test_service import (RELOAD_SECONDS, Daemon, Site, site, start,  # noqa: F401
                          wait_for_log)

MIB = 1 << 20
#: The tree the rate tests read: 8 MiB in files of 1 MiB, 256 KiB and 3 KiB.
TREE_BYTES = 4 * MIB + 12 * (256 << 10) + 341 * 3072 + 2 * 1024
RATE = 8 * MIB
#: Elapsed time must be at least this share of TREE_BYTES / RATE. (Files changed in
#: the last 10 s are read twice, hasher.RECENT_NS: a scan then reads more, never
#: less, so the bound holds either way.)
MARGIN = 0.75


@pytest.fixture
def sized_tree(tmp_path: Path) -> Path:
    """A tree whose regular files hold exactly TREE_BYTES."""
    root = tmp_path / "data"
    (root / "big").mkdir(parents=True)
    (root / "small").mkdir()
    for i in range(4):
        (root / "big" / f"m{i}").write_bytes(os.urandom(MIB))
    for i in range(12):
        (root / "big" / f"q{i}").write_bytes(os.urandom(256 << 10))
    for i in range(341):
        (root / "small" / f"s{i:03d}").write_bytes(os.urandom(3072))
    (root / "rest").write_bytes(os.urandom(2048))
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) == TREE_BYTES
    return root


def policy_text(root: Path, scan: str = "") -> str:
    return f'[[rule]]\npath = "{root}"\ncheck = "static"\n\n{scan}\n'


def cli(tmp_path: Path, policy: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "integrity", "--db", f"sqlite:///{tmp_path}/scan.db",
         "--policy", str(policy), "-q", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], ok: tuple[int, ...] = (0,)) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in ok, (proc.returncode, out, err)


# -- the policy -------------------------------------------------------------------------

def test_scan_settings_default_and_parse() -> None:
    rule = {"path": "/etc"}
    assert parse({"rule": [rule]}).scan == ScanSettings(10, None, None)
    settings = parse({"rule": [rule], "scan": {"nice": 15, "io_class": "idle",
                                               "max_read_rate": "50MiB/s"}}).scan
    assert settings == ScanSettings(15, "idle", 50 * MIB)
    assert parse({"rule": [rule], "scan": {"max_read_rate": "10 MB/s"}}).scan \
        .max_read_rate == 10_000_000
    assert parse({"rule": [rule], "scan": {"max_read_rate": "unlimited"}}).scan \
        .max_read_rate is None


@pytest.mark.parametrize("scan, key", [
    ({"nice": -5}, "scan.nice"), ({"nice": 20}, "scan.nice"), ({"nice": "10"}, "scan.nice"),
    ({"io_class": "realtime"}, "scan.io_class"), ({"max_read_rate": "fast"}, "scan.max_read_rate"),
    ({"max_read_rate": "0MiB/s"}, "scan.max_read_rate"),
    ({"max_read_rate": "5MiB/min"}, "scan.max_read_rate"), ({"nicety": 1}, "scan.nicety"),
])
def test_bad_scan_settings_name_the_key(scan: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse({"rule": [{"path": "/etc"}], "scan": scan}, "p.toml")
    assert str(caught.value).startswith(f"p.toml: {key}: "), caught.value
    assert "\n" not in str(caught.value)


def test_systemd_verify_unit_matches_the_scheduled_defaults() -> None:
    """The timer's verify runs as a scheduled scan would: [scan]'s default nice, and
    the idle I/O class scheduled scans get by default."""
    unit = (Path(__file__).resolve().parent.parent / "systemd"
            / "integrity-verify.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Nice"] == str(ScanSettings().nice)
    assert settings["IOSchedulingClass"] == "idle"


# -- the read-rate ceiling ------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [0, 2])
def test_max_read_rate_bounds_init_and_verify(tmp_path: Path, sized_tree: Path,
                                              parallel: int) -> None:
    """init and verify (in this process, and split over two workers) read the tree no
    faster than max_read_rate; a realtime re-check is not paced."""
    policy = parse({"rule": [{"path": str(sized_tree), "check": "static"}],
                    "scan": {"max_read_rate": f"{RATE // MIB}MiB/s"}})
    store = Store(f"sqlite:///{tmp_path}/rate.db")
    try:
        began = time.monotonic()
        build_baseline(lambda: store, policy, parallel=parallel)
        took = time.monotonic() - began
        assert took >= MARGIN * TREE_BYTES / RATE, (
            f"init read {TREE_BYTES} bytes in {took:.2f} s: faster than {RATE} B/s")
        began = time.monotonic()
        verify(lambda: store, policy, parallel=parallel, source="scan")
        took = time.monotonic() - began
        assert took >= MARGIN * TREE_BYTES / RATE, (
            f"verify read {TREE_BYTES} bytes in {took:.2f} s: faster than {RATE} B/s")
    finally:
        store.close()


def test_workers_stop_when_their_scan_is_killed(tmp_path: Path, sized_tree: Path) -> None:
    """A paced verify killed outright (SIGKILL: no handler runs) takes its workers with
    it: orphaned, they would read on at the paced rate to the end of the tree (here
    about 8 s; on a large tree, hours). Each pipe is held open by the sibling worker
    too, so they cannot count on a broken pipe."""
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(sized_tree))
    finish(cli(tmp_path, policy, "init"))
    policy.write_text(policy_text(sized_tree, '[scan]\nmax_read_rate = "1MiB/s"'))
    proc = cli(tmp_path, policy, "verify")
    workers = wait_until(lambda: child_pids(proc.pid) or None, "scanning workers", 30)
    proc.kill()
    proc.wait(timeout=30)  # not communicate(): the workers hold its pipes open
    for pipe in (proc.stdout, proc.stderr):
        assert pipe is not None
        pipe.close()

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return False
        return state != b"Z"

    wait_until(lambda: not any(running(pid) for pid in workers),
               "the orphaned workers to stop", 5)


def test_max_read_rate_paces_verify_fast_rehashes(tmp_path: Path, sized_tree: Path,
                                                  write_policy: Callable[..., Path]) -> None:
    """verify --fast reads only files whose stat moved: those reads are paced too."""
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(sized_tree))
    finish(cli(tmp_path, policy, "init"))
    for path in (sized_tree / "big").iterdir():  # 7 MiB whose mtime moved
        os.utime(path, None)
    policy.write_text(policy_text(sized_tree, f'[scan]\nmax_read_rate = "{RATE // MIB}MiB/s"'))
    changed = sum(p.stat().st_size for p in (sized_tree / "big").iterdir())
    began = time.monotonic()
    finish(cli(tmp_path, policy, "verify", "--fast"), ok=(1,))
    took = time.monotonic() - began
    assert took >= MARGIN * changed / RATE, (took, changed)


# -- nice level and I/O class -------------------------------------------------------------------

def nice_of(pid: int, tid: int | None = None) -> int:
    """The nice value of a process (or one of its threads), from /proc."""
    stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_bytes()
    return int(stat.rsplit(b")", 1)[1].split()[16])


def test_verify_runs_at_the_policy_nice_level_and_io_class(tmp_path: Path,
                                                          sized_tree: Path) -> None:
    """The verify process and its scanning workers run at [scan]'s nice level and
    I/O class while they work (looked at from outside: /proc and ioprio_get)."""
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(sized_tree))
    finish(cli(tmp_path, policy, "init"))
    policy.write_text(policy_text(
        sized_tree, '[scan]\nnice = 13\nio_class = "idle"\nmax_read_rate = "2MiB/s"'))
    proc = cli(tmp_path, policy, "verify")
    try:
        workers = wait_until(lambda: [c for c in child_pids(proc.pid)
                                      if nice_of(c) == 13] or None,
                             "scanning workers at nice 13", 30)
        assert nice_of(proc.pid) == 13
        for pid in [proc.pid, *workers]:
            assert ioprio_get(pid)[0] == IOPRIO_CLASS_IDLE, pid
        assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # we, the parent, are untouched
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_scan_priority_lowers_a_thread_and_puts_it_back() -> None:
    """The watcher lowers its scan thread only: another thread keeps its priority,
    and the scan thread is restored after the scan (we run as root)."""
    seen: dict[str, object] = {}

    def scan() -> None:
        tid = threading.get_native_id()
        with scan_priority(ScanSettings(nice=12, io_class=None), scheduled=True):
            seen["during"] = (os.getpriority(os.PRIO_PROCESS, tid), ioprio_get(tid)[0])
        seen["after"] = (os.getpriority(os.PRIO_PROCESS, tid), ioprio_get(tid)[0])

    before = (os.getpriority(os.PRIO_PROCESS, 0), ioprio_get()[0])
    thread = threading.Thread(target=scan)
    thread.start()
    thread.join()
    assert seen["during"] == (12, IOPRIO_CLASS_IDLE)
    assert seen["after"] == before
    assert (os.getpriority(os.PRIO_PROCESS, 0), ioprio_get()[0]) == before
    with scan_priority(ScanSettings(nice=11, io_class="best-effort")):
        assert ioprio_get() == (IOPRIO_CLASS_BE, 6)
        assert os.getpriority(os.PRIO_PROCESS, 0) == 11
    assert (os.getpriority(os.PRIO_PROCESS, 0), ioprio_get()[0]) == before


@pytest.mark.usefixtures("no_leaks")
def test_the_watchers_scheduled_scan_runs_at_the_policy_priority(
        site: Site, start: Callable[..., Daemon]) -> None:
    """A full scan of the running watcher (queued here by a policy reload) runs on a
    thread at [scan]'s nice level and the idle I/O class; the daemon's main thread
    keeps its priority. SIGTERM ends the paced scan (48 MiB to read at 2 MiB/s: the
    new file is read twice) instead of sleeping through it."""
    daemon = start()
    (site.tree / "bulk").write_bytes(os.urandom(24 * MIB))
    text = site.policy.read_text()
    site.policy.write_text(text + '\n[scan]\nnice = 14\nmax_read_rate = "2MiB/s"\n')
    daemon.signal(signal.SIGHUP)
    wait_for_log(site, "policy reloaded", RELOAD_SECONDS)

    def scanning_thread() -> int | None:
        # The thread takes its nice level and its I/O class one after the other: a
        # look in between sees only the first.
        for tid in map(int, os.listdir(f"/proc/{daemon.pid}/task")):
            try:
                if (nice_of(daemon.pid, tid) == 14
                        and ioprio_get(tid)[0] == IOPRIO_CLASS_IDLE):
                    return tid
            except OSError:
                continue
        return None

    wait_until(scanning_thread, "a watcher thread at nice 14 in the idle I/O class", 15)
    assert nice_of(daemon.pid) == 0
    assert ioprio_get(daemon.pid)[0] != IOPRIO_CLASS_IDLE
    assert daemon.terminate() == 0
    assert "full scan abandoned: stopping" in site.stderr()
    json.dumps(site.status())  # the daemon left a readable database behind


@pytest.mark.usefixtures("no_leaks")
def test_sigterm_ends_the_watchers_paced_catch_up_scan(
        site: Site, start: Callable[..., Daemon]) -> None:
    """The catch-up scan at start runs on the main thread, paced like any scheduled
    scan: SIGTERM waited for all of it (24 MiB at 2 MiB/s here, 20 s at 1 MiB/s by
    hand), and systemd kills a service that outlasts its stop timeout. It ends the
    scan, recording nothing, and the daemon stops with 0."""
    (site.tree / "bulk").write_bytes(os.urandom(24 * MIB))
    site.policy.write_text(site.policy.read_text()
                           + '\n[scan]\nmax_read_rate = "2MiB/s"\n')
    daemon = start(wait=False)
    wait_for_log(site, "watching", 15)  # set up: the catch-up scan is under way
    assert daemon.terminate() == 0
    log = site.stderr()
    assert "catch-up scan abandoned: stopping" in log, log
    assert "scan: " not in log  # no scan result was recorded or reported
