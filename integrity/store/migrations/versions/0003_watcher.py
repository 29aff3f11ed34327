"""watcher heartbeat

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "watcher",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started", sa.DateTime, nullable=False),
        sa.Column("heartbeat", sa.DateTime, nullable=False),
        sa.Column("interval", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("watches", sa.Integer, nullable=False),
        sa.Column("unwatched", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_watcher"),
    )


def downgrade() -> None:
    op.drop_table("watcher")
