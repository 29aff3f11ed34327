"""The webhook sink: an HTTP(S) POST per event (JSON) or per digest (Slack, Teams).

Options of a `type = "webhook"` table:

- `url` or `url_file` (one is required): http:// or https:// endpoint. Slack and Teams
  webhook URLs are themselves secrets: give those as `url_file`, a file holding the
  URL, read at every delivery.
- `format` (default "json"): "json" posts the event object itself, one request per
  event; "slack" posts {"text": ...}; "teams" posts a MessageCard (title, colour by
  severity, text), which Teams connectors and Power Automate flows accept. The chat
  formats are digests: one message per `digest_interval`.
- `digest_interval` (seconds, default 60; chat formats only).
- `timeout` (seconds, default 10): per connection attempt and per read; an attempt as
  a whole (connecting, sending, the reply) at most three times that, so a peer that
  trickles its reply a byte at a time is cut off (alerts/deadline.py).
- `retries` (default 2): further attempts within one delivery after a network error,
  a timeout, HTTP 408, 429 or 5xx, waiting 0.5 s, 1 s, ... or what Retry-After asks,
  up to 30 s. Other 4xx are not retried: the request itself is wrong. Redirects are
  not followed (a POST turned into a GET would be "delivered" nowhere).
- `secret_file`: a file holding an HMAC key; each request then carries
  `X-Integrity-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>` and
  `X-Integrity-Timestamp: <unix seconds>`.
- `headers`: table of literal headers. Names that look like credentials
  (Authorization, Cookie, *token*, *key*, *secret*, ...) are refused here.
- `header_files`: table of header name -> file whose stripped content is the value,
  e.g. Authorization = "/etc/integrity/hec-token" holding "Splunk 1234-...".
- `ca_file`: PEM bundle trusted instead of the system's (a private CA).

Receivers should de-duplicate on the event `id`: a delivery that timed out may have
arrived, and the dispatcher delivers it again.
"""

from __future__ import annotations

from collections.abc import Sequence

import email.utils
import hashlib
import hmac
import http.client
import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TYPE_CHECKING

from integrity import __version__
from integrity.alerts import DeliveryError, network_cause, read_secret
from integrity.alerts import text as render
from integrity.alerts.deadline import Deadline
from integrity.paths import escape
from integrity.alerts.options import Options

if TYPE_CHECKING:
    from integrity.store.events import EventDoc

FORMATS = ("json", "slack", "teams")
RETRY_AFTER_CAP = 30.0
BACKOFF = 0.5
#: One attempt (connect, request, reply) takes at most this many `timeout`s.
ATTEMPT = 3
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SECRET_NAME = re.compile(r"auth|token|secret|key|passw|cookie|session", re.I)
_OURS = {"content-length", "host", "transfer-encoding", "connection",
         "x-integrity-signature", "x-integrity-timestamp"}
_COLOURS = {"low": "2EB886", "medium": "DAA038", "high": "E01E5A", "critical": "8B0000"}
_SLACK_LIMIT = 39000  # Slack truncates "text" beyond 40,000 characters


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx becomes an HTTPError: a failed delivery


def _timed(base: type[http.client.HTTPConnection],
           deadline: Deadline) -> type[http.client.HTTPConnection]:
    """A connection class whose sockets `deadline` shuts down when time is up."""
    class Timed(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = deadline.connect
    return Timed


class _Http(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_timed(http.client.HTTPConnection, self.deadline), req)


class _Https(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, deadline: Deadline) -> None:
        super().__init__(context=context)
        self.context, self.deadline = context, deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_timed(http.client.HTTPSConnection, self.deadline), req,
                            context=self.context)


