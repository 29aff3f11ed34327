"""The syslog sink: RFC 5424 messages to the local syslog socket (journald, rsyslog).

Options of a `type = "syslog"` table:

- `socket` (default "/dev/log"): absolute path of the local socket. A datagram socket
  is used as such; a stream socket (syslog-ng's unix-stream) is detected by the
  EPROTOTYPE its datagram connect gets, and written newline-framed.
- `facility` (default "authpriv"): kern user mail daemon auth syslog lpr news uucp
  cron authpriv ftp local0 .. local7. authpriv, because integrity alerts name files
  and users, which belong in the restricted log (/var/log/auth.log, secure).
- `app_name` (default "integrity"): the APP-NAME field, 1-48 printable ASCII.
- `timeout` (default 5): seconds a send may block while the logger's queue is full.

Each event is one message: severity low -> notice, medium -> warning, high -> err,
critical -> crit; MSGID is the event kind; the structured data element
`[integrity@32473 id=".." path=".." ...]` carries the fields a log search filters on
and MSG a short human line. A message is kept within 8 KiB (rsyslog's default limit):
past it MSG is shortened (to "..."), and if the structured data alone would not leave
MSG 1 KiB, its longest values (a deep path) are shortened too, never inside an escape,
so the structured data stays valid; a `truncated="path,msg"` parameter says what was
cut. A socket that went away (journald
restarted) is reconnected once before the delivery counts as failed.
"""

from __future__ import annotations

from collections.abc import Sequence

import datetime as dt
import errno
import os
import re
import socket
import threading
from typing import Any, TYPE_CHECKING

from integrity.alerts import DeliveryError
from integrity.alerts.options import Options
from integrity.alerts.text import headline
from integrity.content.diff import shorten
from integrity.paths import escape

#: What of a diff one syslog message carries, escaped onto its one line.
DIFF_BYTES = 1024

if TYPE_CHECKING:
    from integrity.store.events import EventDoc

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}
LEVELS = {"low": 5, "medium": 4, "high": 3, "critical": 2}
#: Private enterprise number used by the structured data id (as in many examples).
SD_ID = "integrity@32473"
MAX_MESSAGE = 8192
# journald restarted, or the socket is not there yet: worth one reconnect.
_RECONNECT = {errno.ENOTCONN, errno.ECONNREFUSED, errno.ENOENT, errno.EPIPE,
              errno.ECONNRESET, errno.EDESTADDRREQ}
_ACTOR_FIELDS = ("pid", "exe", "user", "loginuid")


#: MSG keeps at least this much when long structured data is shortened.
MIN_MSG = 1024
_MARK = "..."
# One unit of escaped text: an escape we made, or one character. Cuts fall between.
_UNIT = re.compile(r"\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|\\U[0-9a-f]{8}|.", re.S)


def _sd_escape(value: Any) -> str:
    """RFC 5424 §6.3.3: '"', '\\' and ']' are escaped with a backslash."""
    return re.sub(r'(["\\\]])', r"\\\1", escape(value))


def _cut(text: str, limit: int, escape_sd: bool) -> str:
    """The longest run of whole units of escaped `text` that, with the marker, takes
    at most `limit` bytes once SD-escaped (or as MSG)."""
    out, size, room = [], 0, limit - len(_MARK)
    for unit in _UNIT.findall(escape(text)):
        piece = _sd_escape(unit) if escape_sd else unit
        size += len(piece.encode("utf-8"))
        if size > room:
            break
        out.append(piece)
    return "".join(out) + _MARK


def _element(params: list[tuple[str, str]], truncated: list[str]) -> str:
    """The SD-ELEMENT of already escaped values."""
    if truncated:
        params = [*params, ("truncated", ",".join(truncated))]
    return f"[{SD_ID}" + "".join(f' {key}="{value}"' for key, value in params) + "]"


