"""entry without rowid (SQLite): every key stored once, in the primary key's B-tree

A rowid table kept each key twice, in its row and in the (baseline_id, key) index,
which made a /usr baseline cost ~255 bytes per entry instead of ~160 (issue 13).
PostgreSQL keeps rows in a heap whatever we ask: nothing to do there. The columns are
those of 0010 (package from 0004, kept from 0009), in the same order. Triggers on the
table (the fleet spool's, store/spool.py) go with the old table and are made again
on the new one: a dropped spool trigger would read as tampering at the next push.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""
from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_COLUMNS = ("baseline_id, key, type, content, size, mode, uid, gid, inode, nlink, "
            "mtime, ctime, link, xattrs, dev, package, kept")


def _rebuild(without_rowid: bool) -> None:
    triggers = [sql for (sql,) in op.get_bind().exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'entry' "
        "AND sql IS NOT NULL ORDER BY name")]
    op.execute(f"""
        CREATE TABLE entry_new (
            baseline_id INTEGER NOT NULL,
            key BLOB NOT NULL,
            type VARCHAR(8) NOT NULL,
            content BLOB,
            size BIGINT NOT NULL,
            mode INTEGER NOT NULL,
            uid BIGINT NOT NULL,
            gid BIGINT NOT NULL,
            inode BIGINT NOT NULL,
            nlink BIGINT NOT NULL,
            mtime BIGINT NOT NULL,
            ctime BIGINT NOT NULL,
            link BLOB,
            xattrs BLOB,
            dev BIGINT NOT NULL,
            package VARCHAR(255),
            kept BLOB,
            CONSTRAINT pk_entry PRIMARY KEY (baseline_id, key),
            CONSTRAINT fk_entry_baseline_id_baseline FOREIGN KEY(baseline_id)
                REFERENCES baseline (id) ON DELETE CASCADE
        ){" WITHOUT ROWID" if without_rowid else ""}""")
    op.execute(f"INSERT INTO entry_new ({_COLUMNS}) SELECT {_COLUMNS} FROM entry "
               "ORDER BY baseline_id, key")
    op.execute("DROP TABLE entry")
    op.execute("ALTER TABLE entry_new RENAME TO entry")
    for sql in triggers:
        op.execute(sql)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(without_rowid=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(without_rowid=False)
