"""Admin-side reads of the central database: every host's state, events across hosts,
and the entries drift compares.

Rows come back as plain dicts; what they mean (silent, healthy, the majority of a
group) is decided by the use cases in integrity/fleet/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from integrity.store.central import schema
from integrity.store.central.admin import check_schema, host_id

if TYPE_CHECKING:
    from integrity.store.central import Central

#: What drift compares of an entry, in this order.
VARIANT = ("type", "content", "link", "mode")

_ODD_KEYS = """
SELECT key_hash
  FROM integrity.entry
 WHERE {hosts} AND superseded IS NULL {range}
 GROUP BY key_hash
HAVING count(*) < :total OR min(variant) <> max(variant)
"""

_HOLDERS = """
SELECT e.key, h.name, e.type, e.content, e.link, e.mode
  FROM integrity.entry e JOIN integrity.host h ON h.id = e.host_id
 WHERE e.host_id = ANY(CAST(:hosts AS int[])) AND e.superseded IS NULL
   AND e.key_hash = ANY(CAST(:hashes AS bigint[]))
"""


def hosts_in(conn: sa.Connection) -> tuple[dt.datetime, list[dict[str, Any]]]:
    """(the server's now, one row per enrolled host by name): its host and host_state
    columns, `signature` (of the baseline push held), `opened` (open events by
    severity), `flags` (open ones) and `pending` (approval requests it has not
    answered)."""
    h, s, e, f, r, b = (schema.host, schema.host_state, schema.event, schema.flag,
                        schema.request, schema.baseline)
    now = conn.execute(sa.select(sa.func.now())).scalar_one()
    held = b.c.host_id == s.c.host_id, b.c.epoch == s.c.epoch, b.c.push == s.c.push
    rows = [dict(row) for row in conn.execute(
        sa.select(h, s, b.c.signature).join(s, s.c.host_id == h.c.id)
        .outerjoin(b, sa.and_(*held)).order_by(h.c.name)).mappings()]
    opened: dict[int, dict[str, int]] = defaultdict(dict)
    for hid, severity, count in conn.execute(
            sa.select(e.c.host_id, e.c.severity, sa.func.count())
            .where(e.c.status == "open").group_by(e.c.host_id, e.c.severity)):
        opened[hid][severity] = count
    flags: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for flag in conn.execute(sa.select(f.c.id, f.c.host_id, f.c.kind, f.c.detail, f.c.raised)
                             .where(f.c.resolved.is_(None)).order_by(f.c.id)).mappings():
        flags[flag["host_id"]].append(dict(flag))
    pending = {hid: count for hid, count in conn.execute(
        sa.select(r.c.host_id, sa.func.count()).where(
            r.c.answered.is_(None), r.c.expires > sa.func.now()).group_by(r.c.host_id))}
    for row in rows:
        row.update(opened=opened.get(row["id"], {}), flags=flags.get(row["id"], []),
                   pending=pending.get(row["id"], 0))
    return now, rows


def critical_since(conn: sa.Connection, age: dt.timedelta) -> list[dict[str, Any]]:
    """Critical events that arrived within `age`, with their host's name, oldest first."""
    e, h = schema.event, schema.host
    return [dict(row) for row in conn.execute(
        sa.select(e, h.c.name).join(h, h.c.id == e.c.host_id).where(
            e.c.severity == "critical", e.c.received > sa.func.now() - age)
        .order_by(e.c.uid)).mappings()]


class Reads:
    """What the admin commands read."""

    def __init__(self, central: Central) -> None:
        self.central = central

    def hosts(self) -> tuple[dt.datetime, list[dict[str, Any]]]:
        """Every enrolled host's state (see `hosts_in`)."""
        with self.central.errors(), self.central.engine.connect() as conn:
            check_schema(conn, self.central.name())
            return hosts_in(conn)

    def events(self, *, host: str | None = None, open_only: bool = False,
               since: dt.datetime | None = None, limit: int | None = None
               ) -> list[dict[str, Any]]:
        """Event rows across hosts, oldest first, each with its host's `name`."""
        e, h = schema.event, schema.host
        query = sa.select(e, h.c.name).join(h, h.c.id == e.c.host_id)
        with self.central.errors(), self.central.engine.connect() as conn:
            check_schema(conn, self.central.name())
            if host is not None:
                query = query.where(e.c.host_id == host_id(conn, host))
            if open_only:
                query = query.where(e.c.status == "open")
            if since is not None:
                query = query.where(e.c.last_seen >= since)
            query = query.order_by(e.c.first_seen, h.c.name, e.c.id)
            if limit is not None:
                query = query.limit(limit)
            return [dict(row) for row in conn.execute(query).mappings()]

    @contextlib.contextmanager
    def drift(self) -> Iterator[DriftReader]:
        """One read transaction for comparing groups' current entries."""
        with self.central.errors(), self.central.engine.connect() as conn, conn.begin():
            check_schema(conn, self.central.name())
            # One statement reads a group's 20M index entries: room to hash or sort
            # where the planner prefers that; no JIT (its compile time is most of a
            # small query).
            conn.execute(sa.text("SET LOCAL work_mem = '256MB'"))
            conn.execute(sa.text("SET LOCAL jit = off"))
            yield DriftReader(conn)


class DriftReader:
    """The groups and the entries of paths on which a group's hosts are not unanimous."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    def groups(self) -> dict[str, dict[int, str]]:
        """group -> {host id: name} of hosts with a baseline: the pinned group, else
        the one the host reports."""
        found: dict[str, dict[int, str]] = defaultdict(dict)
        for hid, name, group in self.conn.execute(sa.text(
                "SELECT h.id, h.name, coalesce(h.grp, s.reported_group, 'default') "
                "FROM integrity.host h JOIN integrity.host_state s ON s.host_id = h.id "
                "WHERE s.push IS NOT NULL")):
            found[group][hid] = name
        return dict(found)

    def odd_paths(self, hosts: Sequence[int], within: tuple[bytes, bytes] | None
                  ) -> dict[bytes, dict[str, tuple[Any, ...]]]:
        """key -> {host name: (type, content, link, mode)} for every path not all of
        `hosts` hold alike (within a key range, if given).

        One pass over the group's current entries, through the narrow covering index
        of (path hash, host, variant hash), finds the few paths that are not unanimous;
        only for those are the hosts' entries read. (A 64-bit variant collision could
        hide a difference a host could misreport anyway: hosts report their own state.)
        """
        ids = sorted(hosts)
        params: dict[str, Any] = {"hosts": ids, "total": len(ids)}
        # The whole group: through the narrow drift index, never the (host, key) one,
        # which would make the server read every host's rows from the table (hence
        # `+ 0`, which no index can serve). Within a range: through (host, key).
        where_hosts, where_range = "host_id + 0 = ANY(CAST(:hosts AS int[]))", ""
        if within is not None:
            params["low"], params["high"] = within
            where_hosts = "host_id = ANY(CAST(:hosts AS int[]))"
            where_range = "AND key >= :low AND key < :high"
        hashes = list(self.conn.execute(sa.text(_ODD_KEYS.format(
            hosts=where_hosts, range=where_range)), params).scalars())
        held: dict[bytes, dict[str, tuple[Any, ...]]] = defaultdict(dict)
        for start in range(0, len(hashes), 1000):
            for key, host, *variant in self.conn.execute(sa.text(_HOLDERS), {
                    "hosts": ids, "hashes": hashes[start:start + 1000]}):
                if within is None or within[0] <= key < within[1]:
                    held[bytes(key)][host] = tuple(variant)
        return dict(held)
