"""Metrics: `integrity metrics` (OpenMetrics), the textfile verify writes (parsed back
with prometheus_client's own parser, as node_exporter would read it), and /metrics
served by a running watcher, fetched over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import socket
import sqlite3
import stat
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import Cli, wait_until

SPEC_NAMES = {
    "integrity_last_scan_success_timestamp_seconds": "gauge",
    "integrity_scan_duration_seconds": "gauge",
    "integrity_baseline_entries": "gauge",
    "integrity_open_events": "gauge",
    "integrity_changes": "counter",
    "integrity_watcher_overflows": "counter",
    "integrity_alerts_undelivered": "gauge",
    "integrity_baseline_seal_valid": "gauge",
    "integrity_event_chain_valid": "gauge",
    "integrity_fleet_unpushed_records": "gauge",
}

pytestmark = pytest.mark.usefixtures("no_leaks")


def samples(families: Any) -> tuple[dict[str, str], dict[tuple[str, tuple[Any, ...]], float]]:
    """(family name -> type, (sample name, sorted labels) -> value)."""
    types, values = {}, {}
    for family in families:
        types[family.name] = family.type
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, values


@pytest.fixture
def site(tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> Cli:
    textfile = tmp_path / "node" / "integrity.prom"
    textfile.parent.mkdir()
    policy = write_policy(
        {"path": str(tree), "check": "config", "severity": "high"},
        extra=f'\n[[alert]]\ntype = "jsonl"\nname = "log"\npath = "{tmp_path / "a.jsonl"}"'
              f'\n\n[metrics]\ntextfile = "{textfile}"\n')
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    assert run("init").exit_code == 0
    return run


def textfile(site: Cli) -> Path:
    return site.policy.parent / "node" / "integrity.prom"


def test_openmetrics_has_every_spec_name_and_true_values(site: Cli, tree: Path) -> None:
    (tree / "a.conf").write_text("changed\n")
    (tree / "new").write_text("added\n")
    assert site("verify").exit_code == 1
    result = site("metrics")
    assert result.exit_code == 0
    assert result.stdout.endswith("# EOF\n")
    types, values = samples(parse_openmetrics(result.stdout))
    for name, kind in SPEC_NAMES.items():
        assert types.get(name) == kind, name
        assert f"# HELP {name} " in result.stdout and f"# TYPE {name} {kind}" in result.stdout
    # The tree's root and what it held at init: everything now but the new file.
    entries = 1 + len(list(tree.rglob("*"))) - 1
    assert values[("integrity_baseline_entries", ())] == entries
    assert values[("integrity_open_events", (("severity", "high"),))] == 2
    assert values[("integrity_open_events", (("severity", "low"),))] == 0
    assert values[("integrity_changes_total", (("kind", "modified"),))] == 1
    assert values[("integrity_changes_total", (("kind", "added"),))] == 1
    assert values[("integrity_changes_total", (("kind", "removed"),))] == 0
    assert values[("integrity_alerts_undelivered", (("sink", "log"),))] == 0  # delivered
    assert values[("integrity_baseline_seal_valid", ())] == 1
    assert values[("integrity_event_chain_valid", ())] == 1
    assert values[("integrity_fleet_unpushed_records", ())] == 0
    assert values[("integrity_watcher_overflows_total", ())] == 0
    finished = site.json("status")["last_scan"]["time"]
    import datetime as dt
    stamp = values[("integrity_last_scan_success_timestamp_seconds", ())]
    assert dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ") == finished
    assert 0 < values[("integrity_scan_duration_seconds", ())] < 60


def test_tampering_shows_in_the_metrics(site: Cli, tree: Path) -> None:
    (tree / "a.conf").write_text("changed\n")
    site("verify")
    with sqlite3.connect(site.db) as conn:
        conn.execute("UPDATE entry SET size = size + 1 WHERE key = ?",
                     (os.fsencode(tree / "a.conf").replace(b"/", b"\0"),))
        conn.execute("DELETE FROM event")
    _, values = samples(parse_openmetrics(site("metrics").stdout))
    assert values[("integrity_baseline_seal_valid", ())] == 0
    assert values[("integrity_event_chain_valid", ())] == 0


def test_verify_writes_the_textfile_atomically_and_it_parses(site: Cli, tree: Path) -> None:
    (tree / "a.conf").write_text("changed\n")
    assert site("verify").exit_code == 1
    path = textfile(site)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # node_exporter reads it
    assert sorted(p.name for p in path.parent.iterdir()) == ["integrity.prom"]  # no tmp
    text = path.read_text()
    types, values = samples(parse_text(text))
    assert set(SPEC_NAMES) <= set(types)
    assert values[("integrity_open_events", (("severity", "high"),))] == 1
    assert values[("integrity_changes_total", (("kind", "modified"),))] == 1
    # Pruning removes events; the counter must not go down.
    assert site("approve", "--all").exit_code == 0
    assert site("prune", "--older-than", "0s").exit_code == 0
    site("verify")
    _, after = samples(parse_text(path.read_text()))
    assert after[("integrity_changes_total", (("kind", "modified"),))] == 1
    assert after[("integrity_open_events", (("severity", "high"),))] == 0
    assert after[("integrity_event_chain_valid", ())] == 1


def test_an_unwritable_textfile_is_one_warning_not_a_failed_verify(
        site: Cli, tree: Path) -> None:
    textfile(site).parent.rmdir()
    result = site("verify")
    assert result.exit_code == 0  # nothing changed: the scan itself succeeded
    assert result.stderr.startswith("warning: writing metrics failed for '")
    assert "(metrics not updated)" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("table, key", [
    ('listen = "localhost"', "metrics.listen"),
    ('listen = "127.0.0.1:99999"', "metrics.listen"),
    ('listen = "[::g]:9419"', "metrics.listen"),
    ('textfile = "relative.prom"', "metrics.textfile"),
    ('textfile = "/var/lib/node/integrity.txt"', "metrics.textfile"),
    ('port = 9419', "metrics.port"),
])
def test_bad_metrics_table_refuses_the_policy(tmp_path: Path, tree: Path,
                                              write_policy: Callable[..., Path],
                                              table: str, key: str) -> None:
    policy = write_policy({"path": str(tree)}, extra=f"\n[metrics]\n{table}\n")
    result = Cli(tmp_path / "db", policy)("verify")
    assert result.exit_code == 2 and key in result.stderr
    assert result.stderr.count("\n") == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_running_watcher_serves_metrics_over_http(tmp_path: Path) -> None:
    from test_service import Daemon, Site

    site = Site(tmp_path)
    port = free_port()
    prom = tmp_path / "node" / "integrity.prom"
    prom.parent.mkdir()
    site.policy.write_text(site.policy.read_text() + f'\n[metrics]\nlisten = '
                           f'"127.0.0.1:{port}"\ntextfile = "{prom}"\n')
    assert site.cli("init").exit_code == 0
    daemon = Daemon(site)
    try:
        daemon.wait_running()
        url = f"http://127.0.0.1:{port}/metrics"

        def scrape(accept: str | None = None) -> str:
            request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 200
                return response.read().decode()

        types, values = samples(parse_text(scrape()))
        assert set(SPEC_NAMES) <= set(types)
        assert values[("integrity_watcher_up", ())] == 1
        # (A host short of inotify watches has an open high warning already.)
        before = values[("integrity_open_events", (("severity", "high"),))]
        # The catch-up scan (a full scan) wrote the textfile too.
        assert prom.exists() and "integrity_baseline_entries" in prom.read_text()
        (site.tree / "a.conf").write_text("changed under a running watcher\n")

        def high() -> bool:
            _, now = samples(parse_text(scrape()))
            return now[("integrity_open_events", (("severity", "high"),))] == before + 1
        wait_until(high, "/metrics to count the realtime event", 10)
        openmetrics = scrape("application/openmetrics-text; version=1.0.0")
        assert openmetrics.endswith("# EOF\n")
        samples(parse_openmetrics(openmetrics))
        code = daemon.terminate()
        assert code == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)
    finally:
        daemon.kill()
    log = site.stderr()
    assert f"serving /metrics on 127.0.0.1:{port}" in log and "Traceback" not in log


def test_a_port_in_use_is_logged_and_the_watcher_keeps_watching(tmp_path: Path) -> None:
    from test_service import Daemon, Site

    site = Site(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        site.policy.write_text(site.policy.read_text()
                               + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        assert site.cli("init").exit_code == 0
        daemon = Daemon(site)
        try:
            daemon.wait_running()
            assert f"metrics: cannot listen on 127.0.0.1:{port}" in site.stderr()
            assert daemon.terminate() == 0
        finally:
            daemon.kill()
    assert json.dumps(site.status()["watcher"]["state"]) == '"stopped"'



# --- /metrics under attack: whoever reaches the listen address must not blind the watcher.

#: The watcher's descriptor limit in the attack tests. systemd gives a service 1024 (soft)
#: unless the unit says otherwise; 256 lets 300 connections make the same point.
NOFILE = 256
FLOOD = 300


@contextlib.contextmanager
def nofile(soft: int) -> Iterator[None]:
    """Children started inside inherit a soft descriptor limit of `soft`."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def server_behind(port: int) -> bool:
    """Whether connections to 127.0.0.1:`port` are not yet all taken by the server
    (/proc/net/tcp): handshakes under way (SYN_SENT, SYN_RECV), bytes a client sent
    that the server's kernel has not acknowledged (tx_queue), or connections queued
    on the listener that the server has not accepted (a LISTEN socket's rx_queue)."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = (int(fields[1].split(":")[1], 16),
                             int(fields[2].split(":")[1], 16))
            state, (sending, queued) = fields[3], (
                int(n, 16) for n in fields[4].split(":"))
            if (remote == port and (state == "02" or (state == "01" and sending))) \
                    or (local == port and (state == "03" or (state == "0A" and queued))):
                return True
    return False


def open_idle(port: int, count: int, timeout: float = 30.0) -> list[socket.socket]:
    """`count` connections that send the start of a request and never the rest (the
    classic slowloris; the bytes sent also make the server's kernel keep a connection
    its full queue would otherwise forget), opened all at once. Returns once the
    server has accepted (or dropped) every one of them, or at `timeout` when it can
    accept no more."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        socks.append(sock)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as connecting:
        for sock in socks:
            connecting.register(sock, selectors.EVENT_WRITE)
        while (connecting.get_map() or server_behind(port)) \
                and time.monotonic() < deadline:
            for key, _ in connecting.select(0.05):
                connecting.unregister(key.fileobj)
                try:
                    key.fileobj.send(b"GET /metrics HTTP/1.1\r\n")  # type: ignore[union-attr]
                except OSError:
                    pass  # refused or already dropped by the server
    return socks


def threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def metrics_site(tmp_path: Path) -> tuple[Any, int]:
    from test_service import Site

    site = Site(tmp_path)
    port = free_port()
    site.policy.write_text(site.policy.read_text()
                           + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    assert site.cli("init").exit_code == 0
    return site, port


def test_idle_connections_neither_blind_the_watcher_nor_lock_out_scrapes(
        tmp_path: Path) -> None:
    """300 connections that never finish a request: the watcher keeps its threads and
    descriptors (one thread each and no timeout would exhaust its 256 descriptors, and
    a changed file would then be recorded as "Too many open files", unchecked and
    unalerted), a scrape is still answered, and a change is still checked and alerted."""
    from test_service import Daemon

    site, port = metrics_site(tmp_path)
    with nofile(NOFILE):
        daemon = Daemon(site)
    flood: list[socket.socket] = []
    try:
        daemon.wait_running()
        threads, fds = threads_and_fds(daemon.pid)
        flood = open_idle(port, FLOOD)
        during = threads_and_fds(daemon.pid)
        assert during[0] <= threads + 2, f"{during[0] - threads} threads more under flood"
        assert during[1] <= fds + 32, f"{during[1] - fds} descriptors more under flood"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=10) as response:
            assert response.status == 200
            types, values = samples(parse_text(response.read().decode()))
        assert set(SPEC_NAMES) <= set(types)
        assert values[("integrity_watcher_up", ())] == 1
        target = site.tree / "a.conf"
        target.write_text("changed while /metrics is flooded\n")
        event = wait_until(lambda: [e for e in site.events(target) if e["kind"] == "modified"],
                           "the change to be checked and recorded as modified", 15)[0]
        assert "content" in event["changed"]
        wait_until(lambda: site.alerts_for(target), "the change's alert", 15)
        assert threads_and_fds(daemon.pid)[0] <= threads + 2
        assert daemon.terminate() == 0
    finally:
        for sock in flood:
            sock.close()
        daemon.kill()
    log = site.stderr()
    assert "Too many open files" not in log and "Traceback" not in log
    # Dropped connections are said, a few lines at most: never one per connection.
    assert 1 <= log.count("metrics: dropped ") <= 3, log


