"""The email sink: one message per digest interval, over SMTP (smtplib).

Options of a `type = "email"` table:

- `host` (required): the SMTP server (relay or submission server).
- `security` (default "starttls"): "starttls" upgrades a plain connection and fails
  if the server does not offer it; "tls" is implicit TLS (SMTPS); "none" sends in the
  clear (a local MTA on localhost:25) and then allows no login.
- `port` (default 587 with starttls, 465 with tls, 25 with none).
- `username` and `password_file` (both or neither): AUTH (PLAIN or LOGIN, whichever
  the server offers); the password is read from the file at each delivery.
- `from` (required): the sender address; `to` (required): array of recipients.
- `subject_prefix` (default "[integrity]").
- `timeout` (seconds, default 30): per connect and per server reply; the whole
  conversation at most four times that (a server trickling its replies is cut off).
- `ca_file`: PEM bundle trusted instead of the system's (a private CA).
- `digest_interval` (seconds, default 300).

The subject names the host, the count and the highest severity ("[integrity] web1:
37 changes (2 critical)"); the body lists the events, most severe first. Messages are
marked `Auto-Submitted: auto-generated` so vacation responders stay quiet.
"""

from __future__ import annotations

from collections.abc import Sequence

import logging
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, TYPE_CHECKING

from integrity.alerts import DeliveryError, network_cause, read_secret
from integrity.alerts import text as render
from integrity.alerts.deadline import Deadline
from integrity.alerts.options import Options
from integrity.paths import escape

if TYPE_CHECKING:
    from integrity.store.events import EventDoc

log = logging.getLogger(__name__)

SECURITY = ("starttls", "tls", "none")
PORTS = {"starttls": 587, "tls": 465, "none": 25}
#: The whole conversation (greeting to QUIT) takes at most this many `timeout`s.
CONVERSATION = 4


