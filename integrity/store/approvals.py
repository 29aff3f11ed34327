"""Approvals: the only writes to a baseline after init, with who, when, why and evidence.

An approval writes the current state of its paths into the active baseline, seals the
result (root and signature, computed from the rows as this transaction leaves them)
and closes the events it settles: one transaction, so the baseline never holds half
an approval and never a root that does not match its rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from integrity.paths import to_key
from integrity.record import FileRecord
from integrity.store import schema
from integrity.store.baseline import Owner, Seal, entries_in
from integrity.store.engine import Database, chunks, inserted_id
from integrity.store.events import APPROVED, OPEN, UNEXPLAINED
from integrity.store.ledger import journal
from integrity.times import utcnow


class Approvals:
    """The approval table, and the baseline writes it makes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def apply(self, baseline_id: int, *, upserts: Sequence[FileRecord],
              deletes: Sequence[bytes], events: Mapping[int, str | None], user: str,
              sudo_user: str | None, reason: str | None, mode: str, seal: Seal,
              classification: str = UNEXPLAINED, owner: Owner | None = None,
              ) -> tuple[int, str]:
        """Write paths' current state into the baseline and close their events.

        `events` maps event id to the evidence it rested on (None for a person's
        word). Returns (approval id, the new root).
        """
        b, en, e, a = schema.baseline, schema.entry, schema.event, schema.approval
        with self.db.writer() as conn, conn.begin():
            keys = [to_key(rec.path) for rec in upserts] + [to_key(p) for p in deletes]
            for chunk in chunks(keys):
                conn.execute(en.delete().where(en.c.baseline_id == baseline_id,
                                               en.c.key.in_(chunk)))
            if upserts:
                conn.execute(en.insert(), [
                    {"baseline_id": baseline_id, "key": to_key(rec.path),
                     **{name: getattr(rec, name) for name in schema.ENTRY_COLUMNS[1:]},
                     "package": owner(rec.path) if owner else None}
                    for rec in upserts])
            count = conn.execute(sa.select(sa.func.count()).select_from(en).where(
                en.c.baseline_id == baseline_id)).scalar_one()
            root, signature = seal(entries_in(conn, baseline_id))
            conn.execute(b.update().where(b.c.id == baseline_id).values(
                entries=count, root=root, signature=signature))
            approval_id = inserted_id(conn.execute(a.insert().values(
                time=utcnow(), user=user, sudo_user=sudo_user, reason=reason, mode=mode,
                baseline_id=baseline_id, entries=len(upserts) + len(deletes),
                events=len(events))))
            for event_id, evidence in events.items():
                values: dict[str, Any] = {"status": APPROVED, "approval_id": approval_id,
                                          "evidence": evidence}
                if evidence is not None:
                    values["classification"] = classification
                conn.execute(e.update().where(e.c.id == event_id, e.c.status == OPEN)
                             .values(**values))
            journal(conn, "approval", [approval_id])
            journal(conn, "event", list(events))
        return approval_id, root
