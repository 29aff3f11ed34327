"""Who made a change: real fanotify, real writer processes, as root; nothing mocked.

Each test starts an `ActorListener` on a tree under tmp_path, has a child process
change something in it, and polls `actor_for()` until the event has been filed (never a
fixed sleep). Writers that must still be alive when /proc is read wait on their stdin
until the test has its answer. Where the order of events matters (a writer gone before
it is read, a queue overflow) the test freezes the listener's helper process with
SIGSTOP, which makes the race deterministic instead of likely.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integrity.policy.severity import Judgement
from integrity.realtime.actor import ActorListener
from integrity.realtime.processes import ACTOR_KEYS

from conftest import APT_COPY, REPO, apt_copy
DEADLINE = 5.0
NOBODY = 65534
SH = os.path.realpath(shutil.which("sh") or "/bin/sh")
FANOTIFY_SYSCTL = Path("/proc/sys/fs/fanotify")

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root"),
              pytest.mark.usefixtures("no_leaks")]


def b(path: Path | str) -> bytes:
    return os.fsencode(str(path))


def open_fds() -> dict[int, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return found


@pytest.fixture
def actor_tree(tmp_path: Path) -> Path:
    """A tree of this file's own (conftest's `tree` is the scanners' one)."""
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "conf").write_text("alpha\n")
    return root


@pytest.fixture
def listen(actor_tree: Path) -> Iterator[Callable[..., ActorListener]]:
    """Start listeners (on the tree unless told otherwise); close them all at the end."""
    started: list[ActorListener] = []

    def make(*roots: Path, **kwargs: Any) -> ActorListener:
        listener = ActorListener([b(r) for r in roots or (actor_tree,)], **kwargs)
        started.append(listener)
        listener.start()
        return listener

    yield make
    for listener in started:
        listener.close()


