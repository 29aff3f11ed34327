"""The systemd notification protocol ($NOTIFY_SOCKET), spoken without libsystemd.

`integrity watch` runs as a `Type=notify` service: systemd considers it started only
when it says READY=1 (after its catch-up scan), shows its STATUS= line in `systemctl
status`, and restarts it when the WATCHDOG=1 pings stop. The protocol is a handful of
newline-separated `KEY=value` assignments in one datagram on an AF_UNIX socket, so a
few lines of Python replace a C dependency (libsystemd) or a wrapper package.

Monitoring must never be the thing that fails: every send here swallows its error
(logged at debug level) and reports it only through a False return value. Without
$NOTIFY_SOCKET (run by hand, in a container, under another supervisor) every method is
a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: How long one send may block. A datagram to systemd is queued by the kernel and
#: never waits in practice, but a full receive queue would otherwise stall the watcher
#: on a ping it can afford to lose.
SEND_TIMEOUT = 2.0


def _address(value: str) -> str | None:
    """The socket address named by $NOTIFY_SOCKET, or None when we cannot use it.

    A leading '@' names a socket in the abstract namespace (Linux), which Python
    addresses with a leading NUL. systemd >= 254 may also hand out "vsock:CID:PORT"
    for virtual machines; that is not a protocol this service runs under, so it is
    refused rather than mistaken for a relative path.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _one_line(text: str) -> str:
    """Text safe as a value: a newline would start a new assignment.

    A STATUS built from a path could otherwise smuggle "READY=1" or "STOPPING=1"
    into the message (file names may contain newlines).
    """
    return " ".join(text.splitlines()).replace("\0", " ")


class Notifier:
    """Sends state changes to the service manager that started us, if any.

    Build it with `Notifier.from_environ()`. One instance may be shared by the watcher
    loop and the scheduler's threads: each message is a single sendto() on a datagram
    socket, which the kernel keeps whole, and a lock guards the socket's lifetime.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (sd_watchdog_enabled).

        The watchdog is ours only when WATCHDOG_PID is unset or names this process:
        systemd sets it so that a child which inherited the environment (an `exec`
        alert, say) does not think it has to ping on the service's behalf.
        """
        env = os.environ if environ is None else environ
        raw_socket = env.get("NOTIFY_SOCKET", "")
        address = _address(raw_socket)
        if raw_socket and address is None:
            log.debug("NOTIFY_SOCKET=%r: unsupported address, notifications disabled",
                      raw_socket)
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", "")) or None
        except ValueError:
            usec = None
        pid = env.get("WATCHDOG_PID")
        if usec is not None and pid:
            try:
                if int(pid) != os.getpid():
                    usec = None
            except ValueError:
                usec = None
        if usec is not None and usec < 0:
            usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to talk to."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, or None when no watchdog expects them.

        Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so one late ping
        (a slow scan holding the GIL, a busy disk) does not get us killed.
        """
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str = "") -> bool:
        """READY=1: start-up (and its catch-up scan) is done; units ordered after us run."""
        return self.send("READY=1", *(("STATUS=" + _one_line(status),) if status else ()))

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by `systemctl status integrity`."""
        return self.send("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: still alive. Send every `watchdog_interval` seconds."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1: shutting down on purpose (SIGTERM), so no watchdog alarm follows."""
        return self.send("STOPPING=1", *(("STATUS=" + _one_line(status),) if status else ()))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC=, at the start of a policy reload (SIGHUP).

        systemd then shows the unit as "reloading" until the next READY=1, so follow
        with `ready()` whether the new policy was accepted or refused. MONOTONIC_USEC is
        what systemd >= 253 requires for Type=notify-reload; our unit is Type=notify,
        where it is merely informational, but sending it keeps the unit portable.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: we are making progress; allow `seconds` more.

        The catch-up scan runs before READY=1 and on a large host can outlast
        TimeoutStartSec=; sending this periodically during it keeps systemd from
        killing a start-up that is merely slow, while a hung one still times out.
        """
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def send(self, *assignments: str) -> bool:
        """Send raw `KEY=value` assignments as one datagram; True when it was sent.

        Never raises: a service manager that went away, a socket we may not write to
        or a full queue is logged at debug level and otherwise ignored.
        """
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "backslashreplace")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX,
                                         socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(SEND_TIMEOUT)
                    self._sock = sock
                self._sock.sendto(message, self._address)
            except OSError as exc:
                log.debug("sd_notify %r to %r failed: %s (ignored)",
                          message, self._address, exc)
                self._close()
                return False
        return True

    def close(self) -> None:
        """Release the socket; a later send opens a new one."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
