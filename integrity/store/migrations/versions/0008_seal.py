"""seal: generation, sealed policy, signer and seal version on baselines; an archive of
pruned chain digests

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("baseline") as batch:
        batch.add_column(sa.Column("generation", sa.Integer, nullable=False,
                                   server_default="1"))
        batch.add_column(sa.Column("policy", sa.Text))
        batch.add_column(sa.Column("signer", sa.LargeBinary))
        # Baselines written before this revision carry a version 1 root.
        batch.add_column(sa.Column("seal_version", sa.Integer, nullable=False,
                                   server_default="1"))
    op.create_table(
        "ledger_archive",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_ledger_archive"),
    )
    # The chain now covers owed alerts and the active baseline: enter what exists.
    from integrity.store.ledger import journal

    bind = op.get_bind()
    for kind, query in (("baseline", "SELECT id FROM baseline WHERE state = 'active'"),
                        ("outbox", "SELECT id FROM outbox")):
        journal(bind, kind, [row[0] for row in bind.execute(sa.text(query))])


def downgrade() -> None:
    op.drop_table("ledger_archive")
    with op.batch_alter_table("baseline") as batch:
        batch.drop_column("seal_version")
        batch.drop_column("signer")
        batch.drop_column("policy")
        batch.drop_column("generation")
