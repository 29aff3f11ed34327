"""Alert sinks against real endpoints on this host: files, unix sockets, HTTP(S) and
SMTP servers on 127.0.0.1, and real scripts. Nothing under test is mocked."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from integrity import __version__
from integrity.alerts import DeliveryError, Sink, build_sinks, wants
from integrity.alerts import text as render
from integrity.alerts import webhook
from integrity.errors import PolicyError
from integrity.policy import load

from conftest import REPO, Inbox, wait_until

HOST = socket.gethostname()


def make_event(n: int = 1, **fields: Any) -> dict[str, Any]:
    """An event as EventLog.events() gives it."""
    event: dict[str, Any] = {
        "id": n, "time": "2024-05-01T10:00:00Z", "last_seen": "2024-05-01T10:00:00Z",
        "path": f"/etc/app/file{n}.conf", "kind": "modified", "changed": ["content", "mode"],
        "source": "realtime", "rule": "/etc", "severity": "high", "status": "open",
        "classification": "unexplained", "count": 1,
        "actor": {"pid": 123, "exe": "/usr/bin/vim", "cmdline": ["vim", "x"], "uid": 1000,
                  "user": "alice", "loginuid": 1000, "login_user": "alice"},
        "old": {"content": "aa" * 32, "mode": "0644"},
        "new": {"content": "bb" * 32, "mode": "0666"},
        "approval": None, "evidence": None}
    event.update(fields)
    return event


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def sinks_for(tmp_path: Path, *tables: dict[str, Any]) -> list[Sink]:
    """Sinks built by the real policy loader from [[alert]] tables."""
    lines = ["[[rule]]", 'path = "/etc"', ""]
    for table in tables:
        lines.append("[[alert]]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
        lines.append("")
    policy = tmp_path / "policy.toml"
    policy.write_text("\n".join(lines))
    return build_sinks(load(policy))


def sink_for(tmp_path: Path, **table: Any) -> Any:
    return sinks_for(tmp_path, table)[0]


# -- building and validation -----------------------------------------------------------

def test_every_type_builds_with_its_name_digest_flag_and_interval(tmp_path: Path) -> None:
    sinks = sinks_for(
        tmp_path,
        {"type": "jsonl", "path": str(tmp_path / "a.jsonl"), "min_severity": "high"},
        {"type": "syslog"},
        {"type": "webhook", "url": "https://example.org/hook"},
        {"type": "webhook", "url_file": "/etc/integrity/slack-url", "format": "slack"},
        {"type": "email", "host": "mail", "from": "fim@h", "to": ["ops@h"]},
        {"type": "exec", "command": ["/bin/true"]},
        {"type": "webhook", "url": "http://x/", "format": "teams", "digest_interval": 5})
    assert [s.name for s in sinks] == [
        "alert[0]:jsonl", "alert[1]:syslog", "alert[2]:webhook", "alert[3]:webhook",
        "alert[4]:email", "alert[5]:exec", "alert[6]:webhook"]
    assert [s.digest for s in sinks] == [False, False, False, True, True, False, True]
    assert (sinks[3].interval, sinks[4].interval, sinks[6].interval) == (60.0, 300.0, 5.0)
    assert not wants(sinks[0], make_event(severity="medium"))
    assert wants(sinks[0], make_event(severity="critical")) and wants(sinks[1], make_event())


@pytest.mark.parametrize(("table", "key", "words"), [
    ({"type": "jsonl", "path": "/x/a", "max_byte": 5}, "max_byte", "unknown key"),
    ({"type": "jsonl", "path": "rel/a"}, "path", "absolute"),
    ({"type": "jsonl", "path": "/x/a", "keep": 0}, "keep", "at least 1"),
    ({"type": "syslog", "facility": "local9"}, "facility", "must be one of"),
    ({"type": "syslog", "app_name": "has space"}, "app_name", "printable"),
    ({"type": "webhook"}, "url", "exactly one of url and url_file"),
    ({"type": "webhook", "url": "ftp://h/x"}, "url", "http"),
    ({"type": "webhook", "url": "https://u:pw@h/x"}, "url", "password"),
    ({"type": "webhook", "url": "https://h/", "timeout": -1}, "timeout", "greater than 0"),
    ({"type": "webhook", "url": "https://h/", "retries": True}, "retries", "integer"),
    ({"type": "webhook", "url": "https://h/", "headers": {"Authorization": "Bearer x"}},
     "headers.Authorization", "header_files"),
    ({"type": "webhook", "url": "https://h/", "header_files": {"X-Token": "rel"}},
     "header_files.X-Token", "absolute"),
    ({"type": "webhook", "url": "https://h/", "digest_interval": 9}, "digest_interval",
     "slack and teams"),
    ({"type": "email", "host": "h", "from": "a@h"}, "to", "required"),
    ({"type": "email", "host": "h", "from": "a@h", "to": "b@h"}, "to", "array"),
    ({"type": "email", "host": "h", "from": "a@h", "to": ["b@h"], "username": "u"},
     "password_file", "go together"),
    ({"type": "email", "host": "h", "from": "a@h", "to": ["b@h"], "security": "none",
      "username": "u", "password_file": "/p"}, "username", "in clear"),
    ({"type": "email", "host": "h", "from": "a@h", "to": ["b@h"], "password": "x"},
     "password", "unknown key"),
    ({"type": "exec", "command": ["notify-send", "x"]}, "command", "absolute"),
    ({"type": "exec", "command": []}, "command", "non-empty"),
    ({"type": "exec", "command": ["/bin/true"], "env": {"INTEGRITY_PATH": "x"}},
     "env.INTEGRITY_PATH", "set by integrity"),
])
def test_bad_options_are_refused_naming_file_and_key(
        tmp_path: Path, table: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        sinks_for(tmp_path, {"type": "jsonl", "path": "/x/ok"}, table)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'policy.toml'}: alert[1].{key}: "), message
    assert words in message and "\n" not in message


def test_delivery_error_is_one_line_naming_the_sink() -> None:
    error = DeliveryError("alert[1]:webhook", "POST https://x/y: HTTP 503: busy\r\nretry")
    assert str(error) == "alert[1]:webhook: POST https://x/y: HTTP 503: busy retry"


# -- text ------------------------------------------------------------------------------

def test_lines_name_the_actor_or_why_it_is_unknown() -> None:
    assert render.line(make_event()) == (
        "[high] modified /etc/app/file1.conf (content, mode) "
        "by /usr/bin/vim (pid 123, user alice, login alice)")
    unknown = make_event(actor={"unknown": "fanotify unavailable (not root)"},
                         classification="package-update", count=3)
    assert render.line(unknown) == (
        "[high] modified /etc/app/file1.conf (content, mode) by an unidentified process "
        "(fanotify unavailable (not root)) (3 times) [package-update]")
    assert "by" not in render.line(make_event(actor=None))


def test_a_file_name_cannot_forge_digest_lines() -> None:
    hostile = make_event(2, path="/tmp/x\n[critical] removed /etc/shadow\u202e")
    text = render.digest([make_event(1), hostile])
    assert len(text.splitlines()) == 4  # counts, blank, two events
    assert "\\x0a[critical] removed /etc/shadow\\u202e" in text


def test_a_digest_counts_by_severity_and_caps_its_lines() -> None:
    events = [make_event(i, severity="low") for i in range(240)] + \
        [make_event(1000 + i, severity="critical") for i in range(2)]
    lines = render.digest(events).splitlines()
    assert lines[0] == "242 changes: 2 critical, 240 low"
    assert lines[2].startswith("[critical]") and lines[3].startswith("[critical]")
    assert len(lines) == 2 + render.MAX_LINES + 1 and lines[-1] == "and 42 more"
    assert render.subject(events, "web1") == "web1: 242 changes (2 critical)"


# -- jsonl -----------------------------------------------------------------------------

def test_jsonl_rotates_by_size_keeping_n_files(tmp_path: Path) -> None:
    path = tmp_path / "log" / "alerts.jsonl"
    sink = sink_for(tmp_path, type="jsonl", path=str(path), max_bytes=2000, keep=2)
    size = len(json.dumps(make_event(), separators=(",", ":")).encode()) + 1
    for n in range(1, 30):
        sink.deliver([make_event(n)])
    sink.close()
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"]
    ids = []
    for name in ("alerts.jsonl.2", "alerts.jsonl.1", "alerts.jsonl"):
        data = (path.parent / name).read_bytes()
        assert len(data) <= 2000
        ids += [json.loads(line)["id"] for line in data.splitlines()]
    per_file = 2000 // size
    assert ids == list(range(30 - len(ids), 30)) and len(ids) > 2 * per_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_jsonl_follows_an_external_rotation_and_reopens_on_request(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    sink = sink_for(tmp_path, type="jsonl", path=str(path))
    sink.deliver([make_event(1)])
    path.rename(tmp_path / "alerts.jsonl.1")  # logrotate without copytruncate
    sink.deliver([make_event(2)])
    path.rename(tmp_path / "alerts.jsonl.2")
    sink.reopen()  # SIGHUP from logrotate's postrotate
    sink.deliver([make_event(3)])
    sink.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [3]
    assert json.loads((tmp_path / "alerts.jsonl.1").read_text())["id"] == 1
    assert json.loads((tmp_path / "alerts.jsonl.2").read_text())["id"] == 2


def test_jsonl_write_failure_is_a_delivery_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    sink = sink_for(tmp_path, type="jsonl", path=str(tmp_path / "file" / "alerts.jsonl"))
    with pytest.raises(DeliveryError, match=r"^alert\[0\]:jsonl: write .*file/alerts.jsonl: "
                                           r".*/file: File exists$"):
        sink.deliver([make_event()])


def test_logrotate_config_matches_the_unit_and_the_default_path() -> None:
    config = (REPO / "contrib" / "logrotate" / "integrity").read_text()
    assert "/var/log/integrity/*.jsonl" in config
    for word in ("weekly", "rotate 8", "dateext", "compress", "delaycompress", "missingok",
                 "notifempty", "create 0640 root adm"):
        assert re.search(rf"^\s+{word}$", config, re.M), word
    unit = re.search(r"systemctl kill --kill-who=main -s HUP (\S+)", config)
    assert unit and (REPO / "systemd" / unit.group(1)).exists()


# -- syslog ----------------------------------------------------------------------------

@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ia-"))
    yield path
    shutil.rmtree(path)


def _dgram(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    return server


def test_syslog_sends_rfc5424_with_escaped_structured_data(sockdir: Path) -> None:
    server = _dgram(sockdir / "log")
    sink = sink_for(sockdir, type="syslog", socket=str(sockdir / "log"))
    path = '/etc/we"ird]\\name'
    sink.deliver([make_event(7, path=path)])
    message = server.recv(65536).decode()
    match = re.fullmatch(r"<(\d+)>1 (\S+) (\S+) (\S+) (\d+) (\S+) (\[.*\]) (.*)", message)
    assert match, message
    pri, stamp, host, app, pid, msgid, sd, msg = match.groups()
    assert int(pri) == 10 * 8 + 3  # authpriv.err
    assert dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert (host, app, int(pid), msgid) == (HOST, "integrity", os.getpid(), "modified")
    assert sd == ('[integrity@32473 id="7" path="/etc/we\\"ird\\]\\\\name" kind="modified" '
                  'severity="high" changed="content,mode" classification="unexplained" '
                  'source="realtime" pid="123" exe="/usr/bin/vim" user="alice" '
                  'loginuid="1000"]')
    assert msg == ('high: modified /etc/we"ird]\\name (content, mode) '
                   "by /usr/bin/vim (pid 123, user alice, login alice)")
    for severity, level in (("low", 5), ("medium", 4), ("critical", 2)):
        sink.deliver([make_event(severity=severity, actor=None)])
        received = server.recv(65536).decode()
        assert received.startswith(f"<{80 + level}>1 ") and " pid=" not in received
    sink.close()
    server.close()


def test_syslog_shortens_a_long_message_but_never_the_structured_data(sockdir: Path) -> None:
    server = _dgram(sockdir / "log")
    sink = sink_for(sockdir, type="syslog", socket=str(sockdir / "log"), facility="local3")
    warning = make_event(kind="warning", changed=[], new={"warning": "é" * 9000})
    sink.deliver([warning])
    message = server.recv(65536)
    assert len(message) <= 8192 and message.endswith(b"...")
    assert message.startswith(f"<{19 * 8 + 3}>1 ".encode())
    assert b'kind="warning" severity="high" changed="" classification' in message
    message.decode("utf-8")  # not cut inside a character
    server.close()


def test_syslog_falls_back_to_a_stream_socket(sockdir: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sockdir / "log"))
    server.listen()
    server.settimeout(5)
    sink = sink_for(sockdir, type="syslog", socket=str(sockdir / "log"))
    sink.deliver([make_event(1)])
    sink.deliver([make_event(2)])
    conn, _ = server.accept()
    conn.settimeout(5)
    data = b""
    while data.count(b"\n") < 2:
        data += conn.recv(65536)
    first, second = data.decode().splitlines()
    assert first.startswith("<83>1 ") and ' id="1" ' in first and ' id="2" ' in second
    sink.close()
    conn.close()
    server.close()


def test_syslog_reconnects_once_after_the_logger_restarts(sockdir: Path) -> None:
    address = sockdir / "log"
    server = _dgram(address)
    sink = sink_for(sockdir, type="syslog", socket=str(address))
    sink.deliver([make_event(1)])
    assert b' id="1" ' in server.recv(65536)
    server.close()
    address.unlink()  # journald restarting: the old socket is gone, a new one comes
    server = _dgram(address)
    sink.deliver([make_event(2)])
    assert b' id="2" ' in server.recv(65536)
    server.close()
    address.unlink()
    with pytest.raises(DeliveryError, match=rf"^alert\[0\]:syslog: send to {address}: "
                                            "No such file or directory$"):
        sink.deliver([make_event(3)])
    sink.close()


# -- TLS material: a private CA and a server certificate for 127.0.0.1 -------------------

@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca.pem (the ca_file sinks are given), cert.pem and key.pem for the servers."""
    root = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "integrity test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


