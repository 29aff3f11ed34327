"""events and approvals

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approval",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("time", sa.DateTime, nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("sudo_user", sa.String(128)),
        sa.Column("reason", sa.Text),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("baseline_id", sa.Integer, nullable=False),
        sa.Column("entries", sa.Integer, nullable=False),
        sa.Column("events", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_approval"),
    )
    op.create_table(
        "event",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("changed", sa.Text, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("rule", sa.Text),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("classification", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("first_seen", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("old", sa.Text),
        sa.Column("new", sa.Text),
        sa.Column("actor", sa.Text),
        sa.Column("approval_id", sa.Integer),
        sa.Column("evidence", sa.String(32)),
        sa.PrimaryKeyConstraint("id", name="pk_event"),
        sa.ForeignKeyConstraint(["approval_id"], ["approval.id"],
                                name="fk_event_approval_id_approval"),
    )
    op.create_index("ix_event_status_key", "event", ["status", "key"])
    op.create_index("ix_event_last_seen", "event", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_event_last_seen", "event")
    op.drop_index("ix_event_status_key", "event")
    op.drop_table("event")
    op.drop_table("approval")
