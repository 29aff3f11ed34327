"""The sd_notify protocol against a real AF_UNIX datagram socket the test listens on."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integrity.realtime.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, named by $NOTIFY_SOCKET."""
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def nothing_pending(sock: socket.socket) -> bool:
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def test_exact_datagrams(listener: socket.socket) -> None:
    with Notifier.from_environ() as notifier:
        assert notifier.enabled
        assert notifier.ready("watching 12 directories")
        assert received(listener) == b"READY=1\nSTATUS=watching 12 directories"
        assert notifier.ready()
        assert received(listener) == b"READY=1"
        assert notifier.status("catch-up scan: 40%")
        assert received(listener) == b"STATUS=catch-up scan: 40%"
        assert notifier.watchdog()
        assert received(listener) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert received(listener) == b"STOPPING=1"
        assert notifier.extend_timeout(90)
        assert received(listener) == b"EXTEND_TIMEOUT_USEC=90000000"
    assert nothing_pending(listener)


def test_reloading_carries_monotonic_usec(listener: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier.from_environ().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(listener).split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC" and before <= int(value) <= after


def test_status_cannot_smuggle_assignments(listener: socket.socket) -> None:
    """A file name with a newline must not become a READY=1 line of its own."""
    Notifier.from_environ().status("changed: /etc/evil\nREADY=1")
    assert received(listener) == b"STATUS=changed: /etc/evil READY=1"


def test_undecodable_path_in_status(listener: socket.socket) -> None:
    Notifier.from_environ().status("changed: " + os.fsdecode(b"/etc/\xff"))
    assert received(listener) == b"STATUS=changed: /etc/\\udcff"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"integrity-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier.from_environ().ready("up")
        assert received(sock) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, listener: socket.socket) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert Notifier.from_environ().watchdog_interval == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_environ().watchdog_interval == 30.0
    # Inherited by a child (an exec alert, say): the watchdog belongs to someone else.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier.from_environ().watchdog_interval is None
    monkeypatch.setenv("WATCHDOG_PID", "not-a-pid")
    assert Notifier.from_environ().watchdog_interval is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "", "soon", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert Notifier.from_environ().watchdog_interval is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Notifier.from_environ().watchdog_interval is None


def test_explicit_environ_mapping() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "20000000",
           "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(env).watchdog_interval == 10.0
    # No socket: nobody to ping, whatever the watchdog variables say.
    del env["NOTIFY_SOCKET"]
    assert Notifier.from_environ(env).watchdog_interval is None


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environ()
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False


@pytest.mark.parametrize("value", ["/nonexistent/dir/notify.sock", "@integrity-nobody-listens",
                                   "relative/path", "vsock:2:1234"])
def test_unusable_socket_never_raises(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    notifier = Notifier.from_environ()
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    assert notifier.status("still fine") is False
    notifier.close()


def test_recovers_when_the_manager_comes_back(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed send closes the socket; the next one reconnects rather than staying dead."""
    path = tmp_path / "later.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier.from_environ()
    assert notifier.watchdog() is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        assert notifier.watchdog() is True
        assert received(sock) == b"WATCHDOG=1"
    finally:
        sock.close()
        notifier.close()


def test_a_full_queue_does_not_stall_the_caller(listener: socket.socket,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A manager that stops reading fills the queue; sends then time out, not block."""
    monkeypatch.setattr("integrity.realtime.sdnotify.SEND_TIMEOUT", 0.05)
    notifier = Notifier.from_environ()
    assert notifier.watchdog() is True
    for _ in range(100_000):  # far beyond net.unix.max_dgram_qlen
        started = time.monotonic()
        if not notifier.watchdog():
            break
    else:
        pytest.fail("the queue never filled")
    assert time.monotonic() - started < 1.0
    notifier.close()
