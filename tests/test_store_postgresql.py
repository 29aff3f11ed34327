"""A host's own store on PostgreSQL (`--db postgresql://...`, SPEC: any SQLAlchemy
URL): concurrent writers must be as safe as on SQLite, where BEGIN IMMEDIATE makes
every write transaction the only one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from integrity.cli import cli as cli_main
from integrity.store import Store
from integrity.store import engine
from integrity.store.engine import as_database_error

_NAMES = iter(range(1, 10**6))


@pytest.fixture
def pg_store_url(pg_cluster: Any) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for a local store; dropped afterwards."""
    name = f"local_{next(_NAMES)}"
    pg_cluster.psql(f"CREATE DATABASE {name}")
    yield pg_cluster.url(name)
    if not pg_cluster.running:
        pg_cluster.start()
    pg_cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_concurrent_writers_keep_one_chain(pg_store_url: str) -> None:
    # Two processes' worth of writers (the watcher and a CLI run each have their own
    # engine) record events at once. Each write journals into the hash chain; on
    # PostgreSQL nothing serialised them, so two read the same head and the chain
    # forked: the check then reported tampering that never happened.
    Store(pg_store_url).close()  # creates the schema once
    stores = [Store(pg_store_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def write(index: int, store: Store) -> None:
        try:
            start.wait()
            for n in range(40):
                store.events.warn(f"/srv/w{index}/f{n}".encode(), "seen",
                                  source="scan", severity="low")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i, s)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        report = stores[0].ledger.check(limit=5)
        assert report.problems == []
        assert report.rows >= 4 * 40
        assert len(stores[0].events.list(open_only=True)) == 4 * 40
    finally:
        for store in stores:
            store.close()


def test_a_write_waits_for_the_writer_before_it_and_gives_up_after_its_patience(
        pg_store_url: str) -> None:
    Store(pg_store_url).close()
    holder, other = Store(pg_store_url), Store(pg_store_url, busy_timeout=60)
    try:
        with holder.writer() as conn, conn.begin():
            conn.execute(sa.text("SELECT 1"))
            # The watcher's heartbeat waits one interval at most, then is skipped
            # (with one line), instead of holding up the main loop.
            started = time.monotonic()
            with pytest.raises(sa.exc.OperationalError) as raised:
                other.runs.heartbeat(None, interval=5, state="running", watches=0,
                                     unwatched=None, patience=0.5)
            assert time.monotonic() - started < 30
            error = as_database_error(raised.value)
            assert error is not None and "lock timeout" in str(error)
            assert "\n" not in str(error)
        # Once the first writer is done, the next write goes through at once.
        assert other.runs.heartbeat(None, interval=5, state="running", watches=0,
                                    unwatched=None, patience=0.5) > 0
        assert other.ledger.check().problems == []
    finally:
        holder.close()
        other.close()


def test_a_read_transaction_is_one_state(pg_store_url: str) -> None:
    # A verify reads the baseline row, then its entries, in one read transaction, so
    # that an approval committing in between cannot make the seal check compare one
    # baseline's root with another's rows. PostgreSQL's READ COMMITTED took a new
    # snapshot per statement.
    Store(pg_store_url).close()
    reader, writer = Store(pg_store_url), Store(pg_store_url)
    try:
        writer.events.warn(b"/srv/before", "seen", source="scan", severity="low")
        with reader.reader() as conn, conn.begin():
            count = sa.text("SELECT count(*) FROM event")
            before = conn.execute(count).scalar_one()
            writer.events.warn(b"/srv/meanwhile", "seen", source="scan", severity="low")
            assert conn.execute(count).scalar_one() == before == 1
        with reader.reader() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM event")).scalar_one() == 2
    finally:
        reader.close()
        writer.close()


def test_init_verify_approve_and_status_on_postgresql(
        pg_store_url: str, tree: Path, tmp_path: Path, write_policy: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # `config` keeps texts, whose redaction key lives in the host's state directory
    # (no file beside a PostgreSQL database), created if missing: here one of the
    # test's own, not the host's /var/lib/integrity.
    policy = write_policy({"path": str(tree), "check": "config", "severity": "high"})
    state = tmp_path / "state-dir"
    monkeypatch.setattr(engine, "default_url",
                        lambda: f"sqlite:///{state}/integrity.db")

    def cli(*args: str) -> Any:
        return CliRunner().invoke(cli_main, ["--db", pg_store_url, "--policy", str(policy),
                                             "-q", *args], catch_exceptions=False)

    assert cli("init").exit_code == 0
    assert (state / "redact-key").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert cli("verify").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    changed = cli("verify")
    assert changed.exit_code == 1 and "a.conf" in changed.stdout
    diff = cli("diff", str(tree / "a.conf"))
    assert "-alpha" in diff.stdout and "+changed" in diff.stdout
    assert cli("approve", str(tree / "a.conf"), "--reason", "ticket 1").exit_code == 0
    assert cli("verify").exit_code == 0
    status = cli("status")
    assert status.exit_code == 0, status.stdout
    assert "tamper" not in status.stdout.lower()


def test_processes_creating_the_schema_at_once_all_get_it(pg_store_url: str) -> None:
    # The first use of a fresh database (the watcher's start beside a timer's verify,
    # or the apt hook): every process finds no schema and migrates. The migration
    # wrote without the write lock, so all but one failed ("duplicate key value" in
    # the catalog); on SQLite the one writer at a time made the others wait.
    import subprocess
    import sys

    code = ("import sys; from integrity.store import Store; "
            "Store(sys.argv[1]).close(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_store_url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read())  # type: ignore[union-attr]
               for p in procs]
    assert [(code, out) for code, out, _ in results] == [(0, "ok\n")] * 6, results
    store = Store(pg_store_url)
    try:
        assert store.revision() == engine.HEAD
    finally:
        store.close()


def test_a_server_idle_in_transaction_timeout_does_not_cut_our_transactions(
        pg_cluster: Any, pg_store_url: str, tree: Path, write_policy: Any) -> None:
    # Our transactions wait between statements while files are hashed: init's one
    # write transaction between batches, verify's read transaction between fetches
    # of the baseline. A server (or database) idle_in_transaction_session_timeout,
    # which managed PostgreSQL services often set, killed them mid-way.
    database = pg_store_url.rsplit("/", 1)[1]
    pg_cluster.psql(f"ALTER DATABASE {database} SET idle_in_transaction_session_timeout "
                    "= '500ms'")
    Store(pg_store_url).close()
    store = Store(pg_store_url)
    try:
        with store.writer() as conn, conn.begin():
            conn.execute(sa.text("SELECT 1"))
            time.sleep(1.5)  # three times the server's limit, idle in the transaction
            conn.execute(sa.text("SELECT 1"))
        with store.reader() as conn, conn.begin():
            conn.execute(sa.text("SELECT 1"))
            time.sleep(1.5)
            conn.execute(sa.text("SELECT 1"))
    finally:
        store.close()
    # Through the CLI: an init paced to 1 MiB/s over 3 MiB in one file keeps its
    # write transaction open for seconds with nothing to write meanwhile.
    (tree / "big.bin").write_bytes(b"\0" * (3 << 20))
    policy = write_policy({"path": str(tree), "check": "static", "severity": "high"},
                          extra='[scan]\nmax_read_rate = "1MiB/s"\n')
    result = CliRunner().invoke(cli_main, ["--db", pg_store_url, "--policy", str(policy),
                                           "-q", "init"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    verified = CliRunner().invoke(cli_main, ["--db", pg_store_url, "--policy", str(policy),
                                             "-q", "verify"], catch_exceptions=False)
    assert verified.exit_code == 0, verified.output


def test_a_connection_the_server_closed_is_replaced_not_a_failed_write(
        pg_cluster: Any, pg_store_url: str) -> None:
    # The watcher keeps one engine for months. A pooled connection the server ended
    # while it sat idle (its idle_session_timeout, a restart) failed the next write:
    # a realtime change went unrecorded until the next full scan.
    database = pg_store_url.rsplit("/", 1)[1]
    pg_cluster.psql(f"ALTER DATABASE {database} SET idle_session_timeout = '500ms'")
    Store(pg_store_url).close()
    store = Store(pg_store_url)
    try:
        store.events.warn(b"/srv/before", "seen", source="scan", severity="low")
        time.sleep(1.5)  # the server ends the idle pooled connection
        store.events.warn(b"/srv/after-idle", "seen", source="scan", severity="low")
        pg_cluster.stop()
        pg_cluster.start()
        store.events.warn(b"/srv/after-restart", "seen", source="scan", severity="low")
        assert sorted(e["path"] for e in store.events.list(open_only=True)) == [
            "/srv/after-idle", "/srv/after-restart", "/srv/before"]
        assert store.ledger.check().problems == []
    finally:
        store.close()