def server_context(tls: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls["cert"], tls["key"])
    return context


# -- webhook ---------------------------------------------------------------------------

class _Server(http.server.ThreadingHTTPServer):
    #: Connections taken from the listening socket. Over TLS the handshake is part of
    #: taking one, so a client that gave up on the certificate was counted first.
    connections = 0

    def get_request(self) -> Any:
        self.connections += 1
        return super().get_request()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and left is what some tests want


class Hook:
    """A real HTTP(S) server on 127.0.0.1: records each request, answers from `replies`
    (status, headers, body, seconds to stall), 200 when none is queued; `answered`
    counts the replies it has finished sending."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answered = 0
        self.replies: queue.Queue[tuple[int, dict[str, str], bytes, float]] = queue.Queue()
        self.release = threading.Event()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.requests.append({"method": self.command, "path": self.path,
                                      "headers": self.headers, "body": body,
                                      "time": time.monotonic()})
                try:
                    status, headers, reply, stall = hook.replies.get_nowait()
                except queue.Empty:
                    status, headers, reply, stall = 200, {}, b"ok", 0.0
                if stall:
                    hook.release.wait(stall)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                hook.answered += 1

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def test_webhook_posts_the_event_signed_with_headers_from_files(
        tmp_path: Path, hook: Hook) -> None:
    key, token = tmp_path / "hmac.key", tmp_path / "hec-token"
    key.write_text("s3cret\n")
    token.write_text("Splunk abc-123\n")
    sink = sink_for(tmp_path, type="webhook", url=hook.url, secret_file=str(key),
                    headers={"X-Source": "web1"}, header_files={"Authorization": str(token)})
    event = make_event(5)
    sink.deliver([event])
    key.write_text("rotated")  # read at delivery time: the next request uses it
    sink.deliver([event])
    first, second = hook.requests
    assert first["method"] == "POST" and first["path"] == "/hook"
    assert json.loads(first["body"]) == event and first["body"] == second["body"]
    for request, secret in ((first, b"s3cret"), (second, b"rotated")):
        expected = hmac.new(secret, request["body"], hashlib.sha256).hexdigest()
        assert request["headers"]["X-Integrity-Signature"] == f"sha256={expected}"
    assert abs(int(first["headers"]["X-Integrity-Timestamp"]) - time.time()) < 60
    assert first["headers"]["Authorization"] == "Splunk abc-123"
    assert first["headers"]["X-Source"] == "web1"
    assert first["headers"]["User-Agent"] == f"integrity/{__version__}"
    assert first["headers"]["Content-Type"].startswith("application/json")
    token.unlink()
    with pytest.raises(DeliveryError, match=rf"^alert\[0\]:webhook: cannot read secret file "
                                            rf"{token}: No such file or directory$"):
        sink.deliver([event])
    assert len(hook.requests) == 2


class Clock:
    """The time module as a sink sees it, with the waits it asks for recorded (and
    really waited): what a wait was meant to be, however loaded the machine."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_webhook_retries_5xx_and_429_honouring_retry_after(
        tmp_path: Path, hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(webhook, "time", clock)
    hook.replies.put((503, {}, b"busy", 0))
    hook.replies.put((429, {"Retry-After": "0"}, b"", 0))
    sink = sink_for(tmp_path, type="webhook", url=hook.url)  # retries = 2
    sink.deliver([make_event()])
    times = [request["time"] for request in hook.requests]
    assert len(times) == 3 and len({r["body"] for r in hook.requests}) == 1
    assert times[1] - times[0] >= 0.45  # first backoff, 0.5 s
    # The first backoff, then Retry-After: 0 instead of the 1 s backoff.
    assert clock.waits == [0.5, 0]
    hook.replies.put((503, {}, b"still busy", 0))
    hook.replies.put((502, {}, b"bad gateway", 0))
    short = sink_for(tmp_path, type="webhook", url=hook.url, retries=1)
    with pytest.raises(DeliveryError, match=r"^alert\[0\]:webhook: POST http://127.0.0.1:\d+"
                                            r"/hook: HTTP 502: bad gateway \(after 2 attempts\)$"):
        short.deliver([make_event()])
    assert len(hook.requests) == 5


