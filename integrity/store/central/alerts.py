"""The monitor's alerts in the central database: raised once (by key), owed per sink.

Several monitors may run: the alerts one of them is delivering are locked, and the
others skip them (FOR UPDATE SKIP LOCKED) rather than send them twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from integrity.store.central import schema
from integrity.store.central.admin import check_schema
from integrity.store.central.reads import critical_since, hosts_in

if TYPE_CHECKING:
    from integrity.store.central import Central


@dataclass(frozen=True)
class Owed:
    """An alert some sinks (by name) have not taken yet."""

    id: int
    event: dict[str, Any]
    pending: list[str]


class Raising:
    """One transaction of a monitor round: what is known, and the new alerts."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    def known(self) -> set[str]:
        """Keys of every alert raised so far."""
        a = schema.monitor_alert
        return set(self.conn.execute(sa.select(a.c.key)).scalars())

    def host_ids(self) -> dict[str, int]:
        h = schema.host
        return {name: int(hid) for name, hid in self.conn.execute(sa.select(h.c.name, h.c.id))}

    def hosts(self) -> tuple[dt.datetime, list[dict[str, Any]]]:
        return hosts_in(self.conn)

    def critical(self, age: dt.timedelta) -> list[dict[str, Any]]:
        return critical_since(self.conn, age)

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record alerts: key, kind, host_id, event (JSON) and pending (sink names)."""
        if rows:
            self.conn.execute(insert(schema.monitor_alert)
                              .on_conflict_do_nothing(index_elements=["key"]), list(rows))


class Delivering:
    """Owed alerts, locked for this monitor until the transaction ends."""

    def __init__(self, conn: sa.Connection, owed: list[Owed]) -> None:
        self.conn = conn
        self.owed = owed

    def settle(self, alert_id: int, pending: list[str], error: str | None) -> None:
        """What is still owed of one alert, and why the last try failed."""
        a = schema.monitor_alert
        values: dict[str, Any] = {"pending": pending}
        if error is not None:
            values.update(attempts=a.c.attempts + 1, last_error=error[:2000])
        self.conn.execute(a.update().where(a.c.id == alert_id).values(**values))


class Alerts:
    """The monitor_alert table."""

    def __init__(self, central: Central) -> None:
        self.central = central

    @contextlib.contextmanager
    def raising(self) -> Iterator[Raising]:
        with self.central.errors(), self.central.engine.begin() as conn:
            check_schema(conn, self.central.name())
            yield Raising(conn)

    @contextlib.contextmanager
    def owed(self, limit: int = 500) -> Iterator[Delivering]:
        a = schema.monitor_alert
        with self.central.errors(), self.central.engine.begin() as conn:
            rows = conn.execute(sa.select(a.c.id, a.c.event, a.c.pending)
                                .where(sa.func.cardinality(a.c.pending) > 0)
                                .order_by(a.c.id).limit(limit)
                                .with_for_update(skip_locked=True)).all()
            yield Delivering(conn, [Owed(int(r.id), dict(r.event), list(r.pending))
                                    for r in rows])
