"""usage: maintenance windows, access records, expected events, overflow counts

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "maintenance_window",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("start", sa.DateTime, nullable=False),
        sa.Column("end", sa.DateTime, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("paths", sa.Text, nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("sudo_user", sa.String(128)),
        sa.Column("cancelled", sa.DateTime),
        sa.Column("cancelled_by", sa.String(128)),
        sa.PrimaryKeyConstraint("id", name="pk_maintenance_window"),
    )
    op.create_table(
        "access",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("hour", sa.DateTime, nullable=False),
        sa.Column("exe", sa.Text),
        sa.Column("uid", sa.BigInteger),
        sa.Column("rule", sa.Text),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("first_seen", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("actor", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_access"),
    )
    op.create_index("ix_access_hour_key", "access", ["hour", "key"])
    op.create_index("ix_ledger_kind_ref", "ledger", ["kind", "ref"])
    # Plain ADD COLUMN (no batch copy of the event table: ids and rows stay as the
    # ledger chained them).
    op.add_column("event", sa.Column("window_id", sa.Integer))
    op.add_column("watcher", sa.Column("overflows", sa.Integer, nullable=False,
                                       server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("watcher") as batch:
        batch.drop_column("overflows")
    with op.batch_alter_table("event") as batch:
        batch.drop_column("window_id")
    op.drop_index("ix_ledger_kind_ref", "ledger")
    op.drop_index("ix_access_hour_key", "access")
    op.drop_table("access")
    op.drop_table("maintenance_window")
