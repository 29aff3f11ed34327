"""Shared fixtures and helpers: isolated state, real trees under tmp_path, a CLI runner.

Test modules import the helpers as `from conftest import ...` (and the package builders
as `from debs import ...`): pytest puts tests/ on sys.path for its rootdir conftest, and
this spelling keeps one module object, so there is one copy of each helper.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from click.testing import CliRunner, Result

import integrity.policy
import integrity.store.engine
from integrity.cli import cli

REPO = Path(__file__).resolve().parent.parent


# -- no test touches the host's integrity state (STYLE 9) ---------------------------------

#: Root's defaults (SPEC): the database under /var/lib/integrity, the policy (and
#: anything beside it) under /etc/integrity.
HOST_STATE = ("/var/lib/integrity", "/etc/integrity")
#: The product's own defaults, kept before clean_env points them into tmp_path.
HOST_DEFAULT_URL = integrity.store.engine.default_url
HOST_POLICY = integrity.policy.SYSTEM_POLICY


class HostStateTouched(PermissionError):
    """Raised into the code that reached for the host's integrity state."""


class HostGuard:
    """An audit hook (PEP 578) that refuses, and remembers, any access of this process
    to HOST_STATE while a test runs.

    Refusing stops a host write; remembering fails the test even when the code under
    test catches the refusal (as the CLI's error boundary would). Audit hooks cannot
    be removed, so the hook stays installed and `armed` says whether a test is running.
    """

    #: Audit events whose first argument is a path, and sqlite3's connect.
    EVENTS = frozenset({"open", "os.mkdir", "os.listdir", "os.scandir", "os.remove",
                        "os.rmdir", "os.rename", "os.link", "os.symlink", "os.chmod",
                        "os.chown", "os.utime", "os.truncate", "os.chdir", "os.chroot",
                        "shutil.rmtree", "shutil.copyfile", "sqlite3.connect"})

    def __init__(self) -> None:
        self.armed = False
        self.touched: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or event not in self.EVENTS or not args:
            return
        path = args[0]
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return  # a file descriptor
        if path.startswith("file:"):  # an SQLite URI
            path = path[5:].split("?", 1)[0]
        if not path.startswith("/"):
            return  # relative: the way into a guarded tree was absolute, and caught
        path = os.path.normpath(path)
        if any(path == top or path.startswith(top + "/") for top in HOST_STATE):
            self.touched.append(f"{event} {path}")
            raise HostStateTouched(f"test touched the host's integrity state: {event} {path}")


HOST_GUARD = HostGuard()
sys.addaudithook(HOST_GUARD)


@pytest.fixture
def host_guard() -> HostGuard:
    """The guard itself, for the test that checks it."""
    return HOST_GUARD


#: Held shared by every test and exclusively by one marked `inotify_limits`: the
#: inotify limits in /proc/sys/fs/inotify are the machine's, so a test that lowers one
#: (or counts every process's watches to leave room for two) would fail the other
#: xdist worker's watchers, and be failed by them, if they ran meanwhile.
INOTIFY_LIMITS_LOCK = Path("/tmp/integrity-tests-inotify-limits.lock")