class WebhookSink:
    """POSTs events to an HTTP endpoint; chat formats send one digest per interval."""

    def __init__(self, name: str, min_severity: str = "low", *, url: str | None = None,
                 url_file: str | None = None, format: str = "json", timeout: float = 10.0,
                 retries: int = 2, secret_file: str | None = None,
                 headers: dict[str, str] | None = None,
                 header_files: dict[str, str] | None = None, ca_file: str | None = None,
                 interval: float = 60.0) -> None:
        self.name = name
        self.min_severity = min_severity
        self.format = format
        self.digest = format != "json"
        self.interval = interval
        self.url, self.url_file = url, url_file
        self.timeout = timeout
        self.retries = retries
        self.secret_file = secret_file
        self.headers = dict(headers or {})
        self.header_files = dict(header_files or {})
        self.ca_file = ca_file
        self._shown = _shown(url) if url else f"the URL in {url_file}"

    def deliver(self, events: Sequence[EventDoc]) -> None:
        """POST each event (json) or one message for all of them (slack, teams)."""
        if self.format == "json":
            for event in events:
                self._post(json.dumps(event, ensure_ascii=False,
                                      separators=(",", ":")).encode("utf-8"))
        else:
            self._post(json.dumps(self.message(events), ensure_ascii=False).encode("utf-8"))

    def message(self, events: Sequence[EventDoc]) -> dict[str, Any]:
        """The chat payload for events: Slack {"text"} or a Teams MessageCard."""
        title = render.subject(events, socket.gethostname())
        body = render.body(events)
        if self.format == "slack":
            body = body if len(body) <= _SLACK_LIMIT else body[:_SLACK_LIMIT] + "\n..."
            return {"text": f"{_slack(title)}\n```\n{_slack(body)}\n```"}
        return {"@type": "MessageCard", "@context": "https://schema.org/extensions",
                "summary": title, "title": _markdown(title),
                "themeColor": _COLOURS.get(render.highest(events), "808080"),
                "text": "\n\n".join(_markdown(line) for line in body.splitlines() if line)}

    def reopen(self) -> None:
        """Nothing stays open between deliveries."""

    def close(self) -> None:
        """Nothing stays open between deliveries."""

    # -- one request, retried -------------------------------------------------------

    def _post(self, body: bytes) -> None:
        url = self._url()
        headers = self._headers(body)
        context = self._context()
        delay = BACKOFF
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            wait: float | None = None
            with Deadline(ATTEMPT * self.timeout) as deadline:
                opener = urllib.request.build_opener(_Http(deadline),
                                                     _Https(context, deadline), _NoRedirect())
                try:
                    with opener.open(request, timeout=self.timeout) as response:
                        response.read(65536)
                    # A reply cut off by the deadline can parse as a whole one.
                    retry, detail = True, ""
                except urllib.error.HTTPError as exc:
                    detail = f"HTTP {exc.code}" + _reply(exc)
                    retry = exc.code in (408, 429) or exc.code >= 500
                    wait = _retry_after(exc.headers.get("Retry-After"))
                    exc.close()
                except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                    detail = network_cause(reason)
                    retry = not isinstance(reason, ssl.SSLCertVerificationError)
            if deadline.expired:
                detail = f"no whole reply within {ATTEMPT * self.timeout:g} s"
            elif not detail:
                return
            if not retry or attempt == self.retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise DeliveryError(self.name, f"POST {self._shown}: {detail}{tries}")
            time.sleep(min(wait, RETRY_AFTER_CAP) if wait is not None else delay)
            delay *= 2

    def _url(self) -> str:
        if self.url_file is None:
            assert self.url is not None
            return self.url
        url = read_secret(self.name, self.url_file)
        if _bad_url(url):
            raise DeliveryError(self.name, f"{self.url_file} does not hold an http(s) URL")
        return url

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "User-Agent": f"integrity/{__version__}", **self.headers}
        for header, path in self.header_files.items():
            value = read_secret(self.name, path)
            if "\n" in value or "\r" in value:
                raise DeliveryError(self.name, f"header file {path} holds more than one line")
            headers[header] = value
        if self.secret_file is not None:
            key = read_secret(self.name, self.secret_file).encode("utf-8")
            digest = hmac.new(key, body, hashlib.sha256).hexdigest()
            headers["X-Integrity-Signature"] = f"sha256={digest}"
            headers["X-Integrity-Timestamp"] = str(int(time.time()))
        return headers

    def _context(self) -> ssl.SSLContext:
        # Built per delivery so a renewed ca_file is picked up without a restart.
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(self.name, f"cannot load ca_file {self.ca_file}: "
                                           f"{network_cause(exc)}") from None


def _shown(url: str) -> str:
    """A URL for messages: no query string, which may carry a token."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _bad_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme not in ("http", "https") or not parts.hostname \
        or any(ch.isspace() for ch in url)


def _reply(exc: urllib.error.HTTPError) -> str:
    """The start of an error reply's body: Slack and most APIs say what was wrong."""
    try:
        text = exc.read(300).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        return ""
    return f": {escape(text)[:200]}" if text else ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _slack(value: str) -> str:
    """Slack's three control characters, escaped as Slack asks."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _markdown(value: str) -> str:
    """Teams text is markdown: keep '*', '_' and friends in paths literal."""
    return re.sub(r"([\\`*_{}\[\]#|~])", r"\\\1", _slack(value))


def build(options: Options) -> WebhookSink:
    """A webhook sink from its [[alert]] table."""
    url = options.string("url")
    url_file = options.path("url_file")
    if (url is None) == (url_file is None):
        raise options.fail("url", "exactly one of url and url_file is required")
    if url is not None:
        if _bad_url(url):
            raise options.fail("url", f"must be an http:// or https:// URL, not {url!r}")
        if urllib.parse.urlsplit(url).password is not None:
            raise options.fail("url", "must not hold a password: use header_files")
    style = options.choice("format", FORMATS, "json")
    if style == "json" and options.has("digest_interval"):
        raise options.fail("digest_interval", "applies to format slack and teams only")
    headers = options.table("headers")
    header_files = options.table("header_files")
    for key, table in (("headers", headers), ("header_files", header_files)):
        for header, value in table.items():
            if not _TOKEN.fullmatch(header) or header.lower() in _OURS:
                raise options.fail(f"{key}.{header}", "is not a header name we may set")
            if key == "headers" and _SECRET_NAME.search(header):
                raise options.fail(f"{key}.{header}", "looks like a credential: put the "
                                   "value in a file and name it under header_files")
            if key == "header_files" and not value.startswith("/"):
                raise options.fail(f"{key}.{header}", "must be an absolute path")
    both = {h.lower() for h in headers} & {h.lower() for h in header_files}
    if both:
        raise options.fail(f"header_files.{sorted(both)[0]}", "is also set under headers")
    return WebhookSink(
        options.name, options.min_severity, url=url, url_file=url_file, format=style,
        timeout=options.number("timeout", 10.0),
        retries=options.integer("retries", 2),
        secret_file=options.path("secret_file"), headers=headers, header_files=header_files,
        ca_file=options.path("ca_file"), interval=options.number("digest_interval", 60.0))
