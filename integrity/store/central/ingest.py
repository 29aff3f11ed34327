"""A host's side of the central database: what one push reads and inserts.

A host's role may only insert its own rows and read its own open requests; every
INSERT here is judged centrally by the trigger functions of the schema (a record
sent again is dropped, one that contradicts the chain held forks the host). Rows
are many where a push carries a baseline or a backlog of chain records: those go
through COPY into a temporary table, then one INSERT ... SELECT (COPY cannot write a
table with row-level security directly).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from integrity.errors import DatabaseError
from integrity.store.central.engine import copy_rows
from integrity.store.spool import ENTRY_FIELDS, Record

_LEDGER_COLUMNS = ("seq", "time", "kind", "ref", "content", "prev", "digest")
_LEDGER_TEMP = ("CREATE TEMP TABLE push_ledger (seq bigint, time timestamp, kind text, "
                "ref bigint, content text, prev text, digest text) ON COMMIT DROP")
ENTRY_COLUMNS = ("key", "removed", *ENTRY_FIELDS)
_ENTRY_TEMP = ("CREATE TEMP TABLE push_entry (key bytea, removed boolean, type text, "
               "content bytea, size bigint, mode int, uid bigint, gid bigint, inode bigint, "
               "nlink bigint, mtime bigint, ctime bigint, link bytea, xattrs bytea, "
               "dev bigint, package text, kept bytea) ON COMMIT DROP")
_BASELINE_COLUMNS = ("push", "kind", "baseline_id", "generation", "activated", "root",
                     "signature", "signer", "seal_version", "policy_digest", "entries",
                     "changes", "ledger_seq", "host_time")


class HostSession:
    """One connection of a pushing host, as its own login role."""

    def __init__(self, conn: sa.Connection, name: str, host: str) -> None:
        self.conn = conn
        self.name = name
        self.host = host
        self.host_id = 0

    def whoami(self) -> int:
        """This role's host id; DatabaseError when the role is not an enrolled host."""
        found = self.conn.execute(sa.text("SELECT integrity.current_host()")).scalar()
        self.conn.commit()
        if found is None:
            raise DatabaseError(f"central database {self.name}: role {self.host!r} is not "
                                f"an enrolled host (run 'integrity fleet enroll "
                                f"{self.host}' there)")
        self.host_id = int(found)
        return self.host_id

    def requests(self) -> list[dict[str, Any]]:
        """The open approval requests addressed to this host (RLS shows no others)."""
        rows = self.conn.execute(sa.text(
            'SELECT id, kind, paths, "all", reason, requested_by FROM integrity.request '
            "ORDER BY id")).mappings().all()
        self.conn.commit()
        return [dict(row) for row in rows]

    def send_ledger(self, rows: Sequence[Record]) -> None:
        """Chain records, in order, in one transaction."""
        with self.conn.begin():
            self._ledger(rows)

    def _ledger(self, rows: Sequence[Record]) -> None:
        self.conn.exec_driver_sql(_LEDGER_TEMP)
        copy_rows(self.conn, "push_ledger", _LEDGER_COLUMNS, rows)
        self.conn.execute(sa.text(
            "INSERT INTO integrity.ledger (host_id, seq, time, kind, ref, content, prev, "
            "digest) SELECT :h, seq, time, kind, ref, content, prev, digest FROM "
            "push_ledger ORDER BY seq ON CONFLICT DO NOTHING"), {"h": self.host_id})

    def send_baseline(self, values: dict[str, Any], ledger: Sequence[Record],
                      entries: Iterable[Sequence[Any]]) -> bool:
        """One baseline push (its `_BASELINE_COLUMNS` values) with the chain records up
        to the point it was read at and its entries, in one transaction; False when
        the central side did not take it (held already, or refused: see its flags)."""
        with self.conn.begin():
            if ledger:
                self._ledger(ledger)
            names = ", ".join(_BASELINE_COLUMNS)
            binds = ", ".join(f":{name}" for name in _BASELINE_COLUMNS)
            accepted = self.conn.execute(sa.text(
                f"INSERT INTO integrity.baseline (host_id, {names}) VALUES (:h, {binds})"),
                {"h": self.host_id, **{name: values[name] for name in _BASELINE_COLUMNS}}
            ).rowcount == 1
            if accepted:
                self.conn.exec_driver_sql(_ENTRY_TEMP)
                copy_rows(self.conn, "push_entry", ENTRY_COLUMNS, entries)
                columns = ", ".join(ENTRY_COLUMNS)
                self.conn.execute(sa.text(
                    f"INSERT INTO integrity.entry (host_id, push, {columns}) "
                    f"SELECT :h, :push, {columns} FROM push_entry"),
                    {"h": self.host_id, "push": values["push"]})
        return accepted

    def report(self, request_id: int, time: Any, outcome: str, approval_id: int | None,
               root: str | None, detail: str | None) -> None:
        """The outcome of one request (taken once; a repeat is dropped centrally)."""
        with self.conn.begin():
            self.conn.execute(sa.text(
                "INSERT INTO integrity.request_result (host_id, request_id, time, outcome, "
                "approval_id, root, detail) VALUES (:h, :r, :t, :o, :a, :root, :d)"),
                {"h": self.host_id, "r": request_id, "t": time, "o": outcome,
                 "a": approval_id, "root": root, "d": detail})

    def heartbeat(self, time: Any, interval: int, group: str, version: str,
                  watcher: dict[str, Any], head: tuple[int, str], unpushed: int,
                  seal: tuple[str | None, int | None]) -> None:
        """Liveness, the watcher's state, the newest chain record this host holds and
        the seal (root, generation) of its baseline as the backlog was counted."""
        with self.conn.begin():
            self.conn.execute(sa.text(
                "INSERT INTO integrity.heartbeat (host_id, time, interval_s, grp, version, "
                "watcher, head_seq, head_digest, unpushed, root, generation) VALUES "
                "(:h, :t, :i, :g, :v, CAST(:w AS jsonb), :seq, :digest, :owed, :root, "
                ":generation)"),
                {"h": self.host_id, "t": time, "i": interval, "g": group, "v": version,
                 "w": json.dumps(watcher), "seq": head[0], "digest": head[1],
                 "owed": unpushed, "root": seal[0], "generation": seal[1]})