def _printable(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, or '-' when empty."""
    text = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return text or "-"


class SyslogSink:
    """Sends one RFC 5424 message per event to a local unix socket."""

    digest = False
    interval = 0.0

    def __init__(self, name: str, min_severity: str = "low", *,
                 address: str = "/dev/log", facility: str = "authpriv",
                 app_name: str = "integrity", timeout: float = 5.0) -> None:
        self.name = name
        self.min_severity = min_severity
        self.address = address
        self.facility = FACILITIES[facility]
        self.app_name = app_name
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def format(self, event: EventDoc) -> bytes:
        """One event as an RFC 5424 message (no framing)."""
        pri = self.facility * 8 + LEVELS.get(event.get("severity", ""), 5)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        header = (f"<{pri}>1 {stamp} {_printable(socket.gethostname(), 255)} "
                  f"{_printable(self.app_name, 48)} {os.getpid()} "
                  f"{_printable(str(event.get('kind', '')), 32)} ")
        params: list[tuple[str, Any]] = [
            ("id", event.get("id")), ("path", event.get("path")),
            ("kind", event.get("kind")), ("severity", event.get("severity")),
            ("changed", ",".join(event.get("changed") or [])),
            ("classification", event.get("classification")),
            ("source", event.get("source"))]
        actor = event.get("actor") or {}
        params += [(key, actor[key]) for key in _ACTOR_FIELDS if actor.get(key) is not None]
        raw = {key: value for key, value in params if value is not None}
        values = [(key, _sd_escape(value)) for key, value in raw.items()]
        # No BOM before MSG: RFC 5424 allows plain MSG-ANY, and journald and many
        # readers show a BOM as garbage.
        text = f"{event.get('severity')}: {headline(event)}"
        if event.get("diff"):  # one line: the diff's newlines show as \x0a
            text += " diff: " + shorten(event["diff"] or "", DIFF_BYTES)
        msg = escape(text)
        size = len(header.encode()) + len(_element(values, []).encode()) + 1
        if size + len(msg.encode()) <= MAX_MESSAGE:
            return f"{header}{_element(values, [])} {msg}".encode("utf-8")
        return self._shortened(header, raw, values, msg)

    @staticmethod
    def _shortened(header: str, raw: dict[str, Any], values: list[tuple[str, str]],
                   msg: str) -> bytes:
        """A message over MAX_MESSAGE cut to fit: the longest SD values first while
        they leave MSG less than MIN_MSG, then MSG; `truncated` names the cuts."""
        reserve = len(' truncated=""') + sum(len(k) + 1 for k in raw) + len("msg")
        budget = MAX_MESSAGE - len(header.encode()) - 1 - reserve \
            - min(len(msg.encode()), MIN_MSG)

        def capped(cap: int) -> tuple[list[tuple[str, str]], list[str]]:
            """Every value longer than cap bytes cut to cap; and which were."""
            out = [(key, _cut(raw[key], cap, escape_sd=True)
                    if len(value.encode()) > cap else value) for key, value in values]
            return out, [key for (key, value), (_, old) in zip(out, values) if value != old]

        cut: list[str] = []
        if len(_element(values, []).encode()) > budget:
            # The largest cap that fits: long values share the room, short ones stay.
            low, high = 64, max(len(value.encode()) for _, value in values)
            while low < high:
                middle = (low + high + 1) // 2
                if len(_element(capped(middle)[0], []).encode()) <= budget:
                    low = middle
                else:
                    high = middle - 1
            values, cut = capped(low)
        room = MAX_MESSAGE - len(header.encode()) - 1 \
            - len(_element(values, [*cut, "msg"]).encode())
        if len(msg.encode()) > room:
            msg = _cut(msg, max(room, len(_MARK)), escape_sd=False)
            cut.append("msg")
        return f"{header}{_element(values, cut)} {msg}".encode("utf-8")

    def deliver(self, events: Sequence[EventDoc]) -> None:
        """Send each event as one message; reconnect once if the logger restarted."""
        for event in events:
            data = self.format(event)
            with self._lock:
                try:
                    self._send(data)
                except OSError as exc:
                    self._drop()
                    if exc.errno not in _RECONNECT:
                        raise self._error(exc) from None
                    try:
                        self._send(data)
                    except OSError as again:
                        self._drop()
                        raise self._error(again) from None

    def reopen(self) -> None:
        """Forget the socket; the next message connects anew."""
        with self._lock:
            self._drop()

    def close(self) -> None:
        """Release the socket."""
        self.reopen()

    # -- under self._lock ---------------------------------------------------------

    def _error(self, exc: OSError) -> DeliveryError:
        cause = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        return DeliveryError(self.name, f"send to {self.address}: {cause}")

    def _send(self, data: bytes) -> None:
        sock = self._connect()
        if sock.type == socket.SOCK_STREAM:
            # Newline framing, as syslog-ng's unix-stream expects; format() leaves no
            # newline inside a message (escape() escapes them).
            sock.sendall(data + b"\n")
        else:
            sock.send(data)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.address)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EPROTOTYPE:
                    raise
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.address)
                except OSError:
                    sock.close()
                    raise
            self._sock = sock
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def build(options: Options) -> SyslogSink:
    """A syslog sink from its [[alert]] table."""
    address = options.path("socket", "/dev/log")
    assert address is not None
    facility = options.choice("facility", tuple(FACILITIES), "authpriv")
    app_name = options.string("app_name", "integrity")
    assert app_name is not None
    if len(app_name) > 48 or not all(33 <= ord(ch) <= 126 for ch in app_name):
        raise options.fail("app_name", "must be 1-48 printable ASCII characters, no spaces")
    return SyslogSink(options.name, options.min_severity, address=address,
                      facility=facility, app_name=app_name,
                      timeout=options.number("timeout", 5.0))
