"""Alert sinks: where recorded events go. One module per sink type.

A sink only delivers. The dispatcher (outbox table, retries with backoff, digest
batching) decides when: it hands a machine sink (`digest` False: jsonl, syslog, exec,
webhook with format "json") exactly one event per `deliver` call, and a sink people
read (`digest` True: email, chat-formatted webhooks) every event of one `interval` at
once, which the sink sends as ONE message. A sink that cannot deliver raises
`DeliveryError` and nothing else, so the dispatcher can keep the event and try again
later; it never loses an alert to an unexpected exception type.

Each [[alert]] table's options are validated in `build_sinks`, so a typo is refused
when the policy is loaded (naming the file and key), not discovered at the first
alert. Secrets (tokens, passwords, HMAC keys, chat webhook URLs) are never written in
the policy, which is often world-readable: options ending in `_file` name a file that
is read at delivery time, so a rotated secret takes effect without a restart.

Every table may set `name` (letters, digits, '.', '_', '-'): undelivered alerts are
owed to a sink by name, and the default name ("alert[2]:webhook") changes when the
tables are reordered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from integrity.policy.severity import at_least

if TYPE_CHECKING:
    from integrity.store.events import EventDoc
    from integrity.policy import Policy


class DeliveryError(Exception):
    """One alert could not be delivered: '<sink name>: <what failed>: <cause>'."""

    def __init__(self, sink: str, cause: str) -> None:
        # One line, whatever the cause carried (server replies can span lines).
        # Escaped as well: it reaches logs and `status`, and carries what a server said.
        from integrity.paths import escape

        self.sink = sink
        self.cause = escape(" ".join(str(cause).split()))
        super().__init__(f"{sink}: {self.cause}")


class Sink(Protocol):
    """Delivers events somewhere; built from one [[alert]] table."""

    name: str            # the table's `name`, else "alert[2]:webhook"; the outbox key
    min_severity: str    # low | medium | high | critical
    digest: bool         # True: gets 1..N events per interval and sends one message
    interval: float      # seconds between digests (ignored when digest is False)

    def deliver(self, events: Sequence[EventDoc]) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Route:
    """A sink as recording needs it: its name and the least severity it takes."""

    sink: str
    min_severity: str

    def wants(self, severity: str) -> bool:
        return at_least(severity, self.min_severity)


def routes_of(sinks: Iterable[Sink]) -> list[Route]:
    """The routes of alert sinks: what the event log owes each new event to."""
    return [Route(sink.name, sink.min_severity) for sink in sinks]


def wants(sink: Sink, event: EventDoc) -> bool:
    """Whether an event is severe enough for a sink."""
    return at_least(event["severity"], sink.min_severity)


def network_cause(exc: Any) -> str:
    """A timeout, certificate or socket error as the short text a log line needs."""
    import ssl

    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


#: Characters JSON leaves raw in a string that str.splitlines() (and readers built
#: on it) take for the end of a line.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029",
                              "\u0085": "\\u0085"})


def json_line(event: Any) -> str:
    """An event as one line of JSON (no newline), exact, that no reader can split:
    a file name holding U+2028 must not end its alert's line and start a forged one."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")
                      ).translate(_LINE_BREAKS)


def read_secret(sink: str, path: str) -> str:
    """The stripped content of a secret file, read now so rotation needs no restart."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DeliveryError(sink, f"cannot read secret file {path}: {cause}") from None
    if not value:
        raise DeliveryError(sink, f"secret file {path} is empty")
    return value


def build_sinks(policy: Policy) -> list[Sink]:
    """The sinks of a policy's [[alert]] tables, every option checked.

    Raises PolicyError naming the file and `alert[i].key` for a bad or unknown key.
    """
    if not policy.alerts:
        return []
    from importlib import import_module

    from integrity.alerts.options import Options

    # Only the sinks a policy names are imported: webhook and e-mail pull in http,
    # ssl and email (~20 ms), which a `verify` without them should not pay.
    modules = {"jsonl": "jsonl", "syslog": "syslog", "webhook": "webhook",
               "email": "mail", "exec": "command"}
    sinks: list[Sink] = []
    for index, table in enumerate(policy.alerts):
        options = Options(policy.source, index, table)
        module = modules.get(options.type)
        if module is None:
            raise options.fail("type", f"must be one of {', '.join(modules)}")
        builder: Callable[[Options], Sink] = import_module(
            f"integrity.alerts.{module}").build
        sink = builder(options)
        options.finish()
        if any(other.name == sink.name for other in sinks):
            raise options.fail("name", f"{sink.name!r} names another sink already")
        sinks.append(sink)
    return sinks