class MailSink:
    """Sends events as one e-mail per delivery (a single event, or a digest)."""

    digest = True

    def __init__(self, name: str, min_severity: str = "low", *, host: str,
                 sender: str, recipients: list[str], port: int | None = None,
                 security: str = "starttls", username: str | None = None,
                 password_file: str | None = None, subject_prefix: str = "[integrity]",
                 timeout: float = 30.0, ca_file: str | None = None,
                 interval: float = 300.0) -> None:
        self.name = name
        self.min_severity = min_severity
        self.interval = interval
        self.host = host
        self.port = port or PORTS[security]
        self.security = security
        self.sender, self.recipients = sender, list(recipients)
        self.username, self.password_file = username, password_file
        self.subject_prefix = subject_prefix
        self.timeout = timeout
        self.ca_file = ca_file

    def message(self, events: Sequence[EventDoc]) -> EmailMessage:
        """The e-mail for events: subject with host, count and highest severity."""
        host = socket.gethostname()
        msg = EmailMessage()
        msg["Subject"] = f"{self.subject_prefix} {render.subject(events, host)}".strip()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid("integrity", domain=host)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Integrity-Events"] = ",".join(str(e.get("id")) for e in events[:50])
        msg.set_content(f"integrity on {escape(host)}\n\n{render.body(events)}\n")
        return msg

    def deliver(self, events: Sequence[EventDoc]) -> None:
        """Send one message for all events."""
        msg = self.message(events)
        password = (read_secret(self.name, self.password_file)
                    if self.password_file is not None else None)
        where = f"SMTP {self.host}:{self.port}"
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(self.name, f"cannot load ca_file {self.ca_file}: "
                                           f"{_cause(exc)}") from None
        try:
            refused = self._send(msg, password, context)
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(self.name, f"{where}: login as {self.username} refused: "
                                           f"{_cause(exc)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(self.name, f"{where}: {_cause(exc)}") from None
        if refused:
            # Some recipients have it: failing would make the dispatcher send it to
            # them again. Say who missed it instead.
            log.error("%s: %s refused %s", self.name, where,
                      ", ".join(f"{rcpt} ({_cause(reply)})" for rcpt, reply in refused.items()))

    def _send(self, msg: EmailMessage, password: str | None,
              context: ssl.SSLContext) -> dict[str, tuple[int, bytes]]:
        # The conversation as a whole is bounded too: a server trickling its replies
        # a byte at a time must not hold every other sink (alerts/deadline.py).
        with Deadline(CONVERSATION * self.timeout) as deadline:
            try:
                refused = self._converse(deadline, msg, password, context)
            except (smtplib.SMTPException, OSError):
                if not deadline.expired:
                    raise
                refused = {}
        if deadline.expired:
            raise smtplib.SMTPException(f"no whole conversation within "
                                        f"{CONVERSATION * self.timeout:g} s")
        return refused

    def _converse(self, deadline: Deadline, msg: EmailMessage, password: str | None,
                  context: ssl.SSLContext) -> dict[str, tuple[int, bytes]]:
        smtp: smtplib.SMTP
        watched = {"deadline": deadline}
        if self.security == "tls":
            tls: type[_TimedTls] = type("Client", (_TimedTls,), watched)
            smtp = tls(self.host, self.port, timeout=self.timeout, context=context)
        else:
            plain: type[_Timed] = type("Client", (_Timed,), watched)
            smtp = plain(self.host, self.port, timeout=self.timeout)
        try:
            smtp.ehlo()
            if self.security == "starttls":
                smtp.starttls(context=context)  # refuses a server without STARTTLS
                smtp.ehlo()
            if self.username is not None and password is not None:
                smtp.login(self.username, password)
            return smtp.send_message(msg, self.sender, self.recipients)
        finally:
            # Not `with smtp`: a QUIT that fails after the message was accepted must
            # not turn a delivered message into a failed (and repeated) one.
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    def reopen(self) -> None:
        """Nothing stays open between deliveries."""

    def close(self) -> None:
        """Nothing stays open between deliveries."""


class _Timed(smtplib.SMTP):
    """smtplib.SMTP whose socket a Deadline (a class attribute, set before the
    constructor connects) watches."""

    deadline: Deadline

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self.deadline.connect((host, port), timeout, self.source_address)


class _TimedTls(smtplib.SMTP_SSL, _Timed):
    """SMTP_SSL wraps the socket _Timed makes."""


def _cause(exc: Any) -> str:
    """An SMTP reply or socket error as text."""
    if isinstance(exc, tuple) and len(exc) == 2:
        code, text = exc
        return f"{code} {text.decode('utf-8', 'replace') if isinstance(text, bytes) else text}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "every recipient refused: " + ", ".join(
            f"{rcpt} ({_cause(reply)})" for rcpt, reply in exc.recipients.items())
    if isinstance(exc, smtplib.SMTPResponseException):
        return _cause((exc.smtp_code, exc.smtp_error))
    return network_cause(exc)


def _address(options: Options, key: str, value: str) -> str:
    if "@" not in value or any(ch.isspace() or ch in "<>,\"" for ch in value):
        raise options.fail(key, f"must be a plain e-mail address (user@host), not {value!r}")
    return value


def build(options: Options) -> MailSink:
    """An email sink from its [[alert]] table."""
    host = options.required("host")
    security = options.choice("security", SECURITY, "starttls")
    port = options.integer("port", PORTS[security], minimum=1)
    if port > 65535:
        raise options.fail("port", f"must be a TCP port (1-65535), not {port}")
    username = options.string("username")
    password_file = options.path("password_file")
    if (username is None) != (password_file is None):
        raise options.fail("username" if username is None else "password_file",
                           "username and password_file go together")
    if username is not None and security == "none":
        raise options.fail("username", "a login needs security = \"starttls\" or \"tls\": "
                                        "the password would cross the network in clear")
    sender = _address(options, "from", options.required("from"))
    recipients = [_address(options, "to", to) for to in options.strings("to")]
    prefix = options.string("subject_prefix", "[integrity]")
    assert prefix is not None
    return MailSink(
        options.name, options.min_severity, host=host, sender=sender,
        recipients=recipients, port=port, security=security, username=username,
        password_file=password_file, subject_prefix=prefix,
        timeout=options.number("timeout", 30.0), ca_file=options.path("ca_file"),
        interval=options.number("digest_interval", 300.0))
