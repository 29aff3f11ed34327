"""Shared fixtures: isolated state, real trees under tmp_path, a CLI runner."""

from __future__ import annotations

import json
import os
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from integrity.cli import cli


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the host's policy, database or home (borg's clean_env)."""
    for key in list(os.environ):
        if key.startswith("INTEGRITY_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small protected tree: files, a subdirectory, a symlink."""
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.conf").write_text("alpha\n")
    (root / "b.bin").write_bytes(os.urandom(3000))
    (root / "sub" / "c.txt").write_text("gamma\n")
    (root / "big.dat").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    os.symlink("a.conf", root / "link")
    return root


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[..., Path]:
    """Write a policy file; rules are dicts rendered as [[rule]] tables."""
    def write(*rules: dict[str, Any], extra: str = "", name: str = "policy.toml") -> Path:
        lines = []
        for rule in rules:
            lines.append("[[rule]]")
            for key, value in rule.items():
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        path = tmp_path / name
        path.write_text("\n".join(lines) + textwrap.dedent(extra))
        return path
    return write


class Cli:
    """Runs the real click CLI against one database and policy."""

    def __init__(self, db: Path, policy: Path) -> None:
        self.db = db
        self.policy = policy

    def __call__(self, *args: str, policy: Path | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(
            cli, ["--db", f"sqlite:///{self.db}", "--policy", str(policy or self.policy),
                  "-q", *args], catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        return json.loads(result.stdout)


@pytest.fixture
def run(tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> Cli:
    """CLI bound to a temp database and a policy protecting `tree` (check=static)."""
    policy = write_policy({"path": str(tree), "check": "static", "severity": "high"})
    return Cli(tmp_path / "state" / "integrity.db", policy)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory under /tmp that an unprivileged user can traverse."""
    import shutil
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="integrity-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- shared by the tests of long-running parts (watcher, service, actor, crash) -----------

def wait_until(predicate: Callable[[], Any], what: str, timeout: float,
               interval: float = 0.02) -> Any:
    """Poll until predicate() is true; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def child_pids() -> set[int]:
    """Processes (zombies included) whose parent is this one."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.add(int(entry))
    return found


def inotify_fds() -> set[int]:
    """This process's open inotify descriptors."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                found.add(int(fd))
        except OSError:
            continue  # the descriptor listing the directory, closed by now
    return found


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """No thread, child process or inotify instance outlives its test (STYLE.md 9);
    modules with long-running parts use it for every test."""
    threads, children, fds = set(threading.enumerate()), child_pids(), inotify_fds()
    yield
    leaked = [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"
    assert child_pids() <= children, "child processes left behind"
    assert inotify_fds() <= fds, "inotify descriptors left open"


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records POST bodies; `status` is what it
    answers (503 while "down")."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.attempts = 0
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.status == 200:
                    receiver.bodies.append(json.loads(body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()
