"""A fleet on this machine for tests: a central database in the private cluster, and
hosts, each with its own tree, local SQLite database, policy and login role.

Everything goes through the real CLI (click's runner, or a child process where a
signal or a kill is the point) and real SQL; the admin side connects as the cluster's
superuser, a host as its own enrolled role with its password file.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
from click.testing import CliRunner, Result

from conftest import Cli
from integrity.cli import cli
from integrity.store.central import Central as CentralDatabase
from pgcluster import Cluster

REPO = Path(__file__).resolve().parent.parent


class Central:
    """One central database (fleet init done) in the test cluster."""

    def __init__(self, cluster: Cluster, name: str, tmp: Path,
                 template: str | None = None) -> None:
        self.cluster = cluster
        self.name = name
        self.tmp = tmp
        self.url = cluster.url(name)
        if template is not None:  # a copy of a database `fleet init` set up
            cluster.psql(f"CREATE DATABASE {name} TEMPLATE {template}")
            return
        cluster.psql(f"CREATE DATABASE {name}")
        database = CentralDatabase(self.url)
        try:
            database.admin.init()
        finally:
            database.close()

    def fleet(self, *args: str, **kwargs: Any) -> Result:
        """`integrity [global options] fleet ARGS --url URL` (click's runner)."""
        extra = list(kwargs.pop("before", []))
        return CliRunner().invoke(cli, [*extra, "fleet", *args, "--url", self.url],
                                  catch_exceptions=False, **kwargs)

    def status(self) -> tuple[int, dict[str, Any]]:
        result = self.fleet("status", "--json")
        return result.exit_code, json.loads(result.stdout)

    def host_status(self, host: str) -> dict[str, Any]:
        return next(h for h in self.status()[1]["hosts"] if h["host"] == host)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Plain SQL as the admin (the cluster's superuser)."""
        with psycopg.connect(self.conninfo()) as conn:
            cursor = conn.execute(query, params or None)
            return cursor.fetchall() if cursor.description else []

    def conninfo(self, user: str = "postgres", password: str | None = None) -> str:
        secret = self.cluster.password if user == "postgres" else password
        return (f"host=127.0.0.1 port={self.cluster.port} dbname={self.name} "
                f"user={user} password={secret}")

    def enroll(self, host: str, group: str | None = None) -> Path:
        """Enrol through the CLI; the password file it writes."""
        path = self.tmp / f"{host}.pass"
        args = ["enroll", host, "--password-file", str(path)]
        if group:
            args += ["--group", group]
        result = self.fleet(*args)
        assert result.exit_code == 0, result.output
        return path

    def dump(self) -> str:
        """Every row of the database as pg_dump writes it (bytea as hex), as the admin."""
        result = subprocess.run(
            [str(self.cluster.bin / "pg_dump"), "--data-only", "-h",
             str(self.cluster.sockets), "-p", str(self.cluster.port), "-U", "postgres",
             "-d", self.name], capture_output=True, text=True, check=True)
        return result.stdout

    def drop(self) -> None:
        """Remove the database and the host roles enrolled in it."""
        hosts = [r[0] for r in self.sql("SELECT name FROM integrity.host")]
        self.cluster.psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        for host in hosts:
            self.cluster.psql(f'DROP ROLE IF EXISTS "{host}"')


class Host:
    """A host: a tree under tmp, its policy with [fleet], its own local database."""

    def __init__(self, central: Central, tmp: Path, name: str, *, group: str = "web",
                 files: dict[str, str] | None = None, interval: str = "60s",
                 url: str | None = None, alert: Path | None = None,
                 tree: Path | None = None) -> None:
        self.central = central
        self.name = name
        self.group = group
        self.base = tmp / name
        self.base.mkdir(parents=True)
        self.tree = tree or self.base / "tree"
        if tree is None:
            for rel, text in (files or {"etc/app.conf": "listen 80\n", "etc/motd": "hi\n",
                                        "bin/tool": "#!/bin/sh\necho tool\n"}).items():
                path = self.tree / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        self.db = self.base / "state" / "integrity.db"
        self.policy = self.base / "policy.toml"
        self.password_file = central.enroll(name, None) if url is None else None
        self.url = url or (f"postgresql://{name}@127.0.0.1:{central.cluster.port}/"
                           f"{central.name}")
        self.interval = interval
        self.alert = alert
        self.write_policy()
        self.cli = Cli(self.db, self.policy)

    def write_policy(self, extra: str = "") -> None:
        fleet = [f"url = {json.dumps(self.url)}", f"group = {json.dumps(self.group)}",
                 f"interval = {json.dumps(self.interval)}"]
        if self.password_file is not None:
            fleet.append(f"password_file = {json.dumps(str(self.password_file))}")
        alert = ""
        if self.alert is not None:
            alert = f'[[alert]]\ntype = "jsonl"\npath = {json.dumps(str(self.alert))}\n'
        self.policy.write_text(textwrap.dedent(f"""\
            [[rule]]
            path = {json.dumps(str(self.tree))}
            check = "config"
            severity = "high"

            [[rule]]
            path = {json.dumps(str(self.tree / "bin"))}
            check = "static"
            severity = "critical"

            [fleet]
            """) + "\n".join(fleet) + "\n" + alert + extra)

    def run(self, *args: str) -> Result:
        return self.cli(*args)

    def push(self, *args: str) -> Result:
        result = self.cli("fleet", "push", *args)
        return result

    def push_ok(self) -> Result:
        result = self.push()
        assert result.exit_code == 0, result.output
        return result

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """`python3 -m integrity ... ARGS` as a child process."""
        return subprocess.Popen(
            [sys.executable, "-m", "integrity", "--db", f"sqlite:///{self.db}", "--policy",
             str(self.policy), "-q", *args], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def local(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(query, params).fetchall()

    def ledger(self) -> list[tuple[Any, ...]]:
        """The local chain, (kind, ref, prev, digest) in order."""
        return self.local("SELECT kind, ref, prev, digest FROM ledger ORDER BY seq")

    def central_ledger(self) -> list[tuple[Any, ...]]:
        return self.central.sql(
            "SELECT l.kind, l.ref, l.prev, l.digest FROM integrity.ledger l "
            "JOIN integrity.host h ON h.id = l.host_id WHERE h.name = %s "
            "ORDER BY l.epoch, l.seq", self.name)

    def central_events(self) -> list[tuple[Any, ...]]:
        return self.central.sql(
            "SELECT e.id, e.kind, e.status FROM integrity.event e JOIN integrity.host h "
            "ON h.id = e.host_id WHERE h.name = %s ORDER BY e.id", self.name)

    def local_events(self) -> list[tuple[Any, ...]]:
        return self.local("SELECT id, kind, status FROM event ORDER BY id")

    def root(self) -> str:
        return str(self.local("SELECT root FROM baseline WHERE state = 'active'")[0][0])

    def snapshot(self, target: Path) -> None:
        """A consistent copy of the local database (what a backup would hold)."""
        with sqlite3.connect(self.db) as source, sqlite3.connect(target) as copy:
            source.backup(copy)

    def restore(self, copy: Path) -> None:
        """Put an old copy back in place of the local database (a root's rollback)."""
        for suffix in ("-wal", "-shm"):
            Path(str(self.db) + suffix).unlink(missing_ok=True)
        shutil.copyfile(copy, self.db)

    def change(self, rel: str, text: str) -> Path:
        path = self.tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def make_hosts(central: Central, tmp_path: Path, names: list[str], **kwargs: Any
               ) -> list[Host]:
    """Hosts that have each made their baseline and pushed it once."""
    hosts = [Host(central, tmp_path, name, **kwargs) for name in names]
    for host in hosts:
        assert host.run("init").exit_code == 0
        host.push_ok()
    return hosts


def reseal(host: Host, next_generation: bool) -> None:
    """What an attacker with the code does after editing an entry: a matching seal
    (under the same generation, or as the next one), so the host alone is fooled."""
    import dataclasses

    from integrity.ops.seal import root_statement, verify_seal
    from integrity.store import Store
    from integrity.trust import root_of

    store = Store(f"sqlite:///{host.db}")
    try:
        info = store.baselines.require()
        if next_generation:
            info = dataclasses.replace(info, generation=info.generation + 1)
        root = root_statement(info, root_of(store.baselines.entries(info.id)))
        host.local("UPDATE baseline SET root = ?, generation = ? WHERE state = 'active'",
                   root, info.generation)
        verify_seal(store.baselines.require(), store.baselines.entries(info.id))
    finally:
        store.close()


def edit_entry(host: Host) -> None:
    """A backdoor written into bin/tool, and its entry edited to match it."""
    from integrity.scan.hasher import digest_path  # what the entry would now say

    tool = host.change("bin/tool", "#!/bin/sh\nbackdoor\n")
    key = str(tool).replace("/", "\0").encode()
    digest = digest_path(bytes(tool))["blake3"]
    host.local("UPDATE entry SET content = ?, size = ? WHERE key = ?", digest,
               tool.stat().st_size, key)


def edit_and_reseal(host: Host, next_generation: bool) -> None:
    """An edited entry, sealed again with integrity's own code."""
    edit_entry(host)
    reseal(host, next_generation)


def flags(central: Central, host: str) -> list[tuple[str, str]]:
    """(kind, detail) of a host's open flags."""
    return [(k, d) for k, d in central.sql(
        "SELECT f.kind, f.detail FROM integrity.flag f JOIN integrity.host h "
        "ON h.id = f.host_id WHERE h.name = %s AND f.resolved IS NULL ORDER BY f.id", host)]


def rejected(central: Central, host: str) -> int:
    return int(central.sql(
        "SELECT count(*) FROM integrity.ledger_rejected r JOIN integrity.host h "
        "ON h.id = r.host_id WHERE h.name = %s", host)[0][0])

