"""The store: the only code that speaks SQL.

`Store` opens one database and hands out a typed view per table family: baselines
and their entries, events, approvals, the ledger (hash chain), the alert outbox,
runs with watcher heartbeats, maintenance windows, access records, the counts
behind `events --stats` and metrics, and a fleet host's spool. Nothing outside this
package imports SQLAlchemy; the statements are portable Core, so SQLite and PostgreSQL
run the same code. `central/` is the fleet's PostgreSQL database, a schema of its own.
"""

from __future__ import annotations

from integrity.store.access import Access
from integrity.store.approvals import Approvals
from integrity.store.baseline import BaselineInfo, Baselines
from integrity.store.contents import Contents
from integrity.store.engine import BUSY_TIMEOUT, Database
from integrity.store.events import Events
from integrity.store.ledger import Ledger
from integrity.store.outbox import Outbox
from integrity.store.runs import Runs
from integrity.store.spool import Spool
from integrity.store.usage import Usage
from integrity.store.windows import Windows

__all__ = ["Store", "BaselineInfo"]


class Store(Database):
    """An open integrity database, with one accessor per table family."""

    def __init__(self, url: str, *, must_exist: bool = False,
                 check_schema: bool = True, busy_timeout: float = BUSY_TIMEOUT,
                 baseline_wait: float = 0.0) -> None:
        super().__init__(url, must_exist=must_exist, check_schema=check_schema,
                         busy_timeout=busy_timeout, baseline_wait=baseline_wait)
        self.baselines = Baselines(self)
        self.events = Events(self)
        self.approvals = Approvals(self)
        self.ledger = Ledger(self)
        self.outbox = Outbox(self)
        self.runs = Runs(self)
        self.contents = Contents(self)
        self.windows = Windows(self)
        self.access = Access(self)
        self.usage = Usage(self)
        self.spool = Spool(self)
