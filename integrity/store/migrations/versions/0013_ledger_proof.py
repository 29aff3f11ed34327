"""ledger proof: pruned chain rows keep what proves their digest, in chain order

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03

0008 archived only the digests of pruned rows, and any digest written into that
table passed for an ancestor of the chain: a database rolled back past an incident
met a kept head again with one INSERT. Rows archived from now on carry their place
in the chain, their predecessor and the digest of their content (or, for rows
chained before this revision, the content), so an ancestor is one the rows hash to.
The digests 0008 archived stay, and prove nothing.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_archive") as batch:
        batch.add_column(sa.Column("seq", sa.Integer))
        batch.add_column(sa.Column("kind", sa.String(16)))
        batch.add_column(sa.Column("ref", sa.Integer))
        batch.add_column(sa.Column("prev", sa.String(64)))
        batch.add_column(sa.Column("content_digest", sa.LargeBinary))
        batch.add_column(sa.Column("content", sa.Text))
        batch.create_index("ix_ledger_archive_seq", ["seq"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("ledger_archive") as batch:
        batch.drop_index("ix_ledger_archive_seq")
        for name in ("content", "content_digest", "prev", "ref", "kind", "seq"):
            batch.drop_column(name)