@pytest.mark.parametrize(("status", "headers", "reply"), [
    (400, {}, b"invalid_payload"), (302, {"Location": "/elsewhere"}, b"")])
def test_webhook_does_not_retry_a_bad_request_nor_follow_a_redirect(
        tmp_path: Path, hook: Hook, status: int, headers: dict[str, str], reply: bytes) -> None:
    hook.replies.put((status, headers, reply, 0))
    sink = sink_for(tmp_path, type="webhook", url=hook.url)
    with pytest.raises(DeliveryError, match=rf"^alert\[0\]:webhook: POST {hook.url}: "
                                            rf"HTTP {status}(: invalid_payload)?$"):
        sink.deliver([make_event()])
    assert [r["method"] for r in hook.requests] == ["POST"]


def test_webhook_timeout_is_a_delivery_error_within_the_timeout(
        tmp_path: Path, hook: Hook) -> None:
    hook.replies.put((200, {}, b"", 60))  # stalls until the test ends
    sink = sink_for(tmp_path, type="webhook", url=hook.url, timeout=0.5, retries=0)
    start = time.monotonic()
    with pytest.raises(DeliveryError, match=r"POST .*/hook: timed out$"):
        sink.deliver([make_event()])
    assert time.monotonic() - start >= 0.45  # it waited its timeout,
    assert len(hook.requests) == 1 and hook.answered == 0  # not for the server's reply


