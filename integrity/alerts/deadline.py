"""A time limit for a whole network conversation (the webhook and e-mail sinks).

A socket timeout bounds each connect, send and receive, never the conversation: a
peer that answers one byte every few seconds never trips it, and holds the
dispatcher, so every sink behind it, and a timer's `verify` that then never ends (nor
lets the next scheduled one start), for as long as it likes. A `Deadline` makes the
sockets it opened and shuts them down when its time is up, which ends whatever read
or write waits on them; the sink then fails as after any network error.
"""

from __future__ import annotations

import socket
import threading
from typing import Any


class Deadline:
    """Shuts down the sockets made through `connect` `seconds` after entering."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        #: True once the time was up (the caller words its error by it).
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def connect(self, address: tuple[str, int], timeout: Any = None,
                source_address: Any = None, **kwargs: Any) -> socket.socket:
        """socket.create_connection, the socket watched (http.client and smtplib call
        it with these arguments)."""
        sock = socket.create_connection(address, timeout, source_address, **kwargs)
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def __enter__(self) -> Deadline:
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already, or never connected