@pytest.fixture(autouse=True)
def inotify_limits(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run an `inotify_limits` test while no other test runs, anywhere on the machine."""
    import fcntl

    alone = request.node.get_closest_marker("inotify_limits") is not None
    with open(INOTIFY_LIMITS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        yield


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test reads or writes the host's policy, database or home (borg's clean_env).

    The defaults a command falls back to without --db/--policy point into tmp_path
    (the database of `default_url`, the system policy `default_policy_path` prefers),
    and the guard fails a test whose process reaches for HOST_STATE. Child processes
    are not audited: a test whose children create HOST_STATE fails afterwards.
    """
    for key in list(os.environ):
        if key.startswith("INTEGRITY_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    default_db = tmp_path / "var-lib-integrity" / "integrity.db"
    monkeypatch.setattr(integrity.store.engine, "default_url",
                        lambda: f"sqlite:///{default_db}")
    monkeypatch.setattr(integrity.policy, "SYSTEM_POLICY",
                        str(tmp_path / "etc-integrity" / "policy.toml"))
    existed = {top: os.path.lexists(top) for top in HOST_STATE}
    HOST_GUARD.armed = True
    try:
        yield
    finally:
        HOST_GUARD.armed = False
    touched, HOST_GUARD.touched = HOST_GUARD.touched, []
    if touched:
        pytest.fail("test touched the host's integrity state: " + "; ".join(touched))
    created = [top for top in HOST_STATE if os.path.lexists(top) and not existed[top]]
    if created:
        pytest.fail(f"test created the host's integrity state: {', '.join(created)}")


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
def config_run(tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> Cli:
    """A CLI with a baseline of `tree` under the `config` preset (no inode, no times:
    writing the old bytes back is a revert), in a database of its own."""
    policy = write_policy({"path": str(tree), "check": "config", "severity": "critical"},
                          name="config.toml")
    config = Cli(tmp_path / "state" / "config.db", policy)
    assert config("init").exit_code == 0
    return config


def one_line(text: str) -> str:
    """The single line a fatal error must be, failing the test if there are more."""
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert "Traceback" not in text
    return lines[0]


def ro(db: Path) -> sqlite3.Connection:
    """A read-only connection that never creates or changes the file."""
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The rows of one query, read from outside the product."""
    conn = ro(db)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


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

#: apt's copy method: a trusted package tool anyone may run, which copies what it is told.
APT_COPY = "/usr/lib/apt/methods/copy"


@contextlib.contextmanager
def apt_copy(source: Path, target: Path, prefix: list[str] | None = None
             ) -> Iterator[subprocess.Popen[bytes]]:
    """apt's copy method, run under `prefix` (setpriv as another user, or as we are),
    asked to copy `source` to `target`. It waits for more work while the block runs,
    alive for whoever asks who it is, and ends when the block does."""
    copy = subprocess.Popen([*(prefix or []), APT_COPY], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    assert copy.stdin is not None
    try:
        copy.stdin.write(f"600 URI Acquire\nURI: copy:{source}\nFilename: {target}"
                         "\n\n".encode())
        copy.stdin.flush()
        yield copy
    finally:
        copy.communicate(timeout=10)


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


@contextlib.contextmanager
def database_at(path: Path, revision: str) -> Iterator[Any]:
    """A database file migrated only up to `revision` (an older schema), open in one
    transaction (a SQLAlchemy connection) for the test to fill as that code would."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    path.parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", integrity.store.engine.migrations_dir())
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            yield conn
    finally:
        engine.dispose()


def child_pids(parent: int | None = None) -> set[int]:
    """Processes (zombies included) whose parent is `parent` (default: this one)."""
    me, found = os.getpid() if parent is None else parent, set()
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


# -- a real SMTP server on loopback (e-mail alerts) ----------------------------------------

class Smtp(Controller):
    """aiosmtpd on 127.0.0.1, on a port the kernel picked (bound before start)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        super().__init__(handler, hostname="127.0.0.1",
                         port=self.listener.getsockname()[1], **kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self.listener,
                                       ssl=self.ssl_context)


class Inbox:
    """Keeps what the SMTP server accepted, with how the session got there."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.logins: list[tuple[str, bytes, bool]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                              "content": envelope.content, "starttls": session.ssl is not None,
                              "authenticated": session.authenticated})
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and \
            (auth_data.login, auth_data.password) == (b"fim", b"hunter2")
        self.logins.append((mechanism, auth_data.login, ok))
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    servers: list[Smtp] = []

    def start(inbox: Inbox, **kwargs: Any) -> Smtp:
        server = Smtp(inbox, **kwargs)
        server.start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


# -- fleet: a private PostgreSQL cluster for the session ---------------------------------

_DATABASES = iter(range(1, 10**6))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """Debian's PostgreSQL, initdb'd and started as `postgres` in a temporary directory
    on a free loopback port (tests/pgcluster.py); removed at the end of the session."""
    from pgcluster import Cluster

    from fleethosts import Central

    cluster = Cluster()
    try:
        cluster.start()
        # `fleet init` once, into a template each test's database is copied from.
        Central(cluster, "fleet_template", Path(cluster.base))
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def central(pg_cluster: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh central database (fleet init done) for one test; dropped after it, with
    the host roles enrolled in it."""
    from fleethosts import Central

    database = Central(pg_cluster, f"fleet_{next(_DATABASES)}", tmp_path,
                       template="fleet_template")
    yield database
    if not pg_cluster.running:  # a test that stopped the server
        pg_cluster.start()
    database.drop()