def test_slow_and_wrong_requests_are_dropped_and_only_metrics_is_served(
        tmp_path: Path) -> None:
    """A request that is never finished is dropped after a few seconds (it held a
    thread and a descriptor for ever); an oversized one is refused; only GET and HEAD
    of /metrics are answered."""
    from test_service import Daemon

    site, port = metrics_site(tmp_path)
    daemon = Daemon(site)

    def ask(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    try:
        daemon.wait_running()
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        with slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end
            slow.setblocking(False)

            def dropped() -> bool:
                try:
                    return slow.recv(1) == b""
                except BlockingIOError:
                    return False
                except ConnectionResetError:
                    return True
            wait_until(dropped, "the unfinished request to be dropped", 20)
        get = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert get.startswith(b"HTTP/1.1 200 ") and b"integrity_baseline_entries" in get
        head = ask(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert length == len(get.partition(b"\r\n\r\n")[2])
        assert ask(b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert ask(b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert ask(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
                   ).startswith(b"HTTP/1.1 405 ")
        huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
        try:  # 431, or a reset: the server closes with the rest of the request unread
            assert ask(huge).startswith(b"HTTP/1.1 431 ")
        except ConnectionResetError:
            pass
        assert ask(b"not http\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    assert "Traceback" not in site.stderr()


def test_the_grafana_dashboard_queries_only_metrics_we_export(site: Cli, tree: Path) -> None:
    """contrib/grafana/integrity.json: every metric a panel queries is one that
    `integrity metrics` prints, and the panels the issue asks for are there."""
    import re

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "contrib" / "grafana"
                            / "integrity.json").read_text())
    assert site("verify").exit_code == 0  # a scan: its timestamp and duration exist
    exported = {name for name, _ in samples(parse_openmetrics(site("metrics").stdout))[1]}
    queried = {name for panel in dashboard["panels"] for t in panel["targets"]
               for name in re.findall(r"\bintegrity_[a-z_]+", t["expr"])}
    assert queried and queried <= exported, queried - exported
    for wanted in ("integrity_last_scan_success_timestamp_seconds", "integrity_open_events",
                   "integrity_changes_total", "integrity_alerts_undelivered",
                   "integrity_watcher_overflows_total"):
        assert wanted in queried
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for words in ("Last successful scan", "Open events by severity", "Changes per hour",
                  "Undelivered alerts", "overflows"):
        assert words in titles
