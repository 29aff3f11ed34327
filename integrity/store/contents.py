"""The contents table: kept texts by digest, compressed, each checked against its
digest when read back (a row edited in the database is refused, never shown or
restored)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import blake3
import sqlalchemy as sa

from integrity.store import schema
from integrity.store.engine import Database, chunks
from integrity.trust import TrustError

#: (digest of the text, the text, whether values were redacted)
Text = tuple[bytes, bytes, bool]


class ContentTampered(TrustError):
    """A kept text no longer matches its digest."""


def put_in(conn: sa.Connection, texts: Iterable[Text]) -> None:
    """Store texts not stored yet (deduplicated by digest), inside a transaction."""
    c = schema.content
    wanted = {digest: (text, redacted) for digest, text, redacted in texts}
    for chunk in chunks(list(wanted)):
        for present in conn.execute(sa.select(c.c.digest).where(c.c.digest.in_(chunk))
                                    ).scalars():
            wanted.pop(present, None)
    if wanted:
        conn.execute(c.insert(), [
            {"digest": digest, "data": zlib.compress(text, 6), "size": len(text),
             "redacted": int(redacted)} for digest, (text, redacted) in wanted.items()])


class Contents:
    """Kept texts of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, texts: Iterable[Text]) -> None:
        """Store texts ahead of the baseline that will name them (swept if it never does)."""
        with self.db.writer() as conn, conn.begin():
            put_in(conn, texts)

    def get(self, digest: bytes) -> tuple[bytes, bool] | None:
        """(text, redacted) for a digest, or None; ContentTampered when the stored
        text does not hash to it."""
        c = schema.content
        with self.db.reader() as conn:
            row = conn.execute(sa.select(c.c.data, c.c.redacted)
                               .where(c.c.digest == digest)).first()
        if row is None:
            return None
        try:
            text = zlib.decompress(row[0])
        except zlib.error:
            text = b""
        if blake3.blake3(text).digest() != digest:
            raise ContentTampered(f"kept text {digest.hex()[:16]}… does not match its "
                                  "digest: the database was changed outside integrity "
                                  "(tampering)")
        return text, bool(row[1])