def test_webhook_connection_refused_names_the_url_but_not_a_secret_one(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url_file = tmp_path / "url"
    url_file.write_text(f"http://127.0.0.1:{port}/services/T0/SECRET\n")
    sinks = sinks_for(tmp_path, {"type": "webhook", "url": f"http://127.0.0.1:{port}/x?k=v",
                                 "retries": 0},
                      {"type": "webhook", "url_file": str(url_file), "retries": 0})
    with pytest.raises(DeliveryError, match=rf"^alert\[0\]:webhook: POST http://127.0.0.1:"
                                            rf"{port}/x: Connection refused$"):
        sinks[0].deliver([make_event()])
    with pytest.raises(DeliveryError) as info:
        sinks[1].deliver([make_event()])
    assert str(info.value) == (f"alert[1]:webhook: POST the URL in {url_file}: "
                               "Connection refused")


def test_webhook_over_https_trusts_the_ca_file(tmp_path: Path, tls: dict[str, Path]) -> None:
    hook = Hook(server_context(tls))
    try:
        trusting = sink_for(tmp_path, type="webhook", url=hook.url, ca_file=str(tls["ca"]))
        trusting.deliver([make_event(9)])
        assert [json.loads(r["body"])["id"] for r in hook.requests] == [9]
        system_ca = sink_for(tmp_path, type="webhook", url=hook.url)  # retries = 2
        connections = hook.server.connections
        with pytest.raises(DeliveryError, match="certificate verify failed"):
            system_ca.deliver([make_event(10)])
        assert hook.server.connections == connections + 1  # not retried
        assert len(hook.requests) == 1
    finally:
        hook.close()


def test_chat_webhooks_send_one_digest_message(tmp_path: Path, hook: Hook) -> None:
    url_file = tmp_path / "slack-url"
    url_file.write_text(hook.url + "?token=abc\n")
    slack, teams = sinks_for(
        tmp_path, {"type": "webhook", "url_file": str(url_file), "format": "slack"},
        {"type": "webhook", "url": hook.url, "format": "teams"})
    events = [make_event(1, severity="critical"), make_event(2, path="/etc/<b>&_x"),
              make_event(3, severity="low", actor=None)]
    slack.deliver(events)
    teams.deliver(events)
    posted, card_request = hook.requests
    assert posted["path"] == "/hook?token=abc"
    text = json.loads(posted["body"])["text"]
    assert text.startswith(f"{HOST}: 3 changes (1 critical)\n```\n"
                           "3 changes: 1 critical, 1 high, 1 low\n\n[critical] modified")
    assert "/etc/&lt;b&gt;&amp;_x" in text and text.endswith("\n```")
    card = json.loads(card_request["body"])
    assert card["@type"] == "MessageCard" and card["themeColor"] == "8B0000"
    lines = card["text"].split("\n\n")
    assert lines[0] == "3 changes: 1 critical, 1 high, 1 low" and len(lines) == 4
    assert "/etc/&lt;b&gt;&amp;\\_x" in card["text"]


# -- email -----------------------------------------------------------------------------

def _mail(tmp_path: Path, port: int, **options: Any) -> Any:
    return sink_for(tmp_path, type="email", host="127.0.0.1", port=port,
                    **{"from": "integrity@web1.example"},
                    to=["ops@example.org", "sec@example.org"], timeout=5, **options)


def _parse(raw: bytes) -> Any:
    import email
    import email.policy
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_email_sends_one_message_per_delivery_even_for_a_digest_of_50(
        tmp_path: Path, smtp_server: Any) -> None:
    inbox = Inbox()
    server = smtp_server(inbox)
    sink = _mail(tmp_path, server.port, security="none", digest_interval=120)
    assert sink.digest and sink.interval == 120.0
    sink.deliver([make_event(1)])
    events = [make_event(n, severity="critical" if n % 10 == 0 else "medium")
              for n in range(1, 51)]
    sink.deliver(events)
    assert len(inbox.messages) == 2
    single, digest = (_parse(m["content"]) for m in inbox.messages)
    assert inbox.messages[0]["from"] == "integrity@web1.example"
    assert inbox.messages[0]["to"] == ["ops@example.org", "sec@example.org"]
    assert single["Subject"].startswith(f"[integrity] {HOST}: high: modified "
                                        "/etc/app/file1.conf (content, mode) by /usr/bin/vim")
    assert single["Auto-Submitted"] == "auto-generated"
    body = single.get_content()
    assert "mode: 0644 -> 0666" in body and "(pid 123, user alice, login alice)" in body
    assert digest["Subject"] == f"[integrity] {HOST}: 50 changes (5 critical)"
    lines = digest.get_content().splitlines()
    assert "50 changes: 5 critical, 45 medium" in lines
    assert sum(line.startswith(("[critical] ", "[medium] ")) for line in lines) == 50


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_email_starttls_and_login_with_the_password_file(
        tmp_path: Path, smtp_server: Any, tls: dict[str, Path], mechanism: str) -> None:
    inbox = Inbox()
    other = "PLAIN" if mechanism == "LOGIN" else "LOGIN"
    server = smtp_server(inbox, tls_context=server_context(tls), require_starttls=True,
                         authenticator=inbox.authenticate, auth_require_tls=True,
                         auth_exclude_mechanism=[other])
    password = tmp_path / "smtp-password"
    password.write_text("hunter2\n")
    sink = _mail(tmp_path, server.port, username="fim", password_file=str(password),
                 ca_file=str(tls["ca"]))  # security = "starttls" by default
    sink.deliver([make_event()])
    assert inbox.logins == [(mechanism, b"fim", True)]
    assert len(inbox.messages) == 1 and inbox.messages[0]["starttls"]
    assert inbox.messages[0]["authenticated"]
    password.write_text("wrong\n")
    with pytest.raises(DeliveryError, match=rf"^alert\[0\]:email: SMTP 127.0.0.1:"
                                            rf"{server.port}: login as fim refused: 535 "):
        sink.deliver([make_event()])
    assert len(inbox.messages) == 1


def test_email_implicit_tls_and_a_server_without_starttls(
        tmp_path: Path, smtp_server: Any, tls: dict[str, Path]) -> None:
    inbox = Inbox()
    secure = smtp_server(inbox, ssl_context=server_context(tls))
    _mail(tmp_path, secure.port, security="tls", ca_file=str(tls["ca"])).deliver(
        [make_event()])
    assert len(inbox.messages) == 1
    untrusted = _mail(tmp_path, secure.port, security="tls")
    with pytest.raises(DeliveryError, match="certificate verify failed"):
        untrusted.deliver([make_event()])
    plain = smtp_server(inbox)
    with pytest.raises(DeliveryError, match=r"STARTTLS extension not supported"):
        _mail(tmp_path, plain.port, ca_file=str(tls["ca"])).deliver([make_event()])
    assert len(inbox.messages) == 1


# -- exec ------------------------------------------------------------------------------

def script(tmp_path: Path, body: str, name: str = "hook.py") -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def test_exec_gets_the_event_on_stdin_and_in_its_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.json"
    reader, writer = os.pipe()
    os.set_inheritable(writer, True)  # would reach the child without close_fds
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    hook = script(tmp_path, f"""
import json, os, sys
try:
    os.fstat({writer})
    leaked = True
except OSError:
    leaked = False
json.dump({{"event": json.load(sys.stdin), "argv": sys.argv[1:], "leaked": leaked,
           "env": {{k: v for k, v in os.environ.items() if k.startswith(("INTEGRITY_", "EXTRA"))}},
           "notify": "NOTIFY_SOCKET" in os.environ, "leader": os.getsid(0) == os.getpid(),
           "cwd": os.getcwd()}}, open({str(out)!r}, "w"))
""")
    sink = sink_for(tmp_path, type="exec", command=[str(hook), "--flag"], env={"EXTRA": "1"})
    event = make_event(42, path="/etc/ünï code")
    try:
        sink.deliver([event])
    finally:
        os.close(reader)
        os.close(writer)
    seen = json.loads(out.read_text())
    assert seen["event"] == event and seen["argv"] == ["--flag"]
    assert seen["env"] == {"EXTRA": "1", "INTEGRITY_EVENT_ID": "42",
                           "INTEGRITY_PATH": "/etc/ünï code", "INTEGRITY_SEVERITY": "high",
                           "INTEGRITY_KIND": "modified"}
    assert not seen["leaked"] and not seen["notify"] and seen["leader"]
    assert seen["cwd"] == "/"


def test_exec_failure_reports_the_status_and_the_last_stderr_line(tmp_path: Path) -> None:
    failing = script(tmp_path, "import sys\nsys.stderr.write('noise\\nlast words\\n\\n')\n"
                               "sys.exit(3)\n")
    with pytest.raises(DeliveryError, match=rf"^alert\[0\]:exec: exec {failing}: exit status 3"
                                            r": last words$"):
        sink_for(tmp_path, type="exec", command=[str(failing)]).deliver([make_event()])
    killed = script(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
                    "killed.py")
    with pytest.raises(DeliveryError, match=r"exec .*killed.py: killed by SIGTERM$"):
        sink_for(tmp_path, type="exec", command=[str(killed)]).deliver([make_event()])
    with pytest.raises(DeliveryError, match=r"^alert\[0\]:exec: exec /nonexistent/hook: "
                                            "No such file or directory$"):
        sink_for(tmp_path, type="exec", command=["/nonexistent/hook"]).deliver([make_event()])


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_exec_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A command that outlives its timeout is killed with everything it started.

    The command and its grandchild would wait for ten minutes: the delivery must come
    back because its timeout fired, not because anything ended by itself, and the
    grandchild must die with the group. (The command is a shell script so that it has
    started its grandchild long before the timeout, however loaded the machine.)
    """
    pid_file = tmp_path / "grandchild.pid"
    hang = tmp_path / "hang.sh"
    hang.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > '{pid_file}'\nwait\n")
    hang.chmod(0o755)
    sink = sink_for(tmp_path, type="exec", command=[str(hang)], timeout=1)
    outcome: list[BaseException] = []

    def deliver() -> None:
        try:
            sink.deliver([make_event()])
        except BaseException as exc:  # noqa: BLE001 - checked below, in the test's thread
            outcome.append(exc)

    delivery = threading.Thread(target=deliver, name="exec-delivery")
    delivery.start()
    try:
        wait_until(lambda: not delivery.is_alive(),
                   "the delivery to give up on its command (still waiting on the "
                   "grandchild: the process group was not killed?)", 30)
    finally:
        if delivery.is_alive() and pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # lets the delivery end
        delivery.join(30)
    [error] = outcome
    assert isinstance(error, DeliveryError)
    assert f"exec {hang}: timed out after 1 s" in str(error), str(error)
    grandchild = int(pid_file.read_text())
    wait_until(lambda: not _running(grandchild), "the grandchild to be killed", 10)
