"""content: kept texts of small files (by digest), entry.kept naming one, event.diff

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "content",
        sa.Column("digest", sa.LargeBinary, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("redacted", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_content"),
    )
    with op.batch_alter_table("entry") as batch:
        batch.add_column(sa.Column("kept", sa.LargeBinary))
    with op.batch_alter_table("event") as batch:
        batch.add_column(sa.Column("diff", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("event") as batch:
        batch.drop_column("diff")
    with op.batch_alter_table("entry") as batch:
        batch.drop_column("kept")
    op.drop_table("content")