def wait_for(listener: ActorListener, path: Path | bytes,
             done: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Poll actor_for(path) until an event is filed (or `done` holds), DEADLINE at most."""
    key = path if isinstance(path, bytes) else b(path)
    finished = done or (lambda a: not str(a.get("unknown", "")).startswith("no fanotify"))
    deadline = time.monotonic() + DEADLINE
    while True:
        actor = listener.actor_for(key)
        if finished(actor) or time.monotonic() > deadline:
            return actor
        time.sleep(0.005)


class Writer:
    """A child that runs `script` (sh, or python with python=True), then waits on stdin."""

    def __init__(self, script: str, *args: str, python: bool = False,
                 prefix: list[str] | None = None) -> None:
        if python:
            command = [sys.executable, "-c", script + "\nimport sys; sys.stdin.readline()"]
        else:
            command = ["sh", "-c", script + "; read line", "sh"]
        self.proc = subprocess.Popen([*(prefix or []), *command, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid

    def output(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def go(self) -> None:
        """Let a script waiting on its stdin (before its last step) go on."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        self.proc.communicate("\n", timeout=10)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc.poll() is None:
            self.finish()


@contextlib.contextmanager
def frozen(listener: ActorListener) -> Iterator[None]:
    """The helper stopped: the kernel queues events meanwhile, nobody reads /proc."""
    assert listener.helper_pid is not None
    os.kill(listener.helper_pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(listener.helper_pid, signal.SIGCONT)


# -- who wrote -------------------------------------------------------------------------

def test_shell_writer_is_named(listen: Callable[..., ActorListener], actor_tree: Path) -> None:
    listener = listen()
    assert listener.available and listener.reason is None and listener.mode == "fid"
    target = actor_tree / "sub" / "written"
    with Writer('echo x > "$1"', str(target)) as writer:
        actor = wait_for(listener, target)
        with open(f"/proc/{writer.pid}/loginuid") as handle:
            loginuid = int(handle.read())
    assert "unknown" not in actor, actor
    assert set(actor) == {*ACTOR_KEYS, "ancestors"}
    assert actor["pid"] == writer.pid
    assert actor["exe"] == SH
    assert actor["cmdline"] == f'sh -c echo x > "$1"; read line sh {target}'
    assert actor["uid"] == 0 and actor["user"] == "root"
    assert actor["comm"] == "sh"
    assert actor["loginuid"] == (None if loginuid == 4294967295 else loginuid)
    # Who ran it: this test process first, then whatever ran pytest.
    parent = actor["ancestors"][0]
    assert parent["pid"] == os.getpid()
    assert parent["exe"] == os.path.realpath(sys.executable)
    assert set(parent) == {"pid", "exe", "cmdline", "comm", "uid"}
    assert parent["uid"] == 0


def test_chmod_has_an_actor(listen: Callable[..., ActorListener], actor_tree: Path) -> None:
    listener = listen()
    target = actor_tree / "conf"
    with Writer("import os, sys; os.chmod(sys.argv[1], 0o600)", str(target),
                python=True) as writer:
        actor = wait_for(listener, target)
    assert actor["pid"] == writer.pid, actor
    assert actor["exe"] == os.path.realpath(sys.executable)
    assert (target.stat().st_mode & 0o777) == 0o600


def test_unprivileged_writer(listen: Callable[..., ActorListener],
                             world_dir: Path) -> None:
    open_dir = world_dir / "drop"
    open_dir.mkdir()
    os.chown(open_dir, NOBODY, NOBODY)
    listener = listen(world_dir)
    target = open_dir / "by-nobody"
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    with Writer('echo x > "$1"', str(target),
                prefix=[setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                        "--clear-groups"]) as writer:
        actor = wait_for(listener, target)
    assert actor["pid"] == writer.pid  # setpriv exec()s sh: same process
    assert actor["uid"] == NOBODY
    assert actor["user"] == pwd.getpwuid(NOBODY).pw_name
    assert target.stat().st_uid == NOBODY


def test_an_unprivileged_user_running_a_package_tool_is_no_package_manager(
        listen: Callable[..., ActorListener], world_dir: Path) -> None:
    """Anyone may run a trusted executable: apt's copy method copies whatever it is
    told to. www-data dropping a web shell through it must not be a package update
    (low severity, which sinks above low never hear of); root running it still is."""
    drop = world_dir / "html"
    drop.mkdir()
    os.chown(drop, NOBODY, NOBODY)
    payload = world_dir / "payload"
    payload.write_text("<?php system($_GET['c']);\n")
    payload.chmod(0o644)
    listener = listen(world_dir)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    judgement = Judgement()
    friday_noon = dt.datetime(2026, 12, 4, 12, 0)
    for prefix, name, expected in (
            ([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
             "shell.php", ("critical", "unexplained")),
            ([], "by-root.php", ("low", "package-manager"))):
        target = drop / name
        with apt_copy(payload, target, prefix) as copy:
            actor = wait_for(listener, target)  # the method waits for more work: alive
        assert target.read_bytes() == payload.read_bytes()
        assert actor["pid"] == copy.pid and actor["exe"] == APT_COPY, actor
        assert judgement.judge("critical", actor, friday_noon) == expected, actor


def test_a_reused_pid_is_not_taken_for_the_process_that_had_it(
        listen: Callable[..., ActorListener], world_dir: Path) -> None:
    """One reading of /proc/PID stands for that process for two seconds, but a pid is
    free again as soon as its process is reaped: an unprivileged writer that got the
    pid of root's (cycling through pids, or as here through ns_last_pid) within those
    seconds was named as root's process, and judged as it, a package manager's
    included."""
    drop = world_dir / "drop"
    drop.mkdir()
    os.chown(drop, NOBODY, NOBODY)
    listener = listen(world_dir)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    for attempt in range(20):
        before = drop / f"by-root-{attempt}"
        with Writer('echo x > "$1"', str(before)) as root_writer:
            assert wait_for(listener, before)["uid"] == 0  # read while it is alive
        # Reaped: its pid is free. Other processes may take it first: try again.
        last_pid.write_text(str(root_writer.pid - 1))
        after = drop / f"by-nobody-{attempt}"
        with Writer('echo y > "$1"', str(after),
                    prefix=[setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups"]) as writer:
            if writer.pid != root_writer.pid:
                continue
            actor = wait_for(listener, after)
        assert actor["pid"] == writer.pid
        assert actor["uid"] == NOBODY and actor["user"] == pwd.getpwuid(NOBODY).pw_name, actor
        return
    pytest.fail("could not have the pid reused in 20 tries")


def test_login_uid_survives(listen: Callable[..., ActorListener], actor_tree: Path) -> None:
    """A child sets its audit login uid (root may, once per process where it is
    immutable); the actor carries it, as /proc/<child>/loginuid says independently."""
    listener = listen()
    target = actor_tree / "as-login"
    script = ('if echo 65534 > /proc/self/loginuid 2>/dev/null; then echo set; '
              'else echo kept; fi; echo x > "$1"')
    with Writer(script, str(target)) as writer:
        outcome = writer.output()
        actor = wait_for(listener, target)
        with open(f"/proc/{writer.pid}/loginuid") as handle:
            loginuid = int(handle.read())
    if outcome == "set":
        assert loginuid == NOBODY
    expected = None if loginuid == 4294967295 else loginuid
    assert actor["loginuid"] == expected, actor
    assert actor["login_user"] == (None if expected is None
                                   else pwd.getpwuid(expected).pw_name)
    assert actor["uid"] == 0 and actor["user"] == "root"


def test_replace_by_rename_and_new_directories(listen: Callable[..., ActorListener],
                                               actor_tree: Path) -> None:
    """`sed -i`-style replacement names the renamer; a new directory is marked as it
    appears, so a file written in it afterwards has an actor too."""
    listener = listen()
    target = actor_tree / "conf"
    script = ("import os, sys\n"
              "tmp = sys.argv[1] + '.tmp'\n"
              "open(tmp, 'w').write('beta')\n"
              "os.replace(tmp, sys.argv[1])\n"
              "os.makedirs(sys.argv[2])\n"
              "print('made', flush=True)\n"
              "sys.stdin.readline()\n"
              "open(os.path.join(sys.argv[2], 'late'), 'w').write('x')")
    new_dir = actor_tree / "new"
    with Writer(script, str(target), str(new_dir), python=True) as writer:
        assert writer.output() == "made"
        assert wait_for(listener, target)["pid"] == writer.pid
        # Filed in the same batch as the mark placed on it: a write from now on is seen.
        assert wait_for(listener, new_dir)["pid"] == writer.pid
        writer.go()
        actor = wait_for(listener, new_dir / "late")
    assert actor["pid"] == writer.pid, actor


def test_renamed_directory_is_followed(listen: Callable[..., ActorListener],
                                       actor_tree: Path) -> None:
    listener = listen()
    moved = actor_tree / "moved"
    with Writer('mv "$1" "$2"; echo x > "$2/after"', str(actor_tree / "sub"),
                str(moved)) as writer:
        actor = wait_for(listener, moved / "after")
        before = listener.actor_for(b(actor_tree / "sub" / "after"))
    assert actor["pid"] == writer.pid, actor
    assert before["unknown"].startswith("no fanotify event"), before


def test_removed_and_recreated_directory(listen: Callable[..., ActorListener],
                                         actor_tree: Path) -> None:
    """rmdir forgets the directory's mark; the new one of the same name gets its own.
    Two writers, so that the actor of "sub" tells which of the two events was filed."""
    listener = listen()
    sub = actor_tree / "sub"
    with Writer("import shutil, sys; shutil.rmtree(sys.argv[1])", str(sub),
                python=True) as remover:
        assert wait_for(listener, sub)["pid"] == remover.pid
    script = ("import os, sys\n"
              "os.mkdir(sys.argv[1])\n"
              "sys.stdin.readline()\n"
              "open(os.path.join(sys.argv[1], 'x'), 'w').write('x')")
    with Writer(script, str(sub), python=True) as maker:
        assert wait_for(listener, sub, done=lambda a: a["pid"] == maker.pid)["pid"] \
            == maker.pid
        maker.go()
        actor = wait_for(listener, sub / "x")
    assert actor["pid"] == maker.pid, actor


def test_roots_that_do_not_exist_yet(listen: Callable[..., ActorListener],
                                     actor_tree: Path, tmp_path: Path) -> None:
    """A missing root with a parent is watched through the parent, and marked when it
    appears; one without a parent is reported per root, the others still work."""
    later, nowhere = tmp_path / "later", tmp_path / "no" / "such"
    listener = listen(actor_tree, later, nowhere)
    assert listener.available and listener.mode == "fid"
    assert listener.root_reasons == {
        b(nowhere): f"'{nowhere}' and its parent do not exist"}
    assert listener.actor_for(b(nowhere / "x"))["unknown"] == \
        f"'{nowhere}' and its parent do not exist"
    with Writer('mkdir "$1"; echo made; read line; echo x > "$1/f"', str(later)) as writer:
        assert writer.output() == "made"
        # Filed (by mkdir, its own process) in the same batch as the mark placed on it.
        assert not str(wait_for(listener, later).get("unknown")).startswith("no fanotify")
        writer.go()
        actor = wait_for(listener, later / "f")
    assert actor["pid"] == writer.pid, actor


def test_non_utf8_name(listen: Callable[..., ActorListener], actor_tree: Path) -> None:
    listener = listen()
    target = b(actor_tree) + b"/caf\xe9-\xff\x01"
    script = "import sys, os; open(os.fsencode(sys.argv[1]), 'w').write('x')"
    with Writer(script, os.fsdecode(target), python=True) as writer:
        actor = wait_for(listener, target)
    assert actor["pid"] == writer.pid, actor


def test_file_root_and_its_siblings(listen: Callable[..., ActorListener],
                                    actor_tree: Path) -> None:
    """A root that is a file: its parent is marked, the parent's other entries are not
    ours."""
    listener = listen(actor_tree / "conf")
    with Writer('echo x >> "$1"; echo y > "$2"', str(actor_tree / "conf"),
                str(actor_tree / "sibling")) as writer:
        actor = wait_for(listener, actor_tree / "conf")
    assert actor["pid"] == writer.pid, actor
    assert "not in a tree" in listener.actor_for(b(actor_tree / "sibling"))["unknown"]


# -- who did not -----------------------------------------------------------------------

def test_unknown_paths_say_why(listen: Callable[..., ActorListener], actor_tree: Path) -> None:
    listener = listen(window=12.5)
    quiet = listener.actor_for(b(actor_tree / "conf"))
    assert quiet == {**dict.fromkeys(ACTOR_KEYS),
                     "unknown": "no fanotify event for this path within 12.5 s"}
    outside = listener.actor_for(b"/etc/hostname")
    assert outside["unknown"] == "'/etc/hostname' is not in a tree fanotify watches"


def test_own_writes_are_ignored(listen: Callable[..., ActorListener], actor_tree: Path) -> None:
    listener = listen()
    (actor_tree / "mine").write_text("ours\n")
    with Writer('echo x > "$1"', str(actor_tree / "theirs")) as writer:
        # Events are queued in order: once theirs is filed, ours has been read too.
        assert wait_for(listener, actor_tree / "theirs")["pid"] == writer.pid
    assert listener.actor_for(b(actor_tree / "mine"))["unknown"].startswith("no fanotify event")


def test_writer_gone_before_it_is_read(listen: Callable[..., ActorListener],
                                       actor_tree: Path) -> None:
    listener = listen()
    target = actor_tree / "fleeting"
    with frozen(listener):
        child = subprocess.Popen(["sh", "-c", 'echo x > "$1"', "sh", str(target)])
        assert child.wait() == 0  # reaped: its /proc entry is gone before the helper looks
    actor = wait_for(listener, target)
    assert actor == {**dict.fromkeys(ACTOR_KEYS),
                     "unknown": f"process {child.pid} exited before it could be read"}


def test_zombie_writer_still_gives_its_users(listen: Callable[..., ActorListener],
                                             actor_tree: Path) -> None:
    """Exited but not yet reaped: exe and cmdline are gone, its uid is not."""
    listener = listen()
    target = actor_tree / "zombie"
    script = ("import os, sys\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    open(sys.argv[1], 'w').write('x')\n"
              "    os._exit(0)\n"
              "print(pid, flush=True)\n"
              "while open(f'/proc/{pid}/stat').read().split(') ')[1][0] != 'Z':\n"
              "    pass\n"
              "print('zombie', flush=True)\n"
              "sys.stdin.readline()\n"
              "os.waitpid(pid, 0)")
    with frozen(listener):
        writer = Writer(script, str(target), python=True)
        zombie = int(writer.output())
        assert writer.output() == "zombie"
    with writer:
        actor = wait_for(listener, target)
    assert actor["pid"] == zombie and actor["uid"] == 0 and actor["user"] == "root"
    assert actor["exe"] is None and actor["cmdline"] is None
    assert actor["ancestors"][0]["pid"] == writer.pid  # not reaped: its parent is known
    assert actor["unknown"] == (f"process {zombie} exited before its exe and command "
                                "line could be read")


@contextlib.contextmanager
def fanotify_queue(limit: int) -> Iterator[None]:
    """Lower fs.fanotify.max_queued_events (read at fanotify_init); always restore it."""
    sysctl = FANOTIFY_SYSCTL / "max_queued_events"
    old = sysctl.read_text()
    sysctl.write_text(str(limit))
    try:
        yield
    finally:
        sysctl.write_text(old)


def test_queue_overflow_makes_actors_unknown(listen: Callable[..., ActorListener],
                                             actor_tree: Path) -> None:
    with fanotify_queue(32):
        listener = listen()
    with Writer('echo x > "$1"', str(actor_tree / "early")) as writer:
        assert wait_for(listener, actor_tree / "early")["pid"] == writer.pid
    with frozen(listener):
        subprocess.run(["sh", "-c", 'for i in $(seq 200); do echo $i > "$1/f$i"; done',
                        "sh", str(actor_tree / "sub")], check=True)
    actor = wait_for(listener, actor_tree / "early",
                     done=lambda a: "overflow" in str(a.get("unknown")))
    assert actor["unknown"] == ("fanotify queue overflowed: the writers of that moment "
                                "were lost")
    # Events after the overflow are filed as usual.
    with Writer('echo x > "$1"', str(actor_tree / "later")) as writer:
        later = wait_for(listener, actor_tree / "later", done=lambda a: a["pid"] is not None)
        assert later["pid"] == writer.pid, later


def test_classic_mode_says_what_it_cannot_see(listen: Callable[..., ActorListener],
                                              actor_tree: Path) -> None:
    listener = listen(fid=False)
    assert listener.available and listener.mode == "classic"
    why = listener.root_reasons[b(actor_tree)]
    assert "attribute changes" in why and listener.reason and why in listener.reason
    with Writer('echo x > "$1"', str(actor_tree / "sub" / "w")) as writer:
        assert wait_for(listener, actor_tree / "sub" / "w")["pid"] == writer.pid
    with Writer("import os, sys; os.chmod(sys.argv[1], 0o640)", str(actor_tree / "conf"),
                python=True):
        quiet = listener.actor_for(b(actor_tree / "conf"))
    assert quiet["unknown"].startswith("no fanotify event for this path within 30 s (")
    assert "attribute changes" in quiet["unknown"]


def test_filesystem_without_decodable_handles(listen: Callable[..., ActorListener],
                                              tmp_path: Path) -> None:
    """ramfs cannot encode NFS file handles; FID inode marks still work there
    (AT_HANDLE_FID), so it is not pushed to classic mode."""
    mnt = tmp_path / "ram"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "none", str(mnt)], check=True)
    try:
        (mnt / "d").mkdir()
        listener = listen(mnt)
        assert listener.mode == "fid" and not listener.root_reasons
        with Writer('chmod 700 "$1"; echo x > "$1/f"', str(mnt / "d")) as writer:
            actor = wait_for(listener, mnt / "d" / "f")
        assert actor["pid"] == writer.pid, actor
        listener.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- life cycle ------------------------------------------------------------------------

def test_close_leaves_nothing_behind(actor_tree: Path) -> None:
    before = open_fds()
    threads = set(threading.enumerate())
    listener = ActorListener([b(actor_tree)])
    listener.start()
    helper = listener.helper_pid
    assert helper is not None and os.path.exists(f"/proc/{helper}")
    assert len(open_fds()) > len(before)
    listener.close()
    listener.close()
    assert open_fds() == before
    assert set(threading.enumerate()) == threads
    assert not os.path.exists(f"/proc/{helper}")
    assert listener.actor_for(b(actor_tree / "conf"))["unknown"] == "fanotify listener stopped"


def test_helper_stops_quietly_when_the_daemon_is_killed(actor_tree: Path) -> None:
    """kill -9 of the daemon: its helper sees stdin close (and its stdout pipe break,
    with a change still to report) and exits without a traceback in the daemon's log."""
    code = ("import os, sys\n"
            "from integrity.realtime.actor import ActorListener\n"
            "listener = ActorListener([os.fsencode(sys.argv[1])])\n"
            "listener.start()\n"
            "print(listener.helper_pid, flush=True)\n"
            "sys.stdin.readline()\n")
    daemon = subprocess.Popen([sys.executable, "-c", code, str(actor_tree)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert daemon.stdin and daemon.stdout and daemon.stderr
    helper = int(daemon.stdout.readline())
    os.kill(helper, signal.SIGSTOP)
    try:
        daemon.kill()
        daemon.wait()
        subprocess.run(["sh", "-c", 'echo x > "$1"', "sh", str(actor_tree / "orphan")],
                       check=True)
    finally:
        os.kill(helper, signal.SIGCONT)
    log = daemon.stderr.read()  # EOF: the helper, which shares it, has exited too
    daemon.stdin.close()
    daemon.stdout.close()
    daemon.stderr.close()
    assert "Traceback" not in log, log


def test_unprivileged_listener_says_why(world_dir: Path) -> None:
    """As nobody, under Debian's python (no project dependencies), nothing is marked."""
    setpriv = shutil.which("setpriv")
    python = "/usr/bin/python3"
    if not setpriv or not os.access(python, os.X_OK):
        pytest.skip("needs setpriv and /usr/bin/python3")
    site = world_dir / "site" / "integrity"
    (site / "realtime").mkdir(parents=True)
    for name in ("__init__.py", "paths.py", "realtime/__init__.py", "realtime/actor.py",
                 "realtime/child.py", "realtime/fanotify.py", "realtime/helper.py",
                 "realtime/marks.py", "realtime/mounts.py", "realtime/processes.py",
                 "realtime/procfs.py"):
        shutil.copy(REPO / "integrity" / name, site / name)
    for path in [world_dir / "site", *(world_dir / "site").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    code = ("import json\n"
            "from integrity.realtime.actor import ActorListener\n"
            "listener = ActorListener([b'/tmp'])\n"
            "listener.start()\n"
            "print(json.dumps([listener.available, listener.reason, listener.helper_pid,\n"
            "                  listener.actor_for(b'/tmp/x')]))\n"
            "listener.close()\n")
    done = subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python,
         "-c", code], capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(world_dir / "site"),
             "PYTHONDONTWRITEBYTECODE": "1"}, cwd=str(world_dir))
    assert done.returncode == 0, done.stderr
    available, reason, helper, actor = json.loads(done.stdout)
    assert available is False and helper is None
    assert reason.startswith("fanotify unavailable: not running as root")
    assert actor == {**dict.fromkeys(ACTOR_KEYS), "unknown": reason}


def test_helper_starts_from_any_directory(listen: Callable[..., ActorListener],
                                          actor_tree: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper (python -E -s -S) finds our package by its own path, not the working
    directory: systemd starts the daemon in /, far from the source tree."""
    monkeypatch.chdir(tmp_path)
    listener = listen()
    assert listener.available, listener.reason
    with Writer('echo x > "$1"', str(actor_tree / "conf")) as writer:
        assert wait_for(listener, actor_tree / "conf")["pid"] == writer.pid


def test_start_twice_and_close_unstarted(actor_tree: Path) -> None:
    idle = ActorListener([b(actor_tree)])
    idle.close()
    assert idle.actor_for(b(actor_tree / "conf"))["unknown"] == "fanotify listener not started"
    listener = ActorListener([b(actor_tree)])
    listener.start()
    helper = listener.helper_pid
    listener.start()
    assert listener.helper_pid == helper
    listener.close()
