"""initial schema: baseline generations, entries, runs

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "baseline",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("activated", sa.DateTime),
        sa.Column("policy_source", sa.Text, nullable=False),
        sa.Column("policy_digest", sa.String(64), nullable=False),
        sa.Column("entries", sa.Integer, nullable=False),
        sa.Column("root", sa.String(64)),
        sa.Column("actor", sa.String(128)),
        sa.PrimaryKeyConstraint("id", name="pk_baseline"),
    )
    op.create_table(
        "entry",
        sa.Column("baseline_id", sa.Integer, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("content", sa.LargeBinary),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mode", sa.Integer, nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("gid", sa.BigInteger, nullable=False),
        sa.Column("inode", sa.BigInteger, nullable=False),
        sa.Column("nlink", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.BigInteger, nullable=False),
        sa.Column("ctime", sa.BigInteger, nullable=False),
        sa.Column("link", sa.LargeBinary),
        sa.Column("xattrs", sa.LargeBinary),
        sa.Column("dev", sa.BigInteger, nullable=False),
        sa.ForeignKeyConstraint(["baseline_id"], ["baseline.id"], ondelete="CASCADE",
                                name="fk_entry_baseline_id_baseline"),
        sa.PrimaryKeyConstraint("baseline_id", "key", name="pk_entry"),
    )
    op.create_table(
        "run",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("command", sa.String(16), nullable=False),
        sa.Column("started", sa.DateTime, nullable=False),
        sa.Column("finished", sa.DateTime),
        sa.Column("baseline_id", sa.Integer),
        sa.Column("paths", sa.Text),
        sa.Column("fast", sa.Integer, nullable=False),
        sa.Column("scanned", sa.Integer, nullable=False),
        sa.Column("added", sa.Integer, nullable=False),
        sa.Column("removed", sa.Integer, nullable=False),
        sa.Column("modified", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.PrimaryKeyConstraint("id", name="pk_run"),
    )
    op.create_index("ix_run_started", "run", ["started"])


def downgrade() -> None:
    op.drop_index("ix_run_started", "run")
    op.drop_table("run")
    op.drop_table("entry")
    op.drop_table("baseline")
