"""Alert sinks: where recorded events go. One module per sink type.

A sink receives events as SPEC's JSON objects; `min_severity` filters them. Sinks
configured in the policy but not built yet (syslog, webhook, email, exec) are
refused at start-up with a clear message rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import PolicyError
from ..policy import SEVERITIES, Policy


class Sink(Protocol):
    """Delivers events somewhere."""

    min_severity: str

    def send(self, event: dict[str, Any]) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


def wants(sink: Sink, event: dict[str, Any]) -> bool:
    """Whether an event is severe enough for a sink."""
    return SEVERITIES.index(event["severity"]) >= SEVERITIES.index(sink.min_severity)


def build_sinks(policy: Policy) -> list[Sink]:
    """The sinks of a policy's [[alert]] tables."""
    from .jsonl import JsonlSink

    sinks: list[Sink] = []
    for index, alert in enumerate(policy.alerts):
        kind = alert["type"]
        if kind == "jsonl":
            path = alert.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise PolicyError(f"{policy.source}: alert[{index}].path: an absolute path "
                                  "is required for a jsonl sink")
            sinks.append(JsonlSink(path, alert.get("min_severity", "low")))
        else:
            raise PolicyError(f"{policy.source}: alert[{index}].type: {kind!r} sinks are "
                              "not available in this version (jsonl is)")
    return sinks
