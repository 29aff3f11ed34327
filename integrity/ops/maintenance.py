"""Keeping a host's records bounded and its alert paths proven: prune and alert test."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from integrity.alerts import build_sinks
from integrity.alerts.dispatch import probe_sinks
from integrity.policy import Policy
from integrity.times import parse_since
from integrity.trust import TrustError

if TYPE_CHECKING:
    from integrity.store import Store


def prune(store: Store, older_than: str) -> tuple[int, str]:
    """Remove closed events last seen longer ago than `older_than` (e.g. "90d"),
    leaving a chained checkpoint; returns (events removed, new head).

    Refuses (TrustError) while the chain is broken: pruning would destroy the
    evidence of the tampering.
    """
    report = store.ledger.check()
    if not report.ok:
        raise TrustError("event log hash chain is broken; refusing to prune evidence: "
                         + report.problems[0])
    return store.ledger.prune(parse_since(older_than))


def alert_test(policy: Policy) -> list[tuple[str, str | None]]:
    """Send a test alert straight to every sink of the policy: (sink name, None when
    it was taken, else the reason it failed)."""
    return probe_sinks(build_sinks(policy), socket.gethostname())
