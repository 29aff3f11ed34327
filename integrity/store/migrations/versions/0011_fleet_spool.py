"""fleet spool: what a fleet host still owes the central database

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01

Tables only: the triggers that fill them are created when a host first pushes
(integrity/store/spool.py), so hosts outside a fleet pay nothing on their writes.
Sequence numbers are AUTOINCREMENT: never reused, even after the rows were pushed and
deleted, which is what lets the central side key them (host, sequence).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet_state",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("enabled", sa.DateTime, nullable=False),
        sa.Column("push", sa.Integer),
        sa.Column("baseline_id", sa.Integer),
        sa.Column("generation", sa.Integer),
        sa.Column("root", sa.String(64)),
        sa.Column("last_digest", sa.String(64)),
        sa.PrimaryKeyConstraint("id", name="pk_fleet_state"),
    )
    op.create_table(
        "fleet_ledger",
        sa.Column("seq", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("time", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.Integer, nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("prev", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_fleet_ledger"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "fleet_entry",
        sa.Column("seq", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("baseline_id", sa.Integer, nullable=False),
        sa.Column("key", sa.LargeBinary),
        sa.PrimaryKeyConstraint("seq", name="pk_fleet_entry"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "fleet_request",
        sa.Column("id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("received", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16)),
        sa.Column("approval_id", sa.Integer),
        sa.Column("root", sa.String(64)),
        sa.Column("detail", sa.Text),
        sa.Column("reported", sa.DateTime),
        sa.PrimaryKeyConstraint("id", name="pk_fleet_request"),
    )


def downgrade() -> None:
    for name in ("fleet_ledger_spool", "fleet_baseline_spool", "fleet_entry_insert",
                 "fleet_entry_delete", "fleet_entry_update"):
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    for table in ("fleet_request", "fleet_entry", "fleet_ledger", "fleet_state"):
        op.drop_table(table)
