"""Approvals: the only writes to a baseline after init, with who, when, why and evidence.

An approval checks the baseline's seal over the rows as they are inside its own write
transaction (a row changed behind integrity's back is never re-rooted or re-signed),
writes the current state of its paths, seals the result as the next generation and
closes the events it settles: one transaction, so the baseline never holds half an
approval and never a root that does not match its rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from integrity.errors import BaselineError
from integrity.paths import to_key
from integrity.record import FileRecord
from integrity.store import schema
from integrity.store.baseline import (BaselineInfo, Entries, Owner, Sealed, active_in,
                                      entries_in, sweep_contents)
from integrity.store.contents import Text, put_in
from integrity.store.engine import Database, chunks, inserted_id
from integrity.store.events import APPROVED, OPEN, UNEXPLAINED
from integrity.store.ledger import journal
from integrity.trust import SEAL_VERSION
from integrity.times import utcnow

#: Raises (TrustError) when the stored rows do not match the baseline's seal.
SealCheck = Callable[[BaselineInfo, Entries], None]
#: (entries, generation, activated, sealed policy) -> (root, signature, signer)
Reseal = Callable[[Entries, int, dt.datetime, str], Sealed]


class Approvals:
    """The approval table, and the baseline writes it makes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def apply(self, *, upserts: Sequence[FileRecord], deletes: Sequence[bytes],
              events: Mapping[int, str | None], user: str, sudo_user: str | None,
              reason: str | None, mode: str, check: SealCheck, seal: Reseal,
              policy: str | None = None, classification: str = UNEXPLAINED,
              owner: Owner | None = None,
              kept: Mapping[bytes, Text] | None = None) -> tuple[int, BaselineInfo]:
        """Write paths' current state into the baseline in force and close their events.

        `events` maps event id to the evidence it rested on (None for a person's
        word); `policy`, when given, is the sealed policy the new generation takes;
        `kept` maps upserted paths to the text kept for them, stored in the same
        transaction (texts no entry names any more are swept).
        Returns (approval id, the baseline as sealed now).
        """
        kept = kept or {}
        b, en, e, a = schema.baseline, schema.entry, schema.event, schema.approval
        with self.db.writer() as conn, conn.begin():
            info = active_in(conn)
            if info is None:
                raise BaselineError(f"{self.db.name()}: no baseline yet: run "
                                    "'integrity init'")
            check(info, entries_in(conn, info.id))
            keys = [to_key(rec.path) for rec in upserts] + [to_key(p) for p in deletes]
            for chunk in chunks(keys):
                conn.execute(en.delete().where(en.c.baseline_id == info.id,
                                               en.c.key.in_(chunk)))
            if upserts:
                put_in(conn, kept.values())
                conn.execute(en.insert(), [
                    {"baseline_id": info.id, "key": to_key(rec.path),
                     **{name: getattr(rec, name) for name in schema.ENTRY_COLUMNS[1:]},
                     "package": owner(rec.path) if owner else None,
                     "kept": kept[rec.path][0] if rec.path in kept else None}
                    for rec in upserts])
            sweep_contents(conn)
            count = conn.execute(sa.select(sa.func.count()).select_from(en).where(
                en.c.baseline_id == info.id)).scalar_one()
            sealed_policy = policy if policy is not None else info.policy
            if sealed_policy is None:
                raise BaselineError("the baseline's seal predates sealed policies: "
                                    "accept the policy with 'integrity approve --policy'")
            generation = info.generation + 1
            root, signature, signer = seal(entries_in(conn, info.id), generation,
                                           info.created, sealed_policy)
            conn.execute(b.update().where(b.c.id == info.id).values(
                entries=count, root=root, signature=signature, signer=signer,
                generation=generation, policy=sealed_policy, seal_version=SEAL_VERSION))
            approval_id = inserted_id(conn.execute(a.insert().values(
                time=utcnow(), user=user, sudo_user=sudo_user, reason=reason, mode=mode,
                baseline_id=info.id, entries=len(upserts) + len(deletes),
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
            journal(conn, "baseline", [info.id])
            after = active_in(conn)
        assert after is not None
        return approval_id, after
