"""A private PostgreSQL cluster for tests and benchmarks: Debian's server binaries,
`initdb` and `pg_ctl` run as the `postgres` OS user in a temporary directory, listening
on a free loopback port only. Nothing of the machine's own clusters is touched.

`scripts/test` installs Debian's `postgresql` package when the binaries are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"


def server_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin directory, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One initdb'd cluster: start, stop, and URLs for its superuser."""

    def __init__(self, base: Path | None = None, *, settings: dict[str, str] | None = None
                 ) -> None:
        binaries = server_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries not found under "
                               "/usr/lib/postgresql (apt-get install postgresql)")
        self.bin = binaries
        self.owner = pwd.getpwnam("postgres")
        self.base = Path(tempfile.mkdtemp(prefix="integrity-pg-", dir=base or "/tmp"))
        os.chmod(self.base, 0o755)
        self.data = self.base / "data"
        self.sockets = self.base / "run"
        self.sockets.mkdir()
        os.chown(self.base, self.owner.pw_uid, self.owner.pw_gid)
        os.chown(self.sockets, self.owner.pw_uid, self.owner.pw_gid)
        self.password = secrets.token_hex(16)
        self.port = free_port()
        self.log = self.base / "server.log"
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, self.owner.pw_uid, self.owner.pw_gid)
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                           "--auth-local=trust", "--auth-host=scram-sha-256",
                           f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8",
                           "--no-sync"])
        pwfile.unlink()
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.sockets}'", "fsync": "off",
                "synchronous_commit": "off", "full_page_writes": "off",
                "logging_collector": "off", **(settings or {})}
        with open(self.data / "postgresql.conf", "a") as handle:
            handle.write("".join(f"{key} = {value}\n" for key, value in conf.items()))
        self.running = False

    def _as_postgres(self, argv: list[str]) -> None:
        result = subprocess.run(
            ["setpriv", f"--reuid={self.owner.pw_uid}", f"--regid={self.owner.pw_gid}",
             "--init-groups", *argv], capture_output=True, text=True, cwd=self.base)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                           str(self.log), "-w", "-t", "60", "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: open sessions are disconnected)."""
        if self.running:
            self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode,
                               "-w", "-t", "60", "stop"])
            self.running = False

    def url(self, database: str = "postgres", user: str = SUPERUSER,
            password: str | None = None) -> str:
        """A SQLAlchemy URL for a user (the superuser's password by default)."""
        secret = self.password if password is None and user == SUPERUSER else password
        auth = f"{user}:{secret}" if secret else user
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser through the socket; return psql's output."""
        result = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
             str(self.sockets), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
             "-c", sql], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout

    def destroy(self) -> None:
        """Stop (immediately) and remove everything."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
