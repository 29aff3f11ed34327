"""/metrics for the watcher: a small HTTP server that whoever can reach the listen
address cannot turn against the watcher.

prometheus_client's own server starts a thread per connection with no limit and no
timeout, so a client that opens connections and never sends a request holds a thread
and a file descriptor of the watcher for ever. A thousand of them exhaust the
descriptors systemd gives a service (1024): the watcher can no longer open a file to
hash it, and changes are recorded as "Too many open files" instead of being checked.

This server is one thread with a selector, so idle clients cost no thread at all, and:

- at most `MAX_CONNECTIONS` connections are open at once. A new connection beyond that
  closes the oldest one, not itself: an idle client is always the oldest, while a real
  scraper sends its request the moment it connects, so a few idle connections re-opened
  every few seconds cannot lock Prometheus out (as refusing new ones would allow);
- a client has `REQUEST_SECONDS` from connecting to the end of its request's headers,
  and `SEND_SECONDS` to take the answer; a request longer than `MAX_REQUEST` bytes is
  refused with 431;
- only GET and HEAD of /metrics are answered (405, 404 otherwise), one per connection;
- the registry is rendered by prometheus_client's WSGI app (content negotiation, gzip,
  `name[]`), one request at a time, and a rendering is reused for `CACHE_SECONDS`, so a
  flood of scrapes costs the database one query set a second, on one connection;
- dropped connections are counted and logged at most once a minute, never one line
  per connection.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from integrity.ops.metrics import StoreCollector

log = logging.getLogger(__name__)

#: Connections open at once; the oldest is closed for a new one beyond this.
MAX_CONNECTIONS = 16
#: Seconds from accept to the end of the request's headers.
REQUEST_SECONDS = 5.0
#: Seconds to send the answer to a client that reads it slowly.
SEND_SECONDS = 10.0
#: Bytes of request line and headers at most.
MAX_REQUEST = 8192
#: Seconds a rendering of the metrics is reused for identical requests.
CACHE_SECONDS = 1.0
#: Seconds between two log lines about dropped connections.
LOG_EVERY = 60.0
#: Seconds the listener stops accepting after accept() failed for want of descriptors.
PAUSE_SECONDS = 1.0
#: The kernel's queue of connections not yet accepted (we accept as fast as they come).
BACKLOG = 64

_REASONS = {"evicted": f"more than {MAX_CONNECTIONS} open at once",
            "idle": f"no complete request within {REQUEST_SECONDS:g} s",
            "slow": f"answer not taken within {SEND_SECONDS:g} s",
            "refused": "bad, oversized or not a GET/HEAD of /metrics",
            "accept": "accept() failed"}


class _Client:
    """One accepted connection: what it sent so far, or what is left to send it."""

    __slots__ = ("sock", "deadline", "received", "pending")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = b""
        self.pending: memoryview | None = None  # set once the answer is ready


class MetricsServer:
    """/metrics over HTTP for the watcher: one thread, bounded in connections, time
    and request size (see the module's docstring)."""

    def __init__(self, address: tuple[str, int], collector: StoreCollector) -> None:
        self.address = address
        self.collector = collector
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._clients: collections.OrderedDict[int, _Client] = collections.OrderedDict()
        self._cache: dict[tuple[str, str, str], tuple[float, str, list[tuple[str, str]],
                                                      bytes]] = {}
        self._dropped: collections.Counter[str] = collections.Counter()
        self._next_log = 0.0
        self._paused_until = 0.0
        self._app: Callable[..., Iterable[bytes]] | None = None

    def start(self) -> None:
        """Listen; OSError (address in use, not permitted) is the caller's to report."""
        from prometheus_client import make_wsgi_app

        from integrity.ops.metrics import registry_for

        host, port = self.address
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        try:
            # A restarted watcher must not wait out the old connections' TIME_WAIT;
            # Linux still refuses a port another socket listens on.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(where)
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._app = make_wsgi_app(registry_for(self.collector))
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port bound (the one asked for, or the kernel's pick for 0)."""
        return int(self._listener.getsockname()[1]) if self._listener else 0

    def stop(self) -> None:
        """Stop serving: the thread ends, every connection and the listener close."""
        if self._thread is not None:
            self._stopping = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the pipe is full: the thread is awake already
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # --- the thread ------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, "listen")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                for key, _ in selector.select(self._timeout()):
                    if key.data == "listen":
                        self._accept(selector)
                    elif isinstance(key.data, _Client):
                        self._step(selector, key.data)
                self._expire(selector)
        except Exception:  # never silently: /metrics would just go dark
            log.exception("metrics: the /metrics listener failed (no /metrics)")
        finally:
            for client in list(self._clients.values()):
                self._close(selector, client)
            selector.close()
            if self._dropped:  # what the last minute's line has not said yet
                self._log_dropped()

    def _timeout(self) -> float | None:
        """Seconds until the next deadline, log line or end of an accept pause."""
        times = [c.deadline for c in self._clients.values()]
        if self._dropped:
            times.append(self._next_log)
        if self._paused_until:
            times.append(self._paused_until)
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._listener is not None
        for _ in range(BACKLOG):  # then serve the others; the rest waits in the queue
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS: the listener stays readable, so accepting
                # again at once would spin. Stop for a moment; the queue waits.
                self._drop("accept")
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    selector.unregister(self._listener)
                    self._paused_until = time.monotonic() + PAUSE_SECONDS
                return
            sock.setblocking(False)
            while len(self._clients) >= MAX_CONNECTIONS:
                self._drop("evicted")
                self._close(selector, next(iter(self._clients.values())))
            client = _Client(sock, time.monotonic() + REQUEST_SECONDS)
            self._clients[sock.fileno()] = client
            selector.register(sock, selectors.EVENT_READ, client)

    def _step(self, selector: selectors.BaseSelector, client: _Client) -> None:
        """The client's socket is ready: read its request, or send what is left."""
        try:
            if client.pending is None:
                data = client.sock.recv(MAX_REQUEST + 1 - len(client.received))
                if not data:
                    self._close(selector, client)
                    return
                client.received += data
                head, found, _ = client.received.partition(b"\r\n\r\n")
                if not found:
                    head, found, _ = client.received.partition(b"\n\n")
                if found:
                    self._respond(selector, client, self._answer(head))
                elif len(client.received) > MAX_REQUEST:
                    self._drop("refused")
                    self._respond(selector, client, _plain(
                        "431 Request Header Fields Too Large", "request too large"))
                return
            sent = client.sock.send(client.pending)
            client.pending = client.pending[sent:]
            if not client.pending:
                self._close(selector, client)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset by the peer, and the like
            self._close(selector, client)

    def _respond(self, selector: selectors.BaseSelector, client: _Client,
                 answer: bytes) -> None:
        client.pending = memoryview(answer)
        client.deadline = time.monotonic() + SEND_SECONDS
        selector.modify(client.sock, selectors.EVENT_WRITE, client)
        self._step(selector, client)  # most answers fit the socket's buffer at once

    def _answer(self, head: bytes) -> bytes:
        """The whole HTTP response to one request's line and headers."""
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._drop("refused")
            return _plain("400 Bad Request", "bad request")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            self._drop("refused")
            return _plain("405 Method Not Allowed", "use GET or HEAD",
                          [("Allow", "GET, HEAD")])
        url = urlsplit(target)
        if url.path != "/metrics":
            self._drop("refused")
            return _plain("404 Not Found", "metrics are at /metrics")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        status, fields, body = self._render(url.query, headers.get("accept", ""),
                                            headers.get("accept-encoding", ""))
        return _response(status, fields, body, head_only=method == "HEAD")

    def _render(self, query: str, accept: str, encoding: str
                ) -> tuple[str, list[tuple[str, str]], bytes]:
        """prometheus_client's rendering of the registry, reused for CACHE_SECONDS."""
        key = (query, accept, encoding)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1:]
        assert self._app is not None
        started: list[Any] = []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query,
                   "HTTP_ACCEPT": accept, "HTTP_ACCEPT_ENCODING": encoding}
        try:
            body = b"".join(self._app(environ, lambda s, h: started.extend((s, h))))
        except Exception as exc:  # the database, most likely: say so, serve a 500
            log.warning("metrics: collecting failed: %s (answered 500)", exc)
            return "500 Internal Server Error", [], b"collecting metrics failed\n"
        self._cache = {k: v for k, v in self._cache.items() if now - v[0] < CACHE_SECONDS}
        self._cache[key] = (now, started[0], list(started[1]), body)
        return started[0], list(started[1]), body

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop("idle" if client.pending is None else "slow")
            self._close(selector, client)
        if self._paused_until and now >= self._paused_until and self._listener:
            self._paused_until = 0.0
            selector.register(self._listener, selectors.EVENT_READ, "listen")
        if self._dropped and now >= self._next_log:
            self._log_dropped()
            self._next_log = now + LOG_EVERY

    def _log_dropped(self) -> None:
        counts = ", ".join(f"{n} {_REASONS[why]}" for why, n in
                           sorted(self._dropped.items()))
        log.warning("metrics: dropped %d connections to /metrics (%s); at most %d "
                    "are served at once", sum(self._dropped.values()), counts,
                    MAX_CONNECTIONS)
        self._dropped.clear()

    def _drop(self, why: str) -> None:
        self._dropped[why] += 1

    def _close(self, selector: selectors.BaseSelector, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        try:
            selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()


def _plain(status: str, text: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    return _response(status, [("Content-Type", "text/plain; charset=utf-8"),
                              *(extra or [])], f"{text}\n".encode())


def _response(status: str, fields: list[tuple[str, str]], body: bytes, *,
              head_only: bool = False) -> bytes:
    """HTTP/1.1, one answer per connection (as prometheus_client's server did)."""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in fields),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)
