"""The contents table: kept texts by digest, compressed, each checked against its
digest when read back (a row edited in the database is refused, never shown or
restored)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

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


class PendingTexts:
    """Kept texts a new generation's rows name, handed to its transaction a few
    hundred at a time (a text may be max_diff_size: a whole batch of rows' worth
    could be gigabytes)."""

    #: Texts held before they are handed over.
    LIMIT = 256

    def __init__(self) -> None:
        self.texts: dict[bytes, Text] = {}
        #: Where texts go; set by the generation's writer (store.baseline).
        self.sink: Callable[[list[Text]], None] | None = None

    def add(self, digest: bytes, text: bytes, redacted: bool) -> None:
        """Hold one text (deduplicated by digest); hand them over past LIMIT."""
        self.texts[digest] = (digest, text, redacted)
        if len(self.texts) >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        """Hand every held text to the sink, if there is one yet."""
        if self.texts and self.sink is not None:
            self.sink(list(self.texts.values()))
            self.texts = {}


class Contents:
    """Kept texts of one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
